// Autograd kernel of fpn_fast::nhwc_to_nchw (the layout copy).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

namespace fpn_fast {
namespace {

// With a tensor that needs grad it is ATen's differentiable clone (the same values, and
// autograd keeps the graph); otherwise the device kernel.
at::Tensor nhwc_to_nchw_autograd(c10::DispatchKeySet keys, const at::Tensor& x) {
  if (c10::GradMode::is_enabled() && x.requires_grad()) return x.clone(at::MemoryFormat::Contiguous);
  at::AutoDispatchBelowADInplaceOrView guard;
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fpn_fast::nhwc_to_nchw", "")
                       .typed<at::Tensor(const at::Tensor&)>();
  return op.redispatch(keys & c10::after_ADInplaceOrView_keyset, x);
}

}  // namespace
}  // namespace fpn_fast

TORCH_LIBRARY_IMPL(fpn_fast, Autograd, m) { m.impl("nhwc_to_nchw", &fpn_fast::nhwc_to_nchw_autograd); }
