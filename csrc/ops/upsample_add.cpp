// The device-independent host code of fpn_fast::upsample_add, upsample_add_ and
// upsample_add_backward_top (input checks, layout handling, allocation: the drivers each
// device's registration hands its kernel), and the test hooks of the index math.
#include <torch/library.h>

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

#include <vector>

#include "ops/upsample_add_driver.h"
#include "ops/upsample_index.h"

namespace fpn_fast {
namespace {

// NHWC when the tensor is laid out that way and not also plainly contiguous (mirrors
// fpn_fast.ops.reference.memory_format_of, which the fake kernels use).
bool is_channels_last(const at::Tensor& t) {
  return !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_inputs(const at::Tensor& lateral, const at::Tensor& top, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK_VALUE(lateral.dim() == 4 && top.dim() == 4,
                    "fpn_fast::upsample_add: lateral and top must be 4-D (N, C, H, W); got lateral ",
                    lateral.sizes(), ", top ", top.sizes());
  // A wrong dtype is a TypeError, a wrong shape or device a ValueError, as in fpn_fast.ops._checks.
  TORCH_CHECK_TYPE(is_float(lateral.scalar_type()), "fpn_fast::upsample_add: floating dtypes only, got lateral ",
                   lateral.scalar_type());
  TORCH_CHECK_TYPE(top.scalar_type() == lateral.scalar_type(), "fpn_fast::upsample_add: top dtype ",
                   top.scalar_type(), " differs from lateral dtype ", lateral.scalar_type());
  TORCH_CHECK_VALUE(top.device() == lateral.device(), "fpn_fast::upsample_add: top is on ", top.device(),
                    ", lateral on ", lateral.device());
  TORCH_CHECK_VALUE(top.size(0) == lateral.size(0) && top.size(1) == lateral.size(1), "fpn_fast::upsample_add: top ",
                    top.sizes(), " must match lateral ", lateral.sizes(), " in N and C");
  TORCH_CHECK_VALUE((top.size(2) > 0 && top.size(3) > 0) || lateral.size(2) * lateral.size(3) == 0,
                    "fpn_fast::upsample_add: top has an empty plane ", top.sizes(), ", nothing to upsample to lateral ",
                    lateral.sizes());
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == lateral.size(1), "fpn_fast::upsample_add: bias must have shape (",
                      lateral.size(1), ",) for lateral ", lateral.sizes(), ", got ", b.sizes());
    TORCH_CHECK_TYPE(b.scalar_type() == lateral.scalar_type(), "fpn_fast::upsample_add: bias dtype ",
                     b.scalar_type(), " differs from lateral dtype ", lateral.scalar_type());
    TORCH_CHECK_VALUE(b.device() == lateral.device(), "fpn_fast::upsample_add: bias is on ", b.device(),
                      ", lateral on ", lateral.device());
  }
}

// Fills the kernel arguments; `top` and `bias` are made dense in out's layout (a copy only
// when they arrive in another one: top is a quarter of the output or less).
UpsampleAddArgs make_args(const at::Tensor& out, const at::Tensor& lateral, const at::Tensor& top_dense,
                          const std::optional<at::Tensor>& bias_dense, bool channels_last) {
  return UpsampleAddArgs{out.data_ptr(),
                         lateral.const_data_ptr(),
                         top_dense.const_data_ptr(),
                         bias_dense.has_value() ? bias_dense->const_data_ptr() : nullptr,
                         lateral.size(0),
                         lateral.size(1),
                         lateral.size(2),
                         lateral.size(3),
                         top_dense.size(2),
                         top_dense.size(3),
                         channels_last,
                         lateral.scalar_type()};
}

std::optional<at::Tensor> dense_bias(const std::optional<at::Tensor>& bias) {
  if (!bias.has_value()) return std::nullopt;
  return bias->contiguous();
}

}  // namespace

at::Tensor upsample_add_driver(const at::Tensor& lateral, const at::Tensor& top, const std::optional<at::Tensor>& bias,
                               ForwardKernel kernel) {
  check_inputs(lateral, top, bias);
  const bool channels_last = is_channels_last(lateral);
  const at::MemoryFormat fmt = format_of(channels_last);
  at::Tensor out = at::empty(lateral.sizes(), lateral.options().memory_format(fmt));
  if (out.numel() == 0) return out;
  const at::Tensor lateral_dense = lateral.contiguous(fmt);
  const at::Tensor top_dense = top.contiguous(fmt);
  kernel(make_args(out, lateral_dense, top_dense, dense_bias(bias), channels_last));
  return out;
}

void upsample_add_inplace_driver(const at::Tensor& lateral, const at::Tensor& top,
                                 const std::optional<at::Tensor>& bias, ForwardKernel kernel) {
  check_inputs(lateral, top, bias);
  // Like ATen's in-place ops: no element of lateral may be written twice (an expanded view).
  at::assert_no_internal_overlap(lateral);
  if (lateral.numel() == 0) return;
  const bool channels_last = is_channels_last(lateral);
  const at::MemoryFormat fmt = format_of(channels_last);
  const bool reads_lateral_memory =
      at::get_overlap_status(lateral, top) != at::MemOverlapStatus::No ||
      (bias.has_value() && at::get_overlap_status(lateral, *bias) != at::MemOverlapStatus::No);
  if (!lateral.is_contiguous(fmt) || reads_lateral_memory) {
    // Neither layout (e.g. a strided view), or top / bias read memory the kernel would write
    // while reading them: compute densely, then write back through lateral.
    const_cast<at::Tensor&>(lateral).copy_(upsample_add_driver(lateral, top, bias, kernel));
    return;
  }
  // The kernel reads each lateral element before writing the same element: safe in place.
  const at::Tensor top_dense = top.contiguous(fmt);
  kernel(make_args(lateral, lateral, top_dense, dense_bias(bias), channels_last));
}

at::Tensor upsample_add_backward_top_driver(const at::Tensor& grad, int64_t top_h, int64_t top_w,
                                            BackwardKernel kernel) {
  TORCH_CHECK_VALUE(grad.dim() == 4, "fpn_fast::upsample_add_backward_top: grad must be 4-D, got ", grad.sizes());
  TORCH_CHECK_TYPE(is_float(grad.scalar_type()), "fpn_fast::upsample_add_backward_top: floating dtypes only, got ",
                   grad.scalar_type());
  TORCH_CHECK_VALUE(top_h >= 0 && top_w >= 0, "fpn_fast::upsample_add_backward_top: negative top size ", top_h, "x",
                    top_w);
  TORCH_CHECK_VALUE((top_h > 0 && top_w > 0) || grad.size(2) * grad.size(3) == 0,
                    "fpn_fast::upsample_add_backward_top: empty top plane ", top_h, "x", top_w, " for grad ",
                    grad.sizes());
  const bool channels_last = is_channels_last(grad);
  const at::MemoryFormat fmt = format_of(channels_last);
  at::Tensor grad_top =
      at::empty({grad.size(0), grad.size(1), top_h, top_w}, grad.options().memory_format(fmt));
  if (grad_top.numel() == 0) return grad_top;
  const at::Tensor grad_dense = grad.contiguous(fmt);
  kernel(UpsampleBackwardArgs{grad_top.data_ptr(), grad_dense.const_data_ptr(), grad.size(0), grad.size(1),
                              grad.size(2), grad.size(3), top_h, top_w, channels_last, grad.scalar_type()});
  return grad_top;
}

namespace {

// Test hook for the index arithmetic at sizes too large to allocate: for output element
// `index` of a lateral of `lateral_shape` (N, C, H, W) upsampling a top of `top_hw`, returns
// [n, c, h, w, source h, source w, offset of the source element in top] as the kernels compute it.
std::vector<int64_t> upsample_add_index_probe(std::vector<int64_t> lateral_shape, std::vector<int64_t> top_hw,
                                              bool channels_last, int64_t index) {
  TORCH_CHECK_VALUE(lateral_shape.size() == 4 && top_hw.size() == 2, "index probe: lateral_shape has 4 entries, top_hw 2");
  const int64_t C = lateral_shape[1], H = lateral_shape[2], W = lateral_shape[3];
  int64_t n, c, h, w;
  dense_coords<int64_t>(index, C, H, W, channels_last, n, c, h, w);
  const int64_t sh = nearest_source<int64_t>(make_nearest_axis(top_hw[0], H), h);
  const int64_t sw = nearest_source<int64_t>(make_nearest_axis(top_hw[1], W), w);
  return {n, c, h, w, sh, sw, dense_offset<int64_t>(n, c, sh, sw, C, top_hw[0], top_hw[1], channels_last)};
}

// Test hook for the backward windows: [first_dst_from(s) for s in 0..in_size].
std::vector<int64_t> nearest_window_starts(int64_t in_size, int64_t out_size) {
  const NearestAxis axis = make_nearest_axis(in_size, out_size);
  std::vector<int64_t> starts(in_size + 1);
  for (int64_t s = 0; s <= in_size; ++s) starts[s] = first_dst_from<int64_t>(axis, s);
  return starts;
}

}  // namespace
}  // namespace fpn_fast

// The test hooks run on no tensor, so they take every dispatch key (as they did when they
// were declared from these functions).
TORCH_LIBRARY_IMPL(fpn_fast, CompositeImplicitAutograd, m) {
  m.impl("_upsample_add_index_probe", &fpn_fast::upsample_add_index_probe);
  m.impl("_nearest_window_starts", &fpn_fast::nearest_window_starts);
}
