// Attention read straight from the paged KV cache (CPU, float32), after the step's keys and values are
// written. Sequence b has query_len[b] new tokens at positions context_len[b] - query_len[b] ...
// context_len[b] - 1; the token at position t attends to the sequence's cached tokens j <= t.
//
//   q        [tokens, heads, head_dim]   (decode: one token per sequence, the batch's rows in order)
//   k, v     [num_blocks, block_size, kv_heads, head_dim]   (last dimension contiguous)
//   tables   [batch, max_blocks]   block of each sequence's positions j (block tables[b][j / block_size])
//   lens     [batch]               context length of each sequence
//   starts   [batch]               (prefill only) index in q of each sequence's first new token
//   score(h, t, j) = scale * q_h . k_j, then softcap * tanh(score / softcap) when soft-capped, then
//                    + slope_h * (j - t) with ALiBi; keys outside the sliding window (t - j >= window)
//                    are skipped; out = softmax_j(score) . v_j.
//
// Design: the torch path gathers every sequence's blocks into a padded grid per layer and then runs
// SDPA over the padding; here the cache is read in place.
// - Decode (`paged_decode_attention`, and one-token sequences of a prefill call): a task is one
//   sequence (or some of its kv heads), which reads its blocks in address order, once for the keys
//   and once for the values, for all query heads (GQA: a kv head's row serves every query head
//   sharing it).
// - Prefill (`paged_prefill_attention`: prompts, chunks of prompts, prompts behind a cached prefix):
//   a task is up to 16 query tokens of one sequence with the query heads of its kv heads (all of them,
//   so a position's keys and values are read in one piece, unless the threads would get too few tasks).
//   Its rows (token, query head) sit in vector lanes, 16 to a lane group: each key is scored against a
//   whole lane group with one broadcast per dimension, the rows' running softmax (max, sum, weighted
//   values) is kept lane by lane, and no row's scores are ever stored whole. Keys are walked in tiles of
//   16, cut at block ends, at fixed positions: a token's sums never depend on the batch it came in. The
//   next tile is prefetched while this one computes (a cached prefix comes from memory). Tasks are
//   handed out largest first from a shared counter.
// The arithmetic is written for the compiler to vectorise (vector types, "omp simd"); the workers are
// cloned per instruction set and picked at run time, so the binary does not depend on the build
// machine. The ops are registered with the dispatcher (torch.ops.lorax_attention).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <vector>

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define LORAX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=haswell", "default")))
#else
#define LORAX_CLONES
#endif

namespace {

typedef float vec16 __attribute__((vector_size(64)));
typedef int32_t ivec16 __attribute__((vector_size(64)));
constexpr int64_t kLanes = 16;  // a prefill task's rows: one lane each
constexpr int64_t kKeys = 16;   // keys per tile of a prefill task
constexpr int64_t kTokens = 16; // query tokens per prefill task
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

__attribute__((always_inline)) inline vec16 load16(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

__attribute__((always_inline)) inline void store16(float* p, vec16 v) { std::memcpy(p, &v, sizeof(v)); }

struct Problem {
  const float* q;
  int64_t q_token_stride, q_head_stride;
  const float* k;
  const float* v;
  int64_t k_block_stride, k_pos_stride, k_head_stride;
  int64_t v_block_stride, v_pos_stride, v_head_stride;
  const int64_t* tables;
  int64_t table_stride;
  const int64_t* lens;
  float* out;  // [tokens, heads, head_dim], contiguous
  int64_t heads, kv_heads, head_dim, block_size;
  float scale;
  int64_t window;       // <= 0: none
  float softcap;        // <= 0: none
  const float* slopes;  // [heads] or nullptr

  const float* key(int64_t b, int64_t j, int64_t kv) const {
    const int64_t* table = tables + b * table_stride;
    return k + table[j / block_size] * k_block_stride + (j % block_size) * k_pos_stride + kv * k_head_stride;
  }
  const float* value(int64_t b, int64_t j, int64_t kv) const {
    const int64_t* table = tables + b * table_stride;
    return v + table[j / block_size] * v_block_stride + (j % block_size) * v_pos_stride + kv * v_head_stride;
  }
  // score * scale, soft-capped, plus the ALiBi bias of key j for a query at position t.
  float finish(float dot, int64_t h, int64_t t, int64_t j) const {
    float s = dot * scale;
    if (softcap > 0.0f) s = std::tanh(s / softcap) * softcap;
    if (slopes != nullptr) s += slopes[h] * static_cast<float>(j - t);
    return s;
  }
};

// Sequence b's one query token (q row `token`) with the kv heads [kv_first, kv_last) and the query heads
// that share them. Positions are the outer loop so that each cached row (all kv heads of one token) is
// read in address order. `scores` is scratch for (kv_last - kv_first) * group * context_len floats.
LORAX_CLONES
void attend_one(const Problem& p, int64_t b, int64_t token, int64_t kv_first, int64_t kv_last, float* scores) {
  const int64_t group = p.heads / p.kv_heads;
  const int64_t d = p.head_dim;
  const int64_t len = p.lens[b];
  const int64_t first = p.window > 0 ? std::max<int64_t>(0, len - p.window) : 0;
  const int64_t n = len - first;
  const int64_t h_first = kv_first * group, h_count = (kv_last - kv_first) * group;
  float* out = p.out + (token * p.heads + h_first) * d;
  std::fill(out, out + h_count * d, 0.0f);
  if (n <= 0) return;
  const float* query = p.q + token * p.q_token_stride;

  for (int64_t j = first; j < len; ++j) {
    const float* row = p.key(b, j, 0);
    for (int64_t h = h_first; h < h_first + h_count; ++h) {
      const float* key = row + (h / group) * p.k_head_stride;
      const float* qh = query + h * p.q_head_stride;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < d; ++i) dot += qh[i] * key[i];
      scores[(h - h_first) * n + (j - first)] = p.finish(dot, h, len - 1, j);
    }
  }

  for (int64_t h = 0; h < h_count; ++h) {
    float* row = scores + h * n;
    float top = kNegInf;
    for (int64_t j = 0; j < n; ++j) top = std::max(top, row[j]);
    float total = 0.0f;
    for (int64_t j = 0; j < n; ++j) {
      row[j] = std::exp(row[j] - top);
      total += row[j];
    }
    const float inv = 1.0f / total;
    for (int64_t j = 0; j < n; ++j) row[j] *= inv;
  }

  for (int64_t j = first; j < len; ++j) {
    const float* row = p.value(b, j, 0);
    for (int64_t h = h_first; h < h_first + h_count; ++h) {
      const float* value = row + (h / group) * p.v_head_stride;
      const float w = scores[(h - h_first) * n + (j - first)];
      float* o = out + (h - h_first) * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) o[i] += w * value[i];
    }
  }
}

// A prefill task: `count` query tokens of sequence `seq`, the first at q row `token` and position `first`,
// with the query heads of kv heads [kv_first, kv_last); or (`decode`) a one-token sequence with every
// kv head.
struct Task {
  int64_t seq, token, first, count, kv_first, kv_last;
  bool decode;
  double cost;
};

// exp of every lane, for arguments <= 0 (scores minus their running maximum): 2^n * e^r with
// |r| <= ln2 / 2 and e^r by its Taylor series to r^7 (truncation under 1e-8 relative). -inf and
// anything below the float range give 0.
__attribute__((always_inline)) inline vec16 exp16(vec16 x) {
  const vec16 clamped = x < -87.0f ? (vec16){} - 87.0f : x;
  const vec16 t = clamped * 1.44269504088896341f + 0.5f;
  ivec16 n = __builtin_convertvector(t, ivec16);
  n += (__builtin_convertvector(n, vec16) > t);  // truncation to floor: -1 where it rounded up
  const vec16 nf = __builtin_convertvector(n, vec16);
  const vec16 r = clamped - nf * 0.693145751953125f - nf * 1.428606765330187045e-06f;
  vec16 e = r * (1.0f / 5040) + (1.0f / 720);
  e = e * r + (1.0f / 120);
  e = e * r + (1.0f / 24);
  e = e * r + (1.0f / 6);
  e = e * r + 0.5f;
  e = e * r + 1.0f;
  e = e * r + 1.0f;
  const ivec16 bits = (n + 127) << 23;
  vec16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? (vec16){} : e * scale;
}

// Up to 16 rows of a task, one lane each, that share a kv head. A task's rows of kv head `kv` are its
// tokens times the kv head's query heads, token-major: lane r is row R = row0 + r, the task's token
// R / group with query head kv * group + R % group. Holds the rows' queries (transposed), weighted values
// and running softmax.
struct Lanes {
  int64_t kv, row0, rows;
  float* queries;  // [head_dim, kLanes]
  float* out;      // [kLanes, head_dim]
  // Plain arrays (read and written as vectors): a std::vector does not align its elements to 64 bytes.
  float top[kLanes], total[kLanes];
  int32_t pos[kLanes];  // each row's position; -1 in lanes past `rows`, which then see no key
};

__attribute__((always_inline)) inline ivec16 load16(const int32_t* p) {
  ivec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// Per-thread scratch of the prefill tasks.
struct Scratch {
  std::vector<float> queries, out, weights, decode_scores;
  std::vector<Lanes> lanes;
  Scratch(int64_t lane_groups, int64_t head_dim, int64_t decode_scores)
      : queries(lane_groups * head_dim * kLanes), out(lane_groups * kLanes * head_dim), weights(kKeys * kLanes),
        decode_scores(std::max<int64_t>(decode_scores, 1)) {}
};

// Adds the keys [j0, j0 + n) of one tile (inside one block) to one lane group: scores every key
// against all the rows at once (the queries transposed, one lane per row), then the running softmax and
// the weighted values.
LORAX_CLONES
void prefill_tile(const Problem& p, int64_t seq, Lanes& l, float* w, int64_t j0, int64_t n) {
  const int64_t d = p.head_dim, group = p.heads / p.kv_heads;
  const float* keys = p.key(seq, j0, l.kv);  // the tile's rows are one stride apart
  const float* first_value = p.value(seq, j0, l.kv);
  vec16 score[kKeys];
  for (int64_t c0 = 0; c0 < n; c0 += 8) {  // 8 keys at a time: 8 independent sums in flight
    const float* key[8];
    for (int64_t c = 0; c < 8; ++c) key[c] = keys + std::min(c0 + c, n - 1) * p.k_pos_stride;
    vec16 acc[8] = {};
    for (int64_t i = 0; i < d; ++i) {
      const vec16 column = load16(l.queries + i * kLanes);
      for (int64_t c = 0; c < 8; ++c) acc[c] += key[c][i] * column;
    }
    for (int64_t c = c0; c < std::min(c0 + 8, n); ++c) score[c] = acc[c - c0];
  }
  const ivec16 pos = load16(l.pos);
  const vec16 old_top = load16(l.top);
  vec16 top = old_top;
  for (int64_t c = 0; c < n; ++c) {
    const int64_t j = j0 + c;
    vec16 sc = score[c] * p.scale;
    if (p.softcap > 0.0f || p.slopes != nullptr) {  // Gemma 2, Bloom: lane by lane
      float lane[kLanes];
      store16(lane, score[c]);
      for (int64_t r = 0; r < l.rows; ++r) {
        lane[r] = p.finish(lane[r], l.kv * group + (l.row0 + r) % group, l.pos[r], j);
      }
      sc = load16(lane);
    }
    ivec16 seen = pos >= static_cast<int32_t>(j);
    if (p.window > 0) seen &= (pos - static_cast<int32_t>(j)) < static_cast<int32_t>(p.window);
    score[c] = seen ? sc : (vec16){} + kNegInf;
    top = top > score[c] ? top : score[c];
  }
  // A row that has seen no key yet keeps -inf: subtract 0 there instead (-inf - -inf is NaN).
  const vec16 base = top == kNegInf ? (vec16){} : top;
  const vec16 rescale = exp16(old_top - base);
  vec16 sum = {};
  for (int64_t c = 0; c < n; ++c) {
    const vec16 e = exp16(score[c] - base);
    sum += e;
    store16(w + c * kLanes, e);
  }
  store16(l.top, top);
  store16(l.total, load16(l.total) * rescale + sum);
  float scales[kLanes];
  store16(scales, rescale);
  const float* values[kKeys];
  for (int64_t c = 0; c < n; ++c) values[c] = first_value + c * p.v_pos_stride;
  // The weighted values, 16 columns at a time for all 16 rows (lanes past `rows` have weight 0): each
  // value vector is loaded once and the rows' sums stay in registers.
  int64_t i = 0;
  for (; i + 16 <= d; i += 16) {
    vec16 a[kLanes];
    for (int64_t r = 0; r < kLanes; ++r) a[r] = load16(l.out + r * d + i) * scales[r];
    for (int64_t c = 0; c < n; ++c) {
      const vec16 value = load16(values[c] + i);
      for (int64_t r = 0; r < kLanes; ++r) a[r] += w[c * kLanes + r] * value;
    }
    for (int64_t r = 0; r < kLanes; ++r) store16(l.out + r * d + i, a[r]);
  }
  for (; i < d; ++i) {
    for (int64_t r = 0; r < l.rows; ++r) {
      float a = l.out[r * d + i] * scales[r];
      for (int64_t c = 0; c < n; ++c) a += w[c * kLanes + r] * values[c][i];
      l.out[r * d + i] = a;
    }
  }
}

// Sets up a task's lane groups: each kv head's rows, 16 per group.
void start_lanes(const Problem& p, const Task& t, Scratch& s) {
  const int64_t d = p.head_dim, group = p.heads / p.kv_heads;
  s.lanes.clear();
  for (int64_t kv = t.kv_first; kv < t.kv_last; ++kv) {
    for (int64_t row0 = 0; row0 < t.count * group; row0 += kLanes) {
      const int64_t g = static_cast<int64_t>(s.lanes.size()), rows = std::min(kLanes, t.count * group - row0);
      Lanes l{kv, row0, rows, s.queries.data() + g * d * kLanes, s.out.data() + g * kLanes * d, {}, {}, {}};
      std::fill(l.top, l.top + kLanes, kNegInf);
      std::fill(l.pos, l.pos + kLanes, -1);
      std::fill(l.queries, l.queries + d * kLanes, 0.0f);
      std::fill(l.out, l.out + kLanes * d, 0.0f);
      for (int64_t r = 0; r < l.rows; ++r) {
        const int64_t token = (row0 + r) / group, h = kv * group + (row0 + r) % group;
        const float* q = p.q + (t.token + token) * p.q_token_stride + h * p.q_head_stride;
        for (int64_t i = 0; i < d; ++i) l.queries[i * kLanes + r] = q[i];
        l.pos[r] = static_cast<int32_t>(t.first + token);
      }
      s.lanes.push_back(l);
    }
  }
}

void prefill_task(const Problem& p, const Task& t, Scratch& s) {
  if (t.decode) {  // a decode row of a mixed step: attended exactly as a decode step attends it
    attend_one(p, t.seq, t.token, 0, p.kv_heads, s.decode_scores.data());
    return;
  }
  const int64_t d = p.head_dim, group = p.heads / p.kv_heads;
  start_lanes(p, t, s);
  const int64_t last = t.first + t.count - 1;
  const int64_t lo = p.window > 0 ? std::max<int64_t>(0, t.first - p.window + 1) : 0;
  // Tiles end at multiples of kKeys and at block ends: fixed positions, so that a row's sums do not
  // depend on which rows share its task. Keys below `lo` or past `last` are masked for every row.
  auto tile_end = [&](int64_t j0) {
    return std::min({j0 - j0 % kKeys + kKeys, (j0 / p.block_size + 1) * p.block_size, last + 1});
  };
  for (int64_t j0 = lo - lo % kKeys; j0 <= last;) {
    const int64_t stop = tile_end(j0), from = std::max(j0, lo), next = stop <= last ? tile_end(stop) - stop : 0;
    for (Lanes& l : s.lanes) {
      // The next tile comes from memory (a cached prefix was written steps ago): ask for this kv head's
      // part of it now, spread over the tile's work so that the requests never pile up.
      if (l.row0 == 0 && next > 0) {
        const float* key = p.key(t.seq, stop, l.kv);
        const float* value = p.value(t.seq, stop, l.kv);
        for (int64_t c = 0; c < next; ++c) {
          for (int64_t i = 0; i < d; i += 16) {
            __builtin_prefetch(key + c * p.k_pos_stride + i, 0, 2);  // to L2: 64 KB a tile would crowd L1
            __builtin_prefetch(value + c * p.v_pos_stride + i, 0, 2);
          }
        }
      }
      prefill_tile(p, t.seq, l, s.weights.data(), from, stop - from);
    }
    j0 = stop;
  }
  for (const Lanes& l : s.lanes) {
    for (int64_t r = 0; r < l.rows; ++r) {
      const int64_t token = t.token + (l.row0 + r) / group, h = l.kv * group + (l.row0 + r) % group;
      float* out = p.out + (token * p.heads + h) * d;
      const float inv = 1.0f / l.total[r];
      for (int64_t i = 0; i < d; ++i) out[i] = l.out[r * d + i] * inv;
    }
  }
}

// Checks the inputs both ops share and lays them out as a Problem; `owned` keeps converted tensors alive.
Problem problem_of(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& context_lens, double scale, int64_t window,
                   double softcap, const std::optional<at::Tensor>& alibi_slopes, std::vector<at::Tensor>& owned) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat,
              "float32 query and cache only");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "q [tokens, heads, head_dim], caches [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "head_dim must be contiguous");
  const int64_t heads = q.size(1), head_dim = q.size(2), kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim, "cache head_dim ", k_cache.size(3), " != query head_dim ", head_dim);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, heads, " heads do not share ", kv_heads, " kv heads evenly");
  const at::Tensor tables = block_tables.to(at::kLong).contiguous();
  const at::Tensor lens = context_lens.to(at::kLong).contiguous();
  TORCH_CHECK(tables.dim() == 2 && lens.dim() == 1 && tables.size(0) == lens.numel(), "one table and length per row");
  const int64_t* len_ptr = lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < lens.numel(); ++b) {
    TORCH_CHECK(len_ptr[b] <= tables.size(1) * k_cache.size(1), "context length exceeds the block table");
  }
  at::Tensor slopes;
  if (alibi_slopes.has_value()) {
    slopes = alibi_slopes->to(at::kFloat).contiguous();
    TORCH_CHECK(slopes.numel() == heads, "one ALiBi slope per head");
  }
  owned = {tables, lens, slopes};
  return Problem{q.data_ptr<float>(),
                 q.stride(0),
                 q.stride(1),
                 k_cache.data_ptr<float>(),
                 v_cache.data_ptr<float>(),
                 k_cache.stride(0),
                 k_cache.stride(1),
                 k_cache.stride(2),
                 v_cache.stride(0),
                 v_cache.stride(1),
                 v_cache.stride(2),
                 tables.data_ptr<int64_t>(),
                 tables.size(1),
                 len_ptr,
                 nullptr,
                 heads,
                 kv_heads,
                 head_dim,
                 k_cache.size(1),
                 static_cast<float>(scale),
                 window,
                 static_cast<float>(softcap),
                 slopes.defined() ? slopes.data_ptr<float>() : nullptr};
}

int64_t longest_of(const Problem& p, int64_t batch) {
  int64_t longest = 1;
  for (int64_t b = 0; b < batch; ++b) longest = std::max(longest, p.lens[b]);
  return longest;
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t window, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  std::vector<at::Tensor> owned;
  Problem p = problem_of(q, k_cache, v_cache, block_tables, context_lens, scale, window, softcap, alibi_slopes, owned);
  const int64_t batch = q.size(0);
  TORCH_CHECK(context_lens.numel() == batch, "one table and length per row");
  at::Tensor out = at::empty({batch, p.heads, p.head_dim}, q.options());
  p.out = out.data_ptr<float>();
  // A task is one sequence, or a range of its kv heads when there are fewer sequences than threads
  // (one long sequence would otherwise use one core).
  const int64_t splits =
      std::min(p.kv_heads, std::max<int64_t>(1, at::get_num_threads() / std::max<int64_t>(batch, 1)));
  const int64_t kv_per_task = (p.kv_heads + splits - 1) / splits;
  const int64_t scratch = kv_per_task * (p.heads / p.kv_heads) * longest_of(p, batch);
  at::parallel_for(0, batch * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(scratch));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / splits, kv_first = (task % splits) * kv_per_task;
      attend_one(p, b, b, kv_first, std::min(p.kv_heads, kv_first + kv_per_task), scores.data());
    }
  });
  return out;
}

at::Tensor paged_prefill_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                   const at::Tensor& block_tables, const at::Tensor& query_start,
                                   const at::Tensor& context_lens, double scale, int64_t window, double softcap,
                                   const std::optional<at::Tensor>& alibi_slopes) {
  std::vector<at::Tensor> owned;
  Problem p = problem_of(q, k_cache, v_cache, block_tables, context_lens, scale, window, softcap, alibi_slopes, owned);
  const int64_t batch = context_lens.numel(), tokens = q.size(0), group = p.heads / p.kv_heads;
  const at::Tensor starts = query_start.to(at::kLong).contiguous();
  TORCH_CHECK(starts.dim() == 1 && starts.numel() == batch, "one query start per sequence");
  const int64_t* start = starts.data_ptr<int64_t>();
  TORCH_CHECK(batch > 0 ? start[0] == 0 : tokens == 0, "the sequences' query tokens must cover q's rows from row 0");
  // A prompt task: 16 tokens with the query heads of its kv heads. All the kv heads, so that a position's
  // keys and values are read in one piece, unless the batch's prompts then leave the threads too few tasks.
  int64_t pieces = 0;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t end = b + 1 < batch ? start[b + 1] : tokens;
    const int64_t count = end - start[b];
    TORCH_CHECK(count >= 1 && count <= p.lens[b] && end <= tokens,
                "sequence ", b, ": query tokens [", start[b], ", ", end, ") do not fit its ", p.lens[b],
                " cached tokens or the ", tokens, " query rows");
    if (count > 1) pieces += (count + kTokens - 1) / kTokens;
  }
  const int64_t wanted = std::max<int64_t>(1, 4 * at::get_num_threads() / std::max<int64_t>(pieces, 1));
  const int64_t splits = std::min(p.kv_heads, wanted);
  const int64_t kv_per_task = (p.kv_heads + splits - 1) / splits;
  std::vector<Task> tasks;
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t count = (b + 1 < batch ? start[b + 1] : tokens) - start[b];
    const int64_t first_pos = p.lens[b] - count;
    if (count == 1) {
      tasks.push_back({b, start[b], first_pos, 1, 0, p.kv_heads, true, static_cast<double>(p.lens[b]) * p.heads});
      continue;
    }
    for (int64_t i = 0; i < count; i += kTokens) {
      const int64_t n = std::min(kTokens, count - i), last = first_pos + i + n - 1;
      const int64_t lo = window > 0 ? std::max<int64_t>(0, first_pos + i - window + 1) : 0;
      for (int64_t kv = 0; kv < p.kv_heads; kv += kv_per_task) {
        const int64_t kv_last = std::min(p.kv_heads, kv + kv_per_task);
        const double cost = static_cast<double>(n * group * (kv_last - kv)) * (last + 1 - lo);
        tasks.push_back({b, start[b] + i, first_pos + i, n, kv, kv_last, false, cost});
      }
    }
  }
  // Largest first from a shared counter: the threads finish together however ragged the sequences.
  std::stable_sort(tasks.begin(), tasks.end(), [](const Task& a, const Task& b) { return a.cost > b.cost; });
  at::Tensor out = at::empty({tokens, p.heads, p.head_dim}, q.options());
  p.out = out.data_ptr<float>();
  const int64_t longest = longest_of(p, batch);
  std::atomic<int64_t> next{0};
  const int64_t workers = std::min<int64_t>(at::get_num_threads(), static_cast<int64_t>(tasks.size()));
  at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
    const int64_t lane_groups = p.kv_heads * ((kTokens * group + kLanes - 1) / kLanes);
    Scratch s(lane_groups, p.head_dim, p.heads * longest);
    for (int64_t i; (i = next.fetch_add(1)) < static_cast<int64_t>(tasks.size());) prefill_task(p, tasks[i], s);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(lorax_attention, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens,"
        " float scale, int window, float softcap, Tensor? alibi_slopes) -> Tensor",
        &paged_decode_attention);
  m.def("paged_prefill_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor query_start,"
        " Tensor context_lens, float scale, int window, float softcap, Tensor? alibi_slopes) -> Tensor",
        &paged_prefill_attention);
}
