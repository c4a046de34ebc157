// RMSNorm and rotary embeddings on the CPU, float32, one pass each.
//
//   rms_norm(x [tokens, hidden], w [hidden], eps) = w * x / sqrt(mean(x^2) + eps)
//   rotary(x [tokens, heads, head_dim], cos, sin [tokens, rot_dim], interleaved):
//     the first rot_dim dims of every head become x * cos + rotate(x) * sin, where rotate pairs dim i
//     with i + rot_dim/2 (-x[i + half], x[i]) or, interleaved, dim 2i with 2i+1 (-x[2i+1], x[2i]);
//     the other dims are copied.
//
// Design: the torch paths run these as 5-8 small operators each (power, mean, rsqrt, multiplies; slices,
// negation, concatenations), every one a pass over the tensor and a dispatch; on a decode step's few
// rows the dispatches cost more than the arithmetic. Here each is one loop over the rows, in parallel
// over rows only when there are enough of them. The loops are written for the compiler to vectorise,
// cloned for AVX-512 and AVX2 and picked at run time. Registered as torch.ops.lorax_fused.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

namespace {

constexpr int64_t kSerialElements = 1 << 16;  // below this, one thread: waking others costs more

int64_t grain_rows(int64_t row_elements) {
  return std::max<int64_t>(1, kSerialElements / std::max<int64_t>(1, row_elements));
}

#if defined(__GNUC__) && !defined(__clang__) && (defined(__x86_64__) || defined(__i386__))
#define LORAX_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=haswell", "default")))
#else
#define LORAX_CLONES
#endif

LORAX_CLONES void norm_rows(const float* x, int64_t x_stride, const float* w, float* out, int64_t hidden,
                            float eps, int64_t begin, int64_t end) {
  for (int64_t t = begin; t < end; ++t) {
    const float* row = x + t * x_stride;
    float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
    for (int64_t i = 0; i < hidden; ++i) squares += row[i] * row[i];
    const float inv = 1.0f / std::sqrt(squares / static_cast<float>(hidden) + eps);
    float* o = out + t * hidden;
#pragma omp simd
    for (int64_t i = 0; i < hidden; ++i) o[i] = w[i] * (row[i] * inv);
  }
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(x.dim() == 2 && x.stride(1) == 1, "x [tokens, hidden] with contiguous rows");
  const int64_t tokens = x.size(0), hidden = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden && weight.is_contiguous(), "weight [hidden]");
  at::Tensor out = at::empty({tokens, hidden}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* wp = weight.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t stride = x.stride(0);
  at::parallel_for(0, tokens, grain_rows(hidden), [&](int64_t begin, int64_t end) {
    norm_rows(xp, stride, wp, op, hidden, static_cast<float>(eps), begin, end);
  });
  return out;
}

struct Rotation {
  const float* x;
  int64_t token_stride, head_stride;
  const float* cos;
  const float* sin;
  int64_t cs_stride;  // cos and sin rows
  float* out;         // [tokens, heads, head_dim], contiguous
  int64_t heads, head_dim, rot_dim;
  bool interleaved;
};

LORAX_CLONES void rotate_rows(const Rotation& r, int64_t begin, int64_t end) {
  const int64_t half = r.rot_dim / 2;
  for (int64_t t = begin; t < end; ++t) {
    const float* c = r.cos + t * r.cs_stride;
    const float* s = r.sin + t * r.cs_stride;
    for (int64_t h = 0; h < r.heads; ++h) {
      const float* in = r.x + t * r.token_stride + h * r.head_stride;
      float* o = r.out + (t * r.heads + h) * r.head_dim;
      if (r.interleaved) {
        for (int64_t i = 0; i < r.rot_dim; i += 2) {
          o[i] = in[i] * c[i] + (-in[i + 1]) * s[i];
          o[i + 1] = in[i + 1] * c[i + 1] + in[i] * s[i + 1];
        }
      } else {
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) o[i] = in[i] * c[i] + (-in[i + half]) * s[i];
#pragma omp simd
        for (int64_t i = half; i < r.rot_dim; ++i) o[i] = in[i] * c[i] + in[i - half] * s[i];
      }
      for (int64_t i = r.rot_dim; i < r.head_dim; ++i) o[i] = in[i];
    }
  }
}

at::Tensor rotary(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, bool interleaved) {
  TORCH_CHECK(x.device().is_cpu() && cos.device().is_cpu() && sin.device().is_cpu(), "CPU tensors only");
  TORCH_CHECK(x.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
              "float32 only");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "x [tokens, heads, head_dim] with contiguous heads");
  const int64_t tokens = x.size(0), heads = x.size(1), head_dim = x.size(2);
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == tokens, "cos, sin [tokens, rot_dim]");
  TORCH_CHECK(cos.stride(1) == 1 && sin.stride(1) == 1 && cos.stride(0) == sin.stride(0),
              "cos and sin: contiguous rows, one stride");
  const int64_t rot_dim = cos.size(1);
  TORCH_CHECK(rot_dim % 2 == 0 && rot_dim <= head_dim, "rot_dim must be even and at most head_dim");
  at::Tensor out = at::empty({tokens, heads, head_dim}, x.options());
  Rotation r{x.data_ptr<float>(), x.stride(0), x.stride(1), cos.data_ptr<float>(), sin.data_ptr<float>(),
             cos.stride(0),       out.data_ptr<float>(), heads, head_dim, rot_dim, interleaved};
  at::parallel_for(0, tokens, grain_rows(heads * head_dim), [&](int64_t begin, int64_t end) {
    rotate_rows(r, begin, end);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(lorax_fused, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary(Tensor x, Tensor cos, Tensor sin, bool interleaved) -> Tensor");
}

TORCH_LIBRARY_IMPL(lorax_fused, CPU, m) {
  m.impl("rms_norm", rms_norm);
  m.impl("rotary", rotary);
}
