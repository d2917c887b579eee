"""TorchScript forms of the differentiable ops, for scripted fpn_fast modules.

Scripted code (``torch.jit.script``, LibTorch) cannot run the Python dispatcher, so these call
the registered extension ops ``torch.ops.fpn_fast.*`` directly where the extension has kernels
for the tensors' device, and the pure-PyTorch reference elsewhere. Which ops exist is fixed at
import (what the loaded library registers), so a scripted model holds exactly the calls that can
run where it was scripted; a process that loads it needs ``torch.ops.load_library(
fpn_fast.library_path())`` first (the error otherwise names the missing ``fpn_fast::`` op).
"""
from typing import Optional

import torch
from torch import Tensor

from ..ops import _extension, reference

__all__ = ["upsample_add", "upsample_add_", "stride2_pool", "to_nchw"]

# Chosen at import: TorchScript compiles functions, not closed-over flags.
if _extension.has_cuda_kernels():
    def _on_extension(t: Tensor) -> bool:
        return t.device.type == "cpu" or t.is_cuda
else:
    def _on_extension(t: Tensor) -> bool:
        return t.device.type == "cpu"


def _refuse_grad(lateral: Tensor, top: Tensor, bias: Optional[Tensor]) -> None:
    needs_grad = lateral.requires_grad or top.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and needs_grad:
        raise RuntimeError("fpn_fast upsample_add_ writes into lateral in place and has no gradient, but an "
                           "input requires grad")


if _extension.unavailable_reason("cpu") is None:
    def upsample_add(lateral: Tensor, top: Tensor, bias: Optional[Tensor]) -> Tensor:
        """``fpn_fast.ops.upsample_add`` in TorchScript: the extension op where it has kernels."""
        if _on_extension(lateral):
            return torch.ops.fpn_fast.upsample_add(lateral, top, bias)
        return reference.upsample_add(lateral, top, bias)

    def upsample_add_(lateral: Tensor, top: Tensor, bias: Optional[Tensor]) -> Tensor:
        """``fpn_fast.ops.upsample_add_`` in TorchScript (refuses tensors that need grad)."""
        if _on_extension(lateral):
            torch.ops.fpn_fast.upsample_add_(lateral, top, bias)
            return lateral
        _refuse_grad(lateral, top, bias)
        return lateral.copy_(reference.upsample_add(lateral, top, bias))

    def to_nchw(x: Tensor) -> Tensor:
        """``fpn_fast.ops.to_nchw`` in TorchScript: the extension's NHWC->NCHW copy where it runs."""
        if x.is_contiguous():
            return x
        if x.dim() == 4 and _on_extension(x):
            return torch.ops.fpn_fast.nhwc_to_nchw(x)
        return x.contiguous()
else:
    def upsample_add(lateral: Tensor, top: Tensor, bias: Optional[Tensor]) -> Tensor:
        """``fpn_fast.ops.upsample_add`` in TorchScript: the pure-PyTorch reference (no extension)."""
        return reference.upsample_add(lateral, top, bias)

    def upsample_add_(lateral: Tensor, top: Tensor, bias: Optional[Tensor]) -> Tensor:
        """``fpn_fast.ops.upsample_add_`` in TorchScript (refuses tensors that need grad)."""
        _refuse_grad(lateral, top, bias)
        return lateral.copy_(reference.upsample_add(lateral, top, bias))

    def to_nchw(x: Tensor) -> Tensor:
        """``fpn_fast.ops.to_nchw`` in TorchScript: ATen's copy (no extension)."""
        return x.contiguous()


def stride2_pool(x: Tensor) -> Tensor:
    """``fpn_fast.ops.stride2_pool`` in TorchScript: torchvision's ``max_pool2d(x, 1, 2, 0)``."""
    return torch.nn.functional.max_pool2d(x, 1, 2, 0)
