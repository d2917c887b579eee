"""The two FPN ops and the backend choice.

``upsample_add(lateral, top, bias)``  -> (lateral + bias[c]) + nearest_upsample(top, lateral's H x W)
``upsample_add_(lateral, top, bias)`` -> the same, written into ``lateral`` (inference: no autograd)
``stride2_pool(x)``                   -> F.max_pool2d(x, 1, 2, 0), i.e. x[:, :, ::2, ::2]
``conv1x1(x, weight)``                 -> F.conv2d(x, weight) for a 1x1 kernel (the lateral conv)
``prefer_channels_last(features)``, ``to_nchw(x)``: the FPN's inference layout choice

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

from . import _checks, _extension, _triton
from . import reference as _torch_impl
from .reference import nearest_source_index

__all__ = [
    "upsample_add", "upsample_add_", "stride2_pool", "conv1x1", "prefer_channels_last", "to_nchw", "set_backend", "get_backend", "use_backend",
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


def _backend_from_env() -> None:
    name = os.environ.get("FPN_FAST_BACKEND")
    if name:
        set_backend(name)


_backend_from_env()
