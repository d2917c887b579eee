// Registers the CUDA kernels: device guard here, kernels (on the current stream) in the .cu.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "ops/upsample_add_driver.h"

namespace fpn_fast {
namespace {

at::Tensor upsample_add_cuda(const at::Tensor& lateral, const at::Tensor& top, const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(lateral.device());
  return upsample_add_driver(lateral, top, bias, &upsample_add_cuda_kernel);
}

void upsample_add_inplace_cuda(const at::Tensor& lateral, const at::Tensor& top,
                               const std::optional<at::Tensor>& bias) {
  const c10::cuda::CUDAGuard guard(lateral.device());
  upsample_add_inplace_driver(lateral, top, bias, &upsample_add_cuda_kernel);
}

at::Tensor upsample_add_backward_top_cuda(const at::Tensor& grad, int64_t top_h, int64_t top_w) {
  const c10::cuda::CUDAGuard guard(grad.device());
  return upsample_add_backward_top_driver(grad, top_h, top_w, &upsample_add_backward_top_cuda_kernel);
}

// The CPU layout op's CUDA counterpart, so a program exported on CPU (where inference outputs
// go through fpn_fast::nhwc_to_nchw) also runs on CUDA: ATen's copy, always a new tensor.
at::Tensor nhwc_to_nchw_cuda(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, "fpn_fast::nhwc_to_nchw: x must be 4-D (N, C, H, W), got ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  return x.clone(at::MemoryFormat::Contiguous);
}

}  // namespace
}  // namespace fpn_fast

TORCH_LIBRARY_IMPL(fpn_fast, CUDA, m) {
  m.impl("nhwc_to_nchw", &fpn_fast::nhwc_to_nchw_cuda);
  m.impl("upsample_add", &fpn_fast::upsample_add_cuda);
  m.impl("upsample_add_", &fpn_fast::upsample_add_inplace_cuda);
  m.impl("upsample_add_backward_top", &fpn_fast::upsample_add_backward_top_cuda);
}
