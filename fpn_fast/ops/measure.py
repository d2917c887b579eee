"""The measuring policy of the dispatch rows declared *measured* (``conv2d_act`` and
``lateral_upsample_add`` on CUDA), and the CUDA flags their choices depend on.

Under the "auto" backend such a row's runner for a call signature is chosen once per process,
on the call's own tensors: every implementation of the row that runs here and takes the call is
a candidate (``dispatch.candidates``); the fastest one whose output agrees with the first
candidate's (the same non-finite positions, and within ``AGREEMENT`` of its largest finite
magnitude: rounding only) becomes the runner. A candidate that raises (any exception: Triton's
``OutOfResources`` and ``CompilationError`` are not ``RuntimeError``s) or disagrees loses, and
the reason is kept. Nothing is measured under a named backend (the caller's choice), while the
current stream captures a CUDA graph, or while a graph is traced (torch.compile, export): the
row's first candidate runs then.

A measurement never synchronises the device (which would break a CUDA graph another thread is
capturing): candidates run and are timed on a side stream that first waits for the caller's
stream; agreement is computed on the device and read back once through pinned memory; the host
waits on events recorded on the side stream only (no ``torch.cuda.synchronize``, no ``.item()``,
no ``empty_cache``). The caller's stream then waits for the side stream.

``choices()`` lists the decisions made so far with every candidate's time or why it lost;
``choices.save_choices`` / ``load_choices`` keep them across processes.
"""
import contextlib
import threading
import time
from collections import OrderedDict
from typing import Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence

import torch

from .dispatch import MEASURED, capturing_graph, get_backend
from .flags import cudnn_conv_allows_tf32

__all__ = ["Candidate", "Decision", "measured", "fastest", "choices", "use_loaded", "forget_loaded",
           "on_side_stream", "cuda_flags", "cudnn_conv_allows_tf32", "stream_capturing"]

TIMED_RUNS = 5
# A candidate agrees when it differs from the first by at most this fraction of the first's
# largest finite magnitude (TF32 and reordered sums stay far below it; a wrong result does not).
AGREEMENT = 1e-2


def cuda_flags() -> tuple:
    """The cuDNN, TF32 and determinism flags a CUDA route (and so its measured choice) depends on."""
    return (cudnn_conv_allows_tf32(), torch.backends.cudnn.enabled, torch.backends.cudnn.benchmark,
            torch.backends.cudnn.deterministic, torch.are_deterministic_algorithms_enabled())


def stream_capturing(device: torch.device) -> bool:
    """Whether the current stream of a CUDA device is capturing a graph (never for other devices)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def measured(op: str, device: torch.device) -> bool:
    """Whether ``op``'s route for tensors on ``device`` is chosen by measurement now: its row is
    declared measured, the backend is "auto", and nothing is being captured or traced."""
    return ((op, device.type) in MEASURED and get_backend() == "auto" and not capturing_graph()
            and not stream_capturing(device))


class Candidate(NamedTuple):
    """One implementation's part in a decision.

    status: "chosen", "slower", "raised", "disagreed" (it ran) or "refused" (it could not run
        or does not take the call). ms: its median time in milliseconds, where it was timed.
    reason: why it lost or was refused (None for the chosen one and plain losers).
    """
    status: str
    ms: Optional[float]
    reason: Optional[str]


class Decision(NamedTuple):
    """A measured choice: ``op``'s route for the call ``signature`` (a description), the
    ``chosen`` implementation and every candidate's ``Candidate``, in the row's order; ``device``
    the tensors' device ("cuda:0"); ``loaded_from`` the choices file it was read from (None:
    measured in this process; ``choices.load_choices``)."""
    op: str
    signature: str
    chosen: str
    candidates: Dict[str, Candidate]
    device: str = ""
    loaded_from: Optional[str] = None

    def as_dict(self) -> dict:
        return dict(op=self.op, signature=self.signature, chosen=self.chosen,
                    candidates={name: c._asdict() for name, c in self.candidates.items()},
                    device=self.device, loaded_from=self.loaded_from)


_DECISIONS: "OrderedDict[tuple, Decision]" = OrderedDict()
_MAX_DECISIONS = 1024
# Decisions read from a choices file (``choices.load_choices``), by (op, signature): taken
# instead of measuring while their chosen implementation is still a candidate.
_LOADED: Dict[tuple, Decision] = {}
_lock = threading.Lock()


def choices() -> List[dict]:
    """Every measured decision of this process, oldest first, as dicts: ``op``, ``signature``
    (the call's shapes, strides, dtype and flags, as text), ``chosen``, and ``candidates``:
    {implementation: {"status", "ms", "reason"}} (see ``Candidate``)."""
    with _lock:
        return [decision.as_dict() for decision in _DECISIONS.values()]


def use_loaded(decisions: Iterable[Decision]) -> None:
    """Take these decisions (read from a choices file) instead of measuring their op and
    signature from now on (``choices.load_choices``)."""
    with _lock:
        _LOADED.update({(d.op, d.signature): d for d in decisions})


def forget_loaded() -> None:
    """Drop every loaded decision: later decisions measure again."""
    with _lock:
        _LOADED.clear()


def fastest(op: str, signature: str, runs: Dict[str, Callable[[], torch.Tensor]], refused: Dict[str, str],
            device: torch.device) -> Decision:
    """Run, check and time ``runs`` (implementation -> a call of it on the real tensors, in the
    row's order) and choose the fastest that agrees with the first one that ran.

    Args:
        op: the op's name. signature: the call described (for ``choices``).
        runs: the candidates; none may write into its arguments.
        refused: the row's other implementations and why they are not candidates.
        device: the tensors' device: CUDA candidates run on a side stream, timed with events.

    Returns:
        The Decision (also kept for ``choices``). When no candidate runs, the first is "chosen",
        so the call raises its error where it is made. A decision loaded for this op and
        signature (``choices.load_choices``) whose chosen implementation is among ``runs`` is
        returned without running anything.
    """
    loaded = _LOADED.get((op, signature))
    if loaded is not None and loaded.chosen in runs:
        return _keep(loaded)
    outcome: Dict[str, Candidate] = {name: Candidate("refused", None, reason) for name, reason in refused.items()}
    if len(runs) == 1:  # nothing to measure: the one candidate runs
        return _keep(Decision(op, signature, next(iter(runs)),
                              {next(iter(runs)): Candidate("chosen", None, "the only candidate"), **outcome},
                              str(device)))
    timer = _CudaTimer(device) if device.type == "cuda" else _HostTimer()
    with timer.context():
        outputs = {}
        for name, run in runs.items():
            try:
                outputs[name] = run()
            except Exception as err:  # noqa: BLE001 (a candidate that cannot run loses the race)
                outcome[name] = Candidate("raised", None, f"{type(err).__name__}: {err}")
        for name, reason in _disagreements(outputs, timer).items():
            outcome[name] = Candidate("disagreed", None, reason)
        del outputs
        timed = {name: run for name, run in runs.items() if name not in outcome}
        times, errors = timer.time(timed)
    for name, err in errors.items():
        outcome[name] = Candidate("raised", None, f"{type(err).__name__}: {err}")
    chosen = min(times, key=times.get) if times else next(iter(runs))
    for name, ms in times.items():
        outcome[name] = Candidate("chosen" if name == chosen else "slower", ms, None)
    if chosen not in outcome:
        outcome[chosen] = Candidate("chosen", None, "no candidate ran: the first one's error is the call's")
    order = list(runs) + [name for name in refused if name not in runs]
    return _keep(Decision(op, signature, chosen, {name: outcome[name] for name in order if name in outcome},
                          str(device)))


def _keep(decision: Decision) -> Decision:
    """Keep a decision for ``choices`` (the newest per op and signature)."""
    key = (decision.op, decision.signature)
    with _lock:
        _DECISIONS[key] = decision
        _DECISIONS.move_to_end(key)
        while len(_DECISIONS) > _MAX_DECISIONS:
            _DECISIONS.popitem(last=False)
    return decision


def _disagreements(outputs: Dict[str, torch.Tensor], timer) -> Dict[str, str]:
    """{name: why} for the outputs that disagree with the first one (all checked on the device,
    read back at once)."""
    names = list(outputs)
    if len(names) < 2:
        return {}
    reference = outputs[names[0]]
    reasons, checked, rows = {}, [], []
    for name in names[1:]:
        out = outputs[name]
        if not isinstance(out, torch.Tensor) or out.shape != reference.shape or out.dtype != reference.dtype:
            reasons[name] = (f"its output ({getattr(out, 'dtype', type(out).__name__)}, "
                             f"{tuple(getattr(out, 'shape', ()))}) is not {names[0]}'s "
                             f"({reference.dtype}, {tuple(reference.shape)})")
        elif reference.numel():
            finite = torch.isfinite(reference)
            mismatch = (finite != torch.isfinite(out)).any().float()
            difference = torch.where(finite, (out - reference).abs(), 0).amax().float()
            scale = torch.where(finite, reference.abs(), 0).amax().float()
            rows.append(torch.stack([mismatch, difference, scale]))
            checked.append(name)
    if rows:
        for name, (mismatch, difference, scale) in zip(checked, timer.read(torch.stack(rows))):
            if mismatch:
                reasons[name] = f"its non-finite values are not where {names[0]}'s are"
            elif not difference <= AGREEMENT * max(scale, 1e-30):
                reasons[name] = (f"differs from {names[0]} by {difference:.3g}, over {AGREEMENT:g} of the "
                                 f"output's scale {scale:.3g}")
    return reasons


class _HostTimer:
    """Times on the host clock (CPU tensors: the tests of the policy)."""

    def context(self):
        return contextlib.nullcontext()

    def read(self, t: torch.Tensor) -> List:
        return t.tolist()

    def time(self, runs: Dict[str, Callable]):
        times, errors = {}, {}
        for name, run in runs.items():
            try:
                samples = []
                for _ in range(TIMED_RUNS):
                    start = time.perf_counter()
                    run()
                    samples.append((time.perf_counter() - start) * 1e3)
                times[name] = _median(samples)
            except Exception as err:  # noqa: BLE001
                errors[name] = err
        return times, errors


_SIDE_STREAMS: Dict[torch.device, "torch.cuda.Stream"] = {}


def _side_stream(device: torch.device):
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS.setdefault(device, torch.cuda.Stream(device))
    return stream


class _CudaTimer:
    """Runs on a side stream of ``device`` and times with CUDA events; waits on its events only."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = _side_stream(device)

    @contextlib.contextmanager
    def context(self):
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        try:
            with torch.cuda.stream(self.stream):
                yield
        finally:
            current.wait_stream(self.stream)  # the caller's next kernels follow the candidates'

    def read(self, t: torch.Tensor) -> List:
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        done = torch.cuda.Event()
        done.record(self.stream)
        done.synchronize()
        return host.tolist()

    def time(self, runs: Dict[str, Callable]):
        events, errors = {}, {}
        for name, run in runs.items():
            try:
                run()  # warm: Triton compiled and cuDNN chose its algorithm on the first run
                pairs = []
                for _ in range(TIMED_RUNS):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record(self.stream)
                    run()
                    end.record(self.stream)
                    pairs.append((start, end))
                events[name] = pairs
            except Exception as err:  # noqa: BLE001
                errors[name] = err
        last = torch.cuda.Event()
        last.record(self.stream)
        last.synchronize()
        return {name: _median([s.elapsed_time(e) for s, e in pairs]) for name, pairs in events.items()}, errors


def on_side_stream(device: torch.device, fn: Callable[[], torch.Tensor]) -> List:
    """``fn()``'s result as a (nested) list, computed on the measuring side stream of a CUDA
    device and read back without synchronising the device (the probes' way)."""
    timer = _CudaTimer(device)
    with timer.context():
        return timer.read(fn())


def _median(samples: Sequence[float]) -> float:
    return sorted(samples)[len(samples) // 2]
