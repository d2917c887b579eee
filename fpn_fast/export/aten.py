"""The fpn_fast ops in ATen: a decomposition table for ``ExportedProgram.run_decompositions``,
so an exported program runs in a process without fpn_fast."""
from typing import Callable, Dict, Optional

import torch

from ..ops import _extension, reference

__all__ = ["decompositions"]


def _backward_top_in_aten(grad: torch.Tensor, top_h: int, top_w: int) -> torch.Tensor:
    n, c, h, w = grad.shape
    return torch.ops.aten.upsample_nearest2d_backward(grad, [h, w], [n, c, top_h, top_w])


def _in_aten(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return reference.upsample_add(lateral, top, bias, functional=True)


def _in_place_in_aten(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
    lateral.copy_(_in_aten(lateral, top, bias))


def decompositions() -> Dict[Callable, Callable]:
    """A decomposition table for ``ExportedProgram.run_decompositions`` that rewrites every
    fpn_fast op in a program into ATen ops: torch.export's default (core ATen) decompositions
    plus fpn_fast's registered ops in their pure-PyTorch forms.

    ``torch.export.export(model, args).run_decompositions(fpn_fast.decompositions())`` gives
    a portable program that ``torch.export.load`` runs in a process without fpn_fast; the
    undecomposed program keeps the fused ops (faster, needs ``fpn_fast.library_path()`` loaded).

    Returns:
        {OpOverload: Python function}, a fresh dict the caller may extend.
    """
    table = torch.export.default_decompositions()
    if _extension.unavailable_reason("cpu") is None:
        fused = torch.ops.fpn_fast
        table[fused.upsample_add.default] = _in_aten
        table[fused.upsample_add_.default] = _in_place_in_aten
        table[fused.upsample_add_backward_top.default] = _backward_top_in_aten
        table[fused.nhwc_to_nchw.default] = lambda x: x.clone(memory_format=torch.contiguous_format)
    return table
