// y = x @ W.T where W is stored as low-bit codes, a value table and per-group scales/offsets:
//   W[n, k] = table[code(n, k)] * scales[n, k / group_size] + offsets[n, k / group_size].
// Codes are packed little-endian within a byte (element k at bit (k % (8 / bits)) * bits).
//
// Design (chosen by measurement on an AVX2 EPYC, see bench/lowbit_kernel.py):
// - The weight is read once per call, in packed form; each thread owns a range of output rows.
// - M <= 3 (decode): rows of W are decoded straight into registers and multiplied with every row of
//   x; scales and offsets are applied once per group, not per weight.
// - Larger M: NR rows of a K-chunk are decoded into an L1 buffer and an MR x NR dot-product tile
//   runs over all rows of x, so decoding is amortized over M. The K-chunk loop is outermost so the
//   chunk of x being used stays in L2.
// - M > 128 (prefill): decode a bounded block of rows into scratch and let BLAS do the blocking.
// The SIMD code lives in target("avx2,fma,f16c") functions picked at run time; the scalar path
// computes the same thing on any other CPU (and is the only code compiled off x86).
// Only the ATen pieces used are included: <torch/extension.h> (pybind11 and the whole C++ API)
// triples the compile time. The op is registered with the dispatcher (torch.ops.lorax_quant).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define LUT_X86 1
#define AVX2_FN __attribute__((target("avx2,fma,f16c")))
#endif

namespace {

constexpr int NR = 4;               // weight rows per tile
constexpr int64_t KC = 512;         // K-chunk: MR x KC of x in L1, M x KC of x in L2
constexpr int64_t DIRECT_M = 3;     // up to this many rows of x, decode into registers
constexpr int64_t BLAS_M = 128;     // above this, decode into scratch + at::mm (1.5x faster at 256)

// How a code becomes a value. kLinear (table = a + b * code: GPTQ, AWQ, int8) and kFp8 (table =
// the float8_e4m3fn values) are computed arithmetically: AVX2 has no fast 256-entry lookup.
enum class Mode { kTable, kLinear, kFp8 };

struct Weights {
  const uint8_t* codes;  // [N, row_bytes]
  int64_t row_bytes;
  int bits;
  const float* table;    // [2**bits]
  const float* scales;   // [N, groups]
  const float* offsets;  // [N, groups] or nullptr
  int64_t groups, group_size, N, K;
  Mode mode;
  // table[c] = a + b * value(c): kLinear decodes c itself, kFp8 the float8 value / 256 (see Decoder);
  // a and b are folded into each group's scale and offset.
  float a, b;
  // 4 bits, kTable: byte j of every table entry, twice (one copy per 128-bit lane for vpshufb).
  alignas(32) uint8_t planes[4][32];

  void make_planes() {
    for (int c = 0; c < 16; ++c) {
      uint32_t v;
      std::memcpy(&v, table + c, 4);
      for (int j = 0; j < 4; ++j) planes[j][c] = planes[j][c + 16] = static_cast<uint8_t>(v >> (8 * j));
    }
  }

  void group_affine(int64_t n, int64_t g, float& s, float& o) const {
    s = scales[n * groups + g];
    o = (offsets ? offsets[n * groups + g] : 0.f) + a * s;
    s *= b;
  }
  int code(int64_t n, int64_t k) const {
    const int per_byte = 8 / bits;
    const uint8_t byte = codes[n * row_bytes + k / per_byte];
    return (byte >> ((k % per_byte) * bits)) & ((1 << bits) - 1);
  }
  // What the decoders produce for code c, before a, b, scale and offset.
  float value(int c) const {
    return mode == Mode::kLinear ? static_cast<float>(c) : mode == Mode::kFp8 ? table[c] / 256.f : table[c];
  }
};

// Float scratch aligned to a cache line: std::vector's 16-byte alignment makes every other 32-byte
// load split two lines, which measurably slows the inner loops.
class Floats {
 public:
  explicit Floats(int64_t n = 0) { reserve(n); }
  Floats(const Floats&) = delete;
  Floats& operator=(const Floats&) = delete;
  ~Floats() { std::free(p_); }
  void reserve(int64_t n) {
    if (n <= size_) return;
    std::free(p_);
    size_ = n;
    p_ = static_cast<float*>(std::aligned_alloc(64, (n * sizeof(float) + 63) / 64 * 64));
    TORCH_CHECK(p_ != nullptr, "out of memory for ", n, " floats of scratch");
  }
  float* data() { return p_; }

 private:
  float* p_ = nullptr;
  int64_t size_ = 0;
};

// The rows of x as the register-decoding kernels (M <= DIRECT_M) read them.
struct XInfo {
  const float* x;     // [M, K]
  const float* xp;    // [M, K], each aligned group of 8 as Decoder::wide orders it
  const float* xsum;  // [M, groups]: sums of x over each weight group (offsets are applied to them)
};

// float8_e4m3fn by bit manipulation: exponent and mantissa shifted into fp32 position with the
// exponent rebased (bias 7 -> 127), subnormals (exponent 0) as mantissa * 2^-9.
float fp8_value(int c) {
  const int mag = c & 0x7F;
  float v = static_cast<float>(mag) / 512.f;
  if (mag >= 8) {
    const uint32_t bits = (static_cast<uint32_t>(mag) << 20) + (120u << 23);
    std::memcpy(&v, &bits, 4);
  }
  return (c & 0x80) ? -v : v;
}

Mode detect_mode(const float* t, int bits, float& a, float& b) {
  const int entries = 1 << bits;
  a = 0.f;
  b = 1.f;
  float mag = 0.f;
  for (int i = 0; i < entries; ++i) mag = std::max(mag, std::fabs(t[i]));
  bool linear = true;
  for (int i = 0; i < entries && linear; ++i) linear = std::fabs(t[i] - (t[0] + (t[1] - t[0]) * i)) <= 1e-6f * mag;
  if (linear) {
    a = t[0];
    b = t[1] - t[0];
    return Mode::kLinear;
  }
  if (bits != 8) return Mode::kTable;
  for (int c = 0; c < 256; ++c)  // the two NaN codes never appear in real weights
    if ((c & 0x7F) != 0x7F && t[c] != fp8_value(c)) return Mode::kTable;
  b = 256.f;
  return Mode::kFp8;
}

// Decodes W[n, k0:k1] (scaled and offset) into out.
void decode_scalar(const Weights& w, int64_t n, int64_t k0, int64_t k1, float* out) {
  for (int64_t k = k0; k < k1;) {
    const int64_t g = k / w.group_size, end = std::min(k1, (g + 1) * w.group_size);
    float s, o;
    w.group_affine(n, g, s, o);
    for (; k < end; ++k) out[k - k0] = w.value(w.code(n, k)) * s + o;
  }
}

// y[m, r] += sum_k x[m, k] * wbuf[r, k] for m < mr, r < nvalid.
void tile_scalar(const float* x, int64_t ldx, int64_t mr, const float* wbuf, int64_t kc, float* y, int64_t ldy,
                 int64_t nvalid) {
  for (int64_t m = 0; m < mr; ++m)
    for (int64_t r = 0; r < nvalid; ++r) {
      float acc = 0.f;
      for (int64_t k = 0; k < kc; ++k) acc += x[m * ldx + k] * wbuf[r * kc + k];
      y[m * ldy + r] += acc;
    }
}

#ifdef LUT_X86

// Values of the 8 codes in the `BITS` bytes at p (8 codes always fill exactly BITS bytes).
// A 16-entry table also has a faster 32-code decoder (used where x can be permuted to match).
template <int BITS, Mode MODE>
struct Decoder {
  static constexpr bool kWide = BITS == 4 && MODE == Mode::kTable;
  __m256 t0, t1;          // 4-bit table halves; 2-bit: the table twice
  __m256i plane[4] = {};  // kWide: Weights::planes

  AVX2_FN explicit Decoder(const Weights& w) {
    const float* table = w.table;
    t0 = t1 = _mm256_setzero_ps();
    if constexpr (MODE == Mode::kTable && BITS == 4) {
      t0 = _mm256_loadu_ps(table);
      t1 = _mm256_loadu_ps(table + 8);
      for (int j = 0; j < 4; ++j) plane[j] = _mm256_load_si256(reinterpret_cast<const __m256i*>(w.planes[j]));
    } else if constexpr (MODE == Mode::kTable && BITS == 2) {
      t0 = _mm256_insertf128_ps(_mm256_castps128_ps256(_mm_loadu_ps(table)), _mm_loadu_ps(table), 1);
    }
  }

  // The values of the 32 codes in the 16 bytes at p, each group of 8 in the order 0 2 4 6 1 3 5 7
  // (XInfo::xp has x in the same order): four vpshufb look up the bytes of each value (a 16-entry
  // byte table per lane), unpacks reassemble them. Measured 1.5x faster than four 8-code decodes.
  AVX2_FN void wide(const uint8_t* p, __m256 out[4]) const {
    const __m128i c = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    const __m256i both = _mm256_inserti128_si256(_mm256_castsi128_si256(c), _mm_srli_epi16(c, 4), 1);
    const __m256i idx = _mm256_and_si256(both, _mm256_set1_epi8(0x0F));  // lane 0: even k, lane 1: odd k
    __m256i b[4];
    for (int j = 0; j < 4; ++j) b[j] = _mm256_shuffle_epi8(plane[j], idx);
    const __m256i lo01 = _mm256_unpacklo_epi8(b[0], b[1]), hi01 = _mm256_unpackhi_epi8(b[0], b[1]);
    const __m256i lo23 = _mm256_unpacklo_epi8(b[2], b[3]), hi23 = _mm256_unpackhi_epi8(b[2], b[3]);
    out[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(lo01, lo23));
    out[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(lo01, lo23));
    out[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(hi01, hi23));
    out[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(hi01, hi23));
  }

  AVX2_FN __m256 operator()(const uint8_t* p, const float* table) const {
    if constexpr (BITS == 8) {
      if constexpr (MODE == Mode::kTable)  // measured faster than vgatherdps on Zen 3
        return _mm256_setr_ps(table[p[0]], table[p[1]], table[p[2]], table[p[3]], table[p[4]], table[p[5]],
                              table[p[6]], table[p[7]]);
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
      if constexpr (MODE == Mode::kLinear) return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
      // e4m3 bits s.eeee.mmm placed as float16 s.0eeee.mmm0000000 are the same number / 256, subnormals
      // included: sign-extend to 16 bits, shift by 7 (the sign lands in bit 15) and clear bit 14.
      const __m128i shifted = _mm_slli_epi16(_mm_cvtepi8_epi16(bytes), 7);
      const __m128i half = _mm_and_si128(shifted, _mm_set1_epi16(static_cast<int16_t>(0xBFFF)));
      return _mm256_cvtph_ps(half);
    } else {
      // Broadcast the packed word and shift each lane to its own code. vpermps reads only the low
      // 3 bits of an index, so the neighbours' bits left above it are harmless.
      uint32_t word = 0;
      std::memcpy(&word, p, BITS);
      const __m256i v = _mm256_set1_epi32(static_cast<int>(word));
      const __m256i idx = _mm256_srlv_epi32(
          v, _mm256_setr_epi32(0, BITS, 2 * BITS, 3 * BITS, 4 * BITS, 5 * BITS, 6 * BITS, 7 * BITS));
      if constexpr (MODE != Mode::kTable)
        return _mm256_cvtepi32_ps(_mm256_and_si256(idx, _mm256_set1_epi32((1 << BITS) - 1)));
      if constexpr (BITS == 2) return _mm256_permutevar8x32_ps(t0, idx);
      // 16 entries: look up both halves, pick by bit 3 of the code moved to the sign bit.
      const __m256i bit3 = _mm256_sllv_epi32(v, _mm256_setr_epi32(28, 24, 20, 16, 12, 8, 4, 0));
      return _mm256_blendv_ps(_mm256_permutevar8x32_ps(t0, idx), _mm256_permutevar8x32_ps(t1, idx),
                              _mm256_castsi256_ps(bit3));
    }
  }
};

template <int BITS, Mode MODE>
AVX2_FN void decode_avx2(const Weights& w, int64_t n, int64_t k0, int64_t k1, float* out) {
  const Decoder<BITS, MODE> dec(w);
  const uint8_t* row = w.codes + n * w.row_bytes;
  for (int64_t k = k0; k < k1;) {
    const int64_t g = k / w.group_size, end = std::min(k1, (g + 1) * w.group_size);
    float s, o;
    w.group_affine(n, g, s, o);
    const __m256 vs = _mm256_set1_ps(s), vo = _mm256_set1_ps(o);
    // Group and chunk starts are multiples of 8 / bits, so k is at a byte boundary here.
    for (; k + 8 <= end; k += 8)
      _mm256_storeu_ps(out + (k - k0), _mm256_fmadd_ps(dec(row + k * BITS / 8, w.table), vs, vo));
    for (; k < end; ++k) out[k - k0] = w.value(w.code(n, k)) * s + o;
  }
}

AVX2_FN inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// MR rows of x against NR decoded rows: MR * NR independent accumulators hide FMA latency, each
// x load is reused NR times and each weight load MR times.
template <int MR>
AVX2_FN void tile_avx2(const float* x, int64_t ldx, const float* wbuf, int64_t kc, float* y, int64_t ldy,
                       int64_t nvalid) {
  __m256 acc[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= kc; k += 8) {
    __m256 wv[NR];
    for (int r = 0; r < NR; ++r) wv[r] = _mm256_loadu_ps(wbuf + r * kc + k);
    for (int m = 0; m < MR; ++m) {
      const __m256 xv = _mm256_loadu_ps(x + m * ldx + k);
      for (int r = 0; r < NR; ++r) acc[m][r] = _mm256_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  for (int m = 0; m < MR; ++m)
    for (int r = 0; r < nvalid; ++r) {
      float sum = hsum(acc[m][r]);
      for (int64_t kk = k; kk < kc; ++kk) sum += x[m * ldx + kk] * wbuf[r * kc + kk];
      y[m * ldy + r] += sum;
    }
}

AVX2_FN void tile_avx2_any(const float* x, int64_t ldx, int64_t mr, const float* wbuf, int64_t kc, float* y,
                           int64_t ldy, int64_t nvalid) {
  if (mr == 3) return tile_avx2<3>(x, ldx, wbuf, kc, y, ldy, nvalid);
  if (mr == 2) return tile_avx2<2>(x, ldx, wbuf, kc, y, ldy, nvalid);
  return tile_avx2<1>(x, ldx, wbuf, kc, y, ldy, nvalid);
}

// y[0:MR, NR-row tiles t0..t1) += x[0:MR] @ W[those rows].T, decoding into registers. Scales are
// applied once per group to the group's partial sums, and offsets as offset * sum(x over the group),
// so the inner loop is only decode and multiply-add. The table's a and b (see Weights) are applied
// here too: sum((a + b v) s x) + o sum(x) = b s sum(v x) + (a s + o) sum(x).
template <int BITS, Mode MODE, int MR>
AVX2_FN void direct_avx2(const Weights& w, const XInfo& xi, int64_t t0, int64_t t1, float* y) {
  using Dec = Decoder<BITS, MODE>;
  const Dec dec(w);
  const float* x = xi.x;
  const bool wide = Dec::kWide && w.group_size % 8 == 0;
  for (int64_t t = t0; t < t1; ++t) {
    const int64_t n0 = t * NR, nvalid = std::min<int64_t>(NR, w.N - n0);
    int64_t rows_n[NR];  // rows past N repeat the last one; their results are dropped
    const uint8_t* rows[NR];
    const float *scale[NR], *offset[NR];
    for (int r = 0; r < NR; ++r) {
      rows_n[r] = n0 + std::min<int64_t>(r, nvalid - 1);
      rows[r] = w.codes + rows_n[r] * w.row_bytes;
      scale[r] = w.scales + rows_n[r] * w.groups;
      offset[r] = w.offsets ? w.offsets + rows_n[r] * w.groups : nullptr;
    }
    // Scaled sums stay in memory: touched once per group, they would only crowd the registers.
    alignas(32) float acc[MR][NR][8] = {};
    float extra[MR][NR] = {};  // offsets and scalar tails
    for (int64_t g = 0; g < w.groups; ++g) {
      int64_t k = g * w.group_size;
      const int64_t end = k + w.group_size;
      __m256 part[MR][NR];
      for (int m = 0; m < MR; ++m)
        for (int r = 0; r < NR; ++r) part[m][r] = _mm256_setzero_ps();
      if constexpr (Dec::kWide) {
        for (; wide && k + 32 <= end; k += 32) {
          __m256 xv[MR][4];
          for (int m = 0; m < MR; ++m)
            for (int j = 0; j < 4; ++j) xv[m][j] = _mm256_loadu_ps(xi.xp + m * w.K + k + 8 * j);
          for (int r = 0; r < NR; ++r) {
            __m256 v[4];
            dec.wide(rows[r] + k / 2, v);
            for (int j = 0; j < 4; ++j)
              for (int m = 0; m < MR; ++m) part[m][r] = _mm256_fmadd_ps(v[j], xv[m][j], part[m][r]);
          }
        }
      }
      for (; k + 8 <= end; k += 8)
        for (int r = 0; r < NR; ++r) {
          const __m256 v = dec(rows[r] + k * BITS / 8, w.table);
          for (int m = 0; m < MR; ++m) part[m][r] = _mm256_fmadd_ps(v, _mm256_loadu_ps(x + m * w.K + k), part[m][r]);
        }
      // Kept lean: with small groups this runs once per few decoded vectors.
      if (k < end) {  // group size not a multiple of 8
        for (int r = 0; r < NR; ++r)
          for (int m = 0; m < MR; ++m) {
            float tail = 0.f;
            for (int64_t kk = k; kk < end; ++kk) tail += w.value(w.code(rows_n[r], kk)) * x[m * w.K + kk];
            extra[m][r] += tail * scale[r][g] * w.b;
          }
      }
      for (int r = 0; r < NR; ++r) {
        const float s = scale[r][g];
        const __m256 sb = _mm256_set1_ps(s * w.b);
        const float o = offset[r] ? offset[r][g] : 0.f;
        for (int m = 0; m < MR; ++m) {
          _mm256_store_ps(acc[m][r], _mm256_fmadd_ps(part[m][r], sb, _mm256_load_ps(acc[m][r])));
          extra[m][r] += (w.a * s + o) * xi.xsum[m * w.groups + g];
        }
      }
    }
    for (int m = 0; m < MR; ++m)
      for (int r = 0; r < nvalid; ++r) y[m * w.N + n0 + r] += hsum(_mm256_load_ps(acc[m][r])) + extra[m][r];
  }
}

template <int BITS, Mode MODE>
AVX2_FN void direct_avx2_any(const Weights& w, const XInfo& xi, int64_t M, int64_t t0, int64_t t1, float* y) {
  if (M == 3) return direct_avx2<BITS, MODE, 3>(w, xi, t0, t1, y);
  if (M == 2) return direct_avx2<BITS, MODE, 2>(w, xi, t0, t1, y);
  return direct_avx2<BITS, MODE, 1>(w, xi, t0, t1, y);
}

bool has_avx2() {
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return ok;
}

#else
bool has_avx2() { return false; }
#endif  // LUT_X86

// Off only in tests, to check the portable path on AVX2 machines. Returns the previous setting.
std::atomic<bool> g_simd{true};
bool set_simd(bool enabled) { return g_simd.exchange(enabled); }

using DecodeFn = void (*)(const Weights&, int64_t, int64_t, int64_t, float*);
using TileFn = void (*)(const float*, int64_t, int64_t, const float*, int64_t, float*, int64_t, int64_t);
using DirectFn = void (*)(const Weights&, const XInfo&, int64_t, int64_t, int64_t, float*);

struct Kernels {
  DecodeFn decode = decode_scalar;
  TileFn tile = tile_scalar;
  DirectFn direct = nullptr;  // for M <= DIRECT_M, when there is one
  int64_t mr = 1;             // rows of x per tile call
};

#ifdef LUT_X86
template <int BITS, Mode MODE>
void set_avx2(Kernels& ks) {
  ks.decode = decode_avx2<BITS, MODE>;
  ks.direct = direct_avx2_any<BITS, MODE>;
  ks.tile = tile_avx2_any;
  ks.mr = 3;
}
#endif

Kernels pick_kernels([[maybe_unused]] const Weights& w) {
  Kernels ks;
#ifdef LUT_X86
  if (!has_avx2() || !g_simd) return ks;
  const bool linear = w.mode == Mode::kLinear;
  if (w.bits == 2) linear ? set_avx2<2, Mode::kLinear>(ks) : set_avx2<2, Mode::kTable>(ks);
  if (w.bits == 4) linear ? set_avx2<4, Mode::kLinear>(ks) : set_avx2<4, Mode::kTable>(ks);
  if (w.bits == 8) {
    if (w.mode == Mode::kLinear) set_avx2<8, Mode::kLinear>(ks);
    if (w.mode == Mode::kFp8) set_avx2<8, Mode::kFp8>(ks);
    if (w.mode == Mode::kTable) set_avx2<8, Mode::kTable>(ks);
  }
#endif
  return ks;
}

// Each thread owns a range of NR-row tiles of the output and streams its part of the weight once.
void fused_matmul(const Weights& w, const Kernels& ks, const float* x, int64_t M, float* y) {
  const int64_t tiles = (w.N + NR - 1) / NR;
  // Enough tiles per task that fork/join stays small next to the work (~64k multiply-adds).
  const int64_t grain = std::max<int64_t>(1, 65536 / (NR * w.K * M));
  if (ks.direct && M <= DIRECT_M) {
    Floats xsum(M * w.groups), xp(M * w.K);
    std::fill_n(xsum.data(), M * w.groups, 0.f);
    std::copy_n(x, M * w.K, xp.data());
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < w.K; ++k) xsum.data()[m * w.groups + k / w.group_size] += x[m * w.K + k];
    for (int64_t m = 0; m < M; ++m)  // see Decoder::wide
      for (int64_t k = 0; k + 8 <= w.K; k += 8)
        for (int i = 0; i < 8; ++i) xp.data()[m * w.K + k + i] = x[m * w.K + k + (i < 4 ? 2 * i : 2 * (i - 4) + 1)];
    const XInfo xi{x, xp.data(), xsum.data()};
    at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) { ks.direct(w, xi, M, begin, end, y); });
    return;
  }
  at::parallel_for(0, tiles, grain, [&](int64_t begin, int64_t end) {
    Floats wbuf(NR * std::min(w.K, KC));
    for (int64_t k0 = 0; k0 < w.K; k0 += KC) {
      const int64_t kc = std::min(KC, w.K - k0);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n0 = t * NR, nvalid = std::min<int64_t>(NR, w.N - n0);
        for (int64_t r = 0; r < NR; ++r) {
          if (r < nvalid)
            ks.decode(w, n0 + r, k0, k0 + kc, wbuf.data() + r * kc);
          else
            std::fill_n(wbuf.data() + r * kc, kc, 0.f);
        }
        for (int64_t m = 0; m < M; m += ks.mr)
          ks.tile(x + m * w.K + k0, w.K, std::min(ks.mr, M - m), wbuf.data(), kc, y + m * w.N + n0, w.N, nvalid);
      }
    }
  });
}

// Many rows of x: decode blocks of rows into a bounded scratch (reused per calling thread, never
// the whole weight when it is big) and multiply each block with BLAS.
void blas_matmul(const Weights& w, const Kernels& ks, const at::Tensor& x, at::Tensor& y) {
  constexpr int64_t kScratchFloats = 1 << 20;  // 4 MiB
  const int64_t rows = std::min(w.N, std::max<int64_t>(NR, kScratchFloats / w.K / NR * NR));
  thread_local Floats scratch;
  scratch.reserve(rows * w.K);
  for (int64_t n0 = 0; n0 < w.N; n0 += rows) {
    const int64_t nb = std::min(rows, w.N - n0);
    float* s = scratch.data();
    at::parallel_for(0, nb, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) ks.decode(w, n0 + r, 0, w.K, s + r * w.K);
    });
    const at::Tensor block = at::from_blob(s, {nb, w.K}, x.options());
    at::Tensor out = y.narrow(1, n0, nb);
    at::mm_out(out, x, block.t());
  }
}

// x [..., K] in any float dtype -> y [..., N] in x's dtype, computed in float32. Conversions that
// are no-ops (the usual case) cost nothing here, unlike in Python.
at::Tensor lut_matmul(const at::Tensor& x_in, const at::Tensor& codes, int64_t bits, const at::Tensor& table_in,
                      const at::Tensor& scales_in, const std::optional<at::Tensor>& offsets_in, int64_t group_size) {
  TORCH_CHECK(bits == 2 || bits == 4 || bits == 8, "bits must be 2, 4 or 8, got ", bits);
  TORCH_CHECK(x_in.device().is_cpu() && codes.device().is_cpu(), "lut_matmul takes CPU tensors");
  TORCH_CHECK(x_in.dim() >= 1 && at::isFloatingType(x_in.scalar_type()), "x must be a float tensor [..., K]");
  TORCH_CHECK(codes.scalar_type() == at::kByte && codes.dim() == 2, "codes must be uint8 [N, K * bits / 8]");
  const int64_t K = x_in.size(-1), N = codes.size(0);
  TORCH_CHECK(codes.size(1) * 8 == K * bits, "codes hold ", codes.size(1) * 8 / bits, " values per row, x has K=", K);
  TORCH_CHECK(table_in.numel() == (1 << bits), "table must have 2**bits entries");
  TORCH_CHECK(group_size > 0 && K % group_size == 0 && group_size % (8 / bits) == 0,
              "group_size must divide K and be a multiple of 8 / bits");
  const int64_t groups = K / group_size;
  TORCH_CHECK(scales_in.numel() == N * groups, "scales must be [N, K / group_size]");
  TORCH_CHECK(!offsets_in || offsets_in->numel() == N * groups, "offsets must be None or [N, K / group_size]");

  const at::Tensor x = x_in.reshape({-1, K}).to(at::kFloat).contiguous();
  const at::Tensor codes_c = codes.contiguous();
  const at::Tensor table = table_in.to(at::kFloat).contiguous();
  const at::Tensor scales = scales_in.to(at::kFloat).contiguous();
  const at::Tensor offsets = offsets_in ? offsets_in->to(at::kFloat).contiguous() : at::Tensor();
  const int64_t M = x.size(0);

  Weights w{codes_c.data_ptr<uint8_t>(), codes.size(1), static_cast<int>(bits), table.data_ptr<float>(),
            scales.data_ptr<float>(), offsets.defined() ? offsets.data_ptr<float>() : nullptr, groups, group_size, N,
            K, Mode::kTable, 0.f, 1.f, {}};
  w.mode = detect_mode(w.table, static_cast<int>(bits), w.a, w.b);
  if (bits == 4 && w.mode == Mode::kTable) w.make_planes();
  const Kernels ks = pick_kernels(w);

  at::Tensor y;
  if (M > BLAS_M && N > 0 && K > 0) {
    y = at::empty({M, N}, x.options());
    blas_matmul(w, ks, x, y);
  } else {
    y = at::zeros({M, N}, x.options());
    if (M > 0 && N > 0 && K > 0) fused_matmul(w, ks, x.data_ptr<float>(), M, y.data_ptr<float>());
  }
  std::vector<int64_t> shape = x_in.sizes().vec();
  shape.back() = N;
  return y.to(x_in.scalar_type()).view(shape);
}

}  // namespace

TORCH_LIBRARY(lorax_quant, m) {
  m.def("lut_matmul(Tensor x, Tensor codes, int bits, Tensor table, Tensor scales, Tensor? offsets, int group_size)"
        " -> Tensor",
        &lut_matmul);
  m.def("has_avx2() -> bool", &has_avx2);
  m.def("set_simd(bool enabled) -> bool", &set_simd);
}
