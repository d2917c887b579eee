"""Runners: an op's route decided once for a call signature, and the tape that records them.

Every op module exposes ``runner(<the call's tensors and options>) -> Runner``: the route its
dispatch rows choose for that signature (measured ones included, ``measure.py``), bound into a
function that does nothing else per call. The op's public function is ``runner(...)(...)``, and
runners are cached per signature (``dispatch.cached``), so an eager call and an inference plan
with the same signature run the same runner.

Inside ``recording()`` every runner called on this thread appends itself, its arguments and its
result to the tape: the inference engine's plan is that tape (``fpn_fast.inference.plan``), so it
cannot drift from the forward it was recorded from. A runner names which of its arguments are
*dynamic* (computed by the forward: inputs, residuals, the coarser pyramid level) and which are
*static* (weights, biases, prepacked weights), so a plan can tell a value it must take from an
earlier step from one it may keep.
"""
import contextlib
import threading
from typing import Any, Callable, Iterator, NamedTuple, Optional, Sequence, Tuple

__all__ = ["Runner", "Step", "Tape", "recording", "active", "step"]


class Runner:
    """One op's route for one call signature: ``runner(*args)`` runs it.

    Attributes:
        op: the op's name (a key of ``dispatch.TABLE``'s rows).
        route: the implementation chosen ("extension", "triton", "onednn", "cudnn_relu", ...).
        fn: the function run (what a plan calls directly).
        dynamic: positions of the arguments computed by the forward; the others are static.
        pack: None, or ``pack(packs, x)``: the prepacked weight the route takes as its last
            argument, from a pack source (``inference.Conv2dAct``) and the input.
        decision: the measured decision (``measure.Decision``) that chose the route, if any.
        identity: the runner returns its first argument unchanged (not recorded).
        via: None, or the route of another op's runner this route runs (``conv2d_nchw``'s
            "torch" and "onednn" rows run ``conv2d_act``'s direct route, e.g. "triton": cuDNN
            then the Triton epilogue, before converting to NCHW).
    """

    __slots__ = ("op", "route", "fn", "dynamic", "pack", "decision", "identity", "via")

    def __init__(self, op: str, route: str, fn: Callable, dynamic: Sequence[int] = (0,),
                 pack: Optional[Callable] = None, decision=None, identity: bool = False,
                 via: Optional[str] = None):
        self.op, self.route, self.fn, self.dynamic = op, route, fn, tuple(dynamic)
        self.pack, self.decision, self.identity, self.via = pack, decision, identity, via

    def __call__(self, *args):
        tape = getattr(_state, "tape", None)
        if tape is None:
            return self.fn(*args)
        return tape.run(self, args)

    def __repr__(self) -> str:
        return f"Runner({self.op}: {self.route}{'' if self.via is None else ' via ' + self.via})"


class Step(NamedTuple):
    """One recorded call: ``fn(*args, **kwargs)`` returned ``result``. ``runner`` is the Runner
    (None for a module called as written, or a computation recorded by ``step``); ``dynamic``
    the positions of the arguments computed by the forward (None: every tensor argument);
    ``module`` the module called as written, if any."""
    fn: Callable
    args: Tuple
    kwargs: dict
    result: Any
    runner: Optional[Runner]
    dynamic: Optional[Tuple[int, ...]]
    module: Any


class Tape:
    """The calls recorded on one thread, each handed to ``record(step)`` as it returns (the
    tape keeps none of their values). Calls made inside a recorded call (a runner's own
    sub-runners, the inside of a module called as written) are not recorded: the outer call
    stands for them."""

    def __init__(self, record: Callable[[Step], None]):
        self.record = record
        self.depth = 0

    def run(self, runner: Runner, args: Tuple):
        if self.depth:
            return runner.fn(*args)
        self.depth += 1
        try:
            result = runner.fn(*args)
        finally:
            self.depth -= 1
        if not runner.identity:
            self.record(Step(runner.fn, args, {}, result, runner, runner.dynamic, None))
        return result

    def call(self, fn: Callable, args: Tuple, dynamic: Optional[Tuple[int, ...]] = (0,)):
        """Run and record ``fn(*args)``, a computation of the forward that is no op's runner."""
        if self.depth:
            return fn(*args)
        self.depth += 1
        try:
            result = fn(*args)
        finally:
            self.depth -= 1
        if not (args and result is args[0]):
            self.record(Step(fn, args, {}, result, None, dynamic, None))
        return result

    def enter_module(self) -> None:
        """A module called as written starts: what runs inside it is not recorded."""
        self.depth += 1

    def exit_module(self, module, fn: Callable, args: Tuple, kwargs: dict, result) -> None:
        """It returned ``result``: recorded as one step ``fn(*args, **kwargs)`` (``module``:
        the module called as written, or None where ``fn`` stands for its forward)."""
        self.depth -= 1
        if not self.depth:
            self.record(Step(fn, args, kwargs, result, None, None if module is not None else (0,), module))


_state = threading.local()


def active() -> Optional[Tape]:
    """The tape recording on this thread, or None."""
    return getattr(_state, "tape", None)


@contextlib.contextmanager
def recording(record: Callable[[Step], None]) -> Iterator[Tape]:
    """Hand every runner called on this thread while the block runs to ``record`` (not nested).

    Raises:
        RuntimeError: a recording is already in progress on this thread.
    """
    if active() is not None:
        raise RuntimeError("fpn_fast: a recording is already in progress on this thread")
    tape = Tape(record)
    _state.tape = tape
    try:
        yield tape
    finally:
        # Removed, not set to None: the thread's state is then what it was before any recording,
        # which torch.compile's guards on it (``hasattr``, on torch 2.11) see unchanged.
        del _state.tape


def step(fn: Callable, *args):
    """``fn(*args)``, recorded when a tape is: for a computation of a module's forward that is
    no op (a layout conversion, an added batch dimension). ``args[0]`` is computed by the forward,
    the others are constants; a result that is ``args[0]`` itself records nothing."""
    tape = getattr(_state, "tape", None)
    if tape is None:
        return fn(*args)
    return tape.call(fn, args)
