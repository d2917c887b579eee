"""The FPN's top-down step: a pyramid level's lateral map plus its bias plus the coarser level,
nearest-upsampled to the lateral's size, in one pass.

``upsample_add(lateral, top, bias)``  -> (lateral + bias[c]) + nearest_upsample(top, lateral's H x W)
``upsample_add_(lateral, top, bias)`` -> the same, written into ``lateral`` (refuses tensors that need grad)

Implementations: the extension's C++/CUDA kernels (``_extension.py``), Triton kernels
(``_triton.py``), and the pure-PyTorch reference (``ops.reference``), all bit for bit the same
(docs/design.md, Exact op semantics).
"""
from typing import Optional

import torch

from .. import _checks
from .. import reference as _torch_impl
from ..dispatch import declare, resolve, row
from . import _extension, _triton

__all__ = ["upsample_add", "upsample_add_"]

ROWS = {
    # Forward and backward; the extension first, Triton on GPUs without it.
    ("upsample_add", "cpu"): row(("extension", "torch")),
    ("upsample_add", "cuda"): row(("extension", "triton", "torch")),
}
declare(ROWS)

# Implementation name (a TABLE entry) -> module.
_IMPLEMENTATIONS = {"extension": _extension, "triton": _triton, "torch": _torch_impl}


def _implementation(device_type: str):
    return _IMPLEMENTATIONS[resolve("upsample_add", device_type)]


def _may_overlap(lateral: torch.Tensor, other: Optional[torch.Tensor]) -> bool:
    """Whether ``other`` may share memory with ``lateral`` (same storage; conservative)."""
    return (other is not None and not torch.compiler.is_compiling()
            and other.untyped_storage().data_ptr() == lateral.untyped_storage().data_ptr())


def upsample_add(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The FPN top-down step: ``(lateral + bias[c]) + F.interpolate(top, lateral's H x W, mode="nearest")``.

    Differentiable in all three inputs. Bit-exact with the pure-PyTorch reference (docs/design.md,
    Exact op semantics); float16/bfloat16 add in float32 and round once.

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
    return _implementation(lateral.device.type).upsample_add(lateral, top, bias)


def upsample_add_(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``upsample_add`` written into ``lateral`` (returned), for inference on temporaries.

    ``top`` and ``bias`` may share memory with ``lateral`` (the sum is then formed out of place
    and copied in). It has no gradient: tensors that require grad are refused under grad mode,
    on every backend, rather than leaving their ``.grad`` silently None.

    Args:
        lateral, top, bias: as ``upsample_add``; lateral must not be an expanded view.

    Returns:
        ``lateral`` itself, holding the result.

    Raises:
        RuntimeError: grad mode is on and an input requires grad; or lateral has elements that
            share memory (an expanded view), as for ATen's in-place ops.
        TypeError, ValueError, BackendUnavailableError: as ``upsample_add``.
    """
    _checks.check_upsample_add(lateral, top, bias)
    _checks.check_in_place("upsample_add_", lateral, top, bias)
    impl = _implementation(lateral.device.type)
    if impl is not _extension and (_may_overlap(lateral, top) or _may_overlap(lateral, bias)):
        return lateral.copy_(impl.upsample_add(lateral, top, bias))  # the C++ op does this itself
    return impl.upsample_add_(lateral, top, bias)
