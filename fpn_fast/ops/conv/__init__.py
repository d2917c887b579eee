"""The convolutions of the inference path (``fpn_fast.optimize_for_inference`` models), no
autograd: a folded convolution with its pointwise tail fused, and the layouts the pyramid needs.

``conv2d_act(x, weight, bias, ..., relu, residual)`` -> relu?(conv2d(x, weight, bias) + residual)
``conv2d_nchw(x, weight, bias, ...)``                -> F.conv2d(...) as a contiguous NCHW map
``conv2d_nchw_input_format(x, weight, bias, ...)``   -> the memory format conv2d_nchw takes x in
``conv1x1(x, weight, channels_last)``                -> a bias-free lateral 1x1 convolution

Implementations beneath: oneDNN's fused convolution (``_onednn.py``), the extension's Winograd
F(4x4, 3x3) (``_winograd.py``), NNPACK's Winograd (``_nnpack.py``), the Triton bias/residual/ReLU
epilogue after cuDNN (``_triton_epilogue.py``), cuDNN's fused conv + bias (+ residual) + ReLU
(``_cudnn.py``), and F.conv2d. The rows below are the only place a route is chosen: ``runner``
resolves them once per call signature with the ``supports`` predicates (``_supports.py``, from
the thresholds of ``ops.selection``) and binds the route (``_routes.py``); on CUDA the "auto"
row is measured (``ops.measure``): its candidates are timed on the first call's tensors. The
Winograd routes round differently from the direct sum (``selection.ROUNDING``).
"""
import functools
import os
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _checks
from .._triton import on_device_of
from .._triton import unavailable_reason as _triton_reason
from ..dispatch import (autocast_dtype, cached, candidates, capturing_graph, declare, get_backend, resolve, row,
                        tensor_key)
from ..casts import cast_once
from ..measure import cuda_flags, fastest, measured, stream_capturing
from ..reference import memory_format_of
from ..runner import Runner
from . import _cudnn, _nnpack, _onednn, _routes, _triton_epilogue, _winograd
from ._supports import (TRITON_GEMM_ROUTES, WINOGRAD_ROUTES, channels_last_like, conv2d_act_supports,
                        conv2d_nchw_supports, conv_out_shape, cudnn_relu_refusal, triton_gemm_refusal)

__all__ = ["conv2d_act", "conv2d_nchw", "conv2d_nchw_input_format", "conv1x1", "runner", "nchw_runner"]


def _cpu_only(what: str, unavailable_reason: Callable[[], Optional[str]]) -> Callable[[str], Optional[str]]:
    """The dispatch probe of a CPU-only implementation (``unavailable_reason`` probes it once)."""
    def probe(device_type: str) -> Optional[str]:
        if device_type != "cpu":
            return f"{what} runs on CPU tensors only, not {device_type}"
        return unavailable_reason()
    return probe


def _triton_conv_reason(device_type: str) -> Optional[str]:
    """The Triton GEMM convolutions' probe: Triton's, unless FPN_FAST_TRITON_CONV=0 (read when
    first probed) leaves them out of the measured candidates (each compiles its kernels on the
    first call that measures it)."""
    if os.environ.get("FPN_FAST_TRITON_CONV", "1") == "0":
        return "turned off by FPN_FAST_TRITON_CONV=0"
    return _triton_reason(device_type)


# Looked up per probe (not bound now), so a test can turn a route off and clear dispatch's cache.
PROBES = {
    "onednn": _cpu_only("oneDNN's fused convolution", lambda: _onednn.unavailable_reason()),
    "nnpack": _cpu_only("NNPACK", lambda: _nnpack.unavailable_reason()),
    "winograd": _cpu_only("the extension's Winograd convolution", lambda: _winograd.unavailable_reason()),
    "cudnn_relu": lambda device_type: _cudnn.unavailable_reason(device_type),
    "triton_gemm": lambda device_type: _triton_conv_reason(device_type),
    "triton_conv": lambda device_type: _triton_conv_reason(device_type),
}

ROWS = {
    # A folded convolution and its tail (bias, residual, ReLU): oneDNN post-ops on CPU; on CUDA
    # measured (MEASURED below): cuDNN then one Triton pass ("triton", the reference the others
    # must agree with), one Triton GEMM with the tail in its epilogue (1x1 stride-1 windows:
    # "triton_gemm"; the others: "triton_conv", an implicit GEMM), cuDNN's fused conv + bias
    # (+ residual) + ReLU where its ReLU keeps NaN, or cuDNN then torch's tail. Unmeasured (a
    # graph captured or traced) the first that takes the call runs. "extension" means oneDNN on
    # CPU (the CPU fast path). Winograd first for 3x3 stride-1 convs: the extension's F(4x4, 3x3)
    # where it pays, else NNPACK's (conv2d_act_supports, with the thresholds of ops.selection).
    ("conv2d_act", "cpu"): row(("winograd", "nnpack", "onednn", "torch"),
                               extension=("winograd", "nnpack", "onednn", "torch")),
    ("conv2d_act", "cuda"): row(("triton", "triton_gemm", "triton_conv", "cudnn_relu", "torch"),
                                extension=("torch",)),
    # A convolution whose output is wanted in NCHW (the FPN's 3x3 output convs): a Winograd
    # convolution writing NCHW (the extension's, else NNPACK's), else the conv2d_act route then to_nchw.
    ("conv2d_nchw", "cpu"): row(("winograd", "nnpack", "onednn", "torch"),
                                extension=("winograd", "nnpack", "onednn", "torch"), triton=("torch",)),
    # On CUDA measured too: the Triton implicit GEMM writing NCHW straight from its epilogue
    # (one pass), or conv2d_act's measured route then to_nchw.
    ("conv2d_nchw", "cuda"): row(("triton_conv", "torch"), extension=("torch",), triton=("torch",)),
}
MEASURED = [("conv2d_act", "cuda"), ("conv2d_nchw", "cuda")]
# The implementations a measured row takes only when it measures (its unmeasured route stays
# cuDNN then the Triton epilogue, as a captured or traced graph expects).
MEASURED_ONLY = ("cudnn_relu",) + TRITON_GEMM_ROUTES
declare(ROWS, PROBES, MEASURED)


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
        if not channels_last:
            return _bmm_nchw(x, weight)
        n, c, h, w = x.shape
        out_channels = weight.shape[0]
        nhwc = torch.bmm(x.view(n, c, h * w).transpose(1, 2), weight.reshape(out_channels, c).t().expand(n, -1, -1))
        return nhwc.view(n, h, w, out_channels).permute(0, 3, 1, 2)
    out = F.conv2d(x, weight)
    return out.contiguous(memory_format=torch.channels_last) if channels_last else out


def _plain_cpu_inference(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """x is a contiguous NCHW float32/float64 CPU map and no autograd runs through x or params."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dim() == 4
            and x.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))))


def _state(device: torch.device) -> tuple:
    """The global state a convolution's route depends on besides its arguments."""
    if device.type == "cuda":
        return get_backend(), autocast_dtype("cuda"), cuda_flags(), stream_capturing(device)
    return get_backend(), autocast_dtype(device.type), torch._C._get_mkldnn_enabled()


def runner(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1),
           groups: int = 1, relu: bool = False, residual: Optional[torch.Tensor] = None,
           winograd: bool = True) -> Runner:
    """``conv2d_act``'s runner for this call's signature: ``run(x, weight, bias, residual, pack)``,
    ``pack`` being what ``run.pack(packs, x)`` fetches (or None). Arguments as ``conv2d_act``'s.
    Decided once per signature (on CUDA under "auto": measured on these tensors)."""
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    if capturing_graph():
        return _decide(x, weight, bias, stride, padding, dilation, groups, relu, residual, winograd)
    key = ("conv2d_act", tensor_key(x), tensor_key(weight), tensor_key(bias), tensor_key(residual), stride, padding,
           dilation, groups, relu, winograd, _state(x.device))
    return cached(key, lambda: _decide(x, weight, bias, stride, padding, dilation, groups, relu, residual, winograd))


def _decide(x, weight, bias, stride, padding, dilation, groups, relu, residual, winograd) -> Runner:
    measuring = measured("conv2d_act", x.device)

    def supports(implementation: str) -> bool:
        return ((winograd or implementation not in WINOGRAD_ROUTES) and (measuring or implementation not in MEASURED_ONLY)
                and conv2d_act_supports(implementation, x, weight, bias, stride, padding, dilation, relu, residual))

    def route(implementation: str):
        direct = None
        if implementation in WINOGRAD_ROUTES:
            direct = runner(x, weight, bias, stride, padding, dilation, groups, relu, residual, False).fn
        return _routes.act(implementation, x, weight, stride, padding, dilation, groups, relu, residual, direct)

    if not measuring:
        implementation = resolve("conv2d_act", x.device.type, supports)
        fn, pack = route(implementation)
        return Runner("conv2d_act", implementation, fn, dynamic=(0, 3), pack=pack)
    names, refused = candidates("conv2d_act", x.device.type, supports,
                                lambda implementation: _why_not(implementation, x, weight, relu, residual,
                                                                stride, padding, dilation))
    routes = {name: route(name)[0] for name in names}
    decision = fastest("conv2d_act", _describe(x, weight, bias, stride, padding, dilation, groups, relu, residual),
                       {name: functools.partial(fn, x, weight, bias, residual, None) for name, fn in routes.items()},
                       refused, x.device)
    return Runner("conv2d_act", decision.chosen, routes[decision.chosen], dynamic=(0, 3), decision=decision)


def _why_not(implementation, x, weight, relu, residual, stride, padding, dilation) -> Optional[str]:
    """Why a measured candidate does not take this call (what the route report says)."""
    fits = residual is None or residual.shape == conv_out_shape(x, weight, stride, padding, dilation)
    if not fits:
        return "the residual is not of the output's shape"
    if implementation == "cudnn_relu":
        return cudnn_relu_refusal(x, weight, relu)
    if implementation in TRITON_GEMM_ROUTES:
        return triton_gemm_refusal(implementation, x, weight, None, stride, padding, dilation, residual)
    if implementation == "triton":
        return ("the Triton epilogue takes float32, float16 and bfloat16 outputs with a bias, residual or ReLU "
                "to apply")
    return None


def _describe(x, weight, bias, stride, padding, dilation, groups, relu, residual) -> str:
    layout = "channels_last" if x.dim() == 4 and channels_last_like(x) else "NCHW"
    return (f"x {list(x.shape)} {layout} {x.dtype}, weight {list(weight.shape)}, stride {list(stride)}, "
            f"padding {list(padding)}, dilation {list(dilation)}, groups {groups}, bias {bias is not None}, "
            f"residual {residual is not None}, relu {relu}, autocast {autocast_dtype(x.device.type)}, "
            f"flags {cuda_flags() if x.device.type == 'cuda' else ()}, {x.device}")


def nchw_runner(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1),
                groups: int = 1, winograd: bool = True) -> Runner:
    """``conv2d_nchw``'s runner for this call's signature: ``run(x, weight, bias, pack)``.
    Arguments as ``conv2d_nchw``'s; its route is ``run.route``."""
    stride, padding, dilation = tuple(stride), tuple(padding), tuple(dilation)
    if capturing_graph():
        return _decide_nchw(x, weight, bias, stride, padding, dilation, groups, winograd)
    key = ("conv2d_nchw", tensor_key(x), tensor_key(weight), tensor_key(bias), stride, padding, dilation, groups,
           winograd, _state(x.device))
    return cached(key, lambda: _decide_nchw(x, weight, bias, stride, padding, dilation, groups, winograd))


def _decide_nchw(x, weight, bias, stride, padding, dilation, groups, winograd) -> Runner:
    measuring = measured("conv2d_nchw", x.device)

    def supports(implementation: str) -> bool:
        return ((winograd or implementation not in WINOGRAD_ROUTES)
                and (measuring or implementation not in MEASURED_ONLY)
                and conv2d_nchw_supports(implementation, x, weight, bias, stride, padding, dilation, groups))

    direct = runner(x, weight, bias, stride, padding, dilation, groups, False, None, winograd=False)

    def route(implementation: str):
        fn, pack = _routes.nchw(implementation, x, weight, stride, padding, direct)
        # "torch" and "onednn" run conv2d_act's direct route, then to_nchw: that route is the
        # runner's ``via`` (and, unmeasured, what it measured is the decision).
        via = None if implementation in WINOGRAD_ROUTES + TRITON_GEMM_ROUTES else direct.route
        return fn, pack, via

    if not measuring:
        implementation = resolve("conv2d_nchw", x.device.type, supports)
        fn, pack, via = route(implementation)
        return Runner("conv2d_nchw", implementation, fn, dynamic=(0,), pack=pack, decision=direct.decision, via=via)
    names, refused = candidates("conv2d_nchw", x.device.type, supports,
                                lambda implementation: _why_not(implementation, x, weight, False, None,
                                                                stride, padding, dilation))
    routes = {name: route(name) for name in names}
    decision = fastest("conv2d_nchw", _describe(x, weight, bias, stride, padding, dilation, groups, False, None),
                       {name: functools.partial(fn, x, weight, bias, None) for name, (fn, _, _) in routes.items()},
                       refused, x.device)
    fn, pack, via = routes[decision.chosen]
    return Runner("conv2d_nchw", decision.chosen, fn, dynamic=(0,), pack=pack, decision=decision, via=via)


def conv1x1_route(x: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``conv1x1(x, weight)`` decided for x's signature, outside autograd (the lateral op's)."""
    if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dim() == 4 and x.is_contiguous():
        return _bmm_nchw
    return F.conv2d


def _bmm_nchw(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    out_channels = weight.shape[0]
    # bmm, not matmul: matmul folds (O, C) @ (N, C, HW) through transposed copies of x and out.
    return torch.bmm(weight.reshape(out_channels, c).expand(n, -1, -1), x.view(n, c, h * w)).view(
        n, out_channels, h, w)


def conv2d_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1),
               groups: int = 1, *, relu: bool = False, residual: Optional[torch.Tensor] = None,
               packs=None, winograd: bool = True) -> torch.Tensor:
    """``relu?(F.conv2d(x, weight, bias, stride, padding, dilation, groups) + residual)`` for
    inference: a convolution with its norm folded in, as the optimized ResNet blocks run it.

    Implementations (TABLE["conv2d_act", device], resolved once per call signature by
    ``runner``): on CPU, float32 without autocast, for a 3x3 stride-1 convolution (padding <= 1,
    no groups or dilation), a Winograd convolution (not bit-exact: ~1e-5 of the output's scale
    from the direct sum, ``selection.ROUNDING``; results with non-finite values are recomputed by
    the direct one): the extension's F(4x4, 3x3) in x's memory format with bias and ReLU in its
    output transform where it pays, else NNPACK's in NCHW for wide convolutions over large
    enough maps (``selection.NNPACK_MIN_CHANNELS``, ``NNPACK_MIN_PIXELS``), then the tail, back in
    x's memory format; else oneDNN's fused convolution with bias and residual add as post-ops of
    one call. On CUDA under "auto", the fastest of cuDNN's convolution then one Triton pass
    (bias, residual, ReLU in place), cuDNN's fused conv + bias (+ residual) + ReLU (where its
    ReLU keeps NaN) and cuDNN then torch's tail, measured once per signature (``ops.measure``).
    Otherwise F.conv2d and the tail in place on its fresh output. The sums are done in the same
    order everywhere: (conv + bias) + residual. The ReLU keeps NaN as torch.relu does (oneDNN's
    ReLU post-op maps NaN to 0, so there it runs in place after).

    Args:
        x: Tensor[N, C, H, W] (or unbatched [C, H, W]). weight: Tensor[O, C/groups, kh, kw].
        bias: Tensor[O] or None. residual: a tensor broadcastable to the output, or None.
        stride, padding, dilation, groups: as F.conv2d. relu: apply ReLU last.
        packs: a source of the weight prepacked for the chosen route (``inference.Conv2dAct``,
            which caches them while the weight is unchanged): ``_packed_weight(x)`` (oneDNN, for
            channels_last maps of at most ``selection.PACK_MAX_PIXELS``, bit-identical),
            ``_nnpack_kernels(slices)``, ``_winograd_kernels(tiles)``; None makes them per call.
        winograd: allow the Winograd routes; False keeps the convolution direct (oneDNN's fused
            call: the traced, scripted and exported forms' F.conv2d to float rounding).

    Returns:
        Tensor[N, O, H', W'] (or [O, H', W']) of x's dtype (the autocast dtype under autocast),
        laid out as F.conv2d lays it out for x's memory format.

    Raises:
        RuntimeError: grad mode is on and an input requires grad (there is no backward).
    """
    _checks.check_inference_only("conv2d_act", x, weight, bias, residual)
    weight, bias = _autocast_operands(x, weight, bias)
    run = runner(x, weight, bias, stride, padding, dilation, groups, relu, residual, winograd)
    pack = None if packs is None or run.pack is None else run.pack(packs, x)
    if x.is_cuda:
        with on_device_of(x):
            return run(x, weight, bias, residual, pack)
    return run(x, weight, bias, residual, pack)


def _autocast_operands(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]):
    """weight and bias as autocast casts a convolution's float32 operands (no-ops otherwise),
    kept while they are unchanged (``casts.cast_once``). Cast here, outside the runner, they are
    static arguments: a plan keeps the casts as constants (valid while its weight guard holds)
    instead of casting them on every replay."""
    low = autocast_dtype(x.device.type) if isinstance(x, torch.Tensor) else None
    if low is None:
        return weight, bias
    return cast_once(weight, low), cast_once(bias, low)


def conv2d_act_direct(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding,
                      dilation, groups: int, relu: bool, residual: Optional[torch.Tensor],
                      packed_weight: Optional[Callable[[], torch.Tensor]] = None) -> torch.Tensor:
    """``conv2d_act`` by a direct convolution (no Winograd route), with ``packed_weight()`` as
    oneDNN's prepacked weight where that route takes one."""
    run = runner(x, weight, bias, stride, padding, dilation, groups, relu, residual, winograd=False)
    pack = packed_weight() if packed_weight is not None and run.pack is not None else None
    return run(x, weight, bias, residual, pack)


def conv2d_nchw_implementation(x, weight, bias, stride, padding, dilation, groups, winograd: bool = True) -> str:
    """The implementation ``conv2d_nchw`` runs this call with (its runner's route)."""
    return nchw_runner(x, weight, bias, stride, padding, dilation, groups, winograd).route


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
                groups: int = 1, *, packs=None, winograd: bool = True) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation, groups)`` returned as a contiguous
    NCHW map, for inference: the FPN's 3x3 output convolutions, whose maps leave the backbone in NCHW.

    Implementations (TABLE["conv2d_nchw", device], resolved once per call signature by
    ``nchw_runner``): on CPU, for a float32 3x3 stride-1 convolution (padding <= 1, no groups or
    dilation, no autocast), a Winograd convolution, which agrees with the direct one to ~1e-5 of
    the output's scale (not bit-exact, ``selection.ROUNDING``) and hands results with non-finite
    values back to it: the extension's F(4x4, 3x3), from an NHWC x straight to NCHW, where it
    pays, else NNPACK's over maps of at least ``conv._nnpack.min_pixels()``; else the direct
    route of ``conv2d_act`` (oneDNN on CPU) then ``to_nchw``.

    Args:
        x: Tensor[N, C, H, W], any memory format (see ``conv2d_nchw_input_format``).
        weight: Tensor[O, C/groups, kh, kw]. bias: Tensor[O] or None.
        stride, padding, dilation, groups: as F.conv2d (padding as two ints).
        packs, winograd: as ``conv2d_act``'s.

    Returns:
        Tensor[N, O, H', W'], contiguous (NCHW).

    Raises:
        RuntimeError: grad mode is on and an input requires grad (there is no backward).
    """
    _checks.check_inference_only("conv2d_nchw", x, weight, bias)
    weight, bias = _autocast_operands(x, weight, bias)
    run = nchw_runner(x, weight, bias, stride, padding, dilation, groups, winograd)
    pack = None if packs is None or run.pack is None else run.pack(packs, x)
    if x.is_cuda:
        with on_device_of(x):
            return run(x, weight, bias, pack)
    return run(x, weight, bias, pack)
