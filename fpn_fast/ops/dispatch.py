"""The backend choice and the one dispatch table every public op resolves through.

A *backend* is what users name ("auto", "extension", "triton", "torch"); an *implementation*
is what runs: the compiled extension, a Triton kernel, oneDNN's fused convolution, or plain
PyTorch. ``TABLE[(op, device_type)][backend]`` lists the implementations in the order they
are tried: the first one that can run here and that takes this call (the op's per-call
``supports`` predicate: dtype, layout, autocast, capture, the thresholds of ``selection``) wins,
so a fast path that cannot take a call gives way to the next entry, and every list ends in
"torch". Each op's module declares its rows beside the op (``declare``); which implementations
round differently from the reference is recorded in ``selection.ROUNDING``.

What runs where is probed lazily, once per (implementation, device type), and cached:
``import fpn_fast`` loads no GPU driver and runs no convolution.

A row declared *measured* (``conv2d_act`` and ``lateral_upsample_add`` on CUDA) is chosen by
timing under the "auto" backend: every implementation of the row that runs here and takes the
call is a candidate (``candidates``), and the op's runner is the fastest that agrees with the
first (``measure.py``). Each op decides its route once per call signature and keeps the bound
``runner.Runner`` (``cached``); changing a probe's answer drops every cached runner.

The process default comes from ``set_backend`` or the FPN_FAST_BACKEND environment variable;
``use_backend`` overrides it for the current thread only (a ``threading.local``, which
torch.compile guards on, so a compiled model recompiles when the choice changes).
"""
import contextlib
import os
import threading
from typing import Callable, Dict, Hashable, Iterable, Iterator, List, Optional, Set, Tuple

import torch

__all__ = ["BACKENDS", "BackendUnavailableError", "TABLE", "MEASURED", "row", "declare", "set_backend",
           "get_backend", "use_backend", "available_backends", "unavailable_reason", "resolve", "candidates",
           "resolution_count", "capturing_graph", "autocast_dtype", "cached", "forget_runners", "tensor_key"]

BACKENDS = ("auto", "extension", "triton", "torch")


class BackendUnavailableError(RuntimeError):
    """A backend was named that cannot run here (not built, no GPU, triton missing)."""


def _same(backend: str) -> Tuple[str, ...]:
    return (backend, "torch") if backend != "torch" else ("torch",)


def row(auto: Tuple[str, ...], **named: Tuple[str, ...]) -> Dict[str, Tuple[str, ...]]:
    """One table row: naming a backend runs its own implementation unless ``named`` says what
    it means for this op; every list falls back to "torch" for calls the others cannot do."""
    entries = {"auto": auto}
    for backend in BACKENDS[1:]:
        entries[backend] = named.get(backend, _same(backend))
    return entries


# (op, device type) -> {backend: implementations tried in order}. Each op's module declares its
# rows beside the op (``declare``); importing fpn_fast.ops imports them all.
TABLE: Dict[Tuple[str, str], Dict[str, Tuple[str, ...]]] = {}
# The rows whose "auto" route is chosen by measurement (``measure.py``), declared with their op.
MEASURED: Set[Tuple[str, str]] = set()


def _extension_reason(device_type: str) -> Optional[str]:
    from . import _extension
    return _extension.unavailable_reason(device_type)


def _triton_reason(device_type: str) -> Optional[str]:
    from . import _triton
    return _triton.unavailable_reason(device_type)


# implementation -> probe(device_type): None when it runs on that device type here, else why not.
_PROBES: Dict[str, Callable[[str], Optional[str]]] = {
    "extension": _extension_reason, "triton": _triton_reason, "torch": lambda device_type: None,
}


def declare(rows: Dict[Tuple[str, str], Dict[str, Tuple[str, ...]]],
            probes: Optional[Dict[str, Callable[[str], Optional[str]]]] = None,
            measured: Iterable[Tuple[str, str]] = ()) -> None:
    """Add an op's rows to TABLE, and the probes of implementations only its rows name (oneDNN,
    Winograd, NNPACK, cuDNN's fused ReLU: the convolutions'). Called once per op module, at its
    import. ``measured`` names the rows whose "auto" route is chosen by measurement.

    Raises:
        ValueError: a row is declared twice, a list does not end in "torch", or names an
            implementation without a probe.
    """
    known = {**_PROBES, **(probes or {})}
    for key, entries in rows.items():
        if key in TABLE:
            raise ValueError(f"dispatch row {key!r} is declared twice")
        for backend, implementations in entries.items():
            if implementations[-1:] != ("torch",) or not set(implementations) <= set(known):
                raise ValueError(f"TABLE[{key!r}][{backend!r}] = {implementations!r}: each list names probed "
                                 "implementations and ends in 'torch'")
    _PROBES.update(probes or {})
    TABLE.update(rows)
    MEASURED.update(measured)


# Runners by call signature (``cached``). Each one was decided from the probes' answers, so
# changing an answer (tests turn routes off) drops them all.
_RUNNERS: Dict[Hashable, object] = {}
_MAX_RUNNERS = 4096


class _Probed(dict):
    """The probes' answers; any change drops every cached runner."""

    def __setitem__(self, key, value):
        super().__setitem__(key, value)
        _RUNNERS.clear()

    def __delitem__(self, key):
        super().__delitem__(key)
        _RUNNERS.clear()

    def clear(self):
        super().clear()
        _RUNNERS.clear()

    def pop(self, *args):
        _RUNNERS.clear()
        return super().pop(*args)

    def update(self, *args, **kwargs):
        super().update(*args, **kwargs)
        _RUNNERS.clear()


_PROBED: Dict[Tuple[str, str], Optional[str]] = _Probed()


def cached(key: Hashable, make: Callable[[], object]):
    """The runner cached for ``key`` (an op's call signature and the state its decision read),
    made by ``make()`` on first use. Kept until a probe changes (at most ``_MAX_RUNNERS``: the
    oldest go first)."""
    runner = _RUNNERS.get(key)
    if runner is None:
        runner = make()
        if len(_RUNNERS) >= _MAX_RUNNERS:
            for old in list(_RUNNERS)[:_MAX_RUNNERS // 4]:
                _RUNNERS.pop(old, None)
        _RUNNERS[key] = runner
    return runner


def forget_runners() -> None:
    """Drop every cached runner (the next call of each signature decides again)."""
    _RUNNERS.clear()


def tensor_key(t: Optional[torch.Tensor]) -> Optional[Tuple]:
    """What an op's route can depend on of a tensor argument: shape, strides, dtype, device."""
    return None if t is None else (t.shape, t.stride(), t.dtype, t.device)


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


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype in force for device_type, or None. The inference ops are not autocast
    ops, so they cast their inputs themselves, as autocast would cast a convolution's. A device
    type without autocast (meta, for shape inference) has none in force: torch's autocast
    queries raise for it."""
    if not _has_autocast(device_type) or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


_AUTOCAST_DEVICES: Dict[str, bool] = {}  # device type -> whether torch has autocast for it


@torch.compiler.assume_constant_result
def _has_autocast(device_type: str) -> bool:
    """Whether torch has autocast for ``device_type`` (asked once per device type)."""
    known = _AUTOCAST_DEVICES.get(device_type)
    if known is None:
        known = _AUTOCAST_DEVICES[device_type] = bool(torch.amp.is_autocast_available(device_type))
    return known


@torch.compiler.assume_constant_result
def _exporting_to_onnx() -> bool:
    return torch.onnx.is_in_onnx_export()


_resolutions = [0]  # resolve() calls so far (resolution_count): the inference engine's plans make none


def resolution_count() -> int:
    """How many times ``resolve`` has run in this process (a counter for tests and the engine:
    a planned forward resolves nothing)."""
    return _resolutions[0]


def resolve(op: str, device_type: str, supports: Optional[Callable[[str], bool]] = None) -> str:
    """The implementation that runs ``op`` on ``device_type`` tensors under the current backend.

    Args:
        op: a key of TABLE's rows ("upsample_add", "stride2_pool", ...).
        device_type: the tensors' device type ("cpu", "cuda", ...).
        supports: ``supports(implementation)`` says whether that implementation takes this
            particular call (dtype, layout, autocast, capture, the routing thresholds of
            ``selection``); implementations it rejects are skipped. It decides what runs, not
            how it rounds: ``selection.ROUNDING`` says which implementations round differently.

    Returns:
        The implementation's name: "extension", "triton", "onednn", "winograd", "nnpack" or "torch". While a model is
        exported to ONNX (either exporter) always "torch": ONNX has no fpn_fast ops, and the
        pure-PyTorch forms translate to standard ONNX ops (Resize, Add, Conv...).

    Raises:
        BackendUnavailableError: a named backend cannot run on ``device_type`` here.
    """
    if not torch.compiler.is_compiling():  # traced, the count would be a guard: a recompile per change
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
        # supports() first: it rejects fused paths while a graph is being captured, so a probe that
        # runs a test convolution (oneDNN's) is never traced into the graph.
        if (supports is None or supports(implementation)) and unavailable_reason(implementation, device_type) is None:
            return implementation
    raise AssertionError(f"TABLE[{(op, device_type)!r}][{backend!r}] does not end in 'torch'")


def candidates(op: str, device_type: str, supports: Optional[Callable[[str], bool]] = None,
               why_not: Optional[Callable[[str], Optional[str]]] = None) -> Tuple[List[str], Dict[str, str]]:
    """Every implementation ``resolve`` could pick for this call, in the row's order, and why
    each other one of the row cannot: what a measured row times.

    Args:
        op, device_type, supports: as ``resolve``'s.
        why_not: ``why_not(implementation)``, the reason ``supports`` refused it (None: "does
            not take this call").

    Returns:
        (implementations that run here and take the call, {implementation: why not}).

    Raises:
        BackendUnavailableError: a named backend cannot run on ``device_type`` here.
    """
    first = resolve(op, device_type, supports)
    row = TABLE.get((op, device_type))
    if row is None or _exporting_to_onnx():
        return [first], {}
    taken: List[str] = []
    refused: Dict[str, str] = {}
    for implementation in row[get_backend()]:
        reason = unavailable_reason(implementation, device_type)
        if reason is None and not (supports is None or supports(implementation)):
            reason = (why_not(implementation) if why_not is not None else None) or "does not take this call"
        if reason is None:
            taken.append(implementation)
        else:
            refused[implementation] = reason
    return taken, refused
