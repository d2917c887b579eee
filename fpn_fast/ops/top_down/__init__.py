"""The FPN's top-down step: a pyramid level's lateral map plus its bias plus the coarser level,
nearest-upsampled to the lateral's size, in one pass.

``upsample_add(lateral, top, bias)``  -> (lateral + bias[c]) + nearest_upsample(top, lateral's H x W)
``upsample_add_(lateral, top, bias)`` -> the same, written into ``lateral`` (refuses tensors that need grad)
``step(lateral, top, bias, in_place)`` -> the top-down step as the FPNs take it: no top at the
                                         coarsest level (then only the bias is added)

Implementations: the extension's C++/CUDA kernels (``_extension.py``), Triton kernels
(``_triton.py``), and the pure-PyTorch reference (``ops.reference``), all bit for bit the same
(docs/design.md, Exact op semantics). The TorchScript forms are in ``script.py``, the ATen
decompositions in ``aten.py``.
"""
from typing import Callable, Optional

import torch

from .. import _checks
from .. import reference as _torch_impl
from ..dispatch import cached, capturing_graph, declare, get_backend, resolve, row
from ..runner import Runner
from . import _extension, _triton

__all__ = ["upsample_add", "upsample_add_", "step", "runner"]

ROWS = {
    # Forward and backward; the extension first, Triton on GPUs without it.
    ("upsample_add", "cpu"): row(("extension", "torch")),
    ("upsample_add", "cuda"): row(("extension", "triton", "torch")),
}
declare(ROWS)

# Implementation name (a TABLE entry) -> module.
_IMPLEMENTATIONS = {"extension": _extension, "triton": _triton, "torch": _torch_impl}


def _may_overlap(lateral: torch.Tensor, other: Optional[torch.Tensor]) -> bool:
    """Whether ``other`` may share memory with ``lateral`` (same storage; conservative)."""
    return (other is not None and not torch.compiler.is_compiling()
            and other.untyped_storage().data_ptr() == lateral.untyped_storage().data_ptr())


def runner(device_type: str, in_place: bool = False, fresh: bool = False) -> Runner:
    """The top-down step's runner for tensors of ``device_type`` under the backend in force:
    ``run(lateral, top, bias)``.

    Args:
        device_type: the tensors' device type.
        in_place: write into lateral (``upsample_add_``), returning it.
        fresh: lateral is a fresh map that shares memory with neither top nor bias (a lateral
            convolution's output), so the in-place step needs no overlap check.

    Returns:
        The Runner (lateral and top are its dynamic arguments).
    """
    if capturing_graph():
        return _decide(device_type, in_place, fresh)
    return cached(("upsample_add", device_type, in_place, fresh, get_backend()),
                  lambda: _decide(device_type, in_place, fresh))


def _decide(device_type: str, in_place: bool, fresh: bool) -> Runner:
    implementation = resolve("upsample_add", device_type)
    impl = _IMPLEMENTATIONS[implementation]
    # The implementation's functions are looked up per call (one attribute read), not bound now.
    if not in_place:
        def fn(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
            return impl.upsample_add(lateral, top, bias)
    elif fresh or implementation == "extension":  # the C++ op handles overlap itself
        def fn(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
            return impl.upsample_add_(lateral, top, bias)
    else:
        def fn(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
            if _may_overlap(lateral, top) or _may_overlap(lateral, bias):
                return lateral.copy_(impl.upsample_add(lateral, top, bias))
            return impl.upsample_add_(lateral, top, bias)
    return Runner("upsample_add", implementation, fn, dynamic=(0, 1))


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
    return runner(lateral.device.type)(lateral, top, bias)


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
    return runner(lateral.device.type, in_place=True)(lateral, top, bias)


def step(lateral: torch.Tensor, top: Optional[torch.Tensor], bias: Optional[torch.Tensor], in_place: bool,
         add: Optional[Callable] = None) -> torch.Tensor:
    """The top-down step as every FPN form takes it (the drop-in FPN, the inference lateral op;
    ``script.step`` is its TorchScript form): ``(lateral + bias[c]) + nearest_upsample(top)``,
    just ``lateral + bias[c]`` at the coarsest level (``top`` None).

    Args:
        lateral: Tensor[N, C, H, W]: a lateral convolution's output.
        top: the coarser level's inner map, Tensor[N, C, th, tw], or None.
        bias: Tensor[C] or None (lateral's dtype).
        in_place: write into lateral: only for a fresh map nobody else sees, outside autograd
            and graph capture (a captured graph may later run with autograd).
        add: the decided upsample-add to use (a runner's function taking (lateral, top, bias),
            matching ``in_place``); by default the public op.

    Returns:
        The inner map: lateral itself when in place.
    """
    if top is None:
        if bias is None:
            return lateral
        bias = bias.view(1, -1, 1, 1)
        return lateral.add_(bias) if in_place else lateral + bias
    if add is None:
        add = upsample_add_ if in_place else upsample_add
    return add(lateral, top, bias)
