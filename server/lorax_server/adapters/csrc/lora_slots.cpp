// Writing one adapter into a slot of the CPU LoRA kernel's stack (the layout lora_sgmv.cpp reads), one call
// per linear: for every part p the adapter updates,
//
//   a[slot, :, r0 : r0 + rank] = A_p^T                       A_p [rank, in_features]
//   b[slot, position] = B_p^T (times its scale), tiled        B_p [width, rank]; b: [rank_of_stack, width]
//   scale[slot, r0 : r0 + rank] = the part's scale            when the stack keeps the scales apart
//
// where b is the tiled B of the part's run: its tiles of 32 columns, each [rank_of_stack, 32] row-major,
// then the last width % 32 columns as [rank_of_stack, width % 32]. Every other value of the slot (the
// ranks and parts the adapter lacks, in a, every run's b and scale) is written zero: the slot may hold
// anything before, so a new stack's slots need no zero fill, nor an evicted adapter's slot a clearing.
//
// Why C++: a cold adapter joining a running batch is written into every linear's stack during its
// prompt step, a gap every running request waits through. In torch ops that is about ten small calls
// a part (56 parts on the bench model: 2-3 ms); here it is one call a linear, and the copy itself.
//
// The factors are converted as they are written: widened to a float32 stack (exactly), or copied as
// they are into a stack of their own 16-bit dtype. A float32 stack holds B times its scale (rounded once
// in float32, as `scale * b` in torch); a 16-bit one holds B as it is and `scale` the scales.
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>

namespace {

constexpr int64_t kTile = 32;  // lora_sgmv.cpp's column tile

// One part, the stack's factors of type D and the part's of type S (D == S, or D float32).
template <typename D, typename S>
void write_part(D* a, int64_t in, int64_t ranks, int64_t r0, const S* part_a, int64_t rank, D* b,
                int64_t stack_rank, int64_t width, const S* part_b, std::optional<float> scale) {
  // Row by row of a: its `rank` values are contiguous, and A's `rank` rows are read a cache line at a time.
  for (int64_t k = 0; k < in; ++k) {
    D* row = a + k * ranks + r0;
    for (int64_t c = 0; c < rank; ++c) row[c] = static_cast<D>(static_cast<float>(part_a[c * in + k]));
  }
  const int64_t full = width / kTile * kTile, rest = width - full;
  for (int64_t j = 0; j < width; ++j) {
    const S* column = part_b + j * rank;  // B_p's row j: column j of B_p^T
    D* out = j < full ? b + (j / kTile) * stack_rank * kTile + j % kTile : b + stack_rank * full + (j - full);
    const int64_t step = j < full ? kTile : rest;  // from one row of the tiled matrix to the next
    for (int64_t c = 0; c < rank; ++c) {
      const float v = static_cast<float>(column[c]);
      out[c * step] = static_cast<D>(scale.has_value() ? v * *scale : v);
    }
  }
}

template <typename D>
void write_part_from(const at::Tensor& part_a, const at::Tensor& part_b, D* a, int64_t in, int64_t ranks, int64_t r0,
                     D* b, int64_t stack_rank, int64_t width, std::optional<float> scale) {
  const int64_t rank = part_a.size(0);
  switch (part_a.scalar_type()) {
    case at::kFloat:
      write_part(a, in, ranks, r0, part_a.data_ptr<float>(), rank, b, stack_rank, width, part_b.data_ptr<float>(),
                 scale);
      break;
    case at::kBFloat16:
      write_part(a, in, ranks, r0, part_a.data_ptr<at::BFloat16>(), rank, b, stack_rank, width,
                 part_b.data_ptr<at::BFloat16>(), scale);
      break;
    default:
      write_part(a, in, ranks, r0, part_a.data_ptr<at::Half>(), rank, b, stack_rank, width,
                 part_b.data_ptr<at::Half>(), scale);
  }
}

void write_slot(at::Tensor& a, at::TensorList run_b, const std::optional<at::Tensor>& scale, int64_t slot,
                at::TensorList part_a, at::TensorList part_b, at::IntArrayRef part_r0, at::IntArrayRef part_run,
                at::IntArrayRef part_position, at::ArrayRef<double> part_scale) {
  const auto dtype = a.scalar_type();
  TORCH_CHECK(a.device().is_cpu() && a.dim() == 3 && a.is_contiguous(), "a [slots, in, ranks]: contiguous, on the CPU");
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, "a: float32, bfloat16 or float16");
  const int64_t slots = a.size(0), in = a.size(1), ranks = a.size(2), parts = part_a.size();
  TORCH_CHECK(0 <= slot && slot < slots, "slot ", slot, " outside the stack of ", slots);
  TORCH_CHECK(part_b.size() == parts && part_r0.size() == parts && part_run.size() == parts &&
                  part_position.size() == parts && part_scale.size() == parts,
              "one b, r0, run, position and scale per part");
  if (scale.has_value()) {
    TORCH_CHECK(scale->device().is_cpu() && scale->scalar_type() == at::kFloat && scale->is_contiguous() &&
                    scale->dim() == 2 && scale->size(0) == slots && scale->size(1) == ranks,
                "scale [slots, ranks]: contiguous float32");
  }
  for (const at::Tensor& b : run_b) {
    TORCH_CHECK(b.device().is_cpu() && b.scalar_type() == dtype && b.dim() == 4 && b.is_contiguous() &&
                    b.size(0) == slots,
                "run b [slots, parts, rank, width]: contiguous, of a's dtype");
  }
  for (int64_t i = 0; i < parts; ++i) {
    const at::Tensor &pa = part_a[i], &pb = part_b[i];
    TORCH_CHECK(0 <= part_run[i] && part_run[i] < static_cast<int64_t>(run_b.size()), "part ", i, ": no such run");
    const at::Tensor& b = run_b[part_run[i]];
    TORCH_CHECK(pa.device().is_cpu() && pb.device().is_cpu() && pa.is_contiguous() && pb.is_contiguous() &&
                    pa.scalar_type() == pb.scalar_type(),
                "part ", i, ": contiguous CPU factors of one dtype");
    TORCH_CHECK(pa.scalar_type() == dtype || (dtype == at::kFloat && (pa.scalar_type() == at::kBFloat16 ||
                                                                      pa.scalar_type() == at::kHalf)),
                "part ", i, ": its factors' dtype must be the stack's, or 16-bit into a float32 stack");
    const int64_t rank = pa.dim() == 2 ? pa.size(0) : -1, width = b.size(3);
    TORCH_CHECK(pa.dim() == 2 && pa.size(1) == in && pb.dim() == 2 && pb.size(0) == width && pb.size(1) == rank,
                "part ", i, ": A [rank, in] and B [width, rank] that fit the stack");
    TORCH_CHECK(0 <= part_position[i] && part_position[i] < b.size(1), "part ", i, ": no such position in its run");
    TORCH_CHECK(rank <= b.size(2) && 0 <= part_r0[i] && part_r0[i] + rank <= ranks, "part ", i,
                ": its ranks exceed the stack's");
  }
  // The whole slot zeros first (it fits in the caches: about 100 KB a factor on the bench model).
  const auto zero_slot = [slot](const at::Tensor& t) {
    const int64_t bytes = t.numel() / t.size(0) * t.element_size();
    std::memset(static_cast<char*>(t.data_ptr()) + slot * bytes, 0, bytes);
  };
  zero_slot(a);
  for (const at::Tensor& b : run_b) zero_slot(b);
  if (scale.has_value()) zero_slot(*scale);
  for (int64_t i = 0; i < parts; ++i) {
    const at::Tensor& run = run_b[part_run[i]];
    const int64_t stack_rank = run.size(2), width = run.size(3), offset = (slot * run.size(1) + part_position[i]);
    std::optional<float> folded;
    if (scale.has_value()) {
      float* s = scale->data_ptr<float>() + slot * ranks + part_r0[i];
      for (int64_t c = 0; c < part_a[i].size(0); ++c) s[c] = static_cast<float>(part_scale[i]);
    } else {
      folded = static_cast<float>(part_scale[i]);
    }
    const int64_t a_offset = slot * in * ranks, b_offset = offset * stack_rank * width;
    if (dtype == at::kFloat) {
      write_part_from(part_a[i], part_b[i], a.data_ptr<float>() + a_offset, in, ranks, part_r0[i],
                      run.data_ptr<float>() + b_offset, stack_rank, width, folded);
    } else if (dtype == at::kBFloat16) {
      write_part_from(part_a[i], part_b[i], a.data_ptr<at::BFloat16>() + a_offset, in, ranks, part_r0[i],
                      run.data_ptr<at::BFloat16>() + b_offset, stack_rank, width, folded);
    } else {
      write_part_from(part_a[i], part_b[i], a.data_ptr<at::Half>() + a_offset, in, ranks, part_r0[i],
                      run.data_ptr<at::Half>() + b_offset, stack_rank, width, folded);
    }
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(lorax_lora, m) {
  m.def(
      "write_slot_(Tensor(a!) a, Tensor(b!)[] run_b, Tensor(c!)? scale, int slot, Tensor[] part_a, Tensor[] part_b, "
      "int[] part_r0, int[] part_run, int[] part_position, float[] part_scale) -> ()");
}

TORCH_LIBRARY_IMPL(lorax_lora, CPU, m) { m.impl("write_slot_", write_slot); }
