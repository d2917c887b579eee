// Host-side interface of the fused top-down step: argument structs and kernel entry points.
// Kept free of torch/extension.h so the CUDA translation unit compiles quickly.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fpn_fast {

// out = (lateral + bias[c]) + nearest_upsample(top): out, lateral and top dense in the same
// memory format (NCHW, or NHWC when channels_last); bias contiguous or null.
struct UpsampleAddArgs {
  void* out;
  const void* lateral;
  const void* top;
  const void* bias;
  int64_t N, C, H, W;     // lateral / out
  int64_t top_h, top_w;   // top
  bool channels_last;
  c10::ScalarType dtype;
};

// grad_top[n, c, s, t] = sum of grad over the destination window of (s, t); both dense in
// the same memory format.
struct UpsampleBackwardArgs {
  void* grad_top;
  const void* grad;
  int64_t N, C, H, W;     // grad
  int64_t top_h, top_w;   // grad_top
  bool channels_last;
  c10::ScalarType dtype;
};

void upsample_add_cpu_kernel(const UpsampleAddArgs& args);
void upsample_add_backward_top_cpu_kernel(const UpsampleBackwardArgs& args);
#ifdef FPN_FAST_WITH_CUDA
void upsample_add_cuda_kernel(const UpsampleAddArgs& args);
void upsample_add_backward_top_cuda_kernel(const UpsampleBackwardArgs& args);
#endif

}  // namespace fpn_fast
