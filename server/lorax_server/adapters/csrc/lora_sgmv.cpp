// Segmented LoRA on the CPU, float32 activations (SGMV): every segment of rows [start, end) whose stack slot is not
// -1 adds its adapter's update to the base output in place,
//
//   shrunk = x[start:end] @ a[slot]                                          [rows, ranks]
//   y[start:end, out + p*width : out + (p+1)*width] += shrunk[:, r + p*rank : r + (p+1)*rank] @ b[slot, p]
//
// for every run (out, r, b) and every part p of the run, where
//   x  [tokens, in_features]          y  [tokens, out_features]   (rows may be strided, columns contiguous)
//   a  [slots, in_features, ranks]    every part's A, transposed and stacked (contiguous)
//   b  [slots, parts, rank, width]    a run's B's, transposed, scale folded in (contiguous), each part's
//                                     [rank, width] laid out in column tiles (below)
//
// The factors are float32, or bfloat16 / float16 as adapters stored in 16 bits keep them (the sums are
// float32: each factor is widened exactly as it is loaded, so the result is the float32 kernel's on the
// widened factors, with half the bytes to read). 16-bit B's cannot hold the scale exactly, so they come
// without it and `scale` [slots, ranks] (float32) multiplies the shrunk columns instead.
//
// A part's B is read 32 columns at a time, so it is stored tile by tile: the tiles of 32 columns, each
// [rank, 32] row-major, then the last width % 32 columns as [rank, width % 32]. The expand then streams
// one contiguous run per part instead of `rank` strided rows (measured on decode steps with the factors
// from memory: 5-9% less time). `lora.py` builds the stacks the kernel reads in this layout.
//
// Design: the torch plan pads the segments into a grid and runs batched matmuls over it, or loops over
// the segments in Python; both pay for small matmuls one call at a time. Here one call does every
// segment: a task is a block of up to 8 rows of one segment (4, 2 or 1 for what is left, so that a
// decode step's one row per adapter computes no rows it throws away). It shrinks them into a small
// scratch (the adapter's A is read once per block) and expands the scratch into every part of the
// output, with the sums held in registers (the block's rows by 48, 32 or 16 columns), prefetching the
// factors ahead of use. Blocks run in parallel with at::parallel_for. The arithmetic is written with
// the compiler's vector types; the task is cloned for AVX-512 and AVX2 and picked at run time, so the
// binary does not depend on the build machine. The op is registered with the dispatcher
// (torch.ops.lorax_lora).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <vector>

namespace {

typedef float vec16 __attribute__((vector_size(64)));
constexpr int64_t kRows = 8;  // the most rows of one block

typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef _Float16 f16x16 __attribute__((vector_size(32)));

// 16 factors from p, widened to float32 (exactly: every bfloat16 and float16 value is a float32 one).
__attribute__((always_inline)) inline vec16 load16(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

__attribute__((always_inline)) inline vec16 load16(const at::BFloat16* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof(h));
  const u32x16 bits = __builtin_convertvector(h, u32x16) << 16;  // bfloat16 is float32's upper half
  vec16 v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

__attribute__((always_inline)) inline vec16 load16(const at::Half* p) {
  f16x16 h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, vec16);
}

template <typename T>
__attribute__((always_inline)) inline float widen(T v) {
  return static_cast<float>(v);
}

__attribute__((always_inline)) inline void store16(float* p, vec16 v) { std::memcpy(p, &v, sizeof(v)); }

template <typename T>  // the factors' type: float, at::BFloat16 or at::Half
struct Run {
  const T* b;  // [slots, parts, rank, width]
  int64_t parts, rank, width, out_start, r_start;
};

template <typename T>
struct Problem {
  const float* x;
  int64_t x_stride;
  float* y;
  int64_t y_stride;
  const T* a;  // [slots, in, ranks]
  int64_t in, ranks;
  const float* scale;  // [slots, ranks], or null: the scale is folded into b
  std::vector<Run<T>> runs;
};

// Software prefetch distances. A decode step streams every adapter's factors from memory, 8 rows or
// fewer per adapter, too little arithmetic for the hardware prefetcher to keep ahead of; measured on
// the bench model's decode step (8 adapters x 8 rows, weights from DRAM) 1.99 -> 1.44 ms. With B in
// tiles, longer distances measured better in the engine's decode steps (64 rows; 8 adapters: 1.11-1.19
// ms at 24 rows and 512 floats, 1.05-1.22 and a median of 1.07 at these). Prefetching past the end of
// a tensor is harmless: a prefetch never faults.
constexpr int64_t kAheadA = 96;    // rows of A ahead of the shrink's
constexpr int64_t kAheadB = 2048;  // factors of B ahead of the expand's (four rank-16 tiles)

// shrunk[i, c : c + 16 V] = sum_k x[row_i, k] * a[k, c : c + 16 V], the sums in registers.
template <int64_t R, int64_t V, typename T>
__attribute__((always_inline)) inline void shrink_columns(const Problem<T>& p, const float* const* xr, int64_t rows,
                                                          const T* a, float* shrunk, int64_t c) {
  const int64_t n = p.ranks;
  vec16 acc[R][V] = {};
  for (int64_t k = 0; k < p.in; ++k) {
    const T* row = a + k * n + c;
    vec16 av[V];
    for (int64_t v = 0; v < V; ++v) {
      __builtin_prefetch(row + kAheadA * n + 16 * v);  // past the end: harmless, never faults
      av[v] = load16(row + 16 * v);
    }
    for (int64_t i = 0; i < R; ++i) {
      const float xv = xr[i][k];
      for (int64_t v = 0; v < V; ++v) acc[i][v] += xv * av[v];
    }
  }
  for (int64_t i = 0; i < rows; ++i) {
    for (int64_t v = 0; v < V; ++v) store16(shrunk + i * n + c + 16 * v, acc[i][v]);
  }
}

// shrunk[i, c] = sum_k x[row_i, k] * a[k, c] for the block's rows (`rows` <= R; the missing rows
// repeat the last one and are not stored). Columns in chunks of 48, 32 or 16 (one pass over a's rows
// each), then one at a time.
template <int64_t R, typename T>
__attribute__((always_inline)) inline void shrink(const Problem<T>& p, const float* const* xr, int64_t rows,
                                                  const T* a, float* shrunk) {
  const int64_t n = p.ranks;
  int64_t c = 0;
  for (; c + 48 <= n; c += 48) shrink_columns<R, 3>(p, xr, rows, a, shrunk, c);
  if (c + 32 <= n) {
    shrink_columns<R, 2>(p, xr, rows, a, shrunk, c);
    c += 32;
  }
  if (c + 16 <= n) {
    shrink_columns<R, 1>(p, xr, rows, a, shrunk, c);
    c += 16;
  }
  for (; c < n; ++c) {
    for (int64_t i = 0; i < rows; ++i) {
      float acc = 0.0f;
      for (int64_t k = 0; k < p.in; ++k) acc += xr[i][k] * widen(a[k * n + c]);
      shrunk[i * n + c] = acc;
    }
  }
}

// y[row_i, columns] += shrunk[i, r0 : r0 + rank] @ b for one part (b: [rank, width] in column tiles).
template <int64_t R, typename T>
__attribute__((always_inline)) inline void expand(const Problem<T>& p, float* const* yr, int64_t rows,
                                                  const float* shrunk, int64_t r0, int64_t rank, const T* b,
                                                  int64_t width) {
  const int64_t n = p.ranks;
  const int64_t tiled = width / 32 * 32;
  int64_t j = 0;
  for (; j < tiled; j += 32) {
    const T* tile = b + j * rank;  // [rank, 32]
    vec16 lo[R] = {}, hi[R] = {};
    for (int64_t k = 0; k < rank; ++k) {
      __builtin_prefetch(tile + k * 32 + kAheadB);
      __builtin_prefetch(tile + k * 32 + kAheadB + 16);
      const vec16 b0 = load16(tile + k * 32), b1 = load16(tile + k * 32 + 16);
      for (int64_t i = 0; i < R; ++i) {
        const float s = shrunk[std::min(i, rows - 1) * n + r0 + k];
        lo[i] += s * b0;
        hi[i] += s * b1;
      }
    }
    for (int64_t i = 0; i < rows; ++i) {
      store16(yr[i] + j, load16(yr[i] + j) + lo[i]);
      store16(yr[i] + j + 16, load16(yr[i] + j + 16) + hi[i]);
    }
  }
  // The last width % 32 columns: [rank, rest] after the tiles.
  const T* tail = b + tiled * rank;
  const int64_t rest = width - tiled;
  for (; j + 16 <= width; j += 16) {
    vec16 acc[R] = {};
    for (int64_t k = 0; k < rank; ++k) {
      const vec16 b0 = load16(tail + k * rest + (j - tiled));
      for (int64_t i = 0; i < R; ++i) acc[i] += shrunk[std::min(i, rows - 1) * n + r0 + k] * b0;
    }
    for (int64_t i = 0; i < rows; ++i) store16(yr[i] + j, load16(yr[i] + j) + acc[i]);
  }
  for (; j < width; ++j) {
    for (int64_t i = 0; i < rows; ++i) {
      float acc = 0.0f;
      for (int64_t k = 0; k < rank; ++k) acc += shrunk[i * n + r0 + k] * widen(tail[k * rest + (j - tiled)]);
      yr[i][j] += acc;
    }
  }
}

// One block: rows [row, row + rows) of a segment whose adapter sits in stack slot `slot` (rows <= R).
template <int64_t R, typename T>
__attribute__((always_inline)) inline void apply_rows(const Problem<T>& p, int64_t slot, int64_t row, int64_t rows,
                                                      float* shrunk) {
  const float* xr[R];
  float* yr[R];
  for (int64_t i = 0; i < R; ++i) {
    const int64_t r = row + std::min(i, rows - 1);
    xr[i] = p.x + r * p.x_stride;
    yr[i] = p.y + r * p.y_stride;
  }
  shrink<R>(p, xr, rows, p.a + slot * p.in * p.ranks, shrunk);
  if (p.scale != nullptr) {
    const float* scale = p.scale + slot * p.ranks;
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t c = 0; c < p.ranks; ++c) shrunk[i * p.ranks + c] *= scale[c];
    }
  }
  for (const Run<T>& run : p.runs) {
    for (int64_t part = 0; part < run.parts; ++part) {
      const T* b = run.b + ((slot * run.parts + part) * run.rank) * run.width;
      float* columns[R];
      for (int64_t i = 0; i < R; ++i) columns[i] = yr[i] + run.out_start + part * run.width;
      expand<R>(p, columns, rows, shrunk, run.r_start + part * run.rank, run.rank, b, run.width);
    }
  }
}

template <typename T>
__attribute__((always_inline)) inline void apply_block(const Problem<T>& p, int64_t slot, int64_t row, int64_t rows,
                                                       float* shrunk) {
  // Blocks of fewer rows (a decode step's one row per adapter) compute no rows they do not store.
  if (rows > 4) {
    apply_rows<8>(p, slot, row, rows, shrunk);
  } else if (rows > 2) {
    apply_rows<4>(p, slot, row, rows, shrunk);
  } else if (rows == 2) {
    apply_rows<2>(p, slot, row, rows, shrunk);
  } else {
    apply_rows<1>(p, slot, row, rows, shrunk);
  }
}

// One clone set per factor type (GCC's target_clones does not apply to templates).
#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define CLONED __attribute__((target_clones("arch=x86-64-v4", "arch=haswell", "default")))
#else
#define CLONED
#endif
CLONED void apply_block_f32(const Problem<float>& p, int64_t slot, int64_t row, int64_t rows, float* shrunk) {
  apply_block(p, slot, row, rows, shrunk);
}
CLONED void apply_block_bf16(const Problem<at::BFloat16>& p, int64_t slot, int64_t row, int64_t rows, float* shrunk) {
  apply_block(p, slot, row, rows, shrunk);
}
CLONED void apply_block_f16(const Problem<at::Half>& p, int64_t slot, int64_t row, int64_t rows, float* shrunk) {
  apply_block(p, slot, row, rows, shrunk);
}

void apply_cloned(const Problem<float>& p, int64_t slot, int64_t row, int64_t rows, float* shrunk) {
  apply_block_f32(p, slot, row, rows, shrunk);
}
void apply_cloned(const Problem<at::BFloat16>& p, int64_t slot, int64_t row, int64_t rows, float* shrunk) {
  apply_block_bf16(p, slot, row, rows, shrunk);
}
void apply_cloned(const Problem<at::Half>& p, int64_t slot, int64_t row, int64_t rows, float* shrunk) {
  apply_block_f16(p, slot, row, rows, shrunk);
}

struct Block {
  int64_t slot, row, rows;
};

template <typename T>
void run_blocks(Problem<T>& p, const at::Tensor& a, const at::Tensor& y, at::TensorList run_b,
                at::IntArrayRef run_out_start, at::IntArrayRef run_r_start, const std::vector<Block>& blocks) {
  p.a = a.data_ptr<T>();
  for (size_t i = 0; i < run_b.size(); ++i) {
    const at::Tensor& b = run_b[i];
    TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == a.scalar_type() && b.dim() == 4 && b.is_contiguous() &&
                    b.size(0) == a.size(0),
                "run b [slots, parts, rank, width]: contiguous, of a's dtype");
    Run<T> run{b.data_ptr<T>(), b.size(1), b.size(2), b.size(3), run_out_start[i], run_r_start[i]};
    TORCH_CHECK(run.out_start >= 0 && run.out_start + run.parts * run.width <= y.size(1), "a run exceeds y's columns");
    TORCH_CHECK(run.r_start >= 0 && run.r_start + run.parts * run.rank <= p.ranks, "a run exceeds a's ranks");
    p.runs.push_back(run);
  }
  at::parallel_for(0, static_cast<int64_t>(blocks.size()), 1, [&](int64_t begin, int64_t end) {
    std::vector<float> shrunk(kRows * p.ranks);
    for (int64_t i = begin; i < end; ++i) apply_cloned(p, blocks[i].slot, blocks[i].row, blocks[i].rows, shrunk.data());
  });
}

void lora_sgmv(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& seg_start,
               const at::Tensor& seg_end, const at::Tensor& seg_slot, at::TensorList run_b,
               at::IntArrayRef run_out_start, at::IntArrayRef run_r_start, const std::optional<at::Tensor>& scale) {
  TORCH_CHECK(y.device().is_cpu() && x.device().is_cpu() && a.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(y.scalar_type() == at::kFloat && x.scalar_type() == at::kFloat, "float32 activations only");
  const auto factors = a.scalar_type();
  TORCH_CHECK(factors == at::kFloat || factors == at::kBFloat16 || factors == at::kHalf,
              "factors: float32, bfloat16 or float16");
  TORCH_CHECK(x.dim() == 2 && y.dim() == 2 && x.size(0) == y.size(0), "x [tokens, in], y [tokens, out]");
  TORCH_CHECK(x.stride(1) == 1 && y.stride(1) == 1, "x's and y's rows must be contiguous");
  TORCH_CHECK(a.dim() == 3 && a.is_contiguous() && a.size(1) == x.size(1), "a [slots, in, ranks], contiguous");
  TORCH_CHECK(run_b.size() == run_out_start.size() && run_b.size() == run_r_start.size(), "one start per run");
  for (const auto* seg : {&seg_start, &seg_end, &seg_slot}) {
    TORCH_CHECK(seg->scalar_type() == at::kInt && seg->dim() == 1 && seg->is_contiguous() && seg->device().is_cpu(),
                "segments: contiguous int32 CPU tensors");
  }
  const int64_t segments = seg_start.size(0), slots = a.size(0), tokens = x.size(0);
  TORCH_CHECK(seg_end.size(0) == segments && seg_slot.size(0) == segments, "one end and one slot per segment");
  const float* scale_of = nullptr;
  if (scale.has_value()) {
    TORCH_CHECK(scale->device().is_cpu() && scale->scalar_type() == at::kFloat && scale->is_contiguous() &&
                    scale->dim() == 2 && scale->size(0) == slots && scale->size(1) == a.size(2),
                "scale [slots, ranks]: contiguous float32");
    scale_of = scale->data_ptr<float>();
  }

  const int32_t* starts = seg_start.data_ptr<int32_t>();
  const int32_t* ends = seg_end.data_ptr<int32_t>();
  const int32_t* slot_of = seg_slot.data_ptr<int32_t>();
  std::vector<Block> blocks;
  for (int64_t s = 0; s < segments; ++s) {
    if (slot_of[s] < 0) continue;  // an adapter that does not touch this linear
    TORCH_CHECK(slot_of[s] < slots, "segment slot ", slot_of[s], " outside the stack of ", slots);
    TORCH_CHECK(0 <= starts[s] && starts[s] <= ends[s] && ends[s] <= tokens, "segment outside the tokens");
    for (int64_t row = starts[s]; row < ends[s]; row += kRows) {
      blocks.push_back({slot_of[s], row, std::min<int64_t>(kRows, ends[s] - row)});
    }
  }
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  if (factors == at::kFloat) {
    Problem<float> p{xp, x.stride(0), yp, y.stride(0), nullptr, a.size(1), a.size(2), scale_of, {}};
    run_blocks(p, a, y, run_b, run_out_start, run_r_start, blocks);
  } else if (factors == at::kBFloat16) {
    Problem<at::BFloat16> p{xp, x.stride(0), yp, y.stride(0), nullptr, a.size(1), a.size(2), scale_of, {}};
    run_blocks(p, a, y, run_b, run_out_start, run_r_start, blocks);
  } else {
    Problem<at::Half> p{xp, x.stride(0), yp, y.stride(0), nullptr, a.size(1), a.size(2), scale_of, {}};
    run_blocks(p, a, y, run_b, run_out_start, run_r_start, blocks);
  }
}

}  // namespace

TORCH_LIBRARY(lorax_lora, m) {
  m.def(
      "sgmv_(Tensor(a!) y, Tensor x, Tensor a, Tensor seg_start, Tensor seg_end, Tensor seg_slot, Tensor[] run_b, "
      "int[] run_out_start, int[] run_r_start, Tensor? scale=None) -> ()");
}

TORCH_LIBRARY_IMPL(lorax_lora, CPU, m) { m.impl("sgmv_", lora_sgmv); }
