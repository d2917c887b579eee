"""The FPN's 'pool' extra block: ``stride2_pool(x)`` = ``F.max_pool2d(x, 1, 2, 0)``, every other
row and column of the coarsest pyramid level, as a strided copy.

Implementations: a Triton kernel (``_triton.py``) and the pure-PyTorch reference
(``ops.reference``: ATen's strided copy, which is what "extension" means for this op).
"""
import torch

from .. import _checks
from .. import reference as _torch_impl
from ..dispatch import declare, resolve, row
from . import _triton

__all__ = ["stride2_pool"]

ROWS = {
    # A strided copy: only Triton has a kernel; the extension means ATen's copy.
    ("stride2_pool", "cpu"): row(("torch",), extension=("torch",)),
    ("stride2_pool", "cuda"): row(("triton", "torch"), extension=("torch",)),
}
declare(ROWS)

_IMPLEMENTATIONS = {"triton": _triton, "torch": _torch_impl}


def stride2_pool(x: torch.Tensor) -> torch.Tensor:
    """The FPN 'pool' level, ``F.max_pool2d(x, 1, 2, 0)``, as a strided copy (every other row and column).

    Args:
        x: Tensor[N, C, H, W], a float dtype, any memory format.

    Returns:
        Tensor[N, C, ceil(H/2), ceil(W/2)] in x's memory format; differentiable.

    Raises:
        TypeError: x is not a float tensor. ValueError: x is not 4-D.
        BackendUnavailableError: the named backend cannot run on x's device.
    """
    _checks.check_stride2_pool(x)
    return _IMPLEMENTATIONS[resolve("stride2_pool", x.device.type)].stride2_pool(x)
