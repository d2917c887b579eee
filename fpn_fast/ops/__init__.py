"""The two FPN ops and the backend choice.

``upsample_add(lateral, top, bias)``  -> (lateral + bias[c]) + nearest_upsample(top, lateral's H x W)
``upsample_add_(lateral, top, bias)`` -> the same, written into ``lateral`` (inference: no autograd)
``stride2_pool(x)``                   -> F.max_pool2d(x, 1, 2, 0), i.e. x[:, :, ::2, ::2]
``conv1x1(x, weight)``                 -> F.conv2d(x, weight) for a 1x1 kernel (the lateral conv)
``prefer_channels_last(features)``, ``to_nchw(x)``: the FPN's inference layout choice

Inference only (``fpn_fast.optimize_for_inference`` models), no autograd:
``conv2d_act(x, weight, bias, ..., relu, residual)`` -> relu?(conv2d(x, weight, bias) + residual),
    the tail fused: oneDNN post-ops on CPU, one Triton pass after cuDNN on CUDA
``lateral_upsample_add(x, weight, bias, top)``      -> upsample_add(conv1x1(x, weight), top, bias),
    on CUDA one Triton GEMM whose epilogue does the top-down step (the lateral map is never stored)

Backends: "extension" (the compiled fpn_fast._C ops, CPU and CUDA), "triton" (CUDA, or CPU
under TRITON_INTERPRET=1), "torch" (pure PyTorch, always there), and "auto" (the default):
CUDA tensors -> extension if built with CUDA, else triton if importable, else torch;
CPU tensors -> extension if built, else torch. The pool level is a strided copy that only the
Triton backend has a kernel for; the other backends do it with the ATen strided copy.

What can run is probed once, when fpn_fast.ops is imported (so TRITON_INTERPRET must be set
before that). Choose with ``set_backend(name)``, ``with use_backend(name):`` or the FPN_FAST_BACKEND
environment variable (read once, at import). Naming a backend that cannot run raises
BackendUnavailableError saying why; it never silently falls back.
"""
import contextlib
import os
from typing import Dict, Iterator, Optional

import torch
import torch.nn.functional as F

from . import _checks, _extension, _onednn, _triton, _triton_epilogue, _triton_lateral
from . import reference as _torch_impl
from .reference import nearest_source_index

__all__ = [
    "upsample_add", "upsample_add_", "stride2_pool", "conv1x1", "prefer_channels_last", "to_nchw",
    "conv2d_act", "lateral_upsample_add", "set_backend", "get_backend", "use_backend",
    "available_backends", "BackendUnavailableError", "BACKENDS", "nearest_source_index",
]

BACKENDS = ("auto", "extension", "triton", "torch")


class BackendUnavailableError(RuntimeError):
    """A backend was named that cannot run here (not built, no GPU, triton missing)."""


_IMPLS = {"extension": _extension, "triton": _triton, "torch": _torch_impl}
# Availability is probed once, at import: the hot path only reads these.
_REASONS: Dict[str, Dict[str, Optional[str]]] = {
    "extension": {"cpu": _extension.unavailable_reason("cpu"), "cuda": _extension.unavailable_reason("cuda")},
    "triton": {"cpu": _triton.unavailable_reason("cpu"), "cuda": _triton.unavailable_reason("cuda")},
    "torch": {"cpu": None, "cuda": None},
}
_AUTO_UPSAMPLE = {
    "cpu": _extension if _REASONS["extension"]["cpu"] is None else _torch_impl,
    "cuda": (_extension if _REASONS["extension"]["cuda"] is None
             else _triton if _REASONS["triton"]["cuda"] is None else _torch_impl),
}
_AUTO_POOL = {"cpu": _torch_impl, "cuda": _triton if _REASONS["triton"]["cuda"] is None else _torch_impl}

_backend = "auto"


def _validate_name(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown fpn_fast backend {name!r}; choose one of {BACKENDS}")
    if name != "auto" and all(reason is not None for reason in _REASONS[name].values()):
        raise BackendUnavailableError(
            f"fpn_fast backend {name!r} is not available: " + "; ".join(
                f"{dev}: {reason}" for dev, reason in _REASONS[name].items()))
    return name


def set_backend(name: str) -> None:
    """Select the backend for all later calls ("auto", "extension", "triton", "torch")."""
    global _backend
    _backend = _validate_name(name)


def get_backend() -> str:
    return _backend


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed calls with the named backend, restoring the previous one after."""
    global _backend
    previous = _backend
    _backend = _validate_name(name)
    try:
        yield
    finally:
        _backend = previous


def available_backends() -> Dict[str, Dict[str, Optional[str]]]:
    """{backend: {device_type: None if usable there, else the reason why not}}."""
    return {name: dict(reasons) for name, reasons in _REASONS.items()}


def _named_impl(device_type: str):
    if _backend == "torch":
        return _torch_impl
    reason = _REASONS[_backend].get(device_type, f"{device_type} tensors are not supported")
    if reason is not None:
        raise BackendUnavailableError(f"fpn_fast backend {_backend!r} cannot run on {device_type}: {reason}")
    return _IMPLS[_backend]


def _upsample_impl(device_type: str):
    if _backend == "auto":
        return _AUTO_UPSAMPLE.get(device_type, _torch_impl)
    return _named_impl(device_type)


def _pool_impl(device_type: str):
    if _backend == "auto":
        return _AUTO_POOL.get(device_type, _torch_impl)
    impl = _named_impl(device_type)
    return impl if hasattr(impl, "stride2_pool") else _torch_impl


def upsample_add(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(lateral + bias[c]) + nearest_upsample(top, size=lateral.shape[-2:]); differentiable.

    Output takes lateral's memory format; float16/bfloat16 accumulate in float32 and round once.
    """
    _checks.check_upsample_add(lateral, top, bias)
    return _upsample_impl(lateral.device.type).upsample_add(lateral, top, bias)


def upsample_add_(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """In-place upsample_add into ``lateral`` (returned). For inference: no autograd through it."""
    _checks.check_upsample_add(lateral, top, bias)
    return _upsample_impl(lateral.device.type).upsample_add_(lateral, top, bias)


def stride2_pool(x: torch.Tensor) -> torch.Tensor:
    """F.max_pool2d(x, 1, 2, 0) as a strided copy: output ceil(H/2) x ceil(W/2), x's memory format."""
    _checks.check_stride2_pool(x)
    return _pool_impl(x.device.type).stride2_pool(x)


def _plain_cpu_inference(x: torch.Tensor, *params: torch.Tensor) -> bool:
    """x is a contiguous NCHW float32/float64 CPU map and no autograd runs through x or params."""
    return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64) and x.dim() == 4
            and x.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params))))


def conv1x1(x: torch.Tensor, weight: torch.Tensor, channels_last: bool = False) -> torch.Tensor:
    """Bias-free 1x1 convolution (stride 1, no groups), the FPN's lateral conv; the output is
    channels_last when asked, else in x's layout.

    A contiguous float CPU map in inference goes through a batched matmul that reads x as it
    is and writes either layout directly: weight (O, C) @ x[n] (C, H*W) for NCHW, x[n]^T @
    weight^T for NHWC. oneDNN's NCHW convolution reorders both maps to a blocked layout and back,
    about 1.7x slower at FPN sizes (benchmarks/RESULTS.md). The sums are ordered differently
    from the convolution's, so results agree to float rounding, not bit for bit. Under autograd
    the convolution runs as torchvision runs it; so do CUDA, channels_last input and half types.
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


def prefer_channels_last(features) -> bool:
    """Whether the FPN should run its convolutions in channels_last for these NCHW inputs and
    convert the outputs back with ``to_nchw``, in inference (the caller checks autograd).

    On CPU oneDNN's NHWC 3x3 convolution is ~20% faster than its NCHW one at FPN sizes, which
    pays for the conversion only with the extension's NHWC->NCHW copy (torch's own copy in that
    direction costs more than the convolutions save; benchmarks/RESULTS.md). So: CPU float
    contiguous inputs and the extension backend in charge of CPU ops.
    """
    return (_upsample_impl("cpu") is _extension
            and all(_plain_cpu_inference(f) for f in features))


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous NCHW tensor (x itself when it already is); a channels_last CPU map
    goes through the extension's blocked transpose when the extension backend is in charge."""
    if x.is_contiguous():
        return x
    if x.device.type == "cpu" and _upsample_impl("cpu") is _extension:
        return _extension.nhwc_to_nchw(x)
    return x.contiguous()


def _autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in force for device_type, or None. Our inference ops are not autocast
    ops, so they cast their inputs themselves, as autocast would cast a convolution's."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _inference_only(name: str, *tensors: Optional[torch.Tensor]) -> None:
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"fpn_fast.ops.{name} is for inference only and has no gradient; run it under "
                           "torch.no_grad() or torch.inference_mode(), or use the differentiable ops")


def conv2d_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1, *,
               relu: bool = False, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """relu?(F.conv2d(x, weight, bias, stride, padding, dilation, groups) + residual), for
    inference: a convolution with its norm folded in, as the optimized ResNet blocks run it.

    float32 CPU maps without autocast go through oneDNN's fused convolution (bias, residual add
    and ReLU as post-ops of one call) unless the backend is "torch". On CUDA, when Triton runs
    there, the convolution runs without bias and one Triton pass adds bias and residual and
    applies the ReLU in place (``_triton_epilogue``; eager PyTorch would make three passes);
    with the backend named "triton" CPU tensors take that path too (interpreter). Everything
    else, and torch.compile (which fuses the tail itself; the oneDNN ops have no fake kernels),
    runs F.conv2d, then the add and the ReLU in place on its fresh output. The sums are done in
    the same order on every path: (conv + bias) + residual.
    """
    _inference_only("conv2d_act", x, weight, bias, residual)
    if _triton_epilogue_applies(x.device.type) and not torch.compiler.is_compiling():
        out = F.conv2d(x, weight, None, stride, padding, dilation, groups)
        if _autocast_dtype(out.device.type) is not None:
            # The convolution ran in low precision; so would its bias inside it, and autocast
            # would cast a float32 residual before the add.
            bias, residual = (t.to(out.dtype) if t is not None and t.dtype == torch.float32 else t
                              for t in (bias, residual))
        if (out.dim() != 4 or out.dtype not in _triton_epilogue.SUPPORTED_DTYPES
                or (residual is not None and residual.shape != out.shape)
                or (bias is None and residual is None and not relu)):
            return _torch_tail(out, bias, residual, relu)  # unbatched, broadcast residual, float64
        return _triton_epilogue.bias_act_(out, bias, residual, relu)
    if (x.device.type == "cpu" and x.dim() == 4 and x.dtype == torch.float32 and weight.dtype == torch.float32
            and _backend != "torch" and _onednn.UNAVAILABLE_REASON is None and torch.backends.mkldnn.enabled
            and _autocast_dtype("cpu") is None and not torch.compiler.is_compiling()
            and (residual is None or (residual.dtype == torch.float32 and residual.device.type == "cpu"
                                      and residual.shape == _conv_out_shape(x, weight, stride, padding, dilation)))):
        return _onednn.conv2d_act(x, weight, bias, stride, padding, dilation, groups, relu, residual)
    return _torch_tail(F.conv2d(x, weight, bias, stride, padding, dilation, groups), None, residual, relu)


def _conv_out_shape(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> torch.Size:
    """The (N, O, H', W') F.conv2d makes of a 4-D x: the fused residual add takes that shape only."""
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)]
    return torch.Size([x.shape[0], weight.shape[0], *spatial])


def _torch_tail(out: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                relu: bool) -> torch.Tensor:
    """relu?((out + bias[c]) + residual) in place on the fresh conv output, one torch op each."""
    if bias is not None:  # per channel, batched (N, C, H, W) or not (C, H, W)
        out += bias.view(-1, 1, 1)
    if residual is not None:
        out += residual
    return out.relu_() if relu else out


def _triton_epilogue_applies(device_type: str) -> bool:
    """Whether conv2d_act finishes with the Triton epilogue: CUDA tensors under "auto" when
    Triton runs there; any tensors Triton runs on when the backend is named "triton"."""
    if _backend == "triton":
        return _REASONS["triton"].get(device_type, "unsupported device") is None
    return _backend == "auto" and device_type == "cuda" and _REASONS["triton"]["cuda"] is None


def _fused_lateral_impl(device_type: str, dtype: torch.dtype) -> bool:
    """Whether lateral_upsample_add runs the Triton GEMM: CUDA tensors under "auto" when Triton
    can run there, and any tensors Triton can run on (incl. CPU under the interpreter) when the
    backend is named "triton" (float64 then raises: the kernel has no float64 GEMM)."""
    if _backend == "triton":
        _named_impl(device_type)  # raises BackendUnavailableError saying why not
        return True
    return (_backend == "auto" and device_type == "cuda" and _REASONS["triton"]["cuda"] is None
            and dtype in _triton_lateral.SUPPORTED_DTYPES)


def lateral_upsample_add(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         top: Optional[torch.Tensor] = None, *, fuse: bool = True) -> torch.Tensor:
    """The FPN's whole top-down step from a body feature map, for inference:
    (conv1x1(x, weight) + bias) + nearest_upsample(top, x's H x W); no top at the coarsest level.

    With ``fuse`` and Triton in charge (see _fused_lateral_impl) one GEMM kernel computes the
    1x1 convolution and adds bias and upsampled top in its epilogue, in x's memory format.
    Otherwise the convolution (``conv1x1`` for NCHW CPU maps, else F.conv2d) writes the lateral
    map and ``upsample_add_`` adds bias and top into it. Under autocast every input is cast to
    the autocast dtype first, as the convolution it replaces would be.
    """
    _inference_only("lateral_upsample_add", x, weight, bias, top)
    low = _autocast_dtype(x.device.type)
    if low is not None:  # as autocast casts a convolution's operands: float32 ones only
        x, weight, bias, top = (t.to(low) if t is not None and t.dtype == torch.float32 else t
                                for t in (x, weight, bias, top))
    _checks.check_lateral_upsample_add(x, weight, bias, top)
    if fuse and _fused_lateral_impl(x.device.type, x.dtype):
        return _triton_lateral.lateral_upsample_add(x, weight, bias, top)
    if x.is_contiguous():
        lateral = conv1x1(x, weight)
    else:
        lateral = conv2d_act(x, weight)
    if top is None:
        return lateral if bias is None else lateral.add_(bias.view(1, -1, 1, 1))
    return upsample_add_(lateral, top, bias)


def _backend_from_env() -> None:
    name = os.environ.get("FPN_FAST_BACKEND")
    if name:
        set_backend(name)


_backend_from_env()
