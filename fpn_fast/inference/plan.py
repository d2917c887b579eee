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
import itertools
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .. import ops
from .._fast_path import _global_hooks, runs_as_written
from ..backbone import IntermediateLayerGetter
from ..fpn import LastLevelMaxPool, check_fpn_inputs
from ..ops import dispatch as _dispatch
from . import select
from .conv import Conv2dAct
from .guards import StructureGuard, WeightGuard, _hooked_or_training
from .modules import FoldedResidualBlock, InferenceFPN

__all__ = ["signature", "Plan", "PlanError", "build_plan"]


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
        flags = select.cuda_flags()
    else:  # the thread count decides the Winograd routes' chunks and NNPACK's slices
        flags = (torch._C._get_mkldnn_enabled(), torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    autocast = _dispatch.autocast_dtype(kind)
    return (x.shape, x.stride(), x.dtype, device, autocast, torch.is_grad_enabled(),
            torch.is_inference_mode_enabled(), _dispatch.get_backend(), flags)


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
        if runs_as_written(module, nn.Identity):
            writer.elided.append(module)
            return var, value
        if runs_as_written(module, Conv2dAct):
            return conv(module, var, value)
        if runs_as_written(module, FoldedResidualBlock) and runs_as_written(module.last, Conv2dAct):
            writer.elided.append(module)
            shortcut = (var, value) if module.downsample is None else walk(module.downsample, var, value)
            branch = walk(module.convs, var, value)
            return conv(module.last, branch[0], branch[1], residual=shortcut)
        if runs_as_written(module, nn.Sequential):
            writer.elided.append(module)
            for child in module:
                var, value = walk(child, var, value)
            return var, value
        if runs_as_written(module, nn.MaxPool2d) and not module.return_indices:
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
    names = [name for name, _, _ in features]
    check_fpn_inputs(names, [value for _, _, value in features], fpn.in_channels_list)
    last = len(features) - 1
    inners: List[Tuple[str, Tensor]] = [None] * len(features)  # type: ignore[list-item]
    top: Tuple[Optional[str], Optional[Tensor]] = (None, None)
    for level in range(last, -1, -1):
        _, var, value = features[level]
        block = fpn.inner_blocks[level]
        if runs_as_written(block, Conv2dAct):
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
    direct = [runs_as_written(block, Conv2dAct) and not block.relu and not fpn.output_channels_last for block in blocks]
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
    elif runs_as_written(extra, LastLevelMaxPool):
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


