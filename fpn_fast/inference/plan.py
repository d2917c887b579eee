"""Plan once per input signature, then only run: the optimized backbone's plans, recorded.

A *signature* (``Signature``) is everything a decision of the forward depends on besides the
weights: the input's shape, strides (memory format), dtype and device, the autocast dtype, the
grad and inference modes, the fpn_fast backend in force, and the convolution flags (oneDNN on
CPU; cuDNN and its TF32 flag on CUDA). On the first call with a new signature ``build_plan`` runs
the backbone's own forward once, with the real input, under ``ops.runner.recording``: every op's
runner it calls (decided by the op's dispatch rows, as any eager call decides it) appends itself
and its arguments to the plan, and so does every module the plan cannot see into (another type,
or one with hooks: called as written, its hooks firing per call). The plan is that tape, written
out as one straight-line Python function (generated source, like ``torch.fx``'s) whose constants
are the runners, the weights and their packs; its result is that call's output. Later calls with
the signature are one lookup, the guards, and that function: no module calls, no dispatch.
Nothing of the forward is written twice, so the plan cannot drift from the modules.

Invariants (docs/design.md, "Inference engine"):
- A plan is valid for the weights it was built from: ``WeightGuard`` holds each folded
  convolution's weight and bias objects and compares, per call, their identity, version counter,
  data pointer and the module's generation (``Conv2dAct``'s invalidation). Any change drops every
  plan of the model.
- A plan is valid for the modules it was built from: ``StructureGuard`` keeps, for every module
  whose call it elides (and the backbone), its type and a copy of its attributes, compared per
  call. A replaced submodule or a changed option drops every plan; a hook or training mode on an
  elided module makes the call run the modules as written (the plans stay for when it is gone).
- A module the plan calls as written has its hooks and attributes take effect per call. A CUDA
  graph would hide those calls, so a plan is captured only while such modules have no hooks and
  are in eval mode (``guards.GraphGuard``).
- A value the plan would have to take from the forward but that no recorded call produced (an
  untracked computation) refuses the plan (``PlanError``), so it is never baked in as a constant.
"""
import itertools
import weakref
from collections import OrderedDict
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from .._fast_path import _global_hooks, runs_as_written
from ..backbone import IntermediateLayerGetter
from ..fpn import LastLevelMaxPool
from ..ops import dispatch as _dispatch
from ..ops.casts import source_of as cast_source
from ..ops.measure import cuda_flags
from ..ops.runner import Step, active, recording
from .folded_conv import Conv2dAct
from .guards import StructureGuard, WeightGuard, _hooked_or_training
from .modules import FoldedResidualBlock, InferenceFPN

__all__ = ["Signature", "signature", "Plan", "PlanError", "build_plan"]


class PlanError(RuntimeError):
    """The forward did something a plan cannot replay; its modules then run as written."""


class Signature(NamedTuple):
    """What the forward's decisions depend on besides the weights and the modules."""
    shape: torch.Size
    stride: Tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    autocast: Optional[torch.dtype]
    grad_enabled: bool
    inference_mode: bool
    backend: str
    flags: tuple


def signature(x: Tensor) -> Signature:
    """The signature of a call of the backbone with input x.

    Args:
        x: the backbone's input, Tensor[N, C, H, W] or [C, H, W].

    Returns:
        A Signature (a hashable NamedTuple).
    """
    device = x.device
    kind = device.type
    if kind == "cuda":
        flags = cuda_flags()
    else:  # the thread count decides the Winograd routes' chunks and NNPACK's slices
        flags = (torch._C._get_mkldnn_enabled(), torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    autocast = _dispatch.autocast_dtype(kind)
    return Signature(x.shape, x.stride(), x.dtype, device, autocast, torch.is_grad_enabled(),
                     torch.is_inference_mode_enabled(), _dispatch.get_backend(), flags)


class Route(NamedTuple):
    """One op step of a plan: the ``op``, the ``route`` its runner takes, the ``module`` whose
    weight it uses (its name in the backbone, or None), the measured ``decision`` (an
    ``ops.measure.Decision``, or None where the route was not measured), and ``via``: the route
    of another op's runner that this route runs, or None (``ops.runner.Runner.via``)."""
    op: str
    route: str
    module: Optional[str]
    decision: object
    via: Optional[str] = None


class Plan:
    """The backbone's forward for one signature: ``run(x)`` (generated straight-line code over
    the recorded runners), the modules whose calls it elides and those it calls as written, and
    its guards.

    Attributes:
        run: Tensor -> OrderedDict[str, Tensor], the plan itself.
        source: the generated code (for reading; ``print(plan.source)``).
        routes: a ``Route`` per op step, in order.
        elided: the modules whose calls it does itself (a hook or training mode on one makes
            ``applies()`` False). called: the modules it calls as written.
        guard: the WeightGuard of the folded convolutions. structure: the StructureGuard of the
            elided and called modules and the backbone.
        input_format: torch.channels_last where the plan's only use of its input is converting
            it to channels_last (a CUDA graph then takes the image in channels_last: one copy),
            else None.
    """

    def __init__(self, run: Callable[[Tensor], Dict[str, Tensor]], source: str, elided: List[nn.Module],
                 guard: WeightGuard, called: List[nn.Module], structure: StructureGuard, routes: List[Route],
                 input_format: Optional[torch.memory_format] = None):
        self.run, self.source, self.routes, self.input_format = run, source, routes, input_format
        self.elided, self.called = elided, called
        self.guard, self.structure = guard, structure

    def applies(self) -> bool:
        """Whether the plan may run now: no hook or training mode on a module it elides, no
        global hook (the weights and the structure are checked by the guards)."""
        return not (_global_hooks() or any(map(_hooked_or_training, self.elided)))


def _transparent_types() -> tuple:
    """The module types whose forward a plan sees through: made only of op runners and calls of
    their children (containers included). Every other module is called as written."""
    from .fold import _torchvision_classes
    getters = [kind for kind in _torchvision_classes()["ordered"] if kind.__name__ == "IntermediateLayerGetter"]
    return (IntermediateLayerGetter, *getters, nn.Sequential, nn.Identity, nn.ModuleList, nn.ModuleDict,
            FoldedResidualBlock, Conv2dAct, InferenceFPN, LastLevelMaxPool)


def _classify(backbone: nn.Module) -> Tuple[List[nn.Module], List[nn.Module], List[nn.Module]]:
    """(elided, translated, opaque): the modules under the backbone a plan sees through (and
    nn.MaxPool2d, which it runs as the one op its forward ends in), and the outermost ones it
    calls as written (another type, a subclass, hooks or parametrizations)."""
    transparent = _transparent_types()
    elided, translated, opaque = [], [], []

    def visit(module: nn.Module) -> None:
        if runs_as_written(module, transparent):
            elided.append(module)
            for child in module.children():
                visit(child)
        elif runs_as_written(module, nn.MaxPool2d) and not module.return_indices:
            elided.append(module)
            translated.append(module)
        else:
            opaque.append(module)
    visit(backbone.body)
    visit(backbone.fpn)
    return elided, translated, opaque


def _max_pool(module: nn.MaxPool2d) -> Callable[[Tensor], Tensor]:
    """nn.MaxPool2d's forward as one call of the op F.max_pool2d ends in."""
    kernel, stride, padding, dilation, ceil = (module.kernel_size, module.stride, module.padding, module.dilation,
                                               module.ceil_mode)
    return lambda x: torch.max_pool2d(x, kernel, stride, padding, dilation, ceil)


class _Writer:
    """Writes the plan's function from the recorded steps, as they return: each step's line
    takes earlier steps' values by name and everything else as constants."""

    def __init__(self, x: Tensor, weight_names: Dict[int, str]):
        self.lines: List[str] = []
        self.namespace: Dict[str, object] = {"OrderedDict": OrderedDict}
        self.names = itertools.count()
        self.known: Dict[int, Tuple[weakref.ref, str]] = {}
        self.weight_names = weight_names
        self.called: List[nn.Module] = []
        self.routes: List[Route] = []
        self.input_uses: List[Optional[str]] = []  # per use of the input x: the runner's op (None: no runner)
        self.bind(x, "x")

    def constant(self, value) -> str:
        name = f"c{next(self.names)}"
        self.namespace[name] = value
        return name

    def bind(self, value, expression: str) -> None:
        """Name every tensor in a step's result (lists, tuples and dicts of them included)."""
        if isinstance(value, Tensor):
            self.known[id(value)] = (weakref.ref(value), expression)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                self.bind(item, f"{expression}[{i}]")
        elif isinstance(value, dict):
            for key, item in value.items():
                self.bind(item, f"{expression}[{self.constant(key)}]")

    def expression(self, value, dynamic: bool) -> str:
        """Python for an argument: an earlier step's value, a literal, or a constant. A tensor
        in a dynamic position (computed by the forward) must be an earlier step's."""
        if isinstance(value, Tensor):
            entry = self.known.get(id(value))
            if entry is not None and entry[0]() is value:
                return entry[1]
            if dynamic:
                raise PlanError(f"a {tuple(value.shape)} tensor the forward computed outside any recorded op "
                                "reaches a recorded call (nothing would recompute it per call)")
            return self.constant(value)
        if isinstance(value, list):  # a fresh list per call: a callee may append to it
            return "[" + ", ".join(self.expression(v, dynamic) for v in value) + "]"
        if isinstance(value, tuple):
            return "(" + "".join(self.expression(v, dynamic) + ", " for v in value) + ")"
        if value is None or isinstance(value, (bool, int)):
            return repr(value)
        return self.constant(value)

    def record(self, step: Step) -> None:
        dynamic = step.dynamic
        self.input_uses += [step.runner.op if step.runner is not None else None
                            for i, a in enumerate(step.args) if (dynamic is None or i in dynamic) and self.is_input(a)]
        self.input_uses += [None for v in step.kwargs.values() if self.is_input(v)]
        args = [self.expression(a, dynamic is None or i in dynamic) for i, a in enumerate(step.args)]
        args += [f"{k}={self.expression(v, True)}" for k, v in step.kwargs.items()]
        target = f"v{next(self.names)}"
        self.lines.append(f"{target} = {self.constant(step.fn)}({', '.join(args)})")
        self.bind(step.result, target)
        if step.module is not None:
            self.called.append(step.module)
        if step.runner is not None:
            weight = next((name for i, a in enumerate(step.args) if i not in step.runner.dynamic
                           for name in (self.weight_name(a),) if name is not None), None)
            self.routes.append(Route(step.runner.op, step.runner.route, weight, step.runner.decision,
                                     step.runner.via))

    def is_input(self, value) -> bool:
        entry = self.known.get(id(value)) if isinstance(value, Tensor) else None
        return entry is not None and entry[1] == "x" and entry[0]() is value

    def input_format(self, x: Tensor) -> Optional[torch.memory_format]:
        """channels_last where the plan's only use of its input is converting it to channels_last
        (a CUDA graph's static input can then be allocated so, and the image copied once), else None."""
        return torch.channels_last if x.dim() == 4 and self.input_uses == ["to_channels_last"] else None

    def weight_name(self, value) -> Optional[str]:
        """The name of the module whose parameter ``value`` is (or is autocast's kept cast of)."""
        if not isinstance(value, Tensor):
            return None
        name = self.weight_names.get(id(value))
        if name is None:
            source = cast_source(value)
            name = None if source is None else self.weight_names.get(id(source))
        return name

    def outputs(self, out: Dict[str, Tensor]) -> str:
        return "    return OrderedDict([" + ", ".join(
            f"({self.constant(name)}, {self.expression(value, True)})" for name, value in out.items()) + "])\n"


def _snapshot(value):
    return list(value) if isinstance(value, list) else value


class _Hooks:
    """While a plan is recorded: the modules it calls as written (and nn.MaxPool2d, run as its
    op) record one step each, and nothing inside them is recorded. Hooks on those modules only,
    firing for the recording thread only, removed on exit."""

    def __init__(self, opaque: List[nn.Module], translated: List[nn.Module]):
        self.handles = []
        self.calls: List[Tuple] = []
        for module in opaque + translated:
            pool = module in translated
            self.handles.append(module.register_forward_pre_hook(self._enter, prepend=True, with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._translated if pool else self._exit))

    def _enter(self, module, args, kwargs):
        tape = active()
        if tape is not None:
            tape.enter_module()
            # The lists as they are now: a module may append to one it is given (extra blocks do).
            self.calls.append((tuple(_snapshot(a) for a in args), {k: _snapshot(v) for k, v in kwargs.items()}))

    def _exit(self, module, args, output):
        tape = active()
        if tape is not None:
            called_with, kwargs = self.calls.pop()
            tape.exit_module(module, module, called_with, kwargs, output)

    def _translated(self, module, args, output):
        tape = active()
        if tape is not None:
            called_with, _ = self.calls.pop()
            tape.exit_module(None, _max_pool(module), called_with[:1], {}, output)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        return False


def build_plan(backbone: nn.Module, x: Tensor) -> Tuple[Plan, Dict[str, Tensor]]:
    """Record ``backbone(x)`` (an ``InferenceBackboneWithFPN``) as the plan of x's signature.

    Args:
        backbone: the optimized backbone.
        x: the call's input.

    Returns:
        (the plan, this call's output, computed while recording).

    Raises:
        PlanError: the forward computed a value outside any recorded call that a later call
            needs (the caller runs the modules as written).
    """
    elided, translated, opaque = _classify(backbone)
    weight_names = {id(p): name.rpartition(".")[0] for name, p in backbone.named_parameters()}
    writer = _Writer(x, weight_names)
    with _Hooks(opaque, translated), recording(writer.record):
        out = backbone._run_as_written(x)
    source = "def run(x):\n" + "".join(f"    {line}\n" for line in writer.lines) + writer.outputs(out)
    exec(compile(source, "<fpn_fast plan>", "exec"), writer.namespace)  # noqa: S102 (our own generated code)
    called = list({id(m): m for m in writer.called}.values())
    convs = [m for m in elided if type(m) is Conv2dAct]
    plan = Plan(writer.namespace["run"], source, elided, WeightGuard(convs), called,
                StructureGuard(elided, outer=backbone, called=called), writer.routes, writer.input_format(x))
    return plan, out
