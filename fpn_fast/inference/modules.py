"""The optimized backbone's modules: folded convolutions, folded residual blocks, the inference
FPN and the backbone that runs its forward through the engine's plans (``plan.py``).

They have no training semantics (folded norms cannot be trained as norms), so they refuse to run
in training mode, or with grad mode on and an input or parameter that requires grad, instead of
computing gradients of something else.
"""
import functools
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from ..fpn import check_fpn_inputs
from .._fast_path import _global_hooks
from ..export import script as _script
from ..ops import cpu_cache as _memory
from ..ops.conv import _nnpack, _onednn, _winograd

__all__ = ["Conv2dAct", "FoldedResidualBlock", "InferenceFPN", "InferenceBackboneWithFPN"]


def _check_inference(training: bool, name: str, tensors: List[Optional[Tensor]]) -> None:
    """RuntimeError unless the optimized module ``name`` runs in eval mode and autograd records
    nothing: grad mode off, or no input or parameter that requires grad (so exporters and
    tracers, which run with grad mode on, work)."""
    if training:
        raise RuntimeError(name + " comes from fpn_fast.optimize_for_inference and runs in eval mode only "
                           "(its norms are folded into the convolutions): call model.eval()")
    needs_grad = False
    for t in tensors:
        if t is not None and t.requires_grad:
            needs_grad = True
    if torch.is_grad_enabled() and needs_grad:
        raise RuntimeError(name + " comes from fpn_fast.optimize_for_inference and computes no gradients (its "
                           "norms are folded into the convolutions): run it under torch.no_grad() or "
                           "torch.inference_mode(), or use the original model to train")



# Conv2dAct keeps its caches of the weight in other layouts (oneDNN's prepacked weight, NNPACK's
# and the Winograd kernel transforms, keyed by these slots) and what they were made from
# (Conv2dAct._pack_token) in one dict, the module's "_packs": one object for the module's life, so
# making a pack never changes the module's own attributes (the engine's StructureGuard compares them).
_PACK_SLOTS = ("_onednn_weight", "_nnpack_weight", "_winograd_weight")
_PACKED_FROM = "_packed_from"
_PACKS = "_packs"


def _plain_conv(block: nn.Module) -> bool:
    """Whether calling ``block`` is exactly Conv2dAct's forward (its type, no hooks), so its
    work may be done by the ops directly; otherwise the block is called and its hooks run."""
    return type(block) is Conv2dAct and not (block._forward_hooks or block._forward_pre_hooks or _global_hooks())


def _normal_tensor(tensor: Tensor) -> Tensor:
    """``tensor``, or a normal copy of it (same type, requires_grad and memory format) when it is an
    inference tensor: those count no in-place writes, so nothing made from one can be kept."""
    if not tensor.is_inference():
        return tensor
    with torch.inference_mode(False):
        normal = tensor.clone()
        return nn.Parameter(normal, requires_grad=tensor.requires_grad) if isinstance(tensor, nn.Parameter) else normal


class Conv2dAct(nn.Module):
    """A convolution with its norm folded in: relu?(conv2d(x, weight, bias) + residual).

    ``weight`` and ``bias`` are parameters that require no grad; ``forward(x, residual=None)``.
    Scripted (TorchScript), it runs F.conv2d and the tail as plain ops. On CPU it keeps its weight
    prepacked (oneDNN, NNPACK and Winograd kernel transforms) between calls, valid only for the
    weight tensor, contents and generation they were made from (``_pack_token``):

    - ``weight`` and ``bias`` are always normal tensors: one that arrives as an inference tensor
      (assigned, loaded with ``assign=True``, converted by ``.to()`` under ``torch.inference_mode``,
      deep-copied or unpickled there) is replaced by a normal copy, since inference tensors count
      no writes; later writes to the inference tensor itself are then not the module's.
    - Every path that can replace them bumps a generation: assignment (``__setattr__``, which
      ``load_state_dict(assign=True)`` uses), ``_load_from_state_dict``, ``_apply`` (``.to``,
      ``.half``, ``.float``, ``.cuda``, also with ``torch.__future__``'s swap_tensors), unpickling
      and deepcopy (``__setstate__``).
    - In-place writes (``weight.mul_``, ``load_state_dict`` without ``assign``, also inside
      ``torch.inference_mode``) bump the weight's version counter.
    - A weight put in place some other way (``_parameters`` written directly, ``register_parameter``,
      ``weight.data = t``, ``torch.utils.swap_tensors``) is another tensor object, an inference
      tensor, or at another address (the packed weight's storage is held with its packs), and the
      next call sees it.

    In-place writes through ``weight.data`` (``weight.data.mul_(2)``) bypass the version counter
    and are not seen. The packs are not saved, pickled or copied.
    """

    # The prepacked weights are opaque oneDNN tensors: TorchScript must not copy them (nor what
    # validates them) into a scripted module (torch.jit.save cannot write them), as pickling leaves
    # them out.
    __jit_ignored_attributes__ = [_PACKS, "_weights_generation"]

    def __init__(self, weight: Tensor, bias: Optional[Tensor], stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int], groups: int, relu: bool):
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.stride = tuple(stride)
        self.padding = tuple(padding)
        self.dilation = tuple(dilation)
        self.groups = groups
        self.relu = relu
        # The Winograd routes on CPU (optimize_for_inference's ``winograd`` option).
        self.winograd = True
        self.folded_conv = True  # marks it for the scripted InferenceFPN (a static hasattr there)
        self.__dict__[_PACKS] = {}
        self.eval()  # it has no training mode; .train() makes it refuse to run

    def forward(self, x: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        _check_inference(self.training, "Conv2dAct", [x, residual, self.weight, self.bias])
        if torch.jit.is_scripting():
            out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
            if residual is not None:
                out += residual
            return out.relu_() if self.relu else out
        return self._forward_eager(x, residual)

    @torch.jit.unused
    def _forward_eager(self, x: Tensor, residual: Optional[Tensor]) -> Tensor:
        return ops.conv2d_act(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups,
                              relu=self.relu, residual=residual, packed_weight=lambda: self._packed_weight(x),
                              nnpack_kernels=self._nnpack_kernels, winograd_kernels=self._winograd_kernels,
                              winograd=getattr(self, "winograd", True))

    # The entry points through which weight and bias may be replaced: each makes them normal
    # tensors and bumps the generation (_weights_replaced).

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        if name in ("weight", "bias"):
            self._weights_replaced()

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._weights_replaced()

    def _apply(self, *args, **kwargs):
        result = super()._apply(*args, **kwargs)
        self._weights_replaced()
        return result

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: v for k, v in state.items() if k not in (_PACKS, *_PACK_SLOTS, _PACKED_FROM)}

    def __setstate__(self, state) -> None:
        super().__setstate__({k: v for k, v in state.items() if k not in (*_PACK_SLOTS, _PACKED_FROM)})
        self.__dict__[_PACKS] = {}
        self._weights_replaced()

    @torch.jit.unused
    def _pack_cache(self) -> dict:
        """The dict holding the packs (made here for a module built without ``__init__``)."""
        cache = self.__dict__.get(_PACKS)
        if cache is None:
            cache = self.__dict__[_PACKS] = {}
        return cache

    @torch.jit.unused
    def _weights_replaced(self) -> None:
        """Make weight and bias normal tensors and start a new generation of packs."""
        for name in ("weight", "bias"):
            tensor = self._parameters.get(name)
            if tensor is not None and tensor.is_inference():
                self._parameters[name] = _normal_tensor(tensor)
        self.__dict__["_weights_generation"] = self.__dict__.get("_weights_generation", 0) + 1

    @torch.jit.unused
    def _pack_token(self) -> object:
        """The token the cached packs are keyed by (compared with ``is``), the one place their
        validity is decided. It stays the same object while the weight is the same tensor object
        with the same version counter and data pointer, in the same generation; otherwise a new
        token is made and every pack is dropped. The weight tensor and its storage are held with
        the token (strong references: a weak one would make ``torch.utils.swap_tensors`` refuse
        the weight), so no other tensor can take the weight's identity or address while its
        packs are kept: ``weight.data = t`` and ``swap_tensors``, which keep the object and its
        version counter, always move the data pointer. An inference tensor found here (put in
        place by a path no entry point sees) is replaced by a normal copy first."""
        weight = self.weight
        bias = self.bias
        if weight.is_inference() or (bias is not None and bias.is_inference()):
            self._weights_replaced()
            weight, bias = self.weight, self.bias
            if weight.is_inference() or (bias is not None and bias.is_inference()):
                # Computed anew by each access (a parametrization) under inference_mode: nothing
                # made from it can be kept, so the token is new every time.
                return object()
        made_from = (self.__dict__.get("_weights_generation", 0), weight._version, weight.data_ptr())
        cache = self._pack_cache()
        state = cache.get(_PACKED_FROM)
        if state is None or state[0] != made_from or state[1] is not weight:
            cache.clear()
            state = cache[_PACKED_FROM] = (made_from, weight, weight.untyped_storage(), object())
        return state[3]

    @torch.jit.unused
    def _packed_weight(self, x: Tensor) -> Tensor:
        """The weight prepacked for oneDNN, made on first use for x's size and kept while the
        weight is unchanged (``_pack_token``); not saved or copied with the module."""
        token = self._pack_token()
        cache = self._pack_cache()
        cached = cache.get("_onednn_weight")
        if cached is None or cached[0] is not token:
            packed = _onednn.pack_weight(self.weight, self.stride, self.padding, self.dilation, self.groups,
                                             x.shape)
            cached = cache["_onednn_weight"] = (token, packed)
        return cached[1]

    @torch.jit.unused
    def _nnpack_kernels(self, slices: int) -> List[Tensor]:
        """NNPACK's kernel transforms of the weight in ``slices`` output-channel slices (16 MiB for
        a 256 -> 256 conv), made on first use and kept while the weight is unchanged
        (``_pack_token``); not saved or copied."""
        token = self._pack_token()
        made_for = (slices, self.padding)
        cache = self._pack_cache()
        cached = cache.get("_nnpack_weight")
        if cached is None or cached[0] is not token or cached[1] != made_for:
            kernels = _nnpack.pack(self.weight, self.padding, slices)
            cached = cache["_nnpack_weight"] = (token, made_for, kernels)
        return cached[2]

    @torch.jit.unused
    def _winograd_kernels(self, tiles: int) -> Tuple[int, Tensor]:
        """A batch entry size for a map of ``tiles`` tiles and the Winograd kernel transforms
        prepacked for it (4x the weight's size: 9 MiB for a 256 -> 256 conv): the first map's
        entry size, or the fallback one for maps it would pad too much
        (``_winograd.group_to_use``; at most two packs). Made on first use, kept while the
        weight is unchanged (``_pack_token``); not saved or copied."""
        token = self._pack_token()
        cache = self._pack_cache()
        cached = cache.get("_winograd_weight")
        if cached is None or cached[0] is not token:
            cached = cache["_winograd_weight"] = (token, _winograd.group_for(tiles), {})
        group = _winograd.group_to_use(cached[1], tiles)
        packs = cached[2]
        if group not in packs:
            packs[group] = _winograd.pack(self.weight, group)
        return group, packs[group]

    def extra_repr(self) -> str:
        out_channels, in_per_group, kh, kw = self.weight.shape
        return (f"{in_per_group * self.groups}, {out_channels}, kernel_size=({kh}, {kw}), stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, relu={self.relu}")


class FoldedResidualBlock(nn.Module):
    """A ResNet block (Bottleneck or BasicBlock) with its norms folded:
    ``last(convs(x), residual=shortcut(x))``, every conv with ReLU, the last one after the add."""

    def __init__(self, convs: List[Conv2dAct], last: Conv2dAct, downsample: Optional[Conv2dAct]):
        super().__init__()
        self.convs = nn.Sequential(*convs)
        self.last = last
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.last(self.convs(x), residual=shortcut)



class InferenceFPN(nn.Module):
    """A FeaturePyramidNetwork for inference: per level, ``lateral_upsample_add`` (the lateral
    1x1 conv and the whole top-down step, fused on GPU) then the 3x3 output conv; the extra
    block; then every output in ``output_memory_format``. Built by ``fold.inference_fpn``.

    Levels whose conv has a norm that is not folded keep the original conv+norm block and
    use the plain fused step (``ops.upsample_add``) after it.

    Args:
        inner_blocks, layer_blocks: per level, a Conv2dAct (folded) or the original block.
        extra_blocks: the FPN's extra block, or None. in_channels_list: as the FPN's.
        fuse_lateral: allow ``ops.lateral_upsample_add``'s fused GEMM.
        output_memory_format: torch.contiguous_format or torch.channels_last.
    """

    __jit_ignored_attributes__ = ["in_channels_list"]  # the eager input check's only

    def __init__(self, inner_blocks: List[nn.Module], layer_blocks: List[nn.Module],
                 extra_blocks: Optional[nn.Module], in_channels_list: List[Optional[int]], *,
                 fuse_lateral: bool = True, output_memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__()
        self.in_channels_list = in_channels_list
        self.inner_blocks = nn.ModuleList(inner_blocks)
        self.layer_blocks = nn.ModuleList(layer_blocks)
        self.extra_blocks = extra_blocks
        self.fuse_lateral = fuse_lateral
        # A bool, not the torch.memory_format (which does not pickle): torch.save must work.
        self.output_channels_last = output_memory_format == torch.channels_last

    @torch.jit.unused
    def _top_down(self, level: int, feature: Tensor, top: Optional[Tensor]) -> Tensor:
        block = self.inner_blocks[level]
        if _plain_conv(block):
            return ops.lateral_upsample_add(feature, block.weight, block.bias, top, fuse=self.fuse_lateral)
        lateral = block(feature)  # a kept block's output: hooks may hold it, so not in place
        return lateral if top is None else ops.upsample_add(lateral, top)

    def _top_down_scripted(self, level: int, feature: Tensor, top: Optional[Tensor]) -> Tensor:
        out = feature
        for i, block in enumerate(self.inner_blocks):
            if i == level:
                if hasattr(block, "folded_conv"):  # static in TorchScript: a Conv2dAct
                    out = F.conv2d(feature, block.weight)
                    if top is not None:
                        out = _script.upsample_add_(out, top, block.bias)
                    elif block.bias is not None:
                        out = out + block.bias.view(1, -1, 1, 1)
                else:
                    out = block(feature)
                    if top is not None:
                        out = _script.upsample_add(out, top, None)
        return out

    def forward(self, x: Dict[str, Tensor]) -> Dict[str, Tensor]:
        names = list(x.keys())
        features = list(x.values())
        maps: List[Optional[Tensor]] = [f for f in features]
        _check_inference(self.training, "InferenceFPN", maps)
        if not torch.jit.is_scripting():
            check_fpn_inputs(names, features, self.in_channels_list)
        last = len(features) - 1
        # The whole top-down pathway first, then the output convolutions (independent of each other).
        inners = [self._level(last, features[last], None)]
        for level in range(last - 1, -1, -1):
            inners.insert(0, self._level(level, features[level], inners[0]))
        if torch.jit.is_scripting():
            results: List[Tensor] = []
            for level, inner in enumerate(inners):
                results.append(self._layer(level, inner))
        else:
            results = self._layers_eager(inners)
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, features, names)
        out: Dict[str, Tensor] = OrderedDict()
        for name, result in zip(names, results):
            if self.output_channels_last:
                out[name] = result.contiguous(memory_format=torch.channels_last)
            elif torch.jit.is_scripting():
                out[name] = _script.to_nchw(result)
            else:
                out[name] = ops.to_nchw(result)
        return out

    @torch.jit.unused
    def _layers_eager(self, inners: List[Tensor]) -> List[Tensor]:
        """Every level's output convolution. With NCHW outputs a folded 3x3 conv runs as
        ``ops.conv2d_nchw`` (a Winograd convolution on CPU maps that writes NCHW). Inputs it takes
        in NCHW (NNPACK's route) are converted first, then the convolutions run from the smallest
        map to the largest, so the largest, where NNPACK runs on its own thread pool (over 100x100
        pixels; ~30% slower while OpenMP's workers still spin after an ATen op), run back to back."""
        blocks = list(self.layer_blocks)
        direct = [_plain_conv(block) and not block.relu and not self.output_channels_last for block in blocks]
        inputs = list(inners)
        for level, block in enumerate(blocks):
            if direct[level] and ops.conv2d_nchw_input_format(
                    inners[level], block.weight, block.bias, block.stride, block.padding, block.dilation,
                    block.groups, winograd=getattr(block, "winograd", True)) == torch.contiguous_format:
                inputs[level] = ops.to_nchw(inners[level])
        results: List[Optional[Tensor]] = [None] * len(blocks)
        for level in sorted(range(len(blocks)), key=lambda i: inputs[i].shape[-2] * inputs[i].shape[-1]):
            block = blocks[level]
            if direct[level]:
                results[level] = ops.conv2d_nchw(
                    inputs[level], block.weight, block.bias, block.stride, block.padding, block.dilation,
                    block.groups, packed_weight=functools.partial(block._packed_weight, inputs[level]),
                    nnpack_kernels=block._nnpack_kernels, winograd_kernels=block._winograd_kernels,
                    winograd=getattr(block, "winograd", True))
            else:
                results[level] = block(inners[level])
        return results

    def _level(self, level: int, feature: Tensor, top: Optional[Tensor]) -> Tensor:
        if torch.jit.is_scripting():
            return self._top_down_scripted(level, feature, top)
        return self._top_down(level, feature, top)

    def _layer(self, level: int, inner: Tensor) -> Tensor:
        out = inner
        for i, block in enumerate(self.layer_blocks):  # a loop: TorchScript indexes ModuleLists by constants only
            if i == level:
                out = block(inner)
        return out


def _python_modes() -> bool:
    """Whether a TorchDispatchMode, or a TorchFunctionMode other than ``torch.set_default_device``'s,
    is active (the engine then runs the modules as written, so the mode sees every op)."""
    if torch._C._len_torch_dispatch_stack():
        return True
    if torch._C._len_torch_function_stack():
        from torch.overrides import _get_current_function_mode_stack
        from torch.utils._device import DeviceContext
        return any(type(mode) is not DeviceContext for mode in _get_current_function_mode_stack())
    return False


class InferenceBackboneWithFPN(nn.Module):
    """body + InferenceFPN; the image goes to channels_last first when ``channels_last``.
    Keeps ``out_channels``, so detection models use it as they used the original backbone.

    Eager calls run through the inference engine (``plan.Engine``): the first call with an input
    signature plans the forward (implementations resolved, weights packed, on CUDA captured as a
    CUDA graph), later calls with it only run the plan. ``plans()`` lists what is cached;
    ``set_engine(...)`` configures or turns it off. Scripted, traced, compiled and exported forms
    run the modules as written.

    Args:
        body: the ResNet body (folded), returning its stages. fpn: the InferenceFPN.
        out_channels: the FPN's channels. channels_last: convert the image to channels_last first.
    """

    # The engine holds plans, packs and CUDA graphs: never scripted, pickled or copied.
    __jit_ignored_attributes__ = ["_engine", "engine_options"]

    def __init__(self, body: nn.Module, fpn: "InferenceFPN", out_channels: int, channels_last: bool):
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = out_channels
        self.channels_last = channels_last
        self.engine_options = dict(enabled=True, max_plans=8, cuda_graphs=True, static_outputs=False)

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        if torch.jit.is_scripting():
            image: List[Optional[Tensor]] = [x]
            _check_inference(self.training, "InferenceBackboneWithFPN", image)
            if x.dim() == 3:
                x = x.unsqueeze(0)
            return self._run(x)
        return self._forward_eager(x)

    @torch.jit.unused
    def _forward_eager(self, x: Tensor) -> Dict[str, Tensor]:
        engine = self.__dict__.get("_engine")
        # A plan runs plain tensors outside tracing and torch's Python modes (FakeTensor, FLOP
        # counters, a TorchFunctionMode besides set_default_device's): those see every op as written.
        if type(x) is not Tensor or ops.capturing_graph() or _python_modes():
            return self._run_as_written(x)
        if engine is None:
            if not getattr(self, "engine_options", {}).get("enabled", False):
                return self._run_as_written(x)
            engine = self._make_engine()
        if x.device.type == "cpu":
            with _memory.pooled():
                return engine(self, x)
        if x.device.type == "cuda" and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):  # Triton launches and graphs on x's device
                return engine(self, x)
        return engine(self, x)

    @torch.jit.unused
    def _make_engine(self):
        from .plan import Engine
        options = self.engine_options
        engine = self.__dict__["_engine"] = Engine(options["max_plans"], options["cuda_graphs"],
                                                   options["static_outputs"])
        return engine

    @torch.jit.unused
    def set_engine(self, enabled: bool = True, *, max_plans: int = 8, cuda_graphs: bool = True,
                   static_outputs: bool = False) -> None:
        """Configure the inference engine (drops every cached plan and graph).

        Args:
            enabled: plan per signature (False: every call runs the modules as written).
            max_plans: signatures kept, least recently used evicted (each holds its packs and, on
                CUDA, its graph's memory in the shared pool).
            cuda_graphs: replay CUDA plans as CUDA graphs.
            static_outputs: return a graph's static output tensors, which the next call with the
                same signature overwrites, instead of copies of them (saves one copy of every
                output per call).

        Raises:
            ValueError: max_plans < 1.
        """
        if max_plans < 1:
            raise ValueError(f"max_plans must be at least 1, got {max_plans}")
        self.engine_options = dict(enabled=bool(enabled), max_plans=int(max_plans), cuda_graphs=bool(cuda_graphs),
                                   static_outputs=bool(static_outputs))
        self.__dict__.pop("_engine", None)

    @torch.jit.unused
    def plans(self) -> List[Dict[str, object]]:
        """The cached signatures, least recently used first (``plan.Engine.info``): signature,
        planned, graph, reason, hits, graph_bytes."""
        engine = self.__dict__.get("_engine")
        return [] if engine is None else engine.info()

    def __getstate__(self):
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        return {k: v for k, v in state.items() if k != "_engine"}

    @torch.jit.unused
    def _run_as_written(self, x: Tensor) -> Dict[str, Tensor]:
        """The forward through the modules, without a plan (what scripted forms run, plus the
        CPU buffer pool for eager CPU calls)."""
        image: List[Optional[Tensor]] = [x]
        _check_inference(self.training, "InferenceBackboneWithFPN", image)
        if x.dim() == 3:
            # An unbatched [C, H, W] image: torchvision's backbone returns batched maps for it (its
            # first norm broadcasts against [1, C, 1, 1]), so this one does too.
            x = x.unsqueeze(0)
        if isinstance(x, Tensor) and x.device.type == "cpu" and not ops.capturing_graph():
            with _memory.pooled():
                return self._run(x)
        return self._run(x)

    def _run(self, x: Tensor) -> Dict[str, Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.fpn(self.body(x))
