"""Extension backend: the compiled ``fpn_fast._C`` ops (``torch.ops.fpn_fast.*``), their fake
(meta) kernels for torch.compile, and their autograd formulas."""
from typing import Optional

import torch
import torch.nn.functional as F

from .reference import memory_format_of

try:
    from .. import _C  # importing it registers torch.ops.fpn_fast.*
    _LOAD_ERROR: Optional[str] = None
except ImportError as exc:
    _LOAD_ERROR = (f"the compiled extension fpn_fast._C is not built or failed to load ({exc}); "
                   "build it with `pip install --no-build-isolation -e .`")


def library_path() -> str:
    """Path of the compiled library that registers the ``fpn_fast::`` ops. A process that loads a
    scripted, traced or exported model holding them, without importing fpn_fast, calls
    ``torch.ops.load_library(path)`` first (as a LibTorch program would).

    Raises:
        RuntimeError: the extension is not built.
    """
    if _LOAD_ERROR is not None:
        raise RuntimeError(_LOAD_ERROR)
    return _C.__file__


def has_cuda_kernels() -> bool:
    """Whether the loaded extension registers CUDA kernels (asks the dispatcher, not the GPU)."""
    return _LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key("fpn_fast::upsample_add", "CUDA")


def unavailable_reason(device_type: str) -> Optional[str]:
    if _LOAD_ERROR is not None:
        return _LOAD_ERROR
    if device_type == "cpu":
        return None
    if device_type == "cuda":
        if not has_cuda_kernels():
            return "the extension was built without CUDA kernels (no CUDA toolkit at build time, or FPN_FAST_CUDA=0)"
        if not torch.cuda.is_available():
            return "no CUDA GPU"
        return None
    return f"the extension has no {device_type} kernels"


if _LOAD_ERROR is None:
    _forward = torch.ops.fpn_fast.upsample_add.default
    _forward_inplace = torch.ops.fpn_fast.upsample_add_.default
    _backward_top = torch.ops.fpn_fast.upsample_add_backward_top.default
    _nhwc_to_nchw = torch.ops.fpn_fast.nhwc_to_nchw.default

    @torch.library.register_fake("fpn_fast::nhwc_to_nchw")
    def _nhwc_to_nchw_fake(x):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    # nhwc_to_nchw's autograd is a C++ kernel (a differentiable ATen clone when grad is needed).

    @torch.library.register_fake("fpn_fast::upsample_add")
    def _upsample_add_fake(lateral, top, bias):
        return torch.empty_like(lateral, memory_format=memory_format_of(lateral))

    @torch.library.register_fake("fpn_fast::upsample_add_")
    def _upsample_add_inplace_fake(lateral, top, bias):
        return None

    @torch.library.register_fake("fpn_fast::upsample_add_backward_top")
    def _backward_top_fake(grad, top_h, top_w):
        return grad.new_empty((grad.shape[0], grad.shape[1], top_h, top_w)).contiguous(
            memory_format=memory_format_of(grad))

    def _setup_context(ctx, inputs, output):
        _, top, bias = inputs
        ctx.top_hw = (top.shape[2], top.shape[3])
        ctx.has_bias = bias is not None

    def _upsample_add_backward(ctx, grad):
        grad_top = _backward_top(grad, *ctx.top_hw) if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum((0, 2, 3)) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad, grad_top, grad_bias

    torch.library.register_autograd("fpn_fast::upsample_add", _upsample_add_backward, setup_context=_setup_context)

    def _backward_top_setup_context(ctx, inputs, output):
        ctx.grad_hw = (inputs[0].shape[2], inputs[0].shape[3])

    def _backward_top_backward(ctx, grad_grad_top):
        # backward_top is linear in grad; its adjoint is the nearest upsample itself.
        return F.interpolate(grad_grad_top, size=ctx.grad_hw, mode="nearest"), None, None

    torch.library.register_autograd("fpn_fast::upsample_add_backward_top", _backward_top_backward,
                                    setup_context=_backward_top_setup_context)


def upsample_add(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _forward(lateral, top, bias)


def upsample_add_(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    _forward_inplace(lateral, top, bias)
    return lateral


def nhwc_to_nchw(x: torch.Tensor) -> torch.Tensor:
    """Contiguous NCHW copy of a CPU tensor (blocked transpose for channels_last input)."""
    return _nhwc_to_nchw(x)
