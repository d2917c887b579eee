"""Winograd F(4x4, 3x3) convolution for 3x3 stride-1 convolutions of float32 CPU maps.

The extension's ``fpn_fast::winograd_conv_3x3`` (``csrc/ops/cpu/winograd_conv_kernel.cpp``) computes a
3x3 convolution tile by tile in the Winograd domain (Lavin & Gray, "Fast Algorithms for
Convolutional Neural Networks", 2016): the input and output transforms are its own kernels,
vectorised across the channels of NHWC maps, and the 36 matrix products between them run as one
oneDNN grouped 1x1 convolution over the kernel transforms ``G g G^T``, made here once per
convolution (``pack``) and reordered into the blocked layout oneDNN picks. 4x fewer
multiplications than the direct convolution, no NCHW conversion on the way in, and the result in
NHWC or NCHW, with bias and ReLU applied by the output transform.

Results differ from the direct convolution's by ~1e-5 of the output's largest value (the
transform matrices' entries of up to 5 and 8 round on the way; ``selection.ROUNDING`` gives the
bound the tests hold, benchmarks/RESULTS.md the measurements).

Non-finite values are where Winograd and the direct sum part ways: an inf in a 6x6 input tile
becomes NaN across the tile's outputs (inf - inf in the transforms) where the direct convolution
gives inf at its neighbours only. The op reports whether every output (before the ReLU) is
finite and within ``selection.WINOGRAD_FINITE_BOUND``; ``conv2d`` returns None when one is not,
and the caller runs the direct convolution, so NaN and inf propagate exactly as in eager.
"""
import functools
from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import _extension
from ..selection import WINOGRAD_MIN_CHANNELS, WINOGRAD_MIN_TILES, WINOGRAD_PROBE_TOLERANCE
from . import _onednn

# F(4x4, 3x3)'s kernel transform G (6x3), Lavin & Gray 2016, section 4.2 (points 0, +-1, +-2, inf).
_G = ((1 / 4, 0.0, 0.0),
      (-1 / 6, -1 / 6, -1 / 6),
      (-1 / 6, 1 / 6, -1 / 6),
      (1 / 24, 1 / 12, 1 / 6),
      (1 / 24, -1 / 12, 1 / 6),
      (0.0, 0.0, 1.0))
_POINTS = 36
_OUT = 4  # output pixels per tile side
# The largest batch entry (tiles; group_for).
_MAX_GROUP = 128
# The entry size for maps the first one would pad too much (group_to_use).
FALLBACK_GROUP = 16
# The transformed input and products of this many bytes are made at a time (a chunk of tiles)
# so they stay in the L2/L3 caches between the three steps (measured: see chunk_tiles).
_CHUNK_BYTES = 12 << 20


def tiles(x_shape: Sequence[int], padding: Sequence[int]) -> int:
    """The number of 4x4 output tiles of a 3x3 stride-1 convolution of an [N, C, H, W] map."""
    n, _, h, w = x_shape
    ho, wo = h + 2 * padding[0] - 2, w + 2 * padding[1] - 2
    return n * -(-ho // _OUT) * -(-wo // _OUT)


def worthwhile(in_channels: int, out_channels: int, count: int) -> bool:
    """Whether Winograd beats oneDNN's direct convolution for this many channels and ``count``
    4x4 output tiles: ``selection.WINOGRAD_MIN_CHANNELS`` and ``WINOGRAD_MIN_TILES``, measured
    on the build machine (benchmarks/RESULTS.md)."""
    if min(in_channels, out_channels) < WINOGRAD_MIN_CHANNELS:
        return False
    for channel_limit, min_tiles in WINOGRAD_MIN_TILES:
        if channel_limit is None or in_channels <= channel_limit:
            return count >= min_tiles
    return False


def group_for(count: int) -> int:
    """The tiles per batch entry a convolution keeps once it has seen a map of ``count`` tiles
    (its first): the whole map up to 128 tiles, else the size in 64..128 that pads it least
    (larger on a tie). Maps of the same size, the common case, then run unpadded on the layout
    oneDNN picks for them (faster products than entries of 16 tiles; benchmarks/RESULTS.md)."""
    if count <= _MAX_GROUP:
        return count
    return min(range(_MAX_GROUP, _MAX_GROUP // 2 - 1, -1), key=lambda g: -(-count // g) * g)


def group_to_use(first: int, count: int) -> int:
    """The batch entry size for a map of ``count`` tiles, given the convolution's first one
    (``group_for``): that one while it pads the map by at most an eighth, else FALLBACK_GROUP
    (a second pack; at most 15 padded tiles), so a model used at several image sizes wastes
    little on its small maps."""
    padding = -(-count // first) * first - count
    return first if padding * 8 <= count else FALLBACK_GROUP


def chunk_tiles(in_channels: int, out_channels: int, count: int, group: int) -> int:
    """Tiles per call of the products: all of the map's groups when their transformed input and
    products fit _CHUNK_BYTES, else as many groups as do (at least one)."""
    per_group = _POINTS * (in_channels + out_channels) * 4 * group
    return group * max(1, min(-(-count // group), _CHUNK_BYTES // per_group))


def kernel_transforms(weight: torch.Tensor) -> torch.Tensor:
    """The [36 * K, C, 1, 1] float32 weight of the 36-group 1x1 convolution: row p * K + k holds
    (G g G^T)[p] for kernel g = weight[k, c] (computed in float64, rounded once).

    Args:
        weight: Tensor[K, C, 3, 3], float32, CPU.
    """
    g = torch.tensor(_G, dtype=torch.float64)
    u = torch.einsum("ai,kcij,bj->abkc", g, weight.detach().to(torch.float64), g)
    return u.reshape(_POINTS * weight.shape[0], weight.shape[1], 1, 1).to(torch.float32).contiguous()


def pack(weight: torch.Tensor, group: int) -> torch.Tensor:
    """``kernel_transforms(weight)`` reordered once into the layout oneDNN picks for batch entries
    of ``group`` tiles (an opaque mkldnn tensor, 4x the weight's size: 36 / 9 values per kernel).
    Calls on batches of other entry sizes would reorder it back on every call."""
    u = kernel_transforms(weight)
    return _onednn.pack_weight(u, (1, 1), (0, 0), (1, 1), _POINTS, (1, _POINTS * weight.shape[1], group, 1))


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], padding: Sequence[int], relu: bool,
           channels_last: bool, packed: Optional[Tuple[int, torch.Tensor]] = None) -> Optional[torch.Tensor]:
    """relu?(F.conv2d(x, weight, bias, stride=1, padding)) for a float32 CPU x and a 3x3 weight,
    channels_last or contiguous NCHW as asked; None when an output is not finite or beyond 1e30
    (the caller then runs the direct convolution). ``packed`` is a group and ``pack(weight,
    group)`` for maps of x's tile count (``Conv2dAct._winograd_kernels`` keeps the packs for its
    first map's group and for FALLBACK_GROUP, ``group_to_use``); without it the transforms are
    made for this call."""
    x = x.contiguous(memory_format=torch.channels_last)
    count = tiles(x.shape, padding)
    if packed is not None:
        group, u = packed
    else:
        group = group_for(count)
        u = pack(weight, group)
    chunk = chunk_tiles(x.shape[1], weight.shape[0], count, group)
    out, finite = torch.ops.fpn_fast.winograd_conv_3x3(x, u, bias, weight.shape[0], list(padding), relu,
                                                       channels_last, group, chunk)
    return out if finite else None


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """None when the extension's Winograd convolution runs here and agrees with F.conv2d on a test
    convolution (one chunk and several, both output layouts), else why not (cached)."""
    if _extension.unavailable_reason("cpu") is not None:
        return _extension.unavailable_reason("cpu")
    if not hasattr(torch.ops.fpn_fast, "winograd_conv_3x3"):
        return "the loaded extension has no Winograd op (rebuild it)"
    reason = _onednn.unavailable_reason()
    if reason is not None:
        return reason
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(2, 8, 13, 11, generator=generator).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(5, 8, 3, 3, generator=generator)
        bias = torch.randn(5, generator=generator)
        u = kernel_transforms(weight)
        with torch.no_grad():
            want = F.conv2d(x, weight, bias, 1, 1)
            got = [torch.ops.fpn_fast.winograd_conv_3x3(x, u, bias, 5, [1, 1], False, layout, group, chunk)
                   for layout, group, chunk in ((True, 4, 1000), (False, 3, 6))]
    except (AttributeError, RuntimeError) as err:
        return f"the Winograd convolution is unusable: {err}"
    for out, finite in got:
        if not finite or out.shape != want.shape or \
                not float((out - want).abs().max()) <= WINOGRAD_PROBE_TOLERANCE * float(want.abs().max()):
            return "the Winograd convolution disagrees with F.conv2d"
    return None
