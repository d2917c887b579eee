// Argument checks shared by the CPU 3x3 Winograd convolutions (nnpack_conv_kernel.cpp, winograd_conv_kernel.cpp).
#pragma once

#include <ATen/ATen.h>

namespace fpn_fast {

// Both take a padding of 0 or 1 on each side (same-size or valid 3x3 convolutions).
inline void check_conv3x3_padding(const char* name, at::IntArrayRef padding) {
  TORCH_CHECK_VALUE(padding.size() == 2 && padding[0] >= 0 && padding[0] <= 1 && padding[1] >= 0 && padding[1] <= 1,
                    "fpn_fast::", name, ": padding must be two values in {0, 1}, got ", padding);
}

}  // namespace fpn_fast
