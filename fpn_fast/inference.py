"""An explicit inference mode for ResNet-FPN backbones: ``optimize_for_inference(model)``.

Three changes, each optional, none touching the model passed in (it is copied):
- norm folding: every frozen batch norm (and BatchNorm2d with running statistics) right after a
  convolution becomes part of that convolution's weight and bias, computed in float64 and cast
  back; the body then runs conv(+bias)(+residual)(+ReLU) only (``ops.conv2d_act``).
- channels_last: body and FPN weights and activations in channels_last (the image is converted
  once at the backbone's entry); the outputs come back in ``output_memory_format``.
- lateral fusion: each FPN level's lateral 1x1 convolution, bias, and upsample-add of the
  coarser level run as one ``ops.lateral_upsample_add`` (on a GPU a Triton GEMM whose epilogue
  does the top-down step, so the lateral map is never stored).

On CPU (float32), the 3x3 stride-1 convolutions (the FPN's output convs, the body's) run a
Winograd convolution where it pays (``ops.conv2d_nchw``, ``ops.conv2d_act``: the extension's
F(4x4, 3x3), else NNPACK's; ~1e-5 of a conv's scale, non-finite results recomputed directly), and the backbone's forward runs inside fpn_fast's CPU buffer pool (``ops._memory``), so
its large maps reuse memory instead of being page-faulted in on every call.

The optimized modules have no training semantics (folded norms cannot be trained as norms), so
they refuse to run in training mode, or with grad mode on and an input or parameter that
requires grad, instead of computing gradients of something else.
"""
import copy
import functools
import warnings
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from . import ops
from .ops import _memory, _script
from ._fast_path import has_hooks, runs_as_written
from .backbone import BackboneWithFPN, IntermediateLayerGetter
from .convert import convert
from .fpn import FeaturePyramidNetwork, check_fpn_inputs
from .resnet import BasicBlock, Bottleneck, FrozenBatchNorm2d, ResNet

__all__ = ["optimize_for_inference", "Conv2dAct", "FoldedResidualBlock", "InferenceFPN",
           "InferenceBackboneWithFPN"]

_OUTPUT_FORMATS = (torch.contiguous_format, torch.channels_last)


@functools.lru_cache(maxsize=None)
def _torchvision_classes():
    """torchvision's counterparts of our block, norm and container classes (empty without it)."""
    try:
        from torchvision.models import resnet as tv_resnet
        from torchvision.models._utils import IntermediateLayerGetter as TvGetter
        from torchvision.models.detection.backbone_utils import BackboneWithFPN as TvBackbone
        from torchvision.ops.misc import FrozenBatchNorm2d as TvFrozenBN
    except ImportError:
        return dict(blocks=(), frozen_norms=(), ordered=(), backbones=())
    return dict(blocks=(tv_resnet.Bottleneck, tv_resnet.BasicBlock), frozen_norms=(TvFrozenBN,),
                ordered=(TvGetter, tv_resnet.ResNet), backbones=(TvBackbone,))


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


# Conv2dAct's caches of its weight in other layouts (oneDNN's prepacked weight, NNPACK's and the
# Winograd kernel transforms), and what they were made from (Conv2dAct._pack_token).
_PACK_SLOTS = ("_onednn_weight", "_nnpack_weight", "_winograd_weight")
_PACKED_FROM = "_packed_from"


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
    __jit_ignored_attributes__ = [*_PACK_SLOTS, _PACKED_FROM, "_weights_generation"]

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
        return {k: v for k, v in state.items() if k not in (*_PACK_SLOTS, _PACKED_FROM)}

    def __setstate__(self, state) -> None:
        super().__setstate__(state)
        self._weights_replaced()

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
            weight = self.weight
        made_from = (self.__dict__.get("_weights_generation", 0), weight._version, weight.data_ptr())
        state = self.__dict__.get(_PACKED_FROM)
        if state is None or state[0] != made_from or state[1] is not weight:
            for slot in _PACK_SLOTS:
                self.__dict__.pop(slot, None)
            state = self.__dict__[_PACKED_FROM] = (made_from, weight, weight.untyped_storage(), object())
        return state[3]

    @torch.jit.unused
    def _packed_weight(self, x: Tensor) -> Tensor:
        """The weight prepacked for oneDNN, made on first use for x's size and kept while the
        weight is unchanged (``_pack_token``); not saved or copied with the module."""
        token = self._pack_token()
        cached = self.__dict__.get("_onednn_weight")
        if cached is None or cached[0] is not token:
            packed = ops._onednn.pack_weight(self.weight, self.stride, self.padding, self.dilation, self.groups,
                                             x.shape)
            cached = self.__dict__["_onednn_weight"] = (token, packed)
        return cached[1]

    @torch.jit.unused
    def _nnpack_kernels(self, slices: int) -> List[Tensor]:
        """NNPACK's kernel transforms of the weight in ``slices`` output-channel slices (16 MiB for
        a 256 -> 256 conv), made on first use and kept while the weight is unchanged
        (``_pack_token``); not saved or copied."""
        token = self._pack_token()
        made_for = (slices, self.padding)
        cached = self.__dict__.get("_nnpack_weight")
        if cached is None or cached[0] is not token or cached[1] != made_for:
            kernels = ops._nnpack.pack(self.weight, self.padding, slices)
            cached = self.__dict__["_nnpack_weight"] = (token, made_for, kernels)
        return cached[2]

    @torch.jit.unused
    def _winograd_kernels(self, tiles: int) -> Tuple[int, Tensor]:
        """A batch entry size for a map of ``tiles`` tiles and the Winograd kernel transforms
        prepacked for it (4x the weight's size: 9 MiB for a 256 -> 256 conv): the first map's
        entry size, or the fallback one for maps it would pad too much
        (``ops._winograd.group_to_use``; at most two packs). Made on first use, kept while the
        weight is unchanged (``_pack_token``); not saved or copied."""
        token = self._pack_token()
        cached = self.__dict__.get("_winograd_weight")
        if cached is None or cached[0] is not token:
            cached = self.__dict__["_winograd_weight"] = (token, ops._winograd.group_for(tiles), {})
        group = ops._winograd.group_to_use(cached[1], tiles)
        packs = cached[2]
        if group not in packs:
            packs[group] = ops._winograd.pack(self.weight, group)
        return group, packs[group]

    def extra_repr(self) -> str:
        out_channels, in_per_group, kh, kw = self.weight.shape
        return (f"{in_per_group * self.groups}, {out_channels}, kernel_size=({kh}, {kw}), stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, relu={self.relu}")


def _is_foldable_norm(norm: nn.Module, channels: int) -> bool:
    """An exact frozen / running-statistics batch norm over ``channels``, with nothing attached
    (see _fast_path.runs_as_written): its eval forward is then an affine map we can fold."""
    if runs_as_written(norm, (FrozenBatchNorm2d, *_torchvision_classes()["frozen_norms"])):
        return norm.weight.shape[0] == channels
    if runs_as_written(norm, (nn.BatchNorm2d, nn.SyncBatchNorm)):
        # In eval mode only running statistics make it an affine map of its input.
        return (norm.track_running_stats and norm.running_mean is not None
                and norm.num_features == channels)
    return False


def _attached(module: nn.Module) -> bool:
    """Whether a hook or a parametrization is attached to the module itself."""
    return has_hooks(module) or parametrize.is_parametrized(module)


def _left_alone(model: nn.Module) -> List[str]:
    """Paths of the modules optimize_for_inference leaves as they are although their type is
    one it rewrites: subclasses of those types, or modules with hooks or parametrizations."""
    rewritten = (nn.Conv2d, nn.BatchNorm2d, FrozenBatchNorm2d, nn.ReLU, nn.Sequential, Bottleneck, BasicBlock,
                 FeaturePyramidNetwork, BackboneWithFPN, *_torchvision_classes()["blocks"],
                 *_torchvision_classes()["frozen_norms"], *_torchvision_classes()["backbones"])
    return [name or type(model).__name__ for name, module in model.named_modules(remove_duplicate=False)
            if isinstance(module, rewritten) and (_attached(module) or type(module) not in rewritten)
            and not (isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward
                     and not _attached(module))]


def _is_plain_conv(module: nn.Module) -> bool:
    return (runs_as_written(module, nn.Conv2d) and module.padding_mode == "zeros"
            and not isinstance(module.padding, str))


def fold_conv_norm(conv: nn.Conv2d, norm: Optional[nn.Module], relu: bool) -> Conv2dAct:
    """conv followed by norm (None: conv alone) as one Conv2dAct, folded in float64.

    norm(y) = y * scale + shift per channel with scale = gamma / sqrt(var + eps) and
    shift = beta - mean * scale, so conv-then-norm is a convolution with weight * scale and
    bias * scale + shift. Rounding the folded values once to the weight's dtype changes the
    results by float rounding only (a few 1e-6 of each level's scale in float32 over a ResNet50).
    """
    weight = conv.weight.detach().double()
    bias = (conv.bias.detach().double() if conv.bias is not None
            else torch.zeros(weight.shape[0], dtype=torch.float64, device=weight.device))
    if norm is not None:
        gamma = norm.weight.detach().double() if norm.weight is not None else 1.0
        beta = norm.bias.detach().double() if norm.bias is not None else 0.0
        scale = gamma * (norm.running_var.detach().double() + norm.eps).rsqrt()
        shift = beta - norm.running_mean.detach().double() * scale
        weight = weight * scale.view(-1, 1, 1, 1)
        bias = bias * scale + shift
    if norm is None and conv.bias is None:
        folded_bias = None
    else:
        folded_bias = bias.to(conv.weight.dtype)
    return Conv2dAct(weight.to(conv.weight.dtype), folded_bias, conv.stride, conv.padding, conv.dilation,
                     conv.groups, relu)


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


def _fold_block(block: nn.Module) -> Optional[FoldedResidualBlock]:
    """The folded version of a torchvision-style ResNet block, or None when some part of it
    does not fold (a norm of another kind, an unusual downsample)."""
    depth = 3 if hasattr(block, "conv3") else 2
    if not runs_as_written(block.relu, nn.ReLU):
        return None
    pairs = [(getattr(block, f"conv{k}"), getattr(block, f"bn{k}")) for k in range(1, depth + 1)]
    if not all(_is_plain_conv(conv) and _is_foldable_norm(norm, conv.out_channels) for conv, norm in pairs):
        return None
    downsample = None
    if block.downsample is not None:
        parts = list(block.downsample.children()) if runs_as_written(block.downsample, nn.Sequential) else []
        if not (len(parts) == 2 and _is_plain_conv(parts[0])
                and _is_foldable_norm(parts[1], parts[0].out_channels)):
            return None
        downsample = fold_conv_norm(parts[0], parts[1], relu=False)
    convs = [fold_conv_norm(conv, norm, relu=True) for conv, norm in pairs[:-1]]
    return FoldedResidualBlock(convs, fold_conv_norm(*pairs[-1], relu=True), downsample)


def _runs_children_in_order(module: nn.Module) -> bool:
    """Containers whose forward feeds each child's output to the next one, in registration
    order (so a conv child followed by a norm child is conv-then-norm)."""
    if isinstance(module, nn.Sequential):
        return type(module).forward is nn.Sequential.forward
    return type(module) in (IntermediateLayerGetter, ResNet, *_torchvision_classes()["ordered"])


def fold_norms(module: nn.Module) -> int:
    """Fold, in place, every norm that directly follows a convolution inside ``module``:
    ResNet blocks become FoldedResidualBlocks; in ordered containers (Sequential, the body's
    layer getter, the ResNet stem) a (Conv2d, norm[, ReLU]) run becomes (Conv2dAct, Identity
    [, Identity]). Returns how many norms were folded."""
    blocks = (Bottleneck, BasicBlock, *_torchvision_classes()["blocks"])
    folded = 0
    # _modules, not named_children(): a module registered twice (one ReLU used at two places)
    # must keep both of its places, or the pairs around it would look adjacent.
    children = [(name, child) for name, child in module._modules.items() if child is not None]
    for name, child in children:
        new = _fold_block(child) if runs_as_written(child, blocks) else None
        if new is not None:
            setattr(module, name, new)
            folded += 3 if hasattr(child, "conv3") else 2
            folded += child.downsample is not None
        else:
            folded += fold_norms(child)
    if _runs_children_in_order(module):
        children = [(name, child) for name, child in module._modules.items() if child is not None]
        # A layer getter's returned children must keep their own outputs.
        returned = set(getattr(module, "return_layers", {}))
        for i, (name, child) in enumerate(children[:-1]):
            norm_name, norm = children[i + 1]
            if not (_is_plain_conv(child) and _is_foldable_norm(norm, child.out_channels)) or \
                    {name, norm_name} & returned:
                continue
            relu = (i + 2 < len(children) and runs_as_written(children[i + 2][1], nn.ReLU)
                    and children[i + 2][0] not in returned)
            setattr(module, name, fold_conv_norm(child, norm, relu=relu))
            setattr(module, norm_name, nn.Identity())
            if relu:
                setattr(module, children[i + 2][0], nn.Identity())
            folded += 1
    return folded




class InferenceFPN(nn.Module):
    """A FeaturePyramidNetwork for inference: per level, ``lateral_upsample_add`` (the lateral
    1x1 conv and the whole top-down step, fused on GPU) then the 3x3 output conv; the extra
    block; then every output in ``output_memory_format``.

    Levels whose conv has a norm that is not folded keep the original conv+norm block and
    use the plain fused step (``ops.upsample_add``) after it.
    """

    __jit_ignored_attributes__ = ["in_channels_list"]  # the eager input check's only

    def __init__(self, fpn: FeaturePyramidNetwork, *, fold_norm: bool = True, fuse_lateral: bool = True,
                 output_memory_format: torch.memory_format = torch.contiguous_format):
        super().__init__()
        self.in_channels_list = fpn.in_channels_list
        self.inner_blocks = nn.ModuleList(self._convert_block(b, fold_norm) for b in fpn.inner_blocks)
        self.layer_blocks = nn.ModuleList(self._convert_block(b, fold_norm) for b in fpn.layer_blocks)
        self.extra_blocks = fpn.extra_blocks
        self.fuse_lateral = fuse_lateral
        # A bool, not the torch.memory_format (which does not pickle): torch.save must work.
        self.output_channels_last = output_memory_format == torch.channels_last

    @staticmethod
    def _convert_block(block: nn.Module, fold_norm: bool) -> nn.Module:
        """A (conv[, norm]) block as one Conv2dAct when it provably computes conv-then-norm
        (a Sequential's forward, nothing attached); anything else is kept as it is."""
        if not (isinstance(block, nn.Sequential) and type(block).forward is nn.Sequential.forward
                and not _attached(block) and 1 <= len(block) <= 2):
            return block
        conv = block[0]
        norm = block[1] if len(block) > 1 else None
        if not _is_plain_conv(conv):
            return block
        if norm is None or (fold_norm and _is_foldable_norm(norm, conv.out_channels)):
            return fold_conv_norm(conv, norm, relu=False)
        return block

    @torch.jit.unused
    def _top_down(self, level: int, feature: Tensor, top: Optional[Tensor]) -> Tensor:
        block = self.inner_blocks[level]
        if isinstance(block, Conv2dAct):
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
        direct = [isinstance(block, Conv2dAct) and not block.relu and not self.output_channels_last
                  for block in blocks]
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


class InferenceBackboneWithFPN(nn.Module):
    """body + InferenceFPN; the image goes to channels_last first when ``channels_last``.
    Keeps ``out_channels``, so detection models use it as they used the original backbone."""

    def __init__(self, body: nn.Module, fpn: InferenceFPN, out_channels: int, channels_last: bool):
        super().__init__()
        self.body = body
        self.fpn = fpn
        self.out_channels = out_channels
        self.channels_last = channels_last

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        image: List[Optional[Tensor]] = [x]
        _check_inference(self.training, "InferenceBackboneWithFPN", image)
        if x.dim() == 3:
            # An unbatched [C, H, W] image: torchvision's backbone returns batched maps for it (its
            # first norm broadcasts against [1, C, 1, 1]), so this one does too.
            x = x.unsqueeze(0)
        if torch.jit.is_scripting():
            return self._run(x)
        return self._run_pooled(x)

    @torch.jit.unused
    def _run_pooled(self, x: Tensor) -> Dict[str, Tensor]:
        """Eager CPU calls run with fpn_fast's CPU buffer pool (``ops.empty_cpu_cache``): their
        large maps reuse the previous call's memory instead of being page-faulted in anew."""
        if isinstance(x, Tensor) and x.device.type == "cpu" and not ops.capturing_graph():
            with _memory.pooled():
                return self._run(x)
        return self._run(x)

    def _run(self, x: Tensor) -> Dict[str, Tensor]:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.fpn(self.body(x))


def _optimize(module: nn.Module, options: dict) -> Tuple[nn.Module, int]:
    """(replacement of module, number of FPNs optimized in it); children replaced in place."""
    fpn_options = dict(fold_norm=options["fold_norm"], fuse_lateral=options["fuse_lateral"],
                       output_memory_format=options["output_memory_format"])
    # Exact types, nothing attached: a subclass or a hook may change what the module does.
    if (runs_as_written(module, (BackboneWithFPN, *_torchvision_classes()["backbones"]))
            and runs_as_written(module.fpn, FeaturePyramidNetwork)):
        body = module.body
        if options["fold_norm"]:
            fold_norms(body)
        optimized = InferenceBackboneWithFPN(body, InferenceFPN(module.fpn, **fpn_options), module.out_channels,
                                             options["channels_last"])
    elif runs_as_written(module, FeaturePyramidNetwork):
        optimized = InferenceFPN(module, **fpn_options)
    else:
        count = 0
        for name, child in list(module.named_children()):
            new_child, found = _optimize(child, options)
            if new_child is not child:
                setattr(module, name, new_child)
            count += found
        return module, count
    if options["channels_last"]:
        optimized.to(memory_format=torch.channels_last)
    for parameter in optimized.parameters():
        parameter.requires_grad_(False)
    return optimized.eval(), 1


def optimize_for_inference(model: nn.Module, *, channels_last: bool = True, fold_norm: bool = True,
                           fuse_lateral: bool = True,
                           output_memory_format: torch.memory_format = torch.contiguous_format,
                           winograd: bool = True) -> nn.Module:
    """A copy of ``model`` whose ResNet-FPN backbones run an inference-only fast path.

    Works on an fpn_fast backbone (``resnet_fpn_backbone``/``BackboneWithFPN``), a bare
    ``FeaturePyramidNetwork``, and any model holding them, e.g. a torchvision Faster/Mask/Keypoint
    R-CNN or RetinaNet (torchvision FPNs are converted in the copy, as ``fpn_fast.convert`` does).
    ``model`` itself is not modified. Every backbone is replaced by an
    ``InferenceBackboneWithFPN`` (a bare FPN by an ``InferenceFPN``); the rest of the model
    (heads, transforms) is left as it was.

    Args:
        channels_last: run body and FPN in channels_last (weights converted, the image converted
            once at the backbone's entry).
        fold_norm: fold every FrozenBatchNorm2d / running-statistics BatchNorm2d that follows a
            convolution into it (in float64, then rounded to the weight's dtype).
        fuse_lateral: run each FPN lateral 1x1 conv and top-down step as one op (a Triton GEMM
            with the step in its epilogue on CUDA; the conv then the extension's fused step on CPU).
        output_memory_format: memory format of the returned feature maps: torch.contiguous_format
            (default: what the heads saw before) or torch.channels_last.
        winograd: on CPU, run 3x3 stride-1 convolutions as Winograd convolutions where they pay
            (~1e-5 of a conv's scale from the direct sum). False keeps every convolution direct:
            eager float32 results then agree with the traced, scripted and exported forms (which
            call F.conv2d) to float rounding: bit for bit on most sizes, ~1e-6 of a level's scale
            on some small maps, where oneDNN's fused and plain convolutions round apart.

    Returns a new module in eval mode. Run it under ``torch.no_grad()`` or
    ``torch.inference_mode()``; its backbone raises in training mode, or with grad mode on and
    an input or parameter that requires grad.
    Folding, the reordered sums and (on CPU) Winograd 3x3 convolutions change rounding, not the
    math: float32 outputs agree with the original model's to a few 1e-6 of each level's largest
    value (tests hold them to 1e-4); NaN and inf propagate as in the original.

    On CPU the backbone's forward uses fpn_fast's buffer pool, which keeps up to
    FPN_FAST_CPU_POOL_MB MiB (default 1024) of large blocks between calls
    (``fpn_fast.ops.empty_cpu_cache()`` frees them).

    Raises:
        TypeError: ``model`` is not an nn.Module.
        ValueError: ``output_memory_format`` is neither contiguous nor channels_last, or the model
            holds no ResNet-FPN backbone or FPN.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize_for_inference expects an nn.Module, got {type(model).__name__}")
    if output_memory_format not in _OUTPUT_FORMATS:
        raise ValueError(f"output_memory_format must be torch.contiguous_format or torch.channels_last, "
                         f"got {output_memory_format}")
    options = dict(channels_last=bool(channels_last), fold_norm=bool(fold_norm), fuse_lateral=bool(fuse_lateral),
                   output_memory_format=output_memory_format)
    converted = convert(copy.deepcopy(model))
    left_alone = _left_alone(converted)
    if left_alone:
        warnings.warn("fpn_fast.optimize_for_inference leaves these modules as they are (a subclass, hooks or "
                      "parametrizations may change what they compute, so they are not folded or fused): "
                      + ", ".join(left_alone), stacklevel=2)
    optimized, found = _optimize(converted, options)
    if found == 0:
        raise ValueError(f"optimize_for_inference found no ResNet-FPN backbone (BackboneWithFPN) or "
                         f"FeaturePyramidNetwork in the {type(model).__name__} it was given")
    for module in optimized.modules():
        if isinstance(module, Conv2dAct):
            module.winograd = bool(winograd)
    return optimized.eval()
