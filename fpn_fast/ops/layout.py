"""Memory-format conversions for the inference path: ``to_nchw(x)``, a pyramid level handed back
in NCHW, with the extension's cache-blocked NHWC -> NCHW transpose
(``torch.ops.fpn_fast.nhwc_to_nchw``, whose fake kernel is registered here) on CPU, and
``to_channels_last(x)``. ``to_nchw_scripted`` is ``to_nchw``'s TorchScript form.
"""
from typing import Callable, Dict

import torch
from torch import Tensor

from ._extension import _LOAD_ERROR, has_cuda_kernels
from .dispatch import cached, capturing_graph, declare, get_backend, resolve, row
from .runner import Runner

__all__ = ["to_nchw", "to_channels_last", "nchw_runner", "channels_last_runner", "to_nchw_scripted",
           "decompositions"]

ROWS = {
    # The extension's blocked transpose on CPU; ATen's copy elsewhere.
    ("to_nchw", "cpu"): row(("extension", "torch"), triton=("torch",)),
    ("to_nchw", "cuda"): row(("torch",), extension=("torch",), triton=("torch",)),
}
declare(ROWS)

if _LOAD_ERROR is None:
    _nhwc_to_nchw = torch.ops.fpn_fast.nhwc_to_nchw.default

    @torch.library.register_fake("fpn_fast::nhwc_to_nchw")
    def _nhwc_to_nchw_fake(x):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    # nhwc_to_nchw's autograd is a C++ kernel (a differentiable ATen clone when grad is needed).


def _same(x: Tensor) -> Tensor:
    return x


def nchw_runner(device_type: str, contiguous: bool, four_d: bool = True) -> Runner:
    """``to_nchw``'s runner for a tensor of ``device_type`` that is (or is not) contiguous
    already: ``run(x)``."""
    if capturing_graph():
        return _decide(device_type, contiguous, four_d)
    return cached(("to_nchw", device_type, contiguous, four_d, get_backend()),
                  lambda: _decide(device_type, contiguous, four_d))


def _decide(device_type: str, contiguous: bool, four_d: bool) -> Runner:
    if contiguous:
        return Runner("to_nchw", "torch", _same, identity=True)
    if four_d and resolve("to_nchw", device_type) == "extension":
        return Runner("to_nchw", "extension", _blocked_to_nchw)
    return Runner("to_nchw", "torch", Tensor.contiguous)


def _blocked_to_nchw(x: Tensor) -> Tensor:
    return x if x.is_contiguous() else _nhwc_to_nchw(x)


def to_nchw(x: Tensor) -> Tensor:
    """x as a contiguous NCHW tensor: x itself when it already is, else a copy (on CPU with the
    extension, its cache-blocked NHWC->NCHW transpose, faster than torch's strided copy in that
    direction; benchmarks/RESULTS.md). Differentiable (the gradient of a copy is the incoming
    gradient).

    Args:
        x: any tensor; the blocked transpose applies to 4-D channels_last CPU maps.

    Returns:
        A tensor equal to x, contiguous.
    """
    return nchw_runner(x.device.type, x.is_contiguous(), x.dim() == 4)(x)


def _channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last)


_TO_CHANNELS_LAST = Runner("to_channels_last", "torch", _channels_last)
_ALREADY_CHANNELS_LAST = Runner("to_channels_last", "torch", _same, identity=True)


def channels_last_runner(already: bool) -> Runner:
    """``to_channels_last``'s runner for a tensor that is (or is not) channels_last already."""
    return _ALREADY_CHANNELS_LAST if already else _TO_CHANNELS_LAST


def to_channels_last(x: Tensor) -> Tensor:
    """``x.contiguous(memory_format=torch.channels_last)``, as a runner (recorded by plans).

    Args:
        x: Tensor[N, C, H, W].

    Returns:
        x itself when it is channels_last already, else a channels_last copy.
    """
    return channels_last_runner(x.is_contiguous(memory_format=torch.channels_last))(x)


# The TorchScript form. Which ops exist is fixed at import (what the loaded library registers):
# TorchScript compiles functions, not closed-over flags, and refuses an op the library lacks.
if _LOAD_ERROR is None:
    if has_cuda_kernels():
        def _on_extension(t: Tensor) -> bool:
            return t.device.type == "cpu" or t.is_cuda
    else:
        def _on_extension(t: Tensor) -> bool:
            return t.device.type == "cpu"

    def to_nchw_scripted(x: Tensor) -> Tensor:
        """``to_nchw`` in TorchScript: the extension's NHWC->NCHW copy where it runs, else ATen's."""
        if x.is_contiguous():
            return x
        if x.dim() == 4 and _on_extension(x):
            return torch.ops.fpn_fast.nhwc_to_nchw(x)
        return x.contiguous()
else:
    def to_nchw_scripted(x: Tensor) -> Tensor:
        """``to_nchw`` in TorchScript: ATen's copy (no extension)."""
        return x.contiguous()


def decompositions() -> Dict[Callable, Callable]:
    """{OpOverload: its ATen form} for the extension's layout op (empty without it): entries of
    ``fpn_fast.decompositions()``."""
    if _LOAD_ERROR is not None:
        return {}
    return {_nhwc_to_nchw: lambda x: x.clone(memory_format=torch.contiguous_format)}
