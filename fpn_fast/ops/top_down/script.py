"""The top-down step's TorchScript forms, for scripted fpn_fast modules.

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

from .. import _extension, reference

__all__ = ["upsample_add", "upsample_add_", "step"]

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
else:
    def upsample_add(lateral: Tensor, top: Tensor, bias: Optional[Tensor]) -> Tensor:
        """``fpn_fast.ops.upsample_add`` in TorchScript: the pure-PyTorch reference (no extension)."""
        return reference.upsample_add(lateral, top, bias)

    def upsample_add_(lateral: Tensor, top: Tensor, bias: Optional[Tensor]) -> Tensor:
        """``fpn_fast.ops.upsample_add_`` in TorchScript (refuses tensors that need grad)."""
        _refuse_grad(lateral, top, bias)
        return lateral.copy_(reference.upsample_add(lateral, top, bias))


def step(lateral: Tensor, top: Optional[Tensor], bias: Optional[Tensor], in_place: bool) -> Tensor:
    """``ops.top_down.step`` in TorchScript: ``(lateral + bias[c]) + nearest_upsample(top)``, just
    ``lateral + bias[c]`` without top; written into lateral when ``in_place``."""
    if top is None:
        if bias is None:
            return lateral
        column = bias.view(1, -1, 1, 1)
        if in_place:
            return lateral.add_(column)
        return lateral + column
    if in_place:
        return upsample_add_(lateral, top, bias)
    return upsample_add(lateral, top, bias)
