"""The compiled extension ``fpn_fast._C``: loading it (which registers ``torch.ops.fpn_fast.*``),
where it runs, and where its library is. Each op's Python binding (fake kernels, autograd) lives
beside the op: ``top_down/_extension.py``, ``layout.py``; the convolutions and the CPU buffer
pool call their ops directly."""
from typing import Optional

import torch

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

    Returns:
        The path of the shared library (a ``.so`` / ``.pyd`` file).

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
    """None when the extension's kernels run on ``device_type`` tensors here, else why not."""
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
