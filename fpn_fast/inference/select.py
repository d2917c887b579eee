"""Decide once: the implementation of every convolution and FPN step of a plan, bound into a
runner that does nothing else per call.

``fpn_fast.ops`` resolves an implementation on every call (the dispatch table, the ``supports``
predicates, the autocast state, the capture checks). Every one of those answers depends only on
the module and the input's signature, so a plan (``plan.py``) asks them once, here, with the real
input of its first call, and keeps a runner: a closure over the chosen op, the prepacked weight
(``Conv2dAct``'s packs, valid while the plan's weight guard holds) and the constant arguments.

Each runner computes exactly what the eager call would for inputs of that signature: the same
op, the same arguments, the same fallback for results the Winograd routes hand back (non-finite
values go to the direct convolution, decided per call since it depends on the data).
"""
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import dispatch as _dispatch
from ..ops import reference as _reference
from ..ops import conv as _conv
from ..ops import lateral as _lateral
from ..ops import conv1x1
from ..ops.conv import _nnpack, _winograd
from ..ops.lateral._triton import cudnn_conv_allows_tf32
from ..ops.selection import NNPACK_SLICED_MAX_PIXELS, PACK_MAX_PIXELS

Runner = Callable[..., Tensor]


def _tail(out: Tensor, residual: Optional[Tensor], relu: bool) -> Tensor:
    if residual is not None:
        out += residual
    return out.relu_() if relu else out


def _low_precision(t: Optional[Tensor], low: Optional[torch.dtype]) -> Optional[Tensor]:
    """t cast as autocast would cast a convolution's float32 operand."""
    return t.to(low) if t is not None and low is not None and t.dtype == torch.float32 else t


def conv2d_act_runner(conv, x: Tensor, residual: Optional[Tensor]) -> Runner:
    """``run(x, residual)`` computing ``conv(x, residual=residual)`` (a ``Conv2dAct``) for inputs
    of x's and residual's signature.

    Args:
        conv: the folded convolution. x: an input of the plan's signature (decides the route).
        residual: None, or a residual of the signature the runner will be given.

    Returns:
        A function of (x, residual) returning the output.
    """
    weight, bias = conv.weight, conv.bias
    stride, padding, dilation, relu = conv.stride, conv.padding, conv.dilation, conv.relu
    winograd = getattr(conv, "winograd", True)
    implementation = _dispatch.resolve(
        "conv2d_act", x.device.type, lambda impl: (winograd or impl not in _conv.WINOGRAD_ROUTES)
        and _conv.conv2d_act_supports(impl, x, weight, bias, stride, padding, dilation, relu, residual))
    if implementation == "winograd":
        channels_last = _conv.channels_last_like(x)
        count = _winograd.tiles(x.shape, padding)
        packs = conv._winograd_kernels(count)
        direct = _direct_runner(conv, x, residual)
        fuse_relu = relu and residual is None

        def run_winograd(x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
            out = _winograd.conv2d(x, weight, bias, padding, fuse_relu, channels_last, lambda _: packs)
            if out is None:  # non-finite values: the direct convolution decides how they propagate
                return direct(x, residual)
            return out if residual is None else _tail(out, residual, relu)
        return run_winograd
    if implementation == "nnpack":
        channels_last = _conv.channels_last_like(x)
        kernels = _nnpack_kernels(conv, x)
        direct = _direct_runner(conv, x, residual)
        to_nchw = to_nchw_runner(x)

        def run_nnpack(x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
            out = _nnpack.conv2d(to_nchw(x), weight, bias, padding, lambda _: kernels)
            if out is None:
                return direct(x, residual)
            out = _tail(out, residual, relu)
            return out.contiguous(memory_format=torch.channels_last) if channels_last else out
        return run_nnpack
    if x.device.type == "cuda":
        return _measured_cuda_runner(conv, x, residual, implementation)
    return _direct_runner(conv, x, residual, implementation)


# Measured choices of the CUDA convolution routes, by layer and input signature (decided once
# per process; a plan of another signature with the same layer shape reuses the choice).
_CUDA_CHOICES: dict = {}
_TIMED_RUNS = 5


def _measured_cuda_runner(conv, x: Tensor, residual: Optional[Tensor], implementation: str) -> Runner:
    """On CUDA, the fastest of the direct routes for this layer and signature, measured with
    CUDA events on the plan's real input: the dispatch table's choice (conv, then the Triton
    epilogue in one pass, or torch's tail), torch's F.conv2d with bias and its tail, and, for a
    convolution ending in ReLU, cuDNN's fused ``cudnn_convolution_relu`` /
    ``cudnn_convolution_add_relu`` (conv + bias (+ residual) + ReLU in one call) where it keeps
    NaN as torch.relu does (``_cudnn_relu_keeps_nan``). A route that raises, or whose output
    differs from the first one's beyond rounding (1e-2 of its scale) or in where it is not
    finite, is not a candidate."""
    table = _direct_runner(conv, x, residual, implementation)
    if not _measuring(x):
        return table
    candidates = {"table": table}
    if implementation != "torch":
        candidates["torch"] = _direct_runner(conv, x, residual, "torch")
    low = _dispatch.autocast_dtype("cuda")
    if conv.relu and conv.groups == 1 and _cudnn_fused_allowed() and _cudnn_relu_keeps_nan(x.device, low or x.dtype):
        candidates["cudnn"] = _cudnn_runner(conv, x)
    key = (str(x.device), tuple(x.shape), x.stride(), x.dtype, tuple(conv.weight.shape), conv.bias is None,
           conv.stride, conv.padding, conv.dilation, conv.groups, conv.relu, residual is not None, low, implementation,
           cuda_flags())
    choice = _CUDA_CHOICES.get(key)
    if choice is None or choice not in candidates:
        choice = _CUDA_CHOICES[key] = _fastest(candidates, x, residual)
    return candidates[choice]


def _measuring(x: Tensor) -> bool:
    """Whether routes are chosen by measurement here: CUDA, the "auto" backend (a named backend
    is the caller's choice), and no capture in progress (nothing can be timed inside one)."""
    return (x.device.type == "cuda" and _dispatch.get_backend() == "auto"
            and not torch.cuda.is_current_stream_capturing())


def cuda_flags() -> tuple:
    """The cuDNN, TF32 and determinism flags a CUDA route choice depends on."""
    return (cudnn_conv_allows_tf32(), torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())


def _cudnn_fused_allowed() -> bool:
    """cuDNN's fused convolutions are candidates only where cuDNN is on and nothing asks for
    deterministic algorithms (their algorithm choice is not covered by those flags)."""
    return (torch.backends.cudnn.enabled and not torch.backends.cudnn.deterministic
            and not torch.are_deterministic_algorithms_enabled())


def _fastest(candidates, x: Tensor, residual: Optional[Tensor]) -> str:
    reference = None
    times = {}
    for name, run in candidates.items():
        try:
            out = run(x, residual)
        except RuntimeError:
            continue
        if reference is None:
            reference = out
        elif not _agrees(out, reference):
            continue
        times[name] = _median_ms(lambda: run(x, residual))
    return min(times, key=times.get) if times else "table"


def _agrees(out: Tensor, reference: Tensor) -> bool:
    if out.shape != reference.shape or out.dtype != reference.dtype:
        return False
    finite = torch.isfinite(reference)
    if not torch.equal(torch.isfinite(out), finite):
        return False
    scale = reference[finite].abs().max().float() if bool(finite.any()) else torch.tensor(1.0)
    return bool(((out - reference)[finite].abs().max().float() <= 1e-2 * scale.clamp(min=1e-30)).item()) \
        if bool(finite.any()) else True


def _median_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    times = []
    for _ in range(_TIMED_RUNS):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def _cudnn_runner(conv, x: Tensor) -> Runner:
    """cuDNN's fused convolution with bias, residual and ReLU (what TorchScript's freezing emits);
    not an autocast op, so its operands are cast as autocast would cast a convolution's."""
    low = _dispatch.autocast_dtype("cuda")
    weight = _low_precision(conv.weight, low)
    bias = conv.bias if conv.bias is not None else torch.zeros(conv.weight.shape[0], device=x.device,
                                                              dtype=conv.weight.dtype)
    bias = _low_precision(bias, low)
    stride, padding, dilation, groups = list(conv.stride), list(conv.padding), list(conv.dilation), conv.groups

    def run_cudnn(x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        x = _low_precision(x, low)
        if residual is None:
            return torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
        return torch.cudnn_convolution_add_relu(x, weight, _low_precision(residual, low), 1.0, bias, stride, padding,
                                                dilation, groups)
    return run_cudnn


_NAN_PROBES: dict = {}


def _cudnn_relu_keeps_nan(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether cuDNN's fused ReLU keeps NaN as torch.relu does (a max with 0 would map it to 0),
    probed once per device and dtype, in both memory formats; False where the fused ops are
    missing or raise. Never called inside a capture (it synchronises)."""
    key = (str(device), dtype)
    if key not in _NAN_PROBES:
        keeps = True
        try:
            for memory_format in (torch.contiguous_format, torch.channels_last):
                x = torch.ones(1, 8, 3, 3, device=device, dtype=dtype)
                x[0, :, 1, 1] = float("nan")
                x = x.contiguous(memory_format=memory_format)
                weight = torch.ones(8, 8, 1, 1, device=device, dtype=dtype).contiguous(memory_format=memory_format)
                bias = torch.zeros(8, device=device, dtype=dtype)
                out = torch.cudnn_convolution_relu(x, weight, bias, [1, 1], [0, 0], [1, 1], 1)
                added = torch.cudnn_convolution_add_relu(x, weight, torch.zeros_like(out), 1.0, bias, [1, 1], [0, 0],
                                                        [1, 1], 1)
                keeps = keeps and bool(torch.isnan(out[0, :, 1, 1]).all()) and bool(torch.isnan(added[0, :, 1, 1]).all())
        except (RuntimeError, AttributeError):
            keeps = False
        _NAN_PROBES[key] = keeps
    return _NAN_PROBES[key]


def _nnpack_kernels(conv, x: Tensor):
    """The NNPACK kernel transforms ``ops.conv._nnpack.conv2d`` asks for on maps of x's size (its sliced
    path), or None where it takes torch's NNPACK call, which needs none."""
    if x.shape[2] * x.shape[3] <= NNPACK_SLICED_MAX_PIXELS and _nnpack.sliced_unavailable_reason() is None:
        return conv._nnpack_kernels(min(_nnpack.slices(), conv.weight.shape[0]))
    return None


def _direct_runner(conv, x: Tensor, residual: Optional[Tensor], implementation: Optional[str] = None) -> Runner:
    """The direct convolution's runner (``_conv.conv2d_act_direct`` decided once)."""
    weight, bias = conv.weight, conv.bias
    stride, padding, dilation, groups, relu = conv.stride, conv.padding, conv.dilation, conv.groups, conv.relu
    if implementation is None:
        implementation = _dispatch.resolve(
            "conv2d_act", x.device.type, lambda impl: impl not in _conv.WINOGRAD_ROUTES
            and _conv.conv2d_act_supports(impl, x, weight, bias, stride, padding, dilation, relu, residual))
    stride, padding, dilation = list(stride), list(padding), list(dilation)
    if implementation == "onednn":
        if (_reference.memory_format_of(x) == torch.channels_last
                and x.shape[2] * x.shape[3] <= PACK_MAX_PIXELS):
            weight = conv._packed_weight(x)
        unary = torch.ops.mkldnn._convolution_pointwise.default
        binary = torch.ops.mkldnn._convolution_pointwise.binary

        def run_onednn(x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
            if residual is None:
                out = unary(x, weight, bias, padding, stride, dilation, groups, "none", [], "")
            else:
                out = binary(x, residual, weight, bias, padding, stride, dilation, groups, "add", 1.0, None, [], "")
            return out.relu_() if relu else out
        return run_onednn
    if implementation == "triton":
        low = _dispatch.autocast_dtype(x.device.type)
        epilogue = torch.ops.fpn_fast_triton.bias_act_.default
        cast_bias = _low_precision(bias, low)

        def run_triton(x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
            out = F.conv2d(x, weight, None, stride, padding, dilation, groups)
            epilogue(out, cast_bias, _low_precision(residual, low), relu)
            return out
        return run_triton

    def run_torch(x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        return _tail(F.conv2d(x, weight, bias, stride, padding, dilation, groups), residual, relu)
    return run_torch


def conv2d_nchw_runner(conv, x: Tensor) -> Runner:
    """``run(x)`` computing ``ops.conv2d_nchw`` of ``conv`` (the FPN's output convolutions
    with NCHW outputs) for inputs of x's signature; x is what ``InferenceFPN._layers_eager``
    passes (already converted to the format ``conv2d_nchw_input_format`` asks for)."""
    weight, bias = conv.weight, conv.bias
    stride, padding, dilation, groups = conv.stride, conv.padding, conv.dilation, conv.groups
    winograd = getattr(conv, "winograd", True)
    implementation = _conv.conv2d_nchw_implementation(x, weight, bias, stride, padding, dilation, groups, winograd)
    direct = _direct_runner(conv, x, None)
    to_nchw = to_nchw_runner(direct(x))
    if implementation == "winograd":
        packs = conv._winograd_kernels(_winograd.tiles(x.shape, padding))

        def run_winograd(x: Tensor) -> Tensor:
            out = _winograd.conv2d(x, weight, bias, padding, False, False, lambda _: packs)
            return to_nchw(direct(x)) if out is None else out
        return run_winograd
    if implementation == "nnpack":
        kernels = _nnpack_kernels(conv, x)
        to_nchw_input = to_nchw_runner(x)

        def run_nnpack(x: Tensor) -> Tensor:
            out = _nnpack.conv2d(to_nchw_input(x), weight, bias, padding, lambda _: kernels)
            return to_nchw(direct(x)) if out is None else out
        return run_nnpack
    return lambda x: to_nchw(direct(x))


def to_nchw_runner(x: Tensor) -> Callable[[Tensor], Tensor]:
    """``ops.to_nchw`` decided for x's signature."""
    if x.is_contiguous():
        return _same
    if x.dim() == 4 and _dispatch.resolve("to_nchw", x.device.type) == "extension":
        return torch.ops.fpn_fast.nhwc_to_nchw.default
    return torch.Tensor.contiguous


def _same(x: Tensor) -> Tensor:
    return x


def lateral_runner(inner_block, x: Tensor, top: Optional[Tensor], fuse: bool) -> Runner:
    """``run(x, top)`` computing ``ops.lateral_upsample_add(x, block.weight, block.bias, top,
    fuse=fuse)`` for a folded lateral block and inputs of x's and top's signature."""
    weight, bias = inner_block.weight, inner_block.bias
    low = _dispatch.autocast_dtype(x.device.type)
    cast = (lambda t: _low_precision(t, low)) if low is not None else _same_or_none
    x_low = cast(x)
    weight, bias = cast(weight), cast(bias)
    implementation = _dispatch.resolve("lateral_upsample_add", x.device.type,
                                       lambda impl: _lateral.lateral_supports(impl, x_low, fuse))
    if implementation == "triton":
        op = torch.ops.fpn_fast_triton.lateral_upsample_add.default
        fused = lambda x, top=None: op(cast(x), weight, bias, cast(top))  # noqa: E731
        if not _measuring(x):
            return fused
        # Measured against cuDNN's 1x1 convolution then the in-place top-down step, per level.
        key = ("lateral", str(x.device), tuple(x.shape), x.stride(), x.dtype, tuple(weight.shape), bias is None,
               top is None or (tuple(top.shape), top.stride()), low, cuda_flags())
        candidates = {"fused": fused, "unfused": _unfused_lateral(x_low, weight, bias, cast(top), cast)}
        choice = _CUDA_CHOICES.get(key)
        if choice is None:
            choice = _CUDA_CHOICES[key] = _fastest(candidates, x, top)
        return candidates["fused" if choice == "table" else choice]
    return _unfused_lateral(x_low, weight, bias, cast(top), cast)


def _unfused_lateral(x_low: Tensor, weight: Tensor, bias: Optional[Tensor], top_low: Optional[Tensor],
                     cast: Callable) -> Runner:
    """The lateral convolution, then the top-down step written into its output."""
    if x_low.is_contiguous():
        conv = lambda x: conv1x1(x, weight)  # noqa: E731
    else:  # ops.conv2d_act(x, weight): the lateral convolution alone, decided once
        conv = _direct_runner(_BareConv(weight), x_low, None)
    if top_low is None:
        column = None if bias is None else bias.detach().view(1, -1, 1, 1)  # a view of bias blocks swap_tensors

        def run_coarsest(x: Tensor, top: Optional[Tensor] = None) -> Tensor:
            out = conv(cast(x))
            return out if column is None else out.add_(column)
        return run_coarsest
    step = upsample_add_inplace_runner(conv(x_low), top_low, bias)

    def run_level(x: Tensor, top: Optional[Tensor] = None) -> Tensor:
        return step(conv(cast(x)), cast(top), bias)
    return run_level


class _BareConv:
    """A 1x1 convolution without bias or tail, as ``ops.lateral_upsample_add`` runs it through
    ``ops.conv2d_act`` (no prepacked weight there)."""
    stride, padding, dilation, groups, relu, bias, winograd = (1, 1), (0, 0), (1, 1), 1, False, None, False

    def __init__(self, weight: Tensor):
        self.weight = weight

    def _packed_weight(self, x: Tensor) -> Tensor:
        return self.weight


def _same_or_none(t: Optional[Tensor]) -> Optional[Tensor]:
    return t


def upsample_add_inplace_runner(lateral: Tensor, top: Tensor, bias: Optional[Tensor]) -> Runner:
    """``ops.upsample_add_`` decided for a fresh lateral (never aliasing top or bias) of this
    signature: the extension's op, Triton's, or the reference."""
    implementation = _dispatch.resolve("upsample_add", lateral.device.type)
    if implementation == "extension":
        op = torch.ops.fpn_fast.upsample_add_.default
    elif implementation == "triton":
        op = torch.ops.fpn_fast_triton.upsample_add_.default
    else:
        return _reference.upsample_add_

    def run(lateral: Tensor, top: Tensor, bias: Optional[Tensor]) -> Tensor:
        op(lateral, top, bias)
        return lateral
    return run


def stride2_pool_runner(x: Tensor) -> Callable[[Tensor], Tensor]:
    """``ops.stride2_pool`` decided for x's signature."""
    if _dispatch.resolve("stride2_pool", x.device.type) == "triton":
        return torch.ops.fpn_fast_triton.stride2_pool.default
    return _reference.stride2_pool
