"""NNPACK's Winograd convolution for 3x3 convolutions on CPU maps: the route after the extension's
own F(4x4, 3x3) (``_winograd``), which is faster in the model (benchmarks/RESULTS.md) and needs
oneDNN. NNPACK runs where that one cannot (no extension, or oneDNN turned off) or declines (an
FPN output conv of under ``selection.WINOGRAD_MIN_CHANNELS`` channels on a map NNPACK takes).

NNPACK ships inside torch (libtorch_cpu). For a 3x3, stride-1 convolution it computes in the
Winograd domain, F(6x6, 3x3) (Lavin & Gray, "Fast Algorithms for Convolutional Neural Networks",
2016): fewer multiplications for the same result up to float rounding. It is called two ways:

- up to ``selection.NNPACK_SLICED_MAX_PIXELS``, the extension's
  ``fpn_fast::nnpack_conv_3x3_packed``: each of torch's OpenMP threads runs NNPACK on its own
  slice of output channels, from kernel transforms made once (``pack``; ``Conv2dAct`` caches
  them) instead of on every call;
- above it, torch's ``aten::_nnpack_spatial_convolution`` (NNPACK's own thread pool, which splits
  the image instead and is faster on large maps).

It beats oneDNN's direct convolution on maps of ``selection.NNPACK_MIN_PIXELS`` and more
(``min_pixels``; measurements in benchmarks/RESULTS.md). Results differ from the direct convolution's by about 1e-5 of the output's
largest value (``selection.ROUNDING``).

Non-finite values are where Winograd and the direct sum part ways: an inf in an 8x8 input tile
becomes NaN across the tile's outputs (inf - inf in the transforms) where the direct convolution
gives inf at its neighbours only. A Winograd output is non-finite wherever its input tile is, so
``conv2d`` checks its output and returns None when any value is non-finite or beyond
``selection.WINOGRAD_FINITE_BOUND`` in magnitude (near float32 overflow the two may round apart); the caller then runs the direct
convolution, so NaN and inf propagate exactly as in eager.
"""
import functools
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _extension
from ..selection import (NNPACK_MIN_PIXELS, NNPACK_MIN_PIXELS_UNSLICED, NNPACK_SLICED_MAX_PIXELS,
                         WINOGRAD_FINITE_BOUND, WINOGRAD_PROBE_TOLERANCE)


def min_pixels() -> int:
    """The smallest map (H*W) NNPACK takes: ``selection.NNPACK_MIN_PIXELS`` with the extension's
    sliced path, else ``NNPACK_MIN_PIXELS_UNSLICED`` (torch's call transforms the kernel on every
    call)."""
    return NNPACK_MIN_PIXELS if sliced_unavailable_reason() is None else NNPACK_MIN_PIXELS_UNSLICED


def slices() -> int:
    """How many output-channel slices the sliced path splits a convolution into: one per torch
    intra-op thread."""
    return max(1, torch.get_num_threads())


def pack(weight: torch.Tensor, padding: Sequence[int], count: int) -> List[torch.Tensor]:
    """NNPACK's kernel transforms of a float32 [K, C, 3, 3] weight, one per slice of output
    channels (opaque uint8 buffers, 64 kB per 256 input channels per output channel). They do
    not depend on the input's size (tests/ops/test_cpu_inference_paths.py checks it), so one set
    serves every image size."""
    return torch.ops.fpn_fast.nnpack_pack_3x3(weight, 64, 64, list(padding), min(count, weight.shape[0]))


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: Sequence[int],
           packed: Optional[List[torch.Tensor]] = None) -> Optional[torch.Tensor]:
    """F.conv2d(x, weight, bias, stride=1, padding) for a float32 CPU x and a 3x3 weight, as a
    contiguous NCHW tensor; None when the result has a value that is not finite or beyond
    ``selection.WINOGRAD_FINITE_BOUND`` (the caller then runs the direct convolution). ``packed``
    is the kernel transforms (``pack``) for the sliced path, one per slice of ``slices()``
    (``Conv2dAct._nnpack_kernels`` keeps them); without it they are made for this call."""
    x = x.contiguous()
    if x.shape[2] * x.shape[3] <= NNPACK_SLICED_MAX_PIXELS and sliced_unavailable_reason() is None:
        kernels = packed if packed is not None else pack(weight, padding, min(slices(), weight.shape[0]))
        out, finite = torch.ops.fpn_fast.nnpack_conv_3x3_packed(x, kernels, bias, weight.shape[0], list(padding))
        return out if finite else None
    out = torch._nnpack_spatial_convolution(x, weight.contiguous(), bias, list(padding), [1, 1])
    if out.numel():
        low, high = torch.aminmax(out)
        if not (bool(low > -WINOGRAD_FINITE_BOUND) and bool(high < WINOGRAD_FINITE_BOUND)):  # NaN fails both
            return None
    return out


@functools.lru_cache(maxsize=None)
def sliced_unavailable_reason() -> Optional[str]:
    """None when the extension's sliced NNPACK path can run here, else why not (cached)."""
    if _extension.unavailable_reason("cpu") is not None:
        return _extension.unavailable_reason("cpu")
    if not hasattr(torch.ops.fpn_fast, "nnpack_conv_3x3_packed"):
        return "the loaded extension has no NNPACK ops (rebuild it)"
    return torch.ops.fpn_fast._nnpack_unavailable_reason() or None


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """None when torch's NNPACK runs here and agrees with F.conv2d on a test convolution, else
    why not (cached). NNPACK needs an x86-64 CPU with AVX2 and FMA3 (or ARM NEON)."""
    try:
        if not torch._nnpack_available():  # also initialises NNPACK
            return "torch's NNPACK is not available on this CPU or build"
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, 8, 33, 35, generator=generator)
        weight = torch.randn(5, 8, 3, 3, generator=generator)
        bias = torch.randn(5, generator=generator)
        with torch.no_grad():
            want = F.conv2d(x, weight, bias, 1, 1)
            # torch's call (as on a large map) and, where the extension has it, the sliced path
            got = [torch._nnpack_spatial_convolution(x, weight, bias, [1, 1], [1, 1]),
                   conv2d(x, weight, bias, (1, 1))]
    except (AttributeError, RuntimeError) as err:
        return f"NNPACK's convolution is unusable: {err}"
    for out in got:
        if out is None or out.shape != want.shape or \
                not float((out - want).abs().max()) <= WINOGRAD_PROBE_TOLERANCE * float(want.abs().max()):
            return "NNPACK's convolution disagrees with F.conv2d"
    return None
