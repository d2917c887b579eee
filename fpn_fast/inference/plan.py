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
- A plan never hides a hook or a mode: modules whose call it elides are checked per call for
  forward hooks and training mode (and torch's global hooks); if any is found, the call runs the
  modules as written.
- Captured graphs, scripting, tracing and exports never see a plan (they take the modules).
"""
import itertools
import operator
import warnings
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module_state

from .. import ops
from ..backbone import IntermediateLayerGetter
from ..fpn import LastLevelMaxPool, check_fpn_inputs
from ..ops import _dispatch
from ..ops._triton_lateral import cudnn_conv_allows_tf32
from . import select

__all__ = ["signature", "Plan", "PlanError", "build_plan", "WeightGuard"]


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
        flags = (torch.backends.cudnn.enabled, cudnn_conv_allows_tf32(), torch.backends.cudnn.deterministic)
    else:
        flags = (torch._C._get_mkldnn_enabled(),)
    autocast = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None
    return (x.shape, x.stride(), x.dtype, device, autocast, torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(), _dispatch.get_backend(), flags)


class WeightGuard:
    """Whether the folded convolutions' weights and biases are still those a plan was built from:
    the same tensor objects (held here, so no other tensor can take their identity or address),
    the same version counters and data pointers, and the same module generations."""

    def __init__(self, convs: List[nn.Module]):
        self.modules = convs
        self.state = self._read()

    def _read(self):
        parameters = [m._parameters for m in self.modules]
        weights = [p["weight"] for p in parameters]
        biases = [p["bias"] for p in parameters if p["bias"] is not None]
        tensors = weights + biases
        return (tensors, [t._version for t in tensors], list(map(Tensor.data_ptr, tensors)),
                [m._weights_generation for m in self.modules])

    def holds(self) -> bool:
        """True when nothing changed since the plan was built."""
        tensors, versions, pointers, generations = self.state
        parameters = [m._parameters for m in self.modules]
        current = [p["weight"] for p in parameters] + [p["bias"] for p in parameters if p["bias"] is not None]
        if len(current) != len(tensors) or any(map(operator.is_not, current, tensors)):
            return False
        return ([t._version for t in current] == versions and list(map(Tensor.data_ptr, current)) == pointers
                and [m._weights_generation for m in self.modules] == generations)


def _global_hooks() -> bool:
    return bool(_module_state._global_forward_hooks or _module_state._global_forward_pre_hooks)


class Plan:
    """The backbone's forward for one signature: ``run(x)`` (generated straight-line code over
    the runners ``select.py`` chose), the modules whose calls it elides (checked per call for hooks
    and training mode), and the weight guard.

    Attributes:
        run: Tensor -> OrderedDict[str, Tensor], the plan itself.
        source: the generated code (for reading; ``print(plan.source)``).
        resolutions: how many dispatch resolutions building it made (later runs make none).
    """

    def __init__(self, run: Callable[[Tensor], Dict[str, Tensor]], source: str, elided: List[nn.Module],
                 guard: WeightGuard, resolutions: int):
        self.run = run
        self.source = source
        self.elided = elided
        self.guard = guard
        self.resolutions = resolutions

    def applies(self) -> bool:
        """Whether the plan may run now: no hook or training mode on a module it elides, no
        global hook, and the weights it was built from."""
        if _global_hooks() or [m for m in self.elided if m.training or m._forward_hooks or m._forward_pre_hooks]:
            return False
        return True


class _Writer:
    """Writes a plan while running it: each ``call`` runs one step on the real values (so the next
    step can be decided on them) and appends the matching line of the generated function."""

    def __init__(self):
        self.lines: List[str] = []
        self.namespace: Dict[str, object] = {"OrderedDict": OrderedDict}
        self.names = itertools.count()
        self.elided: List[nn.Module] = []
        self.convs: List[nn.Module] = []

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
        if _plain(module, FoldedResidualBlock):
            writer.elided.append(module)
            shortcut = (var, value) if module.downsample is None else walk(module.downsample, var, value)
            branch = walk(module.convs, var, value)
            if not _plain(module.last, Conv2dAct):
                raise PlanError("a FoldedResidualBlock's last convolution is not a plain Conv2dAct")
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
        return writer.call(module, [var], [value])  # called as written: its hooks run

    body = backbone.body
    if not any(_plain(body, kind) for kind in _layer_getters()):
        raise PlanError(f"the body is a {type(body).__name__}, not fpn_fast's IntermediateLayerGetter")
    writer.elided.append(body)
    features: List[Tuple[str, str, Tensor]] = []
    for name, child in body.items():
        var, value = walk(child, var, value)
        if name in body.return_layers:
            features.append((body.return_layers[name], var, value))
    fpn = backbone.fpn
    if not _plain(fpn, InferenceFPN):
        raise PlanError(f"the FPN is a {type(fpn).__name__}, not an InferenceFPN")
    writer.elided.append(fpn)
    outputs = _plan_fpn(writer, fpn, features, walk)
    source = "def run(x):\n" + "".join(f"    {line}\n" for line in writer.lines)
    source += "    return OrderedDict([" + ", ".join(f"({name!r}, {v})" for name, v, _ in outputs) + "])\n"
    exec(compile(source, "<fpn_fast plan>", "exec"), writer.namespace)  # noqa: S102 (our own generated code)
    plan = Plan(writer.namespace["run"], source, writer.elided, WeightGuard(writer.convs), counted())
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
    """One signature's plan, and its CUDA graph where one was captured."""

    def __init__(self, plan: Optional[Plan], graphed=None, reason: Optional[str] = None):
        self.plan = plan
        self.graphed = graphed
        self.reason = reason  # why there is no plan, or no graph
        self.hits = 0


class Engine:
    """The optimized backbone's plans by signature (least recently used evicted beyond
    ``max_plans``), their CUDA graphs, and the shared graph memory pool.

    Args:
        max_plans: signatures kept (each holds its packs and, on CUDA, its graph's memory).
        cuda_graphs: capture CUDA plans as graphs.
        static_outputs: return a graph's static output tensors (overwritten by the next call of
            the same signature) instead of copies of them.
    """

    def __init__(self, max_plans: int = 8, cuda_graphs: bool = True, static_outputs: bool = False):
        if max_plans < 1:
            raise ValueError(f"max_plans must be at least 1, got {max_plans}")
        self.max_plans = max_plans
        self.cuda_graphs = cuda_graphs
        self.static_outputs = static_outputs
        self.entries: "OrderedDict[Tuple, _Entry]" = OrderedDict()
        self.pools: Dict[torch.device, object] = {}
        self.warned: set = set()
        self.builds = 0

    def __call__(self, backbone: nn.Module, x: Tensor) -> Dict[str, Tensor]:
        key = signature(x)
        entry = self.entries.get(key)
        if entry is not None:
            if entry.plan is None or backbone.training:  # cannot be planned, or refuses: as written
                return backbone._run_as_written(x)
            if not entry.plan.applies():
                return backbone._run_as_written(x)
            if entry.plan.guard.holds() and not (key[5] and _needs_grad(x, entry.plan.guard)):
                self.entries.move_to_end(key)
                entry.hits += 1
                if entry.graphed is not None:
                    return entry.graphed(x, self.static_outputs)
                return entry.plan.run(x)
            if not entry.plan.guard.holds():
                self.entries.clear()  # weights changed: every plan was made from the old ones
        return self._build(backbone, x, key)

    def _build(self, backbone: nn.Module, x: Tensor, key: Tuple) -> Dict[str, Tensor]:
        from .modules import _check_inference
        _check_inference(backbone.training, "InferenceBackboneWithFPN", [x])  # raises as eager would
        try:
            plan, out = build_plan(backbone, x)
        except PlanError as err:
            self._store(key, _Entry(None, reason=str(err)))
            if str(err) not in self.warned:
                self.warned.add(str(err))
                warnings.warn(f"fpn_fast: the optimized backbone runs its modules as written: {err}", stacklevel=3)
            return backbone._run_as_written(x)
        except Exception:  # bad input: the modules as written raise the eager error, named there
            return backbone._run_as_written(x)
        self.builds += 1
        if not plan.applies() or _needs_grad(x, plan.guard):  # hooks, training or grad: as written
            return backbone._run_as_written(x)
        entry = _Entry(plan)
        if x.device.type == "cuda" and self.cuda_graphs:
            from . import cuda_graphs
            entry.reason = cuda_graphs.why_not_capturable(x)
            if entry.reason is None:
                pool = self.pools.get(x.device)
                if pool is None:
                    pool = self.pools[x.device] = torch.cuda.graph_pool_handle()
                try:
                    entry.graphed = cuda_graphs.capture(plan.run, x, pool, key[4])
                except RuntimeError as err:
                    entry.reason = f"capturing the plan failed: {err}"
            if entry.reason is not None:
                cuda_graphs.warn_once(self.warned, entry.reason)
        elif x.device.type != "cuda":
            entry.reason = f"CUDA graphs need CUDA tensors; the input is on {x.device}"
        self._store(key, entry)
        return out

    def _store(self, key: Tuple, entry: _Entry) -> None:
        self.entries[key] = entry
        self.entries.move_to_end(key)
        while len(self.entries) > self.max_plans:
            self.entries.popitem(last=False)

    def info(self) -> List[Dict[str, object]]:
        """One dict per cached signature, least recently used first: ``signature`` (the tuple),
        ``planned`` (False: runs as written), ``graph`` (captured?), ``reason`` (why not planned
        or not captured), ``hits``, ``graph_bytes`` (device memory the graph holds: its capture's
        allocations in the shared pool and its static input; 0 without a graph)."""
        return [dict(signature=key, planned=entry.plan is not None, graph=entry.graphed is not None,
                     reason=entry.reason, hits=entry.hits,
                     graph_bytes=entry.graphed.captured_bytes if entry.graphed is not None else 0)
                for key, entry in self.entries.items()]


def _needs_grad(x: Tensor, guard: WeightGuard) -> bool:
    """Grad mode is on (the caller checked) and the input or a folded weight requires grad."""
    return x.requires_grad or any(map(operator.attrgetter("requires_grad"), guard.state[0]))
