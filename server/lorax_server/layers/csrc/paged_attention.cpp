// Decode attention read straight from the paged KV cache (CPU, float32): every sequence has one query
// token, at position context_len - 1, which attends to the sequence's first context_len cached tokens.
//
//   q        [batch, heads, head_dim]
//   k, v     [num_blocks, block_size, kv_heads, head_dim]   (last dimension contiguous)
//   tables   [batch, max_blocks]   block of each sequence's positions j (block tables[b][j / block_size])
//   lens     [batch]               context length of each sequence
//   score(h, j) = scale * q_h . k_j, then softcap * tanh(score / softcap) when soft-capped, then
//                 + slope_h * (j - (len - 1)) with ALiBi; keys outside the sliding window
//                 (len - 1 - j >= window) are skipped; out_h = softmax_j(score) . v_j.
//
// Design: the torch path gathers every sequence's blocks into a padded grid per layer and then runs
// SDPA over the padding; here each sequence is one task that reads its blocks in place, in address
// order, once for the keys and once for the values, for all query heads (GQA: a kv head's row is read
// for every query head that shares it). Tasks run in parallel with at::parallel_for. The inner loops are written for the compiler to
// vectorise ("omp simd"); the worker is cloned for AVX2+FMA and picked at run time, so the binary does
// not depend on the build machine. The op is registered with the dispatcher (torch.ops.lorax_attention).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <vector>

namespace {

struct Problem {
  const float* q;
  int64_t q_seq_stride, q_head_stride;
  const float* k;
  const float* v;
  int64_t k_block_stride, k_pos_stride, k_head_stride;
  int64_t v_block_stride, v_pos_stride, v_head_stride;
  const int64_t* tables;
  int64_t table_stride;
  const int64_t* lens;
  float* out;  // [batch, heads, head_dim], contiguous
  int64_t heads, kv_heads, head_dim, block_size;
  float scale;
  int64_t window;  // <= 0: none
  float softcap;   // <= 0: none
  const float* slopes;  // [heads] or nullptr
};

// One sequence and the kv heads [kv_first, kv_last) with the query heads that share them. Positions
// are the outer loop so that each cached row (all kv heads of one token) is read in address order.
// `scores` is scratch for (kv_last - kv_first) * group * context_len floats.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
__attribute__((target_clones("arch=haswell", "default")))
#endif
void attend_one(const Problem& p, int64_t b, int64_t kv_first, int64_t kv_last, float* scores) {
  const int64_t group = p.heads / p.kv_heads;
  const int64_t d = p.head_dim;
  const int64_t len = p.lens[b];
  const int64_t first = p.window > 0 ? std::max<int64_t>(0, len - p.window) : 0;
  const int64_t n = len - first;
  const int64_t h_first = kv_first * group, h_count = (kv_last - kv_first) * group;
  float* out = p.out + (b * p.heads + h_first) * d;
  std::fill(out, out + h_count * d, 0.0f);
  if (n <= 0) return;
  const int64_t* table = p.tables + b * p.table_stride;
  const float* query = p.q + b * p.q_seq_stride;

  for (int64_t j = first; j < len; ++j) {
    const float* row = p.k + table[j / p.block_size] * p.k_block_stride + (j % p.block_size) * p.k_pos_stride;
    for (int64_t h = h_first; h < h_first + h_count; ++h) {
      const float* key = row + (h / group) * p.k_head_stride;
      const float* qh = query + h * p.q_head_stride;
      float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
      for (int64_t i = 0; i < d; ++i) dot += qh[i] * key[i];
      float s = dot * p.scale;
      if (p.softcap > 0.0f) s = std::tanh(s / p.softcap) * p.softcap;
      if (p.slopes != nullptr) s += p.slopes[h] * static_cast<float>(j - (len - 1));
      scores[(h - h_first) * n + (j - first)] = s;
    }
  }

  for (int64_t h = 0; h < h_count; ++h) {
    float* row = scores + h * n;
    float top = -std::numeric_limits<float>::infinity();
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
    const float* row = p.v + table[j / p.block_size] * p.v_block_stride + (j % p.block_size) * p.v_pos_stride;
    for (int64_t h = h_first; h < h_first + h_count; ++h) {
      const float* value = row + (h / group) * p.v_head_stride;
      const float w = scores[(h - h_first) * n + (j - first)];
      float* o = out + (h - h_first) * d;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) o[i] += w * value[i];
    }
  }
}

at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                                  int64_t window, double softcap, const std::optional<at::Tensor>& alibi_slopes) {
  TORCH_CHECK(q.device().is_cpu() && k_cache.device().is_cpu() && v_cache.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat &&
                  v_cache.scalar_type() == at::kFloat,
              "float32 query and cache only");
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes(),
              "q [batch, heads, head_dim], caches [blocks, block_size, kv_heads, head_dim]");
  TORCH_CHECK(q.stride(2) == 1 && k_cache.stride(3) == 1 && v_cache.stride(3) == 1, "head_dim must be contiguous");
  const int64_t batch = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == head_dim, "cache head_dim ", k_cache.size(3), " != query head_dim ", head_dim);
  TORCH_CHECK(kv_heads > 0 && heads % kv_heads == 0, heads, " heads do not share ", kv_heads, " kv heads evenly");
  const at::Tensor tables = block_tables.to(at::kLong).contiguous();
  const at::Tensor lens = context_lens.to(at::kLong).contiguous();
  TORCH_CHECK(tables.dim() == 2 && tables.size(0) == batch && lens.numel() == batch, "one table and length per row");
  at::Tensor slopes;
  if (alibi_slopes.has_value()) {
    slopes = alibi_slopes->to(at::kFloat).contiguous();
    TORCH_CHECK(slopes.numel() == heads, "one ALiBi slope per head");
  }

  const int64_t* len_ptr = lens.data_ptr<int64_t>();
  int64_t longest = 0;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(len_ptr[b] <= tables.size(1) * k_cache.size(1), "context length exceeds the block table");
    longest = std::max(longest, len_ptr[b]);
  }

  at::Tensor out = at::empty({batch, heads, head_dim}, q.options());
  Problem p{q.data_ptr<float>(), q.stride(0), q.stride(1),
            k_cache.data_ptr<float>(), v_cache.data_ptr<float>(),
            k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
            v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
            tables.data_ptr<int64_t>(), tables.size(1), len_ptr,
            out.data_ptr<float>(), heads, kv_heads, head_dim, k_cache.size(1),
            static_cast<float>(scale), window, static_cast<float>(softcap),
            slopes.defined() ? slopes.data_ptr<float>() : nullptr};
  // A task is one sequence, or a range of its kv heads when there are fewer sequences than threads
  // (one long sequence would otherwise use one core).
  const int64_t splits = std::min(kv_heads, std::max<int64_t>(1, at::get_num_threads() / std::max<int64_t>(batch, 1)));
  const int64_t kv_per_task = (kv_heads + splits - 1) / splits;
  const int64_t scratch = kv_per_task * (heads / kv_heads) * std::max<int64_t>(longest, 1);
  at::parallel_for(0, batch * splits, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores(static_cast<size_t>(scratch));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t kv_first = (task % splits) * kv_per_task;
      attend_one(p, task / splits, kv_first, std::min(kv_heads, kv_first + kv_per_task), scores.data());
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(lorax_attention, m) {
  m.def("paged_decode_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_tables, Tensor context_lens,"
        " float scale, int window, float softcap, Tensor? alibi_slopes) -> Tensor",
        &paged_decode_attention);
}
