"""The backend choice and the one dispatch table every public op resolves through.

A *backend* is what users name ("auto", "extension", "triton", "torch"); an *implementation*
is what runs: the compiled extension, a Triton kernel, oneDNN's fused convolution, or plain
PyTorch. ``TABLE[(op, device_type)][backend]`` lists the implementations in the order they
are tried: the first one that can run here and can do this call exactly (``exact``) wins, so a
fast path that cannot be exact gives way to the next entry, and every list ends in "torch".

What runs where is probed lazily, once per (implementation, device type), and cached:
``import fpn_fast`` loads no GPU driver and runs no convolution.

The process default comes from ``set_backend`` or the FPN_FAST_BACKEND environment variable;
``use_backend`` overrides it for the current thread only (a ``threading.local``, which
torch.compile guards on, so a compiled model recompiles when the choice changes).
"""
import contextlib
import os
import threading
from typing import Callable, Dict, Iterator, Optional, Tuple

import torch

__all__ = ["BACKENDS", "BackendUnavailableError", "TABLE", "set_backend", "get_backend", "use_backend",
           "available_backends", "unavailable_reason", "resolve", "resolution_count", "capturing_graph"]

BACKENDS = ("auto", "extension", "triton", "torch")


class BackendUnavailableError(RuntimeError):
    """A backend was named that cannot run here (not built, no GPU, triton missing)."""


def _same(backend: str) -> Tuple[str, ...]:
    return (backend, "torch") if backend != "torch" else ("torch",)


def _row(auto: Tuple[str, ...], **named: Tuple[str, ...]) -> Dict[str, Tuple[str, ...]]:
    """One table row: naming a backend runs its own implementation unless ``named`` says what
    it means for this op; every list falls back to "torch" for calls the others cannot do exactly."""
    row = {"auto": auto}
    for backend in BACKENDS[1:]:
        row[backend] = named.get(backend, _same(backend))
    return row


# (op, device type) -> {backend: implementations tried in order}.
TABLE: Dict[Tuple[str, str], Dict[str, Tuple[str, ...]]] = {
    # The top-down step: nearest upsample + add (+ bias), forward and backward.
    ("upsample_add", "cpu"): _row(("extension", "torch")),
    ("upsample_add", "cuda"): _row(("extension", "triton", "torch")),
    # The 'pool' level is a strided copy: only Triton has a kernel; the extension means ATen's copy.
    ("stride2_pool", "cpu"): _row(("torch",), extension=("torch",)),
    ("stride2_pool", "cuda"): _row(("triton", "torch"), extension=("torch",)),
    # Inference only. A folded convolution and its tail (bias, residual, ReLU): oneDNN post-ops on CPU,
    # one Triton pass after cuDNN on CUDA; "extension" means oneDNN on CPU (the CPU fast path).
    # Winograd first for 3x3 stride-1 convs: the extension's F(4x4, 3x3) where it pays (ops._winograd),
    # else NNPACK's for >= 128 channels over >= 20x20 pixels.
    ("conv2d_act", "cpu"): _row(("winograd", "nnpack", "onednn", "torch"),
                                extension=("winograd", "nnpack", "onednn", "torch")),
    ("conv2d_act", "cuda"): _row(("triton", "torch"), extension=("torch",)),
    # Inference only. Lateral 1x1 conv + top-down step: one Triton GEMM on CUDA; elsewhere
    # ("torch") the convolution, then upsample_add_ on whatever backend it resolves to.
    ("lateral_upsample_add", "cpu"): _row(("torch",), extension=("torch",)),
    ("lateral_upsample_add", "cuda"): _row(("triton", "torch"), extension=("torch",)),
    # Inference only. A convolution whose output is wanted in NCHW (the FPN's 3x3 output convs):
    # a Winograd convolution writing NCHW (the extension's, else NNPACK's), else the conv2d_act
    # route then to_nchw.
    ("conv2d_nchw", "cpu"): _row(("winograd", "nnpack", "onednn", "torch"),
                                 extension=("winograd", "nnpack", "onednn", "torch"), triton=("torch",)),
    ("conv2d_nchw", "cuda"): _row(("torch",), extension=("torch",), triton=("torch",)),
    # Inference only. NHWC -> NCHW output copy: the extension's blocked transpose on CPU.
    ("to_nchw", "cpu"): _row(("extension", "torch"), triton=("torch",)),
    ("to_nchw", "cuda"): _row(("torch",), extension=("torch",), triton=("torch",)),
}


def _extension_reason(device_type: str) -> Optional[str]:
    from . import _extension
    return _extension.unavailable_reason(device_type)


def _triton_reason(device_type: str) -> Optional[str]:
    from . import _triton
    return _triton.unavailable_reason(device_type)


def _onednn_reason(device_type: str) -> Optional[str]:
    if device_type != "cpu":
        return f"oneDNN's fused convolution runs on CPU tensors only, not {device_type}"
    from . import _onednn
    return _onednn.unavailable_reason()


def _nnpack_reason(device_type: str) -> Optional[str]:
    if device_type != "cpu":
        return f"NNPACK runs on CPU tensors only, not {device_type}"
    from . import _nnpack
    return _nnpack.unavailable_reason()


def _winograd_reason(device_type: str) -> Optional[str]:
    if device_type != "cpu":
        return f"the extension's Winograd convolution runs on CPU tensors only, not {device_type}"
    from . import _winograd
    return _winograd.unavailable_reason()


_PROBES: Dict[str, Callable[[str], Optional[str]]] = {
    "extension": _extension_reason, "triton": _triton_reason, "onednn": _onednn_reason, "nnpack": _nnpack_reason,
    "winograd": _winograd_reason,
    "torch": lambda device_type: None,
}


_PROBED: Dict[Tuple[str, str], Optional[str]] = {}


# torch.compile calls it while tracing and keeps the answer as a constant (the probe itself,
# a test convolution or a driver query, is nothing to trace).
@torch.compiler.assume_constant_result
def unavailable_reason(implementation: str, device_type: str) -> Optional[str]:
    """None when ``implementation`` can run on ``device_type`` tensors here, else why not.
    Probed on first use and cached for the life of the process."""
    key = (implementation, device_type)
    if key not in _PROBED:
        _PROBED[key] = _PROBES[implementation](device_type)
    return _PROBED[key]


def _reasons(backend: str) -> Dict[str, Optional[str]]:
    return {device_type: unavailable_reason(backend, device_type) for device_type in ("cpu", "cuda")}


def _check_name(name: str, source: str = "backend") -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown fpn_fast {source} {name!r}; choose one of {BACKENDS}")
    return name


def _check_usable(name: str) -> str:
    _check_name(name)
    if name not in ("auto", "torch"):
        reasons = _reasons(name)
        if all(reason is not None for reason in reasons.values()):
            raise BackendUnavailableError(f"fpn_fast backend {name!r} is not available: " + "; ".join(
                f"{device_type}: {reason}" for device_type, reason in reasons.items()))
    return name


def _default_from_environment() -> str:
    name = os.environ.get("FPN_FAST_BACKEND") or "auto"
    if name not in BACKENDS:
        raise ValueError(f"the environment variable FPN_FAST_BACKEND={name!r} names no fpn_fast backend; "
                         f"choose one of {BACKENDS} (or unset it for 'auto')")
    return name


# Availability of a backend named through the environment is checked where it is used (the
# check would probe GPUs at import); set_backend and use_backend check at once.
_default = _default_from_environment()
_local = threading.local()


def set_backend(name: str) -> None:
    """Set the process-wide default backend.

    Args:
        name: "auto" (per op and device, the fastest implementation that can run here),
            "extension", "triton" or "torch".

    Raises:
        ValueError: ``name`` is not a backend.
        BackendUnavailableError: the backend can run on no device here (says why).
    """
    global _default
    _default = _check_usable(name)


def get_backend() -> str:
    """The backend in force for the current thread: its ``use_backend`` choice, else the
    process default."""
    name = getattr(_local, "name", None)
    return _default if name is None else name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed calls of the current thread with the named backend; other threads and
    the process default are unaffected. Nests; the previous choice is restored on exit.

    Raises:
        ValueError: ``name`` is not a backend.
        BackendUnavailableError: the backend can run on no device here.
    """
    _check_usable(name)
    previous = getattr(_local, "name", None)
    _local.name = name
    try:
        yield
    finally:
        _local.name = previous


def available_backends() -> Dict[str, Dict[str, Optional[str]]]:
    """{backend: {device type: None if it runs there, else the reason why not}} (probes them)."""
    return {name: _reasons(name) for name in BACKENDS[1:]}


def capturing_graph() -> bool:
    """Whether a graph is being captured (torch.compile, torch.export, torch.jit.trace): fused
    paths outside the registered ops (oneDNN's internal ops, in-place writes) are then avoided,
    since the graph may later run elsewhere or with autograd."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


@torch.compiler.assume_constant_result
def _exporting_to_onnx() -> bool:
    return torch.onnx.is_in_onnx_export()


_resolutions = [0]  # resolve() calls so far (resolution_count): the inference engine's plans make none


def resolution_count() -> int:
    """How many times ``resolve`` has run in this process (a counter for tests and the engine:
    a planned forward resolves nothing)."""
    return _resolutions[0]


def resolve(op: str, device_type: str, exact: Optional[Callable[[str], bool]] = None) -> str:
    """The implementation that runs ``op`` on ``device_type`` tensors under the current backend.

    Args:
        op: a key of TABLE's rows ("upsample_add", "stride2_pool", ...).
        device_type: the tensors' device type ("cpu", "cuda", ...).
        exact: ``exact(implementation)`` says whether it computes this particular call exactly
            (dtype, layout, autocast...); implementations it rejects are skipped.

    Returns:
        The implementation's name: "extension", "triton", "onednn", "winograd", "nnpack" or "torch". While a model is
        exported to ONNX (either exporter) always "torch": ONNX has no fpn_fast ops, and the
        pure-PyTorch forms translate to standard ONNX ops (Resize, Add, Conv...).

    Raises:
        BackendUnavailableError: a named backend cannot run on ``device_type`` here.
    """
    _resolutions[0] += 1
    if _exporting_to_onnx():
        return "torch"
    backend = get_backend()
    row = TABLE.get((op, device_type))
    if backend != "auto":
        reason = unavailable_reason(backend, device_type)  # each probe also answers for unknown devices
        if reason is not None:
            raise BackendUnavailableError(
                f"fpn_fast backend {backend!r} cannot run {op} on {device_type} tensors: {reason}")
    if row is None:
        return "torch"
    for implementation in row[backend]:
        # exact() first: it rejects fused paths while a graph is being captured, so a probe that
        # runs a test convolution (oneDNN's) is never traced into the graph.
        if (exact is None or exact(implementation)) and unavailable_reason(implementation, device_type) is None:
            return implementation
    raise AssertionError(f"TABLE[{(op, device_type)!r}][{backend!r}] does not end in 'torch'")
