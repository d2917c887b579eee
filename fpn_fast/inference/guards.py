"""What a plan may assume between calls, checked per call: the weights it was built from
(``WeightGuard``), the modules it was built from (``StructureGuard``), and what a CUDA graph hides
beyond the plan (``GraphGuard``). Each check is a few C-level comparisons per module; see
docs/design.md ("Inference engine", invariants) for what each guards and why.
"""
import copy
import itertools
import operator
import weakref
from typing import List, Optional, Sequence, Tuple

from torch import Tensor, nn


__all__ = ["WeightGuard", "StructureGuard", "GraphGuard"]


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
            self.outer_values = tuple(_snapshot({key: state[key] for key in keys}).values())

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
