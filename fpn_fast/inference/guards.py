"""What a plan may assume between calls: the weights it was built from (``WeightGuard``), the
modules it was built from (``StructureGuard``), and what a CUDA graph hides beyond the plan
(``GraphGuard``). Each check is a few C-level comparisons per module; see docs/design.md
("Inference engine", invariants) for what each guards and why.

These Python checks define whether a plan applies. A call does not run them while the extension's
host guard (``arm``/``HostGuard.holds``, csrc/runtime/host_guard.cpp) says that nothing they read
has changed since they last held: one C call instead of about a hundred Python-level comparisons.
"""
import collections
import copy
import itertools
import operator
import threading
import warnings
import weakref
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.nn.modules import module as _module_state

from ..ops import host_guard as _host_guard


__all__ = ["WeightGuard", "StructureGuard", "GraphGuard", "HostGuard", "arm", "host_guard_mechanism"]


_PARAMETERS = operator.attrgetter("_parameters")
_GET_WEIGHT = operator.methodcaller("get", "weight")
_GET_BIAS = operator.methodcaller("get", "bias")
_GENERATION = operator.attrgetter("_weights_generation")


class WeightGuard:
    """Whether the folded convolutions' weights and biases are still those a plan was built from:
    the same tensor objects (held here, so no other tensor can take their identity or address),
    the same version counters and data pointers, and the same module generations."""

    def __init__(self, convs: List[nn.Module]):
        self.modules = convs
        self.state = self._read()

    def _read(self):
        tensors = self._tensors()
        present = [t for t in tensors if t is not None]
        return (tensors, [t._version for t in present], list(map(Tensor.data_ptr, present)),
                list(map(_GENERATION, self.modules)))

    def _tensors(self) -> List[Optional[Tensor]]:
        # get: a parametrized module has no "weight" parameter (and no longer passes the plan's checks).
        parameters = list(map(_PARAMETERS, self.modules))
        return list(map(_GET_WEIGHT, parameters)) + list(map(_GET_BIAS, parameters))

    def holds(self) -> bool:
        """True when nothing changed since the plan was built."""
        tensors, versions, pointers, generations = self.state
        current = self._tensors()
        if any(map(operator.is_not, current, tensors)):
            return False
        present = [t for t in current if t is not None]
        return ([t._version for t in present] == versions and list(map(Tensor.data_ptr, present)) == pointers
                and list(map(_GENERATION, self.modules)) == generations)

    def tensors(self) -> List[Tensor]:
        """The weights and biases guarded."""
        return [t for t in self.state[0] if t is not None]


# Values of a module's __dict__ compared by content (copied into the snapshot) rather than by
# identity: the submodules, hook dicts and option containers (return_layers, in_channels_list).
# Parameters and buffers are compared by identity here (WeightGuard and _TensorGuard do the rest),
# and Conv2dAct's packs (made on demand, valid while its WeightGuard holds).
_BY_IDENTITY = frozenset(("_parameters", "_buffers", "_packs"))


def _snapshot(state: dict) -> dict:
    return {key: (copy.copy(value) if isinstance(value, (dict, list, set)) and key not in _BY_IDENTITY else value)
            for key, value in state.items()}


class StructureGuard:
    """Whether modules still have the type and attributes they had when the guard was made:
    each module's ``__dict__`` (submodules, hook dicts, training flag, options) compared with a
    copy taken then, one C-level dict comparison per module per call.

    Args:
        modules: the modules whose calls a plan elides (duplicates allowed); held by the guard.
        outer: the module whose forward runs the plan (the backbone; held weakly, it holds the
            engine): its submodules and public attributes are compared, and its training flag
            (its own hooks run around the plan, whatever they do).
        called: modules the plan calls as written: only their type, training flag and how many
            forward (pre-)hooks they have are compared (their calls read the rest themselves;
            a hook removed lets a new plan elide them).
    """

    def __init__(self, modules: List[nn.Module], outer: Optional[nn.Module] = None,
                 called: Sequence[nn.Module] = ()):
        called = list({id(m): m for m in called}.values())
        skip = {id(outer)} | {id(m) for m in called}
        unique = list({id(m): m for m in modules if id(m) not in skip}.values())
        self.modules = unique
        self.types = list(map(type, unique))
        self.dicts = [m.__dict__ for m in unique]
        self.snapshots = [_snapshot(d) for d in self.dicts]
        self.called = called
        self.called_state = list(map(_call_state, called))
        self.outer = None if outer is None else weakref.ref(outer)
        if outer is not None:
            state = outer.__dict__
            self.outer_size, self.outer_type = len(state), type(outer)
            keys = [key for key in state if key not in _OUTER_IGNORED]
            self.outer_get = operator.itemgetter(*keys)
            self.outer_snapshot = _snapshot({key: state[key] for key in keys})
            self.outer_values = tuple(self.outer_snapshot.values())

    def holds(self) -> bool:
        """True when no module was changed since the guard was made."""
        try:
            return (all(map(operator.eq, self.dicts, self.snapshots))
                    and list(map(type, self.modules)) == self.types
                    and all(map(operator.is_, map(_DICT, self.modules), self.dicts))
                    and (not self.called or list(map(_call_state, self.called)) == self.called_state)
                    and (self.outer is None or self._outer_holds()))
        except Exception:  # noqa: BLE001 (an attribute replaced by a value whose == raises or is ambiguous)
            return False

    def host_spec(self) -> Tuple[list, list, Optional[tuple]]:
        """What the host guard records of this guard (``arm``): (module, snapshot, keys compared
        by identity) per module, the called modules, and the outer module's (module, snapshot,
        keys compared by identity, keys ignored), or None."""
        structures = [(module, snapshot, _BY_IDENTITY) for module, snapshot in zip(self.modules, self.snapshots)]
        outer = None
        if self.outer is not None:
            module = self.outer()
            if module is not None:
                outer = (module, self.outer_snapshot, _BY_IDENTITY, _OUTER_IGNORED)
        return structures, self.called, outer

    def _outer_holds(self) -> bool:
        outer = self.outer()
        if outer is None:
            return False
        state = outer.__dict__
        return (len(state) == self.outer_size and type(outer) is self.outer_type
                and self.outer_get(state) == self.outer_values)


def _call_state(module: nn.Module) -> Tuple:
    return (type(module), module.training, len(module._forward_hooks), len(module._forward_pre_hooks))


_DICT = operator.attrgetter("__dict__")
# The outer module's own hooks do not touch the plan (its forward runs it); its engine holds the plans.
_OUTER_IGNORED = frozenset(("_engine", "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                            "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                            "_backward_pre_hooks", "_is_full_backward_hook", "_state_dict_hooks",
                            "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"))


def _hooked_or_training(module: nn.Module) -> bool:
    return bool(module.training or module._forward_hooks or module._forward_pre_hooks)


class _TensorGuard:
    """Whether the parameters and buffers of modules are the tensors they were (identity and
    data pointer): a CUDA graph reads them at the addresses it was captured with."""

    def __init__(self, modules: List[nn.Module]):
        self.modules = modules
        self.tensors = self._tensors()
        self.pointers = [t.data_ptr() for t in self.tensors]

    def _tensors(self) -> List[Tensor]:
        return [t for m in self.modules for t in itertools.chain(m._parameters.values(), m._buffers.values())
                if t is not None]

    def holds(self) -> bool:
        current = self._tensors()
        return (len(current) == len(self.tensors) and all(map(operator.is_, current, self.tensors))
                and [t.data_ptr() for t in current] == self.pointers)


def _hidden_modules(called: List[nn.Module]) -> List[nn.Module]:
    """The modules a graph of a plan hides: those it calls as written and their submodules."""
    return list({id(m): m for c in called for m in c.modules()}.values())


def _why_not_hide(called: List[nn.Module]) -> Optional[str]:
    """Why a graph must not hide these modules' calls now (None: it may)."""
    hooked = [type(m).__name__ for m in _hidden_modules(called) if _hooked_or_training(m) or m._backward_hooks]
    if hooked:
        return ("the plan calls modules as written that have hooks or are in training mode ("
                + ", ".join(sorted(set(hooked))) + "): a graph would hide them")
    return None


class GraphGuard:
    """What a CUDA graph hides beyond the plan: the modules the plan calls as written (and their
    submodules). The graph replays only while none of them has a hook or training mode and their
    attributes, parameters and buffers are those it was captured with (made after the capture,
    which ran them)."""

    def __init__(self, called: List[nn.Module]):
        self.modules = _hidden_modules(called)
        self.structure = StructureGuard(self.modules)
        self.tensors = _TensorGuard(self.modules)

    def holds(self) -> bool:
        return self.structure.holds() and self.tensors.holds()

    def plain(self) -> bool:
        """No module the graph hides has a hook or training mode."""
        return not any(map(_hooked_or_training, self.modules))


class HostGuard:
    """The extension's record of everything a plan's guards read, taken right before they held
    (``arm``): ``holds(outer)`` is True only if none of it changed since, so the Python guards
    would hold again. Dict changes are seen by CPython's dict watchers (one generation counter,
    Python >= 3.12) or PEP 509 version tags (before); types, ``__dict__`` identities, list and set
    contents, the called modules' training flags and hook counts, and the tensors' version counters
    and data pointers are read directly (csrc/runtime/host_guard.cpp). A False answer means "ask
    the Python guards", not "changed".

    Args:
        capsule: what ``_C._guard_arm`` returned.
        holds: ``_C._guard_holds``.
    """

    __slots__ = ("capsule", "_holds")

    def __init__(self, capsule, holds):
        self.capsule = capsule
        self._holds = holds

    def holds(self, outer: Optional[nn.Module] = None) -> bool:
        """Whether nothing recorded changed.

        Args:
            outer: the module whose forward runs the plan (the backbone), where the structure
                guard armed from had one; its address is compared before anything of it is read.

        Returns:
            True when the guards it was armed from would hold now.
        """
        return self._holds(self.capsule, outer)


# The dicts ``_fast_path._global_hooks`` reads, and the namespace that holds them (a rebinding).
_GLOBAL_DICTS = (_module_state._global_forward_hooks, _module_state._global_forward_pre_hooks,
                 _module_state._global_backward_hooks, _module_state._global_backward_pre_hooks,
                 _module_state.__dict__)
_FUNCTIONS: list = []  # [ops.host_guard.HostGuardFunctions, or None where the host guard is off]
_FUNCTIONS_LOCK = threading.Lock()  # one self-check per process, whichever thread calls first


def host_guard_mechanism() -> Optional[str]:
    """How the host guard sees dict changes here ("dict watchers ..." or "dict version tags ..."),
    or None where it is not used: the extension is not loaded, ``FPN_FAST_HOST_GUARD=0``, or its
    self-check at first use failed (it warned then); calls then run the Python guards.

    Returns:
        A short description, or None.
    """
    functions = _functions()
    return None if functions is None else functions.mechanism()


def _functions():
    if not _FUNCTIONS:
        with _FUNCTIONS_LOCK:
            if not _FUNCTIONS:
                _FUNCTIONS.append(_self_checked())
    return _FUNCTIONS[0]


def arm(structures: Sequence[StructureGuard], weights: Sequence[WeightGuard] = (),
        graph: Optional[GraphGuard] = None) -> Optional[HostGuard]:
    """Record what these guards read. The caller runs them after it and keeps the record only if
    they hold then: a change before the record was taken is theirs to see, one after it the
    record's.

    Args:
        structures: structure guards (at most one with an outer module).
        weights: weight guards: their tensors' version counters and data pointers.
        graph: a CUDA graph's guard: its structure, and its tensors' data pointers.

    Returns:
        A HostGuard, or None where the host guard is not used or cannot record them (an inference
        tensor among the weights has no version counter): the Python guards then run each call.
    """
    functions = _functions()
    return None if functions is None else _arm(functions, structures, weights, graph)


def _arm(functions, structures, weights, graph, dicts=_GLOBAL_DICTS) -> Optional[HostGuard]:
    if graph is not None:
        structures = list(structures) + [graph.structure]
    modules, called, outer = [], [], None
    for guard in structures:
        parts, calls, its_outer = guard.host_spec()
        modules += parts
        called += calls
        outer = its_outer if its_outer is not None else outer
    convs = [module for guard in weights for module in guard.modules]
    pointers = [] if graph is None else graph.tensors.modules
    try:
        return HostGuard(functions.arm(modules, called, outer, convs, pointers, dicts), functions.holds)
    except Exception:  # noqa: BLE001 (what it cannot record: the Python guards decide each call)
        return None


def _self_checked():
    """The host guard's functions, after checking that they notice an attribute set, an in-place
    weight write, a hook and a watched dict's change (as a global hook's registration) on probes
    of their own; None (with a warning) where they miss one, or where there are none
    (``ops.host_guard.functions``)."""
    functions = _host_guard.functions()
    if functions is None:
        return None
    # The first call may come under inference_mode (plain tensors here) and autocast (no casts here:
    # the probe's tensors are on the CPU).
    with torch.inference_mode(False), torch.autocast("cpu", enabled=False):
        missed = _missed_changes(functions)
    if missed:
        warnings.warn("fpn_fast: the extension's host guard did not notice " + ", ".join(missed)
                      + " on this Python; each call runs the Python guards instead", RuntimeWarning, stacklevel=3)
        return None
    return functions


def _missed_changes(functions) -> List[str]:
    probe = nn.Module()  # a parameter and attributes, as a folded convolution has
    probe.weight = nn.Parameter(torch.zeros(1), requires_grad=False)
    probe.stride = (1, 1)
    probe._weights_generation = 0
    hooks = collections.OrderedDict()  # stands for the global hook dicts (not touched: other threads run)
    changes = [("an attribute set", lambda: setattr(probe, "stride", (2, 2))),
               ("an in-place weight write", lambda: _in_place(probe.weight)),
               ("a forward hook", lambda: probe.register_forward_hook(lambda *args: None).remove()),
               ("a watched dict's new key", lambda: hooks.__setitem__(len(hooks), None))]
    missed = []
    for what, change in changes:
        guard = None
        # Another thread may change a watched dict meanwhile (>= 3.12: one counter for all): a record
        # that does not hold before the change is taken again; what counts is a change missed.
        for _ in range(5):
            guard = _arm(functions, [StructureGuard([probe])], [WeightGuard([probe])], None, (hooks,))
            if guard is None or guard.holds():
                break
        if guard is None or not guard.holds():
            missed.append(f"{what} (it could not record an unchanged probe)")
            continue
        change()
        if guard.holds():
            missed.append(what)
    return missed


def _in_place(weight: Tensor) -> None:
    with torch.no_grad():
        weight.add_(1)
