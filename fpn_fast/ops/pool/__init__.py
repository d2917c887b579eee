"""The FPN's 'pool' extra block: ``stride2_pool(x)`` = ``F.max_pool2d(x, 1, 2, 0)``, every other
row and column of the coarsest pyramid level, as a strided copy.

Implementations: a Triton kernel (``_triton.py``) and the pure-PyTorch reference
(``ops.reference``: ATen's strided copy, which is what "extension" means for this op).
"""
import torch

from .. import _checks
from .. import reference as _torch_impl
from ..dispatch import cached, capturing_graph, declare, get_backend, resolve, row
from ..runner import Runner
from . import _triton

__all__ = ["stride2_pool", "runner"]

ROWS = {
    # A strided copy: only Triton has a kernel; the extension means ATen's copy.
    ("stride2_pool", "cpu"): row(("torch",), extension=("torch",)),
    ("stride2_pool", "cuda"): row(("triton", "torch"), extension=("torch",)),
}
declare(ROWS)

_IMPLEMENTATIONS = {"triton": _triton, "torch": _torch_impl}


def runner(device_type: str) -> Runner:
    """``stride2_pool``'s runner for tensors of ``device_type`` under the backend in force: ``run(x)``."""
    if capturing_graph():
        return _decide(device_type)
    return cached(("stride2_pool", device_type, get_backend()), lambda: _decide(device_type))


def _decide(device_type: str) -> Runner:
    implementation = resolve("stride2_pool", device_type)
    impl = _IMPLEMENTATIONS[implementation]

    def fn(x: torch.Tensor) -> torch.Tensor:  # the implementation looked up per call, not bound now
        return impl.stride2_pool(x)
    return Runner("stride2_pool", implementation, fn)


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
    return runner(x.device.type)(x)
