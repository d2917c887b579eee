"""Plan once per input signature, then only run: the optimized backbone's inference engine.

A *signature* is everything a decision of the forward depends on besides the weights: the
input's shape, strides (memory format), dtype and device, the autocast dtype, the grad and
inference modes, the fpn_fast backend in force, and the convolution flags (oneDNN on CPU; cuDNN
and its TF32 flag on CUDA). On the first call with a new signature ``build_plan`` walks the
optimized backbone once with the real input: every step's implementation is resolved
(``select.py``), its packs are made, and the steps are written out as one straight-line Python
function (generated source, like ``torch.fx``'s), whose result is that call's output. Later calls
with the signature are one lookup, the weight guard, and that function: no module calls, no
dispatch, no exactness predicates.

Invariants (docs/design.md, "Inference engine"):
- A plan is valid for the weights it was built from: ``WeightGuard`` holds each folded
  convolution's weight and bias objects and compares, per call, their identity, version counter,
  data pointer and the module's generation (``Conv2dAct``'s invalidation, issue 22). Any change
  drops every plan of the model.
- A plan is valid for the modules it was built from: ``StructureGuard`` keeps, for every module
  whose call it elides (and the backbone), its type and a copy of its attributes (submodules,
  hook dicts, training flag, options such as ``channels_last``, ``fuse_lateral``, ``relu``,
  ``stride``, ``return_layers``), compared per call. A replaced submodule or a changed option
  drops every plan; a hook or training mode on an elided module makes the call run the modules
  as written (the plans stay for when it is gone), as do torch's global hooks.
- A module the plan cannot elide (another type, or one with hooks when the plan was built) is
  called as written by the plan, so its hooks and attributes take effect per call. A CUDA graph
  would hide those calls, so a plan is captured only while such modules have no hooks and are in
  eval mode, and its graph replays only while their attributes, parameters and buffers are
  those it was captured with (``_GraphGuard``); otherwise the plan runs without its graph.
- Captured graphs, scripting, tracing, torch's Python modes and exports never see a plan (they
  take the modules); a call made while the current CUDA stream is capturing runs the plan's steps
  (never its graph, never a build, which measures).
"""
import copy
import itertools
import operator
import threading
import warnings
import weakref
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_state

from .. import ops
from ..backbone import IntermediateLayerGetter
from ..fpn import LastLevelMaxPool, check_fpn_inputs
from ..ops import dispatch as _dispatch
from ..ops.lateral._triton import cudnn_conv_allows_tf32
from . import select

__all__ = ["signature", "Plan", "PlanError", "build_plan", "WeightGuard", "StructureGuard", "Engine"]


class PlanError(RuntimeError):
    """The backbone holds something a plan cannot express; its modules then run as written."""


def signature(x: Tensor) -> Tuple:
    """What the forward's decisions depend on besides the weights (see the module docstring).

    Args:
        x: the backbone's input, Tensor[N, C, H, W] or [C, H, W].

    Returns:
        A hashable tuple.
    """
    device = x.device
    kind = device.type
    if kind == "cuda":
        flags = (torch.backends.cudnn.enabled, cudnn_conv_allows_tf32(), torch.backends.cudnn.deterministic,
                 torch.backends.cudnn.benchmark, torch.are_deterministic_algorithms_enabled())
    else:  # the thread count decides the Winograd routes' chunks and NNPACK's slices
        flags = (torch._C._get_mkldnn_enabled(), torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    return (x.shape, x.stride(), x.dtype, device, autocast, torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(), _dispatch.get_backend(), flags)


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


def _global_hooks() -> bool:
    return bool(_module_state._global_forward_hooks or _module_state._global_forward_pre_hooks)


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


class _GraphGuard:
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


class Plan:
    """The backbone's forward for one signature: ``run(x)`` (generated straight-line code over
    the runners ``select.py`` chose), the modules whose calls it elides and those it calls as
    written, and its guards.

    Attributes:
        run: Tensor -> OrderedDict[str, Tensor], the plan itself.
        source: the generated code (for reading; ``print(plan.source)``).
        resolutions: how many dispatch resolutions building it made (later runs make none).
        elided: the modules whose calls it does itself (a hook or training mode on one makes
            ``applies()`` False). called: the modules it calls as written.
        guard: the WeightGuard of the folded convolutions. structure: the StructureGuard of the
            elided and called modules and the backbone.
    """

    def __init__(self, run: Callable[[Tensor], Dict[str, Tensor]], source: str, elided: List[nn.Module],
                 guard: WeightGuard, resolutions: int, called: Optional[List[nn.Module]] = None,
                 structure: Optional[StructureGuard] = None):
        self.run = run
        self.source = source
        self.elided = elided
        self.guard = guard
        self.resolutions = resolutions
        self.called = list(called or [])
        self.structure = structure if structure is not None else StructureGuard(elided)

    def applies(self) -> bool:
        """Whether the plan may run now: no hook or training mode on a module it elides, no
        global hook (the weights and the structure are checked by the guards)."""
        return not (_global_hooks() or any(map(_hooked_or_training, self.elided)))


class _Writer:
    """Writes a plan while running it: each ``call`` runs one step on the real values (so the next
    step can be decided on them) and appends the matching line of the generated function."""

    def __init__(self):
        self.lines: List[str] = []
        self.namespace: Dict[str, object] = {"OrderedDict": OrderedDict}
        self.names = itertools.count()
        self.elided: List[nn.Module] = []
        self.convs: List[nn.Module] = []
        self.called: List[nn.Module] = []  # modules the plan calls as written

    def constant(self, value) -> str:
        name = f"c{next(self.names)}"
        self.namespace[name] = value
        return name

    def item(self, listed: str, index: int, value: Tensor) -> Tuple[str, Tensor]:
        """The variable holding ``listed[index]`` (a step that returned a list)."""
        target = f"v{next(self.names)}"
        self.lines.append(f"{target} = {listed}[{index}]")
        return target, value

    def call(self, fn: Callable, args: List[Optional[str]], values: List):
        """Run ``fn(*values)``; the generated line passes the variables ``args`` (None: None)."""
        result = fn(*values)
        target = f"v{next(self.names)}"
        self.lines.append(f"{target} = {self.constant(fn)}({', '.join(a if a else 'None' for a in args)})")
        return target, result


def _plain(module: nn.Module, kind) -> bool:
    return type(module) is kind and not (module._forward_hooks or module._forward_pre_hooks or
                                         module._backward_hooks or module._backward_pre_hooks)


def build_plan(backbone: nn.Module, x: Tensor) -> Tuple[Plan, Dict[str, Tensor]]:
    """Decide every step of ``backbone(x)`` (an ``InferenceBackboneWithFPN``) for x's signature.

    Args:
        backbone: the optimized backbone.
        x: the call's input.

    Returns:
        (the plan, this call's output, computed while deciding).

    Raises:
        PlanError: a part of the backbone the plan cannot express (the caller runs it as written).
    """
    from .modules import Conv2dAct, FoldedResidualBlock, InferenceFPN  # the modules import this file

    body, fpn = backbone.body, backbone.fpn
    # Everything that can refuse a plan is checked before any step runs (no module call twice).
    if type(body) not in _layer_getters():
        raise PlanError(f"the body is a {type(body).__name__}, not fpn_fast's IntermediateLayerGetter")
    if type(fpn) is not InferenceFPN:
        raise PlanError(f"the FPN is a {type(fpn).__name__}, not an InferenceFPN")
    counted = _count_resolutions()
    writer = _Writer()
    var, value = "x", x
    if value.dim() == 3:
        var, value = writer.call(Tensor.unsqueeze, [var, writer.constant(0)], [value, 0])
    if backbone.channels_last:
        var, value = writer.call(_to_channels_last, [var], [value])

    def conv(module, var, value, residual=(None, None)):
        writer.elided.append(module)
        writer.convs.append(module)
        runner = select.conv2d_act_runner(module, value, residual[1])
        return writer.call(runner, [var, residual[0]], [value, residual[1]])

    def walk(module, var, value):
        if _plain(module, nn.Identity):
            writer.elided.append(module)
            return var, value
        if _plain(module, Conv2dAct):
            return conv(module, var, value)
        if _plain(module, FoldedResidualBlock) and _plain(module.last, Conv2dAct):
            writer.elided.append(module)
            shortcut = (var, value) if module.downsample is None else walk(module.downsample, var, value)
            branch = walk(module.convs, var, value)
            return conv(module.last, branch[0], branch[1], residual=shortcut)
        if _plain(module, nn.Sequential):
            writer.elided.append(module)
            for child in module:
                var, value = walk(child, var, value)
            return var, value
        if _plain(module, nn.MaxPool2d) and not module.return_indices:
            writer.elided.append(module)
            pool = _max_pool(module)
            return writer.call(pool, [var], [value])
        writer.called.append(module)
        return writer.call(module, [var], [value])  # called as written: its hooks run

    writer.elided.append(body)
    # As IntermediateLayerGetter's forward: one entry per output name (a later layer of the same
    # name takes the value, the first keeps the place).
    by_name: "OrderedDict[str, Tuple[str, Tensor]]" = OrderedDict()
    for name, child in body.items():
        var, value = walk(child, var, value)
        if name in body.return_layers:
            by_name[body.return_layers[name]] = (var, value)
    features = [(name, v, t) for name, (v, t) in by_name.items()]
    writer.elided.extend([fpn, fpn.inner_blocks, fpn.layer_blocks])  # the lists the FPN's steps index
    outputs = _plan_fpn(writer, fpn, features, walk)
    source = "def run(x):\n" + "".join(f"    {line}\n" for line in writer.lines)
    source += "    return OrderedDict([" + ", ".join(f"({name!r}, {v})" for name, v, _ in outputs) + "])\n"
    exec(compile(source, "<fpn_fast plan>", "exec"), writer.namespace)  # noqa: S102 (our own generated code)
    plan = Plan(writer.namespace["run"], source, writer.elided, WeightGuard(writer.convs), counted(),
                called=writer.called, structure=StructureGuard(writer.elided, outer=backbone, called=writer.called))
    return plan, OrderedDict((name, value) for name, _, value in outputs)


def _plan_fpn(writer: _Writer, fpn: nn.Module, features, walk) -> List[Tuple[str, str, Tensor]]:
    """The InferenceFPN's forward (top-down pathway, output convolutions small to large, extra
    block, output layout) written as steps."""
    from .modules import Conv2dAct

    names = [name for name, _, _ in features]
    check_fpn_inputs(names, [value for _, _, value in features], fpn.in_channels_list)
    last = len(features) - 1
    inners: List[Tuple[str, Tensor]] = [None] * len(features)  # type: ignore[list-item]
    top: Tuple[Optional[str], Optional[Tensor]] = (None, None)
    for level in range(last, -1, -1):
        _, var, value = features[level]
        block = fpn.inner_blocks[level]
        if _plain(block, Conv2dAct):
            writer.elided.append(block)
            writer.convs.append(block)
            runner = select.lateral_runner(block, value, top[1], fpn.fuse_lateral)
            inners[level] = writer.call(runner, [var, top[0]], [value, top[1]])
        else:
            writer.called.append(block)
            lateral = writer.call(block, [var], [value])
            inners[level] = lateral if top[0] is None else writer.call(
                ops.upsample_add, [lateral[0], top[0]], [lateral[1], top[1]])
        top = inners[level]
    blocks = list(fpn.layer_blocks)
    direct = [_plain(block, Conv2dAct) and not block.relu and not fpn.output_channels_last for block in blocks]
    inputs = list(inners)
    for level, block in enumerate(blocks):
        if direct[level] and ops.conv2d_nchw_input_format(
                inners[level][1], block.weight, block.bias, block.stride, block.padding, block.dilation,
                block.groups, winograd=getattr(block, "winograd", True)) == torch.contiguous_format:
            inputs[level] = writer.call(select.to_nchw_runner(inners[level][1]), [inners[level][0]],
                                        [inners[level][1]])
    results: List[Tuple[str, Tensor]] = [None] * len(blocks)  # type: ignore[list-item]
    for level in sorted(range(len(blocks)), key=lambda i: inputs[i][1].shape[-2] * inputs[i][1].shape[-1]):
        block = blocks[level]
        if direct[level]:
            writer.elided.append(block)
            writer.convs.append(block)
            results[level] = writer.call(select.conv2d_nchw_runner(block, inputs[level][1]), [inputs[level][0]],
                                         [inputs[level][1]])
        else:
            results[level] = walk(block, *inners[level])
    extra = fpn.extra_blocks
    if extra is None:
        pass
    elif _plain(extra, LastLevelMaxPool):
        writer.elided.append(extra)
        results.append(writer.call(select.stride2_pool_runner(results[-1][1]), [results[-1][0]],
                                   [results[-1][1]]))
        names = names + ["pool"]
    else:  # another extra block (e.g. RetinaNet's LastLevelP6P7): called as written, hooks and all
        count = len(results)
        writer.called.append(extra)
        call = _ExtraBlockCall(extra, count, names)
        listed, values = writer.call(call, [v for v, _ in results] + [v for _, v, _ in features],
                                     [value for _, value in results] + [value for _, _, value in features])
        names = call.names
        results = [writer.item(listed, i, value) for i, value in enumerate(values)]
    outputs = []
    for name, (var, value) in zip(names, results):
        if fpn.output_channels_last:
            var, value = writer.call(_to_channels_last, [var], [value])
        else:
            var, value = writer.call(select.to_nchw_runner(value), [var], [value])
        outputs.append((name, var, value))
    return outputs


def _layer_getters():
    """fpn_fast's IntermediateLayerGetter and torchvision's (same forward), the bodies a plan walks."""
    from .fold import _torchvision_classes
    return (IntermediateLayerGetter, *[kind for kind in _torchvision_classes()["ordered"]
                                       if kind.__name__ == "IntermediateLayerGetter"])


class _ExtraBlockCall:
    """``extra_blocks(results, features, names)`` as one plan step taking the maps one by one and
    returning the new results list; the output names, decided by the block, are kept from the
    call that planned it."""

    def __init__(self, block: nn.Module, count: int, names: List[str]):
        self.block, self.count, self.given, self.names = block, count, list(names), list(names)

    def __call__(self, *maps: Tensor) -> List[Tensor]:
        results, self.names = self.block(list(maps[:self.count]), list(maps[self.count:]), list(self.given))
        return results


def _to_channels_last(x: Tensor) -> Tensor:
    return x.contiguous(memory_format=torch.channels_last)


def _max_pool(module: nn.MaxPool2d) -> Callable[[Tensor], Tensor]:
    """nn.MaxPool2d's forward as one call of the op F.max_pool2d ends in."""
    kernel, stride, padding, dilation, ceil = (module.kernel_size, module.stride, module.padding, module.dilation,
                                               module.ceil_mode)
    return lambda x: torch.max_pool2d(x, kernel, stride, padding, dilation, ceil)


def _count_resolutions() -> Callable[[], int]:
    """A counter of the dispatch resolutions made from now on (``_dispatch.RESOLUTIONS``)."""
    start = _dispatch.resolution_count()
    return lambda: _dispatch.resolution_count() - start


class _Entry:
    """One signature's plan and its CUDA graph, or why it has none.

    Attributes:
        plan: the Plan, or None where the backbone cannot be planned (its modules run as written
            while ``structure`` holds, i.e. until a module it covers changes).
        graphed, graph_guard: the captured graph and what it hides (``_GraphGuard``), or None.
        captures: graphs captured for it (a graph whose hidden modules changed is captured again,
            at most ``MAX_CAPTURES`` times in all).
        reason: why there is no plan, or no graph.
    """

    def __init__(self, plan: Optional[Plan], reason: Optional[str] = None,
                 structure: Optional[StructureGuard] = None):
        self.plan = plan
        self.structure = structure
        self.graphed = None
        self.graph_guard: Optional[_GraphGuard] = None
        self.captures = 0
        self.reason = reason
        self.hits = 0

    def retire(self) -> None:
        """Forget the graph once its last replay is done (its memory may be reused at once)."""
        if self.graphed is not None:
            self.graphed.retire()
            self.graphed = self.graph_guard = None


MAX_CAPTURES = 3


class Engine:
    """The optimized backbone's plans by signature (least recently used evicted beyond
    ``max_plans``), their CUDA graphs, and the graph memory pools.

    Calls may come from several threads: lookups and runs take no lock; building, capturing and
    evicting take the engine's lock (a call that finds no valid plan looks again once it holds
    it); replays of graphs sharing a pool take turns (``cuda_graphs.ReplayQueue``).

    Args:
        max_plans: signatures kept (each holds its packs and, on CUDA, its graph's memory).
        cuda_graphs: capture CUDA plans as graphs.
        static_outputs: return a graph's static output tensors (overwritten by the next call of
            the same signature) instead of copies of them; each graph then has a memory pool of
            its own, so no other signature's replay writes into them.
    """

    def __init__(self, max_plans: int = 8, cuda_graphs: bool = True, static_outputs: bool = False):
        if max_plans < 1:
            raise ValueError(f"max_plans must be at least 1, got {max_plans}")
        self.max_plans = max_plans
        self.cuda_graphs = cuda_graphs
        self.static_outputs = static_outputs
        self.entries: "OrderedDict[Tuple, _Entry]" = OrderedDict()
        self.pools: Dict[torch.device, object] = {}  # device -> the shared pool's (handle, replay queue)
        self.capture_streams: Dict[torch.device, object] = {}
        self.warned: set = set()
        self.builds = 0
        self.lock = threading.RLock()

    def __call__(self, backbone: nn.Module, x: Tensor) -> Dict[str, Tensor]:
        key = signature(x)
        capturing = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        entry = self.entries.get(key)
        if entry is not None:
            out = self._serve(entry, backbone, x, key, capturing)
            if out is not None:
                return out
        return self._slow(backbone, x, key, capturing)

    def _serve(self, entry: _Entry, backbone: nn.Module, x: Tensor, key: Tuple, capturing: bool):
        """The call's output from a cached entry, or None where the entry does not serve it."""
        plan = entry.plan
        if plan is None:
            # Cannot be planned: as written, until a module changes.
            return backbone._run_as_written(x) if entry.structure.holds() else None
        if not (plan.structure.holds() and plan.guard.holds()) or _global_hooks():
            return None
        if key[5] and _needs_grad(x, plan.guard):  # autograd would record: refuse as eager does
            return backbone._run_as_written(x)
        entry.hits += 1
        try:
            self.entries.move_to_end(key)
        except KeyError:  # evicted by another thread meanwhile
            pass
        if capturing:
            # Inside a user's capture: the plan's steps (never a replay). Under autocast they would
            # bake in the weights' casts made at build time, which the user's graph would then keep.
            return plan.run(x) if key[4] is None else backbone._run_as_written(x)
        graphed, guard = entry.graphed, entry.graph_guard
        if graphed is None or guard is None:
            return plan.run(x)
        if guard.holds():
            return graphed(x, self.static_outputs)
        if not guard.plain():  # a hook or training mode the plan's calls honour
            return plan.run(x)
        with self.lock:  # what the graph hides changed: capture again (a few times at most)
            if entry.graph_guard is guard:
                entry.retire()
                if entry.captures < MAX_CAPTURES:
                    self._capture(entry, x, key)
                else:
                    entry.reason = ("the modules the plan calls as written changed after each of its "
                                    f"{MAX_CAPTURES} captures: it runs without a graph")
                    _cuda_graphs().warn_once(self.warned, entry.reason)
        return plan.run(x)

    def _slow(self, backbone: nn.Module, x: Tensor, key: Tuple, capturing: bool) -> Dict[str, Tensor]:
        """A call the cached plans do not serve: as written (hooks, training, a capture in
        progress), or a new plan."""
        with self.lock:
            entry = self.entries.get(key)
            if entry is not None:  # another thread may have just built it
                out = self._serve(entry, backbone, x, key, capturing)
                if out is not None:
                    return out
            if (capturing or backbone.training or _global_hooks() or _hooked_or_training(backbone.body)
                    or _hooked_or_training(backbone.fpn)):
                return backbone._run_as_written(x)
            if entry is not None and entry.plan is not None and not entry.plan.applies():
                return backbone._run_as_written(x)  # a hook or training mode on a module it elides
            return self._build(backbone, x, key)

    def _build(self, backbone: nn.Module, x: Tensor, key: Tuple) -> Dict[str, Tensor]:
        from .modules import _check_inference
        _check_inference(backbone.training, "InferenceBackboneWithFPN", [x])  # raises as eager would
        if key[5] and any(p.requires_grad for p in backbone.parameters()):
            return backbone._run_as_written(x)  # the folded modules raise as eager does
        self._drop_stale()
        try:
            plan, out = build_plan(backbone, x)
        except PlanError as err:
            return self._unplanned(backbone, key, str(err), backbone._run_as_written(x))
        except Exception as err:  # bad input: the modules as written raise the eager error, named there
            out = backbone._run_as_written(x)
            return self._unplanned(backbone, key, f"planning raised {type(err).__name__}: {err}", out)
        self.builds += 1
        entry = _Entry(plan)
        if x.device.type == "cuda" and self.cuda_graphs:
            self._capture(entry, x, key)
        elif x.device.type != "cuda":
            entry.reason = f"CUDA graphs need CUDA tensors; the input is on {x.device}"
        self._store(key, entry)
        return out

    def _unplanned(self, backbone: nn.Module, key: Tuple, reason: str, out):
        """Remember that the signature runs as written (until the backbone's modules change)."""
        structure = StructureGuard([backbone.body, backbone.fpn], outer=backbone)
        self._store(key, _Entry(None, reason=reason, structure=structure))
        if reason not in self.warned:
            self.warned.add(reason)
            warnings.warn(f"fpn_fast: the optimized backbone runs its modules as written: {reason}", stacklevel=4)
        return out

    def _capture(self, entry: _Entry, x: Tensor, key: Tuple) -> None:
        """Capture the entry's plan as a CUDA graph (the engine's lock held), or say why not."""
        cuda_graphs = _cuda_graphs()
        called = entry.plan.called
        reason = cuda_graphs.why_not_capturable(x) or _why_not_hide(called)
        if reason is None:
            device = x.device
            stream = self.capture_streams.get(device)
            if stream is None:
                stream = self.capture_streams[device] = torch.cuda.Stream(device)
            if self.static_outputs:  # a pool of its own: no other graph writes into its outputs
                pool, queue = None, cuda_graphs.ReplayQueue()
            else:
                if device not in self.pools:
                    self.pools[device] = (torch.cuda.graph_pool_handle(), cuda_graphs.ReplayQueue())
                pool, queue = self.pools[device]
            entry.captures += 1
            try:
                entry.graphed = cuda_graphs.capture(entry.plan.run, x, pool, key[4], stream, queue)
                entry.graph_guard = _GraphGuard(called)  # after the capture, which ran the called modules
            except Exception as err:  # an op that synchronises, or another that graphs do not allow
                reason = f"capturing the plan failed: {type(err).__name__}: {err}"
        entry.reason = reason
        if reason is not None:
            cuda_graphs.warn_once(self.warned, reason)

    def _drop_stale(self) -> None:
        """Drop the plans whose weights or modules changed (they hold packs and graph memory); a
        plan that fails only because a module it elides has a hook stays for when it is gone."""
        for key, entry in list(self.entries.items()):
            if entry.plan is None:
                stale = entry.structure is not None and not entry.structure.holds()
            else:
                stale = not entry.plan.guard.holds() or (not entry.plan.structure.holds() and entry.plan.applies())
            if stale:
                self.entries.pop(key, None)
                entry.retire()

    def _store(self, key: Tuple, entry: _Entry) -> None:
        self.entries[key] = entry
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_plans:
            self.entries.popitem(last=False)[1].retire()

    def info(self) -> List[Dict[str, object]]:
        """One dict per cached signature, least recently used first: ``signature`` (the tuple),
        ``planned`` (False: runs as written), ``graph`` (captured?), ``reason`` (why not planned
        or not captured), ``hits``, ``graph_bytes`` (device memory its capture added: the bytes the
        graph's memory pool grew by while capturing it, plus its static input; graphs sharing a
        pool reuse each other's intermediates, so a later graph may add little; 0 without a graph)."""
        with self.lock:
            items = list(self.entries.items())
        return [dict(signature=key, planned=entry.plan is not None, graph=entry.graphed is not None,
                     reason=entry.reason, hits=entry.hits,
                     graph_bytes=entry.graphed.captured_bytes if entry.graphed is not None else 0)
                for key, entry in items]


def _cuda_graphs():
    from . import cuda_graphs  # imported on first use: CPU-only processes never load it
    return cuda_graphs


def _needs_grad(x: Tensor, guard: WeightGuard) -> bool:
    """Grad mode is on (the caller checked) and the input or a folded weight requires grad."""
    return x.requires_grad or any(map(operator.attrgetter("requires_grad"), guard.tensors()))
