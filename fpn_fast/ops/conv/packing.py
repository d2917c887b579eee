"""The convolution routes' prepacked weights, made from a weight once and kept by its owner
(``inference.Conv2dAct``, which knows when the weight changes): oneDNN's blocked weight, NNPACK's
kernel transforms, the extension's Winograd kernel transforms. What each route takes is its
runner's ``pack`` (``ops.conv.runner``)."""
from typing import List, Sequence

import torch

from . import _nnpack, _onednn, _winograd

__all__ = ["onednn_weight", "nnpack_kernels", "winograd_first_group", "winograd_group", "winograd_kernels"]


def onednn_weight(weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                  groups: int, input_size: Sequence[int]) -> torch.Tensor:
    """``weight`` reordered into the blocked layout oneDNN picks for inputs of ``input_size``
    (an opaque mkldnn tensor; bit-identical results for channels_last inputs of any size)."""
    return _onednn.pack_weight(weight, stride, padding, dilation, groups, input_size)


def nnpack_kernels(weight: torch.Tensor, padding: Sequence[int], slices: int) -> List[torch.Tensor]:
    """NNPACK's kernel transforms of a float32 [K, C, 3, 3] weight in ``slices`` output-channel
    slices (the same for every image size)."""
    return _nnpack.pack(weight, padding, slices)


def winograd_first_group(tiles: int) -> int:
    """The Winograd batch entry size for the first map a weight is packed for (``tiles`` tiles)."""
    return _winograd.group_for(tiles)


def winograd_group(first: int, tiles: int) -> int:
    """The entry size a map of ``tiles`` tiles runs with, given the first map's: the first's, or
    the fallback one for maps it would pad too much (at most two packs per weight)."""
    return _winograd.group_to_use(first, tiles)


def winograd_kernels(weight: torch.Tensor, group: int) -> torch.Tensor:
    """The Winograd kernel transforms of a float32 [K, C, 3, 3] weight, prepacked for batch
    entries of ``group`` tiles (4x the weight's size)."""
    return _winograd.pack(weight, group)
