"""Every route of ``conv2d_act`` and ``conv2d_nchw``, bound for one call signature: what the
op's runner runs once its rows chose the implementation (``ops.conv.runner``).

A route is ``(fn, pack)``: ``fn(x, weight, bias, residual, pack)`` for conv2d_act,
``fn(x, weight, bias, pack)`` for conv2d_nchw; ``pack(packs, x)`` fetches the prepacked weight
the route takes (None where it takes none) from a pack source (``inference.Conv2dAct``:
``_packed_weight(x)``, ``_nnpack_kernels(slices)``, ``_winograd_kernels(tiles)``), which
caches it while the weight is unchanged. Everything that depends only on the signature (the
memory format, the tile count, the conversions) is decided here, once.

The Winograd routes round differently from the direct sum (``selection.ROUNDING``) and hand a
result with a non-finite value (or one beyond ``selection.WINOGRAD_FINITE_BOUND``) to the direct
route, decided per call since it depends on the data.
"""
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from ..dispatch import autocast_dtype
from ..layout import nchw_runner
from ..reference import memory_format_of
from ..selection import NNPACK_SLICED_MAX_PIXELS, PACK_MAX_PIXELS
from . import _cudnn, _nnpack, _winograd
from ._supports import TRITON_GEMM_ROUTES, channels_last_like

Route = Tuple[Callable, Optional[Callable]]


def tail(out: torch.Tensor, residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """relu?(out + residual) in place on a fresh convolution output, one torch op each."""
    if residual is not None:
        out += residual
    return out.relu_() if relu else out


def low_precision(t: Optional[torch.Tensor], low: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    """t cast as autocast would cast a convolution's float32 operand."""
    return t.to(low) if t is not None and low is not None and t.dtype == torch.float32 else t


def act(implementation: str, x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int,
        relu: bool, residual: Optional[torch.Tensor], direct: Optional[Callable]) -> Route:
    """conv2d_act's route ``implementation`` for x's signature. ``direct`` is the direct route's
    function (what a Winograd route hands non-finite results to)."""
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    if implementation == "winograd":
        channels_last = channels_last_like(x)
        count = _winograd.tiles(x.shape, padding)
        fuse_relu = relu and residual is None

        def run_winograd(x, weight, bias=None, residual=None, pack=None):
            out = _winograd.conv2d(x, weight, bias, padding, fuse_relu, channels_last, pack)
            if out is None:  # non-finite values: the direct convolution decides how they propagate
                return direct(x, weight, bias, residual, None)
            return out if residual is None else tail(out, residual, relu)
        return run_winograd, lambda packs, x: packs._winograd_kernels(count)
    if implementation == "nnpack":
        channels_last = channels_last_like(x)
        to_nchw = nchw_runner("cpu", x.is_contiguous()).fn
        sliced = x.shape[2] * x.shape[3] <= NNPACK_SLICED_MAX_PIXELS and _nnpack.sliced_unavailable_reason() is None
        out_channels = weight.shape[0]

        def run_nnpack(x, weight, bias=None, residual=None, pack=None):
            out = _nnpack.conv2d(to_nchw(x), weight, bias, padding, pack)
            if out is None:
                return direct(x, weight, bias, residual, None)
            out = tail(out, residual, relu)
            return out.contiguous(memory_format=torch.channels_last) if channels_last else out
        pack = (lambda packs, x: packs._nnpack_kernels(min(_nnpack.slices(), out_channels))) if sliced else None
        return run_nnpack, pack
    if implementation == "onednn":
        unary = torch.ops.mkldnn._convolution_pointwise.default
        binary = torch.ops.mkldnn._convolution_pointwise.binary

        def run_onednn(x, weight, bias=None, residual=None, pack=None):
            if pack is not None:
                weight = pack
            if residual is None:
                out = unary(x, weight, bias, padding, stride, dilation, groups, "none", [], "")
            else:  # out of place: the in-place variant would overwrite the caller's residual
                out = binary(x, residual, weight, bias, padding, stride, dilation, groups, "add", 1.0, None, [], "")
            return out.relu_() if relu else out  # oneDNN's ReLU post-op maps NaN to 0: torch's after
        # Prepacked for channels_last maps of at most PACK_MAX_PIXELS, where it pays and is bit-identical.
        packed = memory_format_of(x) == torch.channels_last and x.shape[2] * x.shape[3] <= PACK_MAX_PIXELS
        return run_onednn, (lambda packs, x: packs._packed_weight(x)) if packed else None
    if implementation == "triton":
        low = autocast_dtype(x.device.type)
        epilogue = torch.ops.fpn_fast_triton.bias_act_.default

        def run_triton(x, weight, bias=None, residual=None, pack=None):
            out = F.conv2d(x, weight, None, stride, padding, dilation, groups)
            # Under autocast the convolution ran in low precision; so would its bias inside it,
            # and autocast would cast a float32 residual before the add.
            epilogue(out, low_precision(bias, low), low_precision(residual, low), relu)
            return out
        return run_triton, None
    if implementation in TRITON_GEMM_ROUTES:
        return _triton_gemm_route(implementation, x, stride, padding, relu), None
    if implementation == "cudnn_relu":
        return _cudnn.route(x, weight, stride, padding, dilation, groups), None

    def run_torch(x, weight, bias=None, residual=None, pack=None):
        return tail(F.conv2d(x, weight, bias, stride, padding, dilation, groups), residual, relu)
    return run_torch, None


def _autocast_cast(fn: Callable, low: Optional[torch.dtype]) -> Callable:
    """``fn`` itself without autocast; under it, ``fn`` with its float32 tensor arguments cast as
    autocast casts a convolution's (the folded weights arrive cast already: ``conv2d_act`` casts
    them once), since a registered Triton op is not autocast's to cast."""
    if low is None:
        return fn

    def cast(*args):
        return fn(*[low_precision(a, low) if isinstance(a, torch.Tensor) else a for a in args])
    return cast


def _triton_gemm_route(implementation: str, x: torch.Tensor, stride, padding, relu: bool) -> Callable:
    """The convolution as one Triton GEMM with bias, residual and ReLU in its epilogue: the 1x1
    stride-1 kernel ("triton_gemm") or the implicit-GEMM one ("triton_conv"), in autocast's
    dtype under autocast."""
    if implementation == "triton_gemm":
        gemm = torch.ops.fpn_fast_triton.conv1x1_act.default

        def run_triton_gemm(x, weight, bias=None, residual=None, pack=None):
            return gemm(x, weight, bias, residual, relu)
        return _autocast_cast(run_triton_gemm, autocast_dtype(x.device.type))
    conv = torch.ops.fpn_fast_triton.conv2d_act.default

    def run_triton_conv(x, weight, bias=None, residual=None, pack=None):
        return conv(x, weight, bias, residual, stride, padding, relu)
    return _autocast_cast(run_triton_conv, autocast_dtype(x.device.type))


def nchw(implementation: str, x: torch.Tensor, weight: torch.Tensor, stride, padding, direct) -> Route:
    """conv2d_nchw's route ``implementation`` for x's signature; ``direct`` is conv2d_act's direct
    runner for it (its output converted to NCHW, the route of everything else)."""
    padding = list(padding)
    if implementation == "triton_conv":
        conv = torch.ops.fpn_fast_triton.conv2d_nchw.default
        stride = list(stride)

        def run_triton_conv(x, weight, bias=None, pack=None):
            return conv(x, weight, bias, stride, padding)
        return _autocast_cast(run_triton_conv, autocast_dtype(x.device.type)), None
    direct_fn = direct.fn
    to_nchw = nchw_runner(x.device.type, not channels_last_like(x)).fn
    if implementation == "winograd":
        count = _winograd.tiles(x.shape, padding)

        def run_winograd(x, weight, bias=None, pack=None):
            out = _winograd.conv2d(x, weight, bias, padding, False, False, pack)
            return to_nchw(direct_fn(x, weight, bias, None, None)) if out is None else out
        return run_winograd, lambda packs, x: packs._winograd_kernels(count)
    if implementation == "nnpack":
        input_to_nchw = nchw_runner("cpu", x.is_contiguous()).fn
        sliced = x.shape[2] * x.shape[3] <= NNPACK_SLICED_MAX_PIXELS and _nnpack.sliced_unavailable_reason() is None
        out_channels = weight.shape[0]

        def run_nnpack(x, weight, bias=None, pack=None):
            out = _nnpack.conv2d(input_to_nchw(x), weight, bias, padding, pack)
            return to_nchw(direct_fn(x, weight, bias, None, None)) if out is None else out
        pack = (lambda packs, x: packs._nnpack_kernels(min(_nnpack.slices(), out_channels))) if sliced else None
        return run_nnpack, pack

    def run_direct(x, weight, bias=None, pack=None):
        return to_nchw(direct_fn(x, weight, bias, None, pack))
    return run_direct, direct.pack
