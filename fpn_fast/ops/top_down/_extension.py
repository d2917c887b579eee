"""The extension's top-down step, ``torch.ops.fpn_fast.upsample_add`` / ``upsample_add_`` /
``upsample_add_backward_top`` (C++/CUDA kernels, registered by ``fpn_fast._C``): their fake
(meta) kernels for torch.compile, their autograd formulas, and the calls the op makes."""
from typing import Optional

import torch
import torch.nn.functional as F

from .._extension import _LOAD_ERROR
from ..reference import memory_format_of

if _LOAD_ERROR is None:
    _forward = torch.ops.fpn_fast.upsample_add.default
    _forward_inplace = torch.ops.fpn_fast.upsample_add_.default
    _backward_top = torch.ops.fpn_fast.upsample_add_backward_top.default

    @torch.library.register_fake("fpn_fast::upsample_add")
    def _upsample_add_fake(lateral, top, bias):
        return torch.empty_like(lateral, memory_format=memory_format_of(lateral))

    @torch.library.register_fake("fpn_fast::upsample_add_")
    def _upsample_add_inplace_fake(lateral, top, bias):
        return None

    @torch.library.register_fake("fpn_fast::upsample_add_backward_top")
    def _backward_top_fake(grad, top_h, top_w):
        return grad.new_empty((grad.shape[0], grad.shape[1], top_h, top_w)).contiguous(
            memory_format=memory_format_of(grad))

    def _setup_context(ctx, inputs, output):
        _, top, bias = inputs
        ctx.top_hw = (top.shape[2], top.shape[3])
        ctx.has_bias = bias is not None

    def _upsample_add_backward(ctx, grad):
        grad_top = _backward_top(grad, *ctx.top_hw) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad, grad_top, grad_bias

    torch.library.register_autograd("fpn_fast::upsample_add", _upsample_add_backward, setup_context=_setup_context)

    def _backward_top_setup_context(ctx, inputs, output):
        ctx.grad_hw = (inputs[0].shape[2], inputs[0].shape[3])

    def _backward_top_backward(ctx, grad_grad_top):
        # backward_top is linear in grad; its adjoint is the nearest upsample itself.
        return F.interpolate(grad_grad_top, size=ctx.grad_hw, mode="nearest"), None, None

    torch.library.register_autograd("fpn_fast::upsample_add_backward_top", _backward_top_backward,
                                    setup_context=_backward_top_setup_context)


def upsample_add(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _forward(lateral, top, bias)


def upsample_add_(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    _forward_inplace(lateral, top, bias)
    return lateral
