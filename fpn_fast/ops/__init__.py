"""The FPN ops, each resolved through one dispatch table (``fpn_fast.ops._dispatch.TABLE``).

Differentiable, used by the drop-in modules:
``upsample_add(lateral, top, bias)``  -> (lateral + bias[c]) + nearest_upsample(top, lateral's H x W)
``upsample_add_(lateral, top, bias)`` -> the same, written into ``lateral`` (refuses tensors that need grad)
``stride2_pool(x)``                   -> F.max_pool2d(x, 1, 2, 0), i.e. x[:, :, ::2, ::2]

Inference only (``fpn_fast.optimize_for_inference`` models), no autograd:
``conv2d_act(x, weight, bias, ..., relu, residual)`` -> relu?(conv2d(x, weight, bias) + residual),
    the tail fused: oneDNN post-ops on CPU, one Triton pass after cuDNN on CUDA
``lateral_upsample_add(x, weight, bias, top)``      -> upsample_add(conv1x1(x, weight), top, bias),
    on CUDA one Triton GEMM whose epilogue does the top-down step (the lateral map is never stored)
``conv2d_nchw(x, weight, bias, ...)``                -> F.conv2d(...) as a contiguous NCHW map,
    a Winograd convolution for 3x3 stride-1 convs on CPU (the extension's F(4x4, 3x3), else NNPACK's)
``conv1x1(x, weight, channels_last)``, ``to_nchw(x)``: the CPU inference layout helpers
``empty_cpu_cache()``, ``set_cpu_cache_limit(mb)``, ``cpu_cache_stats()``: the CPU buffer pool the
    optimized backbones use

Backends: "extension" (the compiled fpn_fast._C ops, CPU and CUDA), "triton" (CUDA, or CPU
under TRITON_INTERPRET=1, which must be set before import), "torch" (pure PyTorch, always there),
and "auto" (the default): per op and device type, the first implementation in the table that
runs here and computes the call exactly. Choose with ``set_backend(name)`` (process default),
``with use_backend(name):`` (this thread only) or FPN_FAST_BACKEND. Naming a backend that cannot
run raises BackendUnavailableError saying why; it never silently falls back.
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from . import _checks, _extension, _memory, _nnpack, _onednn, _triton, _triton_epilogue, _triton_lateral, _winograd
from . import reference as _torch_impl
from ._extension import library_path
from ._dispatch import (BACKENDS, TABLE, BackendUnavailableError, available_backends, capturing_graph,
                        get_backend, resolve, set_backend, use_backend)
from .reference import nearest_source_index

__all__ = [
    "upsample_add", "upsample_add_", "stride2_pool", "conv1x1", "to_nchw", "conv2d_act", "lateral_upsample_add",
    "conv2d_nchw", "conv2d_nchw_input_format", "empty_cpu_cache", "set_cpu_cache_limit", "cpu_cache_stats",
    "set_backend", "get_backend", "use_backend", "available_backends", "BackendUnavailableError", "BACKENDS",
    "TABLE", "nearest_source_index", "decompositions", "library_path",
]

# Implementation name (a TABLE entry) -> module, per op family.
_UPSAMPLE_IMPLS = {"extension": _extension, "triton": _triton, "torch": _torch_impl}
_POOL_IMPLS = {"triton": _triton, "torch": _torch_impl}


def _upsample_impl(device_type: str):
    return _UPSAMPLE_IMPLS[resolve("upsample_add", device_type)]


def _may_overlap(lateral: torch.Tensor, other: Optional[torch.Tensor]) -> bool:
    """Whether ``other`` may share memory with ``lateral`` (same storage; conservative)."""
    return (other is not None and not torch.compiler.is_compiling()
            and other.untyped_storage().data_ptr() == lateral.untyped_storage().data_ptr())


def upsample_add(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The FPN top-down step: ``(lateral + bias[c]) + F.interpolate(top, lateral's H x W, mode="nearest")``.

    Differentiable in all three inputs. Bit-exact with the pure-PyTorch reference (DESIGN.md,
    exact semantics); float16/bfloat16 add in float32 and round once.

    Args:
        lateral: Tensor[N, C, H, W], a float dtype, any memory format.
        top: Tensor[N, C, th, tw], lateral's dtype and device; upsampled to H x W (any ratio).
        bias: Tensor[C] or None, lateral's dtype and device.

    Returns:
        Tensor[N, C, H, W] in lateral's memory format (channels_last or contiguous).

    Raises:
        TypeError: a non-tensor or non-float input, or dtypes that differ.
        ValueError: shapes or devices that do not fit (named in the message).
        BackendUnavailableError: the named backend cannot run on these tensors' device.
    """
    _checks.check_upsample_add(lateral, top, bias)
    return _upsample_impl(lateral.device.type).upsample_add(lateral, top, bias)


def upsample_add_(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``upsample_add`` written into ``lateral`` (returned), for inference on temporaries.

    ``top`` and ``bias`` may share memory with ``lateral`` (the sum is then formed out of place
    and copied in). It has no gradient: tensors that require grad are refused under grad mode,
    on every backend, rather than leaving their ``.grad`` silently None.

    Args / Returns: as ``upsample_add``; ``lateral`` itself is returned.

    Raises:
        RuntimeError: grad mode is on and an input requires grad; or lateral has elements that
            share memory (an expanded view), as for ATen's in-place ops.
        TypeError, ValueError, BackendUnavailableError: as ``upsample_add``.
    """
    _checks.check_upsample_add(lateral, top, bias)
    _checks.check_in_place("upsample_add_", lateral, top, bias)
    impl = _upsample_impl(lateral.device.type)
    if impl is not _extension and (_may_overlap(lateral, top) or _may_overlap(lateral, bias)):
        return lateral.copy_(impl.upsample_add(lateral, top, bias))  # the C++ op does this itself
    return impl.upsample_add_(lateral, top, bias)


def stride2_pool(x: torch.Tensor) -> torch.Tensor:
    """The FPN 'pool' level, ``F.max_pool2d(x, 1, 2, 0)``, as a strided copy (every other row and column).

    Args:
        x: Tensor[N, C, H, W], a float dtype, any memory format.

    Returns:
        Tensor[N, C, ceil(H/2), ceil(W/2)] in x's memory format; differentiable.

    Raises:
        TypeError: x is not a float tensor. ValueError: x is not 4-D.
        BackendUnavailableError: the named backend cannot run on x's device.
    """
    _checks.check_stride2_pool(x)
    return _POOL_IMPLS[resolve("stride2_pool", x.device.type)].stride2_pool(x)


def conv1x1(x: torch.Tensor, weight: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """Bias-free 1x1 convolution (stride 1, no groups), for inference: the lateral conv of
    ``optimize_for_inference``'s CPU path. Output in channels_last when asked, else x's layout.

    A contiguous float32/float64 CPU map with no autograd goes through a batched matmul that
    reads x as it is and writes either layout directly: weight (O, C) @ x[n] (C, H*W) for NCHW,
    x[n]^T @ weight^T for NHWC (oneDNN's NCHW convolution reorders both maps to a blocked layout
    and back, ~1.7x slower at FPN sizes; benchmarks/RESULTS.md). The sums are ordered differently
    from the convolution's, so results agree to float rounding, not bit for bit. Everything else
    runs F.conv2d.

    Args:
        x: Tensor[N, C, H, W]. weight: Tensor[O, C, 1, 1], x's dtype and device.
        channels_last: return the map in channels_last memory format.

    Returns:
        Tensor[N, O, H, W].
    """
    if _plain_cpu_inference(x, weight) and weight.shape[2:] == (1, 1):
        n, c, h, w = x.shape
        out_channels = weight.shape[0]
        # bmm, not matmul: matmul folds (O, C) @ (N, C, HW) through transposed copies of x and out.
        w2d = weight.reshape(out_channels, c)
        x3d = x.view(n, c, h * w)
        if channels_last:
            nhwc = torch.bmm(x3d.transpose(1, 2), w2d.t().expand(n, -1, -1))
            return nhwc.view(n, h, w, out_channels).permute(0, 3, 1, 2)
        return torch.bmm(w2d.expand(n, -1, -1), x3d).view(n, out_channels, h, w)
    out = F.conv2d(x, weight)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _plain_cpu_inference(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """x is a contiguous NCHW float32/float64 CPU map and no autograd runs through x or params."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dim() == 4
            and x.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))))


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous NCHW tensor: x itself when it already is, else a copy (on CPU with the
    extension, its cache-blocked NHWC->NCHW transpose; torch's strided copy is ~4x slower in
    that direction). Differentiable (the gradient of a copy is the incoming gradient).

    Args:
        x: any tensor; the blocked transpose applies to 4-D channels_last CPU maps.

    Returns:
        A tensor equal to x, contiguous.
    """
    if x.is_contiguous():
        return x
    if x.dim() == 4 and resolve("to_nchw", x.device.type) == "extension":
        return _extension.nhwc_to_nchw(x)
    return x.contiguous()


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in force for device_type, or None. Our inference ops are not autocast
    ops, so they cast their inputs themselves, as autocast would cast a convolution's."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _conv_out_shape(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> torch.Size:
    """The (N, O, H', W') F.conv2d makes of a 4-D x: the fused residual add takes that shape only."""
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)]
    return torch.Size([x.shape[0], weight.shape[0], *spatial])


def _conv2d_act_is_exact(implementation: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                         stride, padding, dilation, relu: bool, residual: Optional[torch.Tensor]) -> bool:
    """Whether a fused conv2d_act implementation computes this call as the torch one would.
    Neither is used while a graph is captured: torch.compile fuses the tail itself, and the
    oneDNN ops have no fake kernels and no tracer support."""
    if implementation == "torch":
        return True
    if implementation in _WINOGRAD and (weight.dim() != 4 or weight.shape[2] != 3 or weight.shape[3] != 3):
        return False  # the common case (1x1 convs) decided first: this runs for every conv call
    if capturing_graph() or x.dim() != 4:
        return False
    residual_fits = residual is None or residual.shape == _conv_out_shape(x, weight, stride, padding, dilation)
    if implementation in ("winograd", "nnpack", "onednn"):  # the CPU float32 ones
        if not residual_fits or (residual is not None and (residual.dtype != torch.float32
                                                           or residual.device.type != "cpu")):
            return False
        groups = x.shape[1] // max(weight.shape[1], 1)
        if implementation == "winograd":
            return _winograd_fits(x, weight, bias, stride, padding, dilation, groups)
        if implementation == "nnpack":
            return x.shape[1] >= _NNPACK_MIN_CHANNELS and _nnpack_fits(x, weight, bias, stride, padding, dilation,
                                                                        groups)
        return (x.dtype == torch.float32 and weight.dtype == torch.float32 and torch.backends.mkldnn.enabled
                and _autocast_dtype("cpu") is None)
    # triton: the epilogue pass after the convolution, in the convolution's output dtype
    out_dtype = _autocast_dtype(x.device.type) or x.dtype
    return (out_dtype in _triton_epilogue.SUPPORTED_DTYPES and residual_fits
            and (bias is not None or residual is not None or relu))


def conv2d_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1),
               groups: int = 1, *, relu: bool = False, residual: Optional[torch.Tensor] = None,
               packed_weight: Optional[Callable[[], torch.Tensor]] = None,
               nnpack_kernels: Optional[Callable[[int], List[torch.Tensor]]] = None,
               winograd_kernels: Optional[Callable[[int], Tuple[int, torch.Tensor]]] = None,
               winograd: bool = True) -> torch.Tensor:
    """``relu?(F.conv2d(x, weight, bias, stride, padding, dilation, groups) + residual)`` for
    inference: a convolution with its norm folded in, as the optimized ResNet blocks run it.

    Implementations (TABLE["conv2d_act", device]): on CPU, float32 without autocast, for a 3x3
    stride-1 convolution (padding <= 1, no groups or dilation), a Winograd convolution (~1e-5 of
    the output's scale from the direct sum; results with non-finite values are recomputed by the
    direct one): the extension's F(4x4, 3x3) in x's memory format with bias and ReLU in its
    output transform (``ops._winograd``; from 32 channels, on maps of enough 4x4 tiles to pay),
    else NNPACK's in NCHW for >= 128 channels over >= 20x20 pixels (``ops._nnpack``), then the
    tail, back in x's memory format; else oneDNN's fused convolution with bias and residual add as post-ops
    of one call; on CUDA the convolution without bias, then one Triton pass that adds bias and
    residual and applies the ReLU in place; otherwise F.conv2d and the tail in place on its
    fresh output. The sums are done in the same order everywhere: (conv + bias) + residual. The ReLU keeps NaN as
    torch.relu does (oneDNN's ReLU post-op maps NaN to 0, so there it runs in place after).

    Args:
        x: Tensor[N, C, H, W] (or unbatched [C, H, W]). weight: Tensor[O, C/groups, kh, kw].
        bias: Tensor[O] or None. residual: a tensor broadcastable to the output, or None.
        stride, padding, dilation, groups: as F.conv2d. relu: apply ReLU last.
        packed_weight: returns ``weight`` prepacked for oneDNN (``Conv2dAct`` caches one); used,
            and called, only when oneDNN runs a channels_last x of at most 128x128 pixels (see
            _PACK_MAX_PIXELS), for which it is bit-identical.
        nnpack_kernels: ``nnpack_kernels(slices)`` returns NNPACK's kernel transforms of weight
            (``Conv2dAct`` caches them), for the NNPACK route.
        winograd_kernels: ``winograd_kernels(tiles)`` returns a batch entry size and the
            extension's Winograd kernel transforms of weight prepacked for it
            (``ops._winograd.pack``; ``Conv2dAct`` caches them); without it they are made per call.
        winograd: allow the Winograd routes; False keeps the convolution direct (oneDNN's fused
            call: the traced, scripted and exported forms' F.conv2d to float rounding).

    Returns:
        The output, as F.conv2d lays it out for x's memory format.

    Raises:
        RuntimeError: grad mode is on and an input requires grad (there is no backward).
    """
    _checks.check_inference_only("conv2d_act", x, weight, bias, residual)
    implementation = resolve("conv2d_act", x.device.type, lambda impl: (winograd or impl not in _WINOGRAD)
                             and _conv2d_act_is_exact(impl, x, weight, bias, stride, padding, dilation, relu, residual))
    if implementation == "winograd":
        channels_last = _channels_last_like(x)
        out = _winograd.conv2d(x, weight, bias, padding, relu and residual is None, channels_last, winograd_kernels)
        if out is not None:
            return out if residual is None else _tail(out, None, residual, relu)
        implementation = None  # non-finite values: the direct convolution decides how they propagate
    elif implementation == "nnpack":
        out = _nnpack.conv2d(to_nchw(x), weight, bias, padding, nnpack_kernels)
        if out is not None:
            out = _tail(out, None, residual, relu)
            return out.contiguous(memory_format=torch.channels_last) if _channels_last_like(x) else out
        implementation = None  # non-finite values: the direct convolution decides how they propagate
    return _conv2d_act_direct(x, weight, bias, stride, padding, dilation, groups, relu, residual, packed_weight,
                              implementation)


def _conv2d_act_direct(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding,
                       dilation, groups: int, relu: bool, residual: Optional[torch.Tensor],
                       packed_weight: Optional[Callable[[], torch.Tensor]],
                       implementation: Optional[str] = None) -> torch.Tensor:
    """conv2d_act by a direct convolution: ``implementation``, or the first one the table names
    after NNPACK's (which hands results with non-finite values back here)."""
    if implementation is None:
        implementation = resolve("conv2d_act", x.device.type, lambda impl: impl not in _WINOGRAD
                                 and _conv2d_act_is_exact(impl, x, weight, bias, stride, padding, dilation, relu,
                                                          residual))
    if implementation == "onednn":
        if (packed_weight is not None and _torch_impl.memory_format_of(x) == torch.channels_last
                and x.shape[2] * x.shape[3] <= _PACK_MAX_PIXELS):
            weight = packed_weight()
        return _tail(_onednn.conv2d_act(x, weight, bias, stride, padding, dilation, groups, residual),
                     None, None, relu)
    if implementation == "triton":
        out = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        if _autocast_dtype(out.device.type) is not None:
            # The convolution ran in low precision; so would its bias inside it, and autocast
            # would cast a float32 residual before the add.
            bias, residual = (t.to(out.dtype) if t is not None and t.dtype == torch.float32 else t
                              for t in (bias, residual))
        return _triton_epilogue.bias_act_(out, bias, residual, relu)
    return _tail(F.conv2d(x, weight, bias, stride, padding, dilation, groups), None, residual, relu)


# Prepacked oneDNN weights pay on small maps; over large ones the measurements disagree
# (ResNet50-FPN on this 2-core CPU, every conv prepacked: 320x320 images 1.11-1.13x faster,
# 800x1216 ones 0.90-1.09x; only convs over <= 128x128 input pixels: 1.08-1.10x at 800x1216;
# benchmarks/RESULTS.md), so only convolutions over at most this many input pixels use them.
_PACK_MAX_PIXELS = 128 * 128


def _channels_last_like(x: torch.Tensor) -> bool:
    """Whether F.conv2d lays its output out channels_last for this 4-D x: an NHWC map, or a
    strided view of one (a channel slice), whose channels are closer together than its columns."""
    if x.is_contiguous():
        return False
    return x.is_contiguous(memory_format=torch.channels_last) or x.stride(1) < x.stride(3)


# The Winograd implementations; they hand results with non-finite values to a direct one.
_WINOGRAD = ("winograd", "nnpack")


def _winograd_shape_fits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding,
                         dilation, groups: int) -> bool:
    """A float32 CPU 3x3 convolution both Winograd routes compute: stride and dilation 1, no
    groups, matching channels, padding 0 or 1, no autocast, nothing captured."""
    return (not capturing_graph() and x.dim() == 4 and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32) and _autocast_dtype("cpu") is None
            and tuple(weight.shape[2:]) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
            and groups == 1 and weight.shape[1] == x.shape[1] and all(0 <= p <= 1 for p in padding))


def _winograd_fits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
                   groups: int) -> bool:
    """A convolution the extension's Winograd F(4x4, 3x3) computes (``_winograd_shape_fits``, with
    oneDNN enabled for its products), on a map where it pays."""
    return (_winograd_shape_fits(x, weight, bias, stride, padding, dilation, groups)
            and torch.backends.mkldnn.enabled
            and _winograd.worthwhile(x.shape[1], weight.shape[0], _winograd.tiles(x.shape, padding)))


# In the ResNet body NNPACK pays from 128 channels on (measured, 3x3 stride 1, conversions to and
# from NCHW included: 128 channels at 40x40 1.43 vs 2.12 ms, 256 at 20x20 1.78 vs 2.06 ms, 64 at
# 80x80 2.20 vs 2.16 ms; benchmarks/RESULTS.md).
_NNPACK_MIN_CHANNELS = 128


def _nnpack_fits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
                 groups: int) -> bool:
    """A convolution NNPACK's Winograd computes (``_winograd_shape_fits``) over a map of at least
    min_pixels."""
    return (_winograd_shape_fits(x, weight, bias, stride, padding, dilation, groups)
            and x.shape[2] * x.shape[3] >= _nnpack.min_pixels())


def _conv2d_nchw_is_exact(implementation: str, x: torch.Tensor, weight: torch.Tensor,
                          bias: Optional[torch.Tensor], stride, padding, dilation, groups: int) -> bool:
    if implementation == "winograd":
        return _winograd_fits(x, weight, bias, stride, padding, dilation, groups)
    if implementation != "nnpack":
        return _conv2d_act_is_exact(implementation, x, weight, bias, stride, padding, dilation, False, None)
    return _nnpack_fits(x, weight, bias, stride, padding, dilation, groups)


def _conv2d_nchw_implementation(x, weight, bias, stride, padding, dilation, groups, winograd: bool = True) -> str:
    return resolve("conv2d_nchw", x.device.type, lambda impl: (winograd or impl not in _WINOGRAD)
                   and _conv2d_nchw_is_exact(impl, x, weight, bias, stride, padding, dilation, groups))


def conv2d_nchw_input_format(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                             stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
                             dilation: Sequence[int] = (1, 1), groups: int = 1, *,
                             winograd: bool = True) -> torch.memory_format:
    """The memory format ``conv2d_nchw`` takes this call's x in without converting it first:
    torch.contiguous_format where NNPACK runs it, channels_last where the extension's Winograd
    does, else x's own. A caller with several such
    convolutions converts their inputs first and runs them back to back (over 100x100 pixels
    NNPACK runs on its own thread pool, ~30% slower while OpenMP's workers still spin after an
    ATen op such as the conversion)."""
    implementation = _conv2d_nchw_implementation(x, weight, bias, stride, padding, dilation, groups, winograd)
    if implementation == "nnpack":
        return torch.contiguous_format
    if implementation == "winograd":
        return torch.channels_last
    return _torch_impl.memory_format_of(x)


def conv2d_nchw(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1),
                groups: int = 1, *, packed_weight: Optional[Callable[[], torch.Tensor]] = None,
                nnpack_kernels: Optional[Callable[[int], List[torch.Tensor]]] = None,
                winograd_kernels: Optional[Callable[[int], Tuple[int, torch.Tensor]]] = None,
                winograd: bool = True) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` returned as a contiguous
    NCHW map, for inference: the FPN's 3x3 output convolutions, whose maps leave the backbone in NCHW.

    Implementations (TABLE["conv2d_nchw", device]): on CPU, for a float32 3x3 stride-1 convolution
    (padding <= 1, no groups or dilation, no autocast), a Winograd convolution, which agrees with
    the direct one to ~1e-5 of the output's scale and hands results with non-finite values back
    to it: the extension's F(4x4, 3x3), from an NHWC x straight to NCHW (``ops._winograd``; from 32
    channels, on maps of enough 4x4 tiles to pay), else NNPACK's over at least 20x20 pixels (32x32
    without the extension; ``ops._nnpack``); else ``conv2d_act`` (oneDNN on CPU) then
    ``to_nchw``; else F.conv2d then a contiguous copy.

    Args:
        x: Tensor[N, C, H, W], any memory format (see ``conv2d_nchw_input_format``).
        weight: Tensor[O, C/groups, kh, kw]. bias: Tensor[O] or None.
        stride, padding, dilation, groups: as F.conv2d (padding as two ints).
        packed_weight: as ``conv2d_act``'s, for the oneDNN route.
        nnpack_kernels: ``nnpack_kernels(slices)`` returns NNPACK's kernel transforms of
            ``weight`` (``ops._nnpack.pack``; ``Conv2dAct`` caches them); without it they are
            made for the call.
        winograd_kernels, winograd: as ``conv2d_act``'s.

    Returns:
        Tensor[N, O, H', W'], contiguous (NCHW).

    Raises:
        RuntimeError: grad mode is on and an input requires grad (there is no backward).
    """
    _checks.check_inference_only("conv2d_nchw", x, weight, bias)
    implementation = _conv2d_nchw_implementation(x, weight, bias, stride, padding, dilation, groups, winograd)
    if implementation == "winograd":
        out = _winograd.conv2d(x, weight, bias, padding, False, False, winograd_kernels)
        if out is not None:
            return out
    elif implementation == "nnpack":
        out = _nnpack.conv2d(to_nchw(x), weight, bias, padding, nnpack_kernels)
        if out is not None:
            return out
    return to_nchw(_conv2d_act_direct(x, weight, bias, stride, padding, dilation, groups, False, None, packed_weight))


def empty_cpu_cache() -> int:
    """Free the CPU blocks the optimized backbones' buffer pool keeps between calls (blocks in
    use stay), as torch.cuda.empty_cache does for CUDA. Returns the bytes freed.

    The pool (``csrc/runtime/cpu/memory_pool.cpp``) serves CPU allocations of 1 MiB and more made inside
    an optimized backbone's forward, and keeps up to a limit of them for the next call: glibc
    returns such blocks to the system on free, and faulting a fresh 62 MB map in again costs
    ~13 ms on the 2-core build machine. The limit is FPN_FAST_CPU_POOL_MB MiB (default 1024; 0
    turns the pool off), read once, the first time the pool is used or queried; change it at run
    time with ``set_cpu_cache_limit``. Blocks in use now come back to the pool when they die,
    up to that limit."""
    return _memory.empty_cache()


def set_cpu_cache_limit(megabytes: int) -> int:
    """Set how much the optimized backbones' CPU buffer pool keeps between calls, at run time
    (it replaces FPN_FAST_CPU_POOL_MB's value, for the whole process).

    Args:
        megabytes: the limit in MiB, a whole number >= 0. A lower limit than the pool holds
            frees cached blocks (the largest first) until what stays fits; 0 turns the pool off:
            every cached block is freed, no later forward pools, and blocks still in use are freed
            when they die instead of being cached.

    Returns:
        The bytes freed now (0 without the compiled extension, which holds the pool).

    Raises:
        TypeError: ``megabytes`` is not an int.
        ValueError: ``megabytes`` is negative.
    """
    if isinstance(megabytes, bool) or not isinstance(megabytes, int):
        raise TypeError(f"set_cpu_cache_limit takes a whole number of MiB, got {type(megabytes).__name__}")
    if megabytes < 0:
        raise ValueError(f"set_cpu_cache_limit takes a limit >= 0 MiB (0 turns the pool off), got {megabytes}")
    return _memory.set_limit(megabytes << 20)


def cpu_cache_stats() -> Dict[str, int]:
    """The CPU buffer pool's counters: cached_bytes, cached_blocks, blocks_in_use, limit_bytes,
    hits and misses (all 0 without the extension; the counts 0 before first use).

    Raises:
        ValueError: FPN_FAST_CPU_POOL_MB, read on first use, is not a whole number >= 0."""
    return _memory.stats()


def _tail(out: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
          relu: bool) -> torch.Tensor:
    """relu?((out + bias[c]) + residual) in place on the fresh conv output, one torch op each."""
    if bias is not None:  # per channel, batched (N, C, H, W) or not (C, H, W)
        out += bias.view(-1, 1, 1)
    if residual is not None:
        out += residual
    return out.relu_() if relu else out


def _lateral_is_exact(implementation: str, x: torch.Tensor, fuse: bool) -> bool:
    return implementation != "triton" or (fuse and x.dtype in _triton_lateral.SUPPORTED_DTYPES)


def lateral_upsample_add(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         top: Optional[torch.Tensor] = None, *, fuse: bool = True) -> torch.Tensor:
    """The FPN's whole top-down step from a body feature map, for inference:
    ``(conv1x1(x, weight) + bias) + nearest_upsample(top, x's H x W)``; no top at the coarsest level.

    With ``fuse`` and Triton in charge (TABLE["lateral_upsample_add", device]) one GEMM kernel
    computes the 1x1 convolution and adds bias and upsampled top in its epilogue, in x's memory
    format (float32/float16/bfloat16; float64 takes the unfused path). Otherwise the convolution
    (``conv1x1`` for NCHW CPU maps, else F.conv2d) writes the lateral map and ``upsample_add_``
    adds bias and top into it. Under autocast every float32 input is cast to the autocast dtype
    first, as the convolution it replaces would be.

    Args:
        x: Tensor[N, C, H, W]. weight: Tensor[O, C, 1, 1]. bias: Tensor[O] or None.
        top: Tensor[N, O, th, tw] or None. All of x's dtype and device.
        fuse: allow the fused GEMM.

    Returns:
        Tensor[N, O, H, W] in x's memory format.

    Raises:
        TypeError, ValueError: inputs that do not fit (named in the message).
        RuntimeError: grad mode is on and an input requires grad (there is no backward).
    """
    _checks.check_inference_only("lateral_upsample_add", x, weight, bias, top)
    low = _autocast_dtype(x.device.type) if isinstance(x, torch.Tensor) else None
    if low is not None:  # as autocast casts a convolution's operands: float32 ones only
        x, weight, bias, top = (t.to(low) if t is not None and t.dtype == torch.float32 else t
                                for t in (x, weight, bias, top))
    _checks.check_lateral_upsample_add(x, weight, bias, top)
    implementation = resolve("lateral_upsample_add", x.device.type, lambda impl: _lateral_is_exact(impl, x, fuse))
    if implementation == "triton":
        return _triton_lateral.lateral_upsample_add(x, weight, bias, top)
    lateral = conv1x1(x, weight) if x.is_contiguous() else conv2d_act(x, weight)
    in_place = not capturing_graph()  # a captured graph gets functional ops (see FeaturePyramidNetwork)
    if top is None:
        if bias is None:
            return lateral
        return lateral.add_(bias.view(1, -1, 1, 1)) if in_place else lateral + bias.view(1, -1, 1, 1)
    return upsample_add_(lateral, top, bias) if in_place else upsample_add(lateral, top, bias)


def _backward_top_in_aten(grad: torch.Tensor, top_h: int, top_w: int) -> torch.Tensor:
    n, c, h, w = grad.shape
    return torch.ops.aten.upsample_nearest2d_backward(grad, [h, w], [n, c, top_h, top_w])


def _in_aten(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    return _torch_impl.upsample_add(lateral, top, bias, functional=True)


def _in_place_in_aten(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
    lateral.copy_(_in_aten(lateral, top, bias))


def decompositions() -> Dict[Callable, Callable]:
    """A decomposition table for ``ExportedProgram.run_decompositions`` that rewrites every
    fpn_fast op in a program into ATen ops: torch.export's default (core ATen) decompositions
    plus fpn_fast's registered ops in their pure-PyTorch forms.

    ``torch.export.export(model, args).run_decompositions(fpn_fast.ops.decompositions())`` gives
    a portable program that ``torch.export.load`` runs in a process without fpn_fast; the
    undecomposed program keeps the fused ops (faster, needs ``library_path()`` loaded).

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
