// The device-independent halves of the registered ops: input checks, layout handling and
// allocation. Each device registers thin wrappers that hand these its kernel.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include "ops/upsample_add.h"

namespace fpn_fast {

using ForwardKernel = void (*)(const UpsampleAddArgs&);
using BackwardKernel = void (*)(const UpsampleBackwardArgs&);

at::Tensor upsample_add_driver(const at::Tensor& lateral, const at::Tensor& top,
                               const std::optional<at::Tensor>& bias, ForwardKernel kernel);
void upsample_add_inplace_driver(const at::Tensor& lateral, const at::Tensor& top,
                                 const std::optional<at::Tensor>& bias, ForwardKernel kernel);
at::Tensor upsample_add_backward_top_driver(const at::Tensor& grad, int64_t top_h, int64_t top_w,
                                            BackwardKernel kernel);

}  // namespace fpn_fast
