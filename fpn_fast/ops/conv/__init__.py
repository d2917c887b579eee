"""The convolutions of the inference path (``fpn_fast.optimize_for_inference`` models), no
autograd: a folded convolution with its pointwise tail fused, and the layouts the pyramid needs.

``conv2d_act(x, weight, bias, ..., relu, residual)`` -> relu?(conv2d(x, weight, bias) + residual)
``conv2d_nchw(x, weight, bias, ...)``                -> F.conv2d(...) as a contiguous NCHW map
``conv2d_nchw_input_format(x, weight, bias, ...)``   -> the memory format conv2d_nchw takes x in
``conv1x1(x, weight, channels_last)``                -> a bias-free lateral 1x1 convolution

Implementations beneath: oneDNN's fused convolution (``_onednn.py``), the extension's Winograd
F(4x4, 3x3) (``_winograd.py``), NNPACK's Winograd (``_nnpack.py``), the Triton bias/residual/ReLU
epilogue after cuDNN (``_triton_epilogue.py``), and F.conv2d. Which one takes a call is decided
by the table rows below and the ``supports`` predicates, from the thresholds in
``ops.selection``; the Winograd routes round differently from the direct sum
(``selection.ROUNDING``).
"""
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .. import _checks
from ..dispatch import autocast_dtype, capturing_graph, declare, resolve, row
from ..layout import to_nchw
from ..reference import memory_format_of
from ..selection import NNPACK_MIN_CHANNELS, PACK_MAX_PIXELS
from . import _nnpack, _onednn, _triton_epilogue, _winograd

__all__ = ["conv2d_act", "conv2d_nchw", "conv2d_nchw_input_format", "conv1x1"]


def _cpu_only(what: str, unavailable_reason: Callable[[], Optional[str]]) -> Callable[[str], Optional[str]]:
    """The dispatch probe of a CPU-only implementation (``unavailable_reason`` probes it once)."""
    def probe(device_type: str) -> Optional[str]:
        if device_type != "cpu":
            return f"{what} runs on CPU tensors only, not {device_type}"
        return unavailable_reason()
    return probe


# Looked up per probe (not bound now), so a test can turn a route off and clear dispatch's cache.
PROBES = {
    "onednn": _cpu_only("oneDNN's fused convolution", lambda: _onednn.unavailable_reason()),
    "nnpack": _cpu_only("NNPACK", lambda: _nnpack.unavailable_reason()),
    "winograd": _cpu_only("the extension's Winograd convolution", lambda: _winograd.unavailable_reason()),
}

ROWS = {
    # A folded convolution and its tail (bias, residual, ReLU): oneDNN post-ops on CPU, one Triton
    # pass after cuDNN on CUDA; "extension" means oneDNN on CPU (the CPU fast path). Winograd
    # first for 3x3 stride-1 convs: the extension's F(4x4, 3x3) where it pays, else NNPACK's
    # (conv2d_act_supports, with the thresholds of ops.selection).
    ("conv2d_act", "cpu"): row(("winograd", "nnpack", "onednn", "torch"),
                               extension=("winograd", "nnpack", "onednn", "torch")),
    ("conv2d_act", "cuda"): row(("triton", "torch"), extension=("torch",)),
    # A convolution whose output is wanted in NCHW (the FPN's 3x3 output convs): a Winograd
    # convolution writing NCHW (the extension's, else NNPACK's), else the conv2d_act route then to_nchw.
    ("conv2d_nchw", "cpu"): row(("winograd", "nnpack", "onednn", "torch"),
                                extension=("winograd", "nnpack", "onednn", "torch"), triton=("torch",)),
    ("conv2d_nchw", "cuda"): row(("torch",), extension=("torch",), triton=("torch",)),
}
declare(ROWS, PROBES)

# The Winograd implementations; they hand results with non-finite values to a direct one.
WINOGRAD_ROUTES = ("winograd", "nnpack")


def conv1x1(x: torch.Tensor, weight: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """Bias-free 1x1 convolution (stride 1, no groups), for inference: the lateral conv of
    ``optimize_for_inference``'s CPU path. Output in channels_last when asked, else x's layout.

    A contiguous float32/float64 CPU map with no autograd goes through a batched matmul that
    reads x as it is and writes either layout directly: weight (O, C) @ x[n] (C, H*W) for NCHW,
    x[n]^T @ weight^T for NHWC (oneDNN's NCHW convolution reorders both maps to a blocked layout
    and back, which is slower at FPN sizes; benchmarks/RESULTS.md). The sums are ordered
    differently from the convolution's, so results agree to float rounding, not bit for bit
    (``selection.ROUNDING``). Everything else runs F.conv2d.

    Args:
        x: Tensor[N, C, H, W]. weight: Tensor[O, C, 1, 1], x's dtype and device.
        channels_last: return the map in channels_last memory format.

    Returns:
        Tensor[N, O, H, W], x's dtype and device.
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
    stride-1 convolution (padding <= 1, no groups or dilation), a Winograd convolution (not
    bit-exact: ~1e-5 of the output's scale from the direct sum, ``selection.ROUNDING``; results
    with non-finite values are recomputed by the direct one): the extension's F(4x4, 3x3) in x's
    memory format with bias and ReLU in its output transform (``conv._winograd``; from 32
    channels, on maps of enough 4x4 tiles to pay), else NNPACK's in NCHW for >= 128 channels over
    >= 20x20 pixels (``conv._nnpack``), then the tail, back in x's memory format; else oneDNN's
    fused convolution with bias and residual add as post-ops of one call; on CUDA the
    convolution without bias, then one Triton pass that adds bias and residual and applies the
    ReLU in place; otherwise F.conv2d and the tail in place on its fresh output. The thresholds
    are ``ops.selection``'s. The sums are done in the same order everywhere: (conv + bias) +
    residual. The ReLU keeps NaN as torch.relu does (oneDNN's ReLU post-op maps NaN to 0, so
    there it runs in place after).

    Args:
        x: Tensor[N, C, H, W] (or unbatched [C, H, W]). weight: Tensor[O, C/groups, kh, kw].
        bias: Tensor[O] or None. residual: a tensor broadcastable to the output, or None.
        stride, padding, dilation, groups: as F.conv2d. relu: apply ReLU last.
        packed_weight: returns ``weight`` prepacked for oneDNN (``Conv2dAct`` caches one); used,
            and called, only when oneDNN runs a channels_last x of at most 128x128 pixels (see
            ``selection.PACK_MAX_PIXELS``), for which it is bit-identical.
        nnpack_kernels: ``nnpack_kernels(slices)`` returns NNPACK's kernel transforms of weight
            (``Conv2dAct`` caches them), for the NNPACK route.
        winograd_kernels: ``winograd_kernels(tiles)`` returns a batch entry size and the
            extension's Winograd kernel transforms of weight prepacked for it
            (``conv._winograd.pack``; ``Conv2dAct`` caches them); without it they are made per call.
        winograd: allow the Winograd routes; False keeps the convolution direct (oneDNN's fused
            call: the traced, scripted and exported forms' F.conv2d to float rounding).

    Returns:
        Tensor[N, O, H', W'] (or [O, H', W']) of x's dtype (the autocast dtype under autocast),
        laid out as F.conv2d lays it out for x's memory format.

    Raises:
        RuntimeError: grad mode is on and an input requires grad (there is no backward).
    """
    _checks.check_inference_only("conv2d_act", x, weight, bias, residual)
    implementation = resolve("conv2d_act", x.device.type, lambda impl: (winograd or impl not in WINOGRAD_ROUTES)
                             and conv2d_act_supports(impl, x, weight, bias, stride, padding, dilation, relu, residual))
    if implementation == "winograd":
        channels_last = channels_last_like(x)
        out = _winograd.conv2d(x, weight, bias, padding, relu and residual is None, channels_last, winograd_kernels)
        if out is not None:
            return out if residual is None else _tail(out, None, residual, relu)
        implementation = None  # non-finite values: the direct convolution decides how they propagate
    elif implementation == "nnpack":
        out = _nnpack.conv2d(to_nchw(x), weight, bias, padding, nnpack_kernels)
        if out is not None:
            out = _tail(out, None, residual, relu)
            return out.contiguous(memory_format=torch.channels_last) if channels_last_like(x) else out
        implementation = None  # non-finite values: the direct convolution decides how they propagate
    return conv2d_act_direct(x, weight, bias, stride, padding, dilation, groups, relu, residual, packed_weight,
                             implementation)


def conv2d_act_direct(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding,
                      dilation, groups: int, relu: bool, residual: Optional[torch.Tensor],
                      packed_weight: Optional[Callable[[], torch.Tensor]],
                      implementation: Optional[str] = None) -> torch.Tensor:
    """conv2d_act by a direct convolution: ``implementation``, or the first one the table names
    after NNPACK's (which hands results with non-finite values back here)."""
    if implementation is None:
        implementation = resolve("conv2d_act", x.device.type, lambda impl: impl not in WINOGRAD_ROUTES
                                 and conv2d_act_supports(impl, x, weight, bias, stride, padding, dilation, relu,
                                                         residual))
    if implementation == "onednn":
        if (packed_weight is not None and memory_format_of(x) == torch.channels_last
                and x.shape[2] * x.shape[3] <= PACK_MAX_PIXELS):
            weight = packed_weight()
        return _tail(_onednn.conv2d_act(x, weight, bias, stride, padding, dilation, groups, residual),
                     None, None, relu)
    if implementation == "triton":
        out = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        if autocast_dtype(out.device.type) is not None:
            # The convolution ran in low precision; so would its bias inside it, and autocast
            # would cast a float32 residual before the add.
            bias, residual = (t.to(out.dtype) if t is not None and t.dtype == torch.float32 else t
                              for t in (bias, residual))
        return _triton_epilogue.bias_act_(out, bias, residual, relu)
    return _tail(F.conv2d(x, weight, bias, stride, padding, dilation, groups), None, residual, relu)


def _tail(out: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
          relu: bool) -> torch.Tensor:
    """relu?((out + bias[c]) + residual) in place on the fresh conv output, one torch op each."""
    if bias is not None:  # per channel, batched (N, C, H, W) or not (C, H, W)
        out += bias.view(-1, 1, 1)
    if residual is not None:
        out += residual
    return out.relu_() if relu else out


def channels_last_like(x: torch.Tensor) -> bool:
    """Whether F.conv2d lays its output out channels_last for this 4-D x: an NHWC map, or a
    strided view of one (a channel slice), whose channels are closer together than its columns."""
    if x.is_contiguous():
        return False
    return x.is_contiguous(memory_format=torch.channels_last) or x.stride(1) < x.stride(3)


def conv2d_nchw_input_format(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                             stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
                             dilation: Sequence[int] = (1, 1), groups: int = 1, *,
                             winograd: bool = True) -> torch.memory_format:
    """The memory format ``conv2d_nchw`` takes this call's x in without converting it first:
    torch.contiguous_format where NNPACK runs it, channels_last where the extension's Winograd
    does, else x's own. A caller with several such convolutions converts their inputs first and
    runs them back to back (over ``selection.NNPACK_SLICED_MAX_PIXELS`` NNPACK runs on its own
    thread pool, slower while OpenMP's workers still spin after an ATen op such as the
    conversion; benchmarks/RESULTS.md).

    Args:
        x, weight, bias, stride, padding, dilation, groups, winograd: as ``conv2d_nchw``'s.

    Returns:
        torch.contiguous_format or torch.channels_last.
    """
    implementation = conv2d_nchw_implementation(x, weight, bias, stride, padding, dilation, groups, winograd)
    if implementation == "nnpack":
        return torch.contiguous_format
    if implementation == "winograd":
        return torch.channels_last
    return memory_format_of(x)


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
    the direct one to ~1e-5 of the output's scale (not bit-exact, ``selection.ROUNDING``) and
    hands results with non-finite values back to it: the extension's F(4x4, 3x3), from an NHWC x
    straight to NCHW (``conv._winograd``; from 32 channels, on maps of enough 4x4 tiles to pay),
    else NNPACK's over at least 20x20 pixels (32x32 without the extension; ``conv._nnpack``);
    else ``conv2d_act`` (oneDNN on CPU) then ``to_nchw``; else F.conv2d then a contiguous copy.

    Args:
        x: Tensor[N, C, H, W], any memory format (see ``conv2d_nchw_input_format``).
        weight: Tensor[O, C/groups, kh, kw]. bias: Tensor[O] or None.
        stride, padding, dilation, groups: as F.conv2d (padding as two ints).
        packed_weight: as ``conv2d_act``'s, for the oneDNN route.
        nnpack_kernels: ``nnpack_kernels(slices)`` returns NNPACK's kernel transforms of
            ``weight`` (``conv._nnpack.pack``; ``Conv2dAct`` caches them); without it they are
            made for the call.
        winograd_kernels, winograd: as ``conv2d_act``'s.

    Returns:
        Tensor[N, O, H', W'], contiguous (NCHW).

    Raises:
        RuntimeError: grad mode is on and an input requires grad (there is no backward).
    """
    _checks.check_inference_only("conv2d_nchw", x, weight, bias)
    implementation = conv2d_nchw_implementation(x, weight, bias, stride, padding, dilation, groups, winograd)
    if implementation == "winograd":
        out = _winograd.conv2d(x, weight, bias, padding, False, False, winograd_kernels)
        if out is not None:
            return out
    elif implementation == "nnpack":
        out = _nnpack.conv2d(to_nchw(x), weight, bias, padding, nnpack_kernels)
        if out is not None:
            return out
    return to_nchw(conv2d_act_direct(x, weight, bias, stride, padding, dilation, groups, False, None, packed_weight))


def _conv_out_shape(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> torch.Size:
    """The (N, O, H', W') F.conv2d makes of a 4-D x: the fused residual add takes that shape only."""
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)]
    return torch.Size([x.shape[0], weight.shape[0], *spatial])


def conv2d_act_supports(implementation: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        stride, padding, dilation, relu: bool, residual: Optional[torch.Tensor]) -> bool:
    """Whether ``implementation`` takes this conv2d_act call: dtype, shape, layout, autocast and
    the thresholds of ``ops.selection`` (where a Winograd route pays). It says nothing of
    rounding: the Winograd routes take calls they do not compute bit for bit
    (``selection.ROUNDING``). No fused implementation is used while a graph is captured:
    torch.compile fuses the tail itself, and the oneDNN ops have no fake kernels and no tracer
    support."""
    if implementation == "torch":
        return True
    if implementation in WINOGRAD_ROUTES and (weight.dim() != 4 or weight.shape[2] != 3 or weight.shape[3] != 3):
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
            return x.shape[1] >= NNPACK_MIN_CHANNELS and _nnpack_fits(x, weight, bias, stride, padding, dilation,
                                                                       groups)
        return (x.dtype == torch.float32 and weight.dtype == torch.float32 and torch.backends.mkldnn.enabled
                and autocast_dtype("cpu") is None)
    # triton: the epilogue pass after the convolution, in the convolution's output dtype
    out_dtype = autocast_dtype(x.device.type) or x.dtype
    return (out_dtype in _triton_epilogue.SUPPORTED_DTYPES and residual_fits
            and (bias is not None or residual is not None or relu))


def conv2d_nchw_supports(implementation: str, x: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor], stride, padding, dilation, groups: int) -> bool:
    """Whether ``implementation`` takes this conv2d_nchw call (as ``conv2d_act_supports``)."""
    if implementation == "winograd":
        return _winograd_fits(x, weight, bias, stride, padding, dilation, groups)
    if implementation != "nnpack":
        return conv2d_act_supports(implementation, x, weight, bias, stride, padding, dilation, False, None)
    return _nnpack_fits(x, weight, bias, stride, padding, dilation, groups)


def conv2d_nchw_implementation(x, weight, bias, stride, padding, dilation, groups, winograd: bool = True) -> str:
    """The implementation ``conv2d_nchw`` resolves to for this call."""
    return resolve("conv2d_nchw", x.device.type, lambda impl: (winograd or impl not in WINOGRAD_ROUTES)
                   and conv2d_nchw_supports(impl, x, weight, bias, stride, padding, dilation, groups))


def _winograd_shape_fits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding,
                         dilation, groups: int) -> bool:
    """A float32 CPU 3x3 convolution both Winograd routes compute: stride and dilation 1, no
    groups, matching channels, padding 0 or 1, no autocast, nothing captured."""
    return (not capturing_graph() and x.dim() == 4 and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32) and autocast_dtype("cpu") is None
            and tuple(weight.shape[2:]) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
            and groups == 1 and weight.shape[1] == x.shape[1] and all(0 <= p <= 1 for p in padding))


def _winograd_fits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
                   groups: int) -> bool:
    """A convolution the extension's Winograd F(4x4, 3x3) computes (``_winograd_shape_fits``, with
    oneDNN enabled for its products), on a map where it pays."""
    return (_winograd_shape_fits(x, weight, bias, stride, padding, dilation, groups)
            and torch.backends.mkldnn.enabled
            and _winograd.worthwhile(x.shape[1], weight.shape[0], _winograd.tiles(x.shape, padding)))


def _nnpack_fits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
                 groups: int) -> bool:
    """A convolution NNPACK's Winograd computes (``_winograd_shape_fits``) over a map of at least
    ``_nnpack.min_pixels()``."""
    return (_winograd_shape_fits(x, weight, bias, stride, padding, dilation, groups)
            and x.shape[2] * x.shape[3] >= _nnpack.min_pixels())
