// Registers the CUDA kernels of upsample_add, upsample_add_ and upsample_add_backward_top:
// device guard here, kernels (on the current stream) in upsample_add_kernel.cu, which stays
// free of the registration headers so that nvcc compiles it quickly.
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

}  // namespace
}  // namespace fpn_fast

TORCH_LIBRARY_IMPL(fpn_fast, CUDA, m) {
  m.impl("upsample_add", &fpn_fast::upsample_add_cuda);
  m.impl("upsample_add_", &fpn_fast::upsample_add_inplace_cuda);
  m.impl("upsample_add_backward_top", &fpn_fast::upsample_add_backward_top_cuda);
}
