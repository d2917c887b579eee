"""The compiled extension ``fpn_fast._C``: loading it (which registers ``torch.ops.fpn_fast.*``),
where it runs, and where its library is. Each op's Python binding (fake kernels, autograd) lives
beside the op: ``top_down/_extension.py``, ``layout.py``; the convolutions and the CPU buffer
pool call their ops directly.

A library built against one torch and loaded under another breaks at load time (an undefined
C++ symbol) or, worse, later. So the build writes ``_C_build.json`` beside the library (setup.py)
naming the torch it was built against, and the library is loaded only under that torch. When it
was built for another torch, or fails to load, fpn_fast says so in one line, once, as an
:class:`ExtensionMismatchWarning`, and runs without it: every op falls back to its pure-PyTorch
implementation (Triton's on GPUs that have it), as the dispatch table lists; naming the
``extension`` backend raises with the same line. Without a built library (a source checkout
never built) fpn_fast runs the same way, without a warning.
"""
import importlib.util
import json
import os
import sys
import warnings
from typing import Optional

import torch

__all__ = ["ExtensionMismatchWarning", "build_record", "library_path", "has_cuda_kernels", "unavailable_reason"]

BUILD_RECORD = "_C_build.json"  # setup.py's name for it
_REBUILD = ("rebuild it against the running torch: pip install --no-build-isolation --no-deps --force-reinstall "
            "--no-cache-dir <the fpn_fast sdist or source folder> "
            "(in a checkout: pip install --no-build-isolation -e .)")


class ExtensionMismatchWarning(RuntimeWarning):
    """fpn_fast's compiled extension cannot be used with the running torch (built for another
    torch, or it failed to load); fpn_fast runs its PyTorch implementations instead."""


def _read_record(folder: str) -> Optional[dict]:
    try:
        with open(os.path.join(folder, BUILD_RECORD)) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and isinstance(record.get("torch"), str) else None


def _one_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def mismatch_message(built_for: Optional[str], running: str, load_error: Optional[str] = None) -> str:
    """The one line that says why the library is not used: which torch it was built for, which
    runs, and how to rebuild it. ``load_error`` is the loader's error, when loading failed."""
    built = f"torch {built_for}" if built_for else "an unrecorded torch (it has no build record)"
    if load_error is None:
        what = f"fpn_fast's compiled extension was built for {built}, but torch {running} is running"
    else:
        what = (f"fpn_fast's compiled extension (built for {built}) failed to load under torch {running}: "
                f"{_one_line(load_error)}")
    return f"{what}; fpn_fast runs its PyTorch implementations instead; {_REBUILD}"


def _load():
    """(the module or None, its build record or None, why it is not used or None, warn?)."""
    spec = importlib.util.find_spec(f"{__package__.rpartition('.')[0]}._C")
    if spec is None or spec.origin is None:
        return None, None, ("the compiled extension fpn_fast._C is not built; build it with "
                            "`pip install --no-build-isolation -e .` (docs/install.md)"), False
    record = _read_record(os.path.dirname(spec.origin))
    running = str(torch.__version__)
    if record is not None and record["torch"] != running:
        return None, record, mismatch_message(record["torch"], running), True
    try:
        from .. import _C  # importing it registers torch.ops.fpn_fast.*
    except ImportError as exc:
        return None, record, mismatch_message(record["torch"] if record else None, running, str(exc)), True
    return _C, record, None, False


def _warn_once(message: str) -> None:
    """Warn, pointing at the first frame outside fpn_fast (the user's ``import fpn_fast``)."""
    package_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    level, frame = 1, sys._getframe(1)
    while frame is not None and (os.path.abspath(frame.f_code.co_filename).startswith(package_dir + os.sep)
                                 or frame.f_code.co_filename.startswith("<frozen importlib")):
        if not frame.f_code.co_filename.startswith("<frozen importlib"):  # warnings skips those itself
            level += 1
        frame = frame.f_back
    warnings.warn(message, ExtensionMismatchWarning, stacklevel=level + 1)


_C, _RECORD, _LOAD_ERROR, _warn = _load()
if _warn:
    _warn_once(_LOAD_ERROR)
del _warn


def build_record() -> Optional[dict]:
    """What the compiled library was built against, as setup.py recorded it beside the library.

    Returns:
        ``{"torch": version string, "torch_cuda": torch's CUDA version or None, "cuda_kernels":
        bool, "cuda_arch_list": str or None}``, or None when there is no library or no record
        (a library built before records were written).
    """
    return None if _RECORD is None else dict(_RECORD)


def library_path() -> str:
    """Path of the compiled library that registers the ``fpn_fast::`` ops. A process that loads a
    scripted, traced or exported model holding them, without importing fpn_fast, calls
    ``torch.ops.load_library(path)`` first (as a LibTorch program would).

    Returns:
        The path of the shared library (a ``.so`` / ``.pyd`` file).

    Raises:
        RuntimeError: the extension is not built, was built for another torch, or failed to load.
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
