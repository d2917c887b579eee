"""Memory-format conversion for the inference path: ``to_nchw(x)``, a pyramid level handed back
in NCHW, with the extension's cache-blocked NHWC -> NCHW transpose
(``torch.ops.fpn_fast.nhwc_to_nchw``, whose fake kernel is registered here) on CPU."""
import torch

from ._extension import _LOAD_ERROR
from .dispatch import declare, resolve, row

__all__ = ["to_nchw"]

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


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous NCHW tensor: x itself when it already is, else a copy (on CPU with the
    extension, its cache-blocked NHWC->NCHW transpose, faster than torch's strided copy in that
    direction; benchmarks/RESULTS.md). Differentiable (the gradient of a copy is the incoming
    gradient).

    Args:
        x: any tensor; the blocked transpose applies to 4-D channels_last CPU maps.

    Returns:
        A tensor equal to x, contiguous.
    """
    if x.is_contiguous():
        return x
    if x.dim() == 4 and resolve("to_nchw", x.device.type) == "extension":
        return _nhwc_to_nchw(x)
    return x.contiguous()
