"""The top-down step's ops in ATen: their entries of ``fpn_fast.decompositions()`` (the table
``ExportedProgram.run_decompositions`` takes), so an exported program runs without fpn_fast."""
from typing import Callable, Dict, Optional

import torch

from .. import _extension, reference

__all__ = ["decompositions"]


def _backward_top_in_aten(grad: torch.Tensor, top_h: int, top_w: int) -> torch.Tensor:
    n, c, h, w = grad.shape
    return torch.ops.aten.upsample_nearest2d_backward(grad, [h, w], [n, c, top_h, top_w])


def _in_aten(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return reference.upsample_add(lateral, top, bias, functional=True)


def _in_place_in_aten(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
    lateral.copy_(_in_aten(lateral, top, bias))


def decompositions() -> Dict[Callable, Callable]:
    """{OpOverload: its pure-PyTorch form} for the extension's top-down ops (empty without it)."""
    if _extension.unavailable_reason("cpu") is not None:
        return {}
    fused = torch.ops.fpn_fast
    return {fused.upsample_add.default: _in_aten, fused.upsample_add_.default: _in_place_in_aten,
            fused.upsample_add_backward_top.default: _backward_top_in_aten}
