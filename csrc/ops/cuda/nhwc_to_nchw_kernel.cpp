// The CPU layout op's CUDA counterpart, so a program exported on CPU (where inference outputs
// go through fpn_fast::nhwc_to_nchw) also runs on CUDA: ATen's copy, always a new tensor.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

namespace fpn_fast {
namespace {

at::Tensor nhwc_to_nchw_cuda(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() == 4, "fpn_fast::nhwc_to_nchw: x must be 4-D (N, C, H, W), got ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  return x.clone(at::MemoryFormat::Contiguous);
}

}  // namespace
}  // namespace fpn_fast

TORCH_LIBRARY_IMPL(fpn_fast, CUDA, m) { m.impl("nhwc_to_nchw", &fpn_fast::nhwc_to_nchw_cuda); }
