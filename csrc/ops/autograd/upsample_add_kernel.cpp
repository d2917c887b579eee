// Autograd kernel of fpn_fast::upsample_add_ (the in-place form). The out-of-place op's and the
// backward's autograd formulas are registered in Python (fpn_fast/ops/_extension.py).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

namespace fpn_fast {
namespace {

// The in-place op has no derivative, so tensors that need one are refused (instead of leaving
// their .grad silently None); otherwise it runs the device kernel and bumps lateral's version
// counter, as ATen's in-place ops do.
void upsample_add_inplace_autograd(c10::DispatchKeySet keys, const at::Tensor& lateral, const at::Tensor& top,
                                   const std::optional<at::Tensor>& bias) {
  const bool needs_grad = lateral.requires_grad() || top.requires_grad() || (bias.has_value() && bias->requires_grad());
  TORCH_CHECK(!(c10::GradMode::is_enabled() && needs_grad),
              "fpn_fast::upsample_add_ writes into lateral in place and has no gradient, but an input requires "
              "grad; use the out-of-place fpn_fast::upsample_add (fpn_fast.ops.upsample_add), or run under "
              "torch.no_grad() / torch.inference_mode()");
  {
    // Redispatch below autograd (not a fresh call, which the JIT tracer would record twice).
    at::AutoDispatchBelowADInplaceOrView guard;
    static auto op = c10::Dispatcher::singleton()
                         .findSchemaOrThrow("fpn_fast::upsample_add_", "")
                         .typed<void(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();
    op.redispatch(keys & c10::after_ADInplaceOrView_keyset, lateral, top, bias);
  }
  lateral.unsafeGetTensorImpl()->bump_version();
}

}  // namespace
}  // namespace fpn_fast

TORCH_LIBRARY_IMPL(fpn_fast, Autograd, m) { m.impl("upsample_add_", &fpn_fast::upsample_add_inplace_autograd); }
