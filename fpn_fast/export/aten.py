"""The fpn_fast ops in ATen: a decomposition table for ``ExportedProgram.run_decompositions``,
so an exported program runs in a process without fpn_fast. Each op's entries sit beside the op
(``ops.top_down.aten``, ``ops.layout``); this gathers them."""
from typing import Callable, Dict

import torch

from ..ops import layout
from ..ops.top_down import aten as top_down_aten

__all__ = ["decompositions"]


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
    table.update(top_down_aten.decompositions())
    table.update(layout.decompositions())
    return table
