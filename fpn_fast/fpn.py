"""Feature Pyramid Network whose top-down glue runs in ``fpn_fast.ops``.

Drop-in for ``torchvision.ops.FeaturePyramidNetwork``: same constructor, same state_dict keys
(``inner_blocks.<i>.0.weight``, ``layer_blocks.<i>.0.weight``; the old ``inner_blocks.<i>.weight``
layout loads too), same OrderedDict-in / OrderedDict-out contract and extra-block protocol.

A faithful port: ``forward`` calls its submodules (``get_result_from_inner_blocks``,
``get_result_from_layer_blocks``, ``extra_blocks``) as torchvision's does, so hooks, conv
wrappers, pruning, parametrizations and subclasses behave the same. The one difference is the
top-down step of a level whose lateral block is provably a plain 1x1 conv
(``_fast_path.fusable_lateral_conv``: exact types, no hooks, no parametrizations): torchvision
computes ``conv1x1(C_i) + bias`` then ``+ interpolate(inner_{i+1})`` in separate passes; here
``ops.upsample_add`` adds the upsampled top in one pass. In inference the conv runs without its
bias and the fused step adds bias and top together (outputs agree to float rounding: the bias is
added after the conv instead of inside it), written into the conv's fresh output
(``ops.upsample_add_``), a temporary nobody else can see. When autograd records (training), the
conv keeps its bias, as torchvision's, so the bias gradient comes from the convolution's backward. Every other lateral block runs as a module and its output is left alone.
Layout and rounding changes (channels_last, norm folding) live only in
``fpn_fast.optimize_for_inference``.
"""
import copy
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import Tensor, nn

from ._fast_path import fusable_lateral_conv
from ._torchvision_compat import ExtraFPNBlockBase, FeaturePyramidNetworkBase
from . import ops
from .ops import stride2_pool, upsample_add, upsample_add_
from .ops.pool import script as pool_script
from .ops.top_down import script as top_down_script
from .ops.top_down import step as top_down_step

# FX symbolic tracing (torchvision's create_feature_extractor) records the ops as single leaf
# calls instead of tracing into their checks and dispatch.
torch.fx.wrap("stride2_pool")
torch.fx.wrap("upsample_add")

__all__ = ["ExtraFPNBlock", "LastLevelMaxPool", "FeaturePyramidNetwork", "check_fpn_inputs"]


class ExtraFPNBlock(ExtraFPNBlockBase):
    """Base of the blocks run after the pyramid: ``forward(results, x, names) -> (results, names)``.

    ``results`` are the FPN outputs (finest first), ``x`` the FPN's input feature maps, ``names``
    the output names; the block returns them extended with its extra levels.
    """

    def forward(self, results: List[Tensor], x: List[Tensor], names: List[str]) -> Tuple[List[Tensor], List[str]]:
        raise NotImplementedError


class LastLevelMaxPool(ExtraFPNBlock):
    """Adds the 'pool' level: the coarsest output subsampled by 2 (max_pool2d with kernel 1, stride 2)."""

    def forward(self, results: List[Tensor], x: List[Tensor], names: List[str]) -> Tuple[List[Tensor], List[str]]:
        names.append("pool")
        if torch.jit.is_scripting():
            results.append(pool_script.stride2_pool(results[-1]))
        else:
            results.append(self._pool(results[-1]))
        return results, names

    @torch.jit.unused
    def _pool(self, x: Tensor) -> Tensor:
        return stride2_pool(x)


def _conv_block(in_channels: int, out_channels: int, kernel_size: int,
                norm_layer: Optional[Callable[..., nn.Module]]) -> nn.Sequential:
    # conv (+ norm), the layout of torchvision's Conv2dNormActivation without activation, so
    # parameter names agree. The conv has a bias only when no norm follows it.
    layers: List[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2,
                                         bias=norm_layer is None)]
    if norm_layer is not None:
        layers.append(norm_layer(out_channels))
    return nn.Sequential(*layers)


def check_fpn_inputs(names: List[str], features: List[Tensor], in_channels_list: List[Optional[int]]) -> None:
    """Check the FPN's input before any convolution runs.

    Args:
        names: the input OrderedDict's keys, finest level first.
        features: its values: one Tensor[N, C_i, H_i, W_i] per level.
        in_channels_list: the channels each level's lateral block expects (None: not known, the
            block checks its input itself).

    Raises:
        ValueError: naming the level, when the number of maps, a map's rank or its channels do not fit.
    """
    if len(features) != len(in_channels_list):
        raise ValueError(f"FeaturePyramidNetwork expects {len(in_channels_list)} feature maps (one per lateral "
                         f"block), got {len(features)}: {names}")
    for i, (name, feature, channels) in enumerate(zip(names, features, in_channels_list)):
        if isinstance(feature, torch.fx.Proxy):
            continue  # symbolic tracing: nothing to check until the traced graph runs
        if not isinstance(feature, Tensor):
            raise ValueError(f"FeaturePyramidNetwork: feature map {name!r} (level {i}) is a "
                             f"{type(feature).__name__}, not a tensor")
        if feature.dim() != 4:
            raise ValueError(f"FeaturePyramidNetwork: feature map {name!r} (level {i}) must be 4-D "
                             f"(N, C, H, W), got shape {tuple(feature.shape)}")
        if channels is not None and feature.shape[1] != channels:
            raise ValueError(f"FeaturePyramidNetwork: feature map {name!r} (level {i}) has "
                             f"{feature.shape[1]} channels, its lateral block expects {channels}")


def _grad_needed(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _lateral_in_channels(block: nn.Module) -> Optional[int]:
    """Input channels of a lateral block that starts with a convolution, else None."""
    first = block[0] if isinstance(block, nn.Sequential) and len(block) > 0 else block
    channels = getattr(first, "in_channels", None)
    return channels if isinstance(channels, int) else None


class _ScriptedLateral(nn.Sequential):
    """A fusable lateral block (one plain 1x1 conv) as TorchScript sees it; holds the same conv
    under the same name ("0"). ``fused_lateral`` marks it for the scripted FPN."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv)
        self.fused_lateral = True  # an attribute, so TorchScript's (static) hasattr sees it

    def conv_without_bias(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self[0].weight)

    def bias_of_conv(self, dtype: torch.dtype) -> Optional[Tensor]:
        bias = self[0].bias
        return None if bias is None else bias.to(dtype)


class FeaturePyramidNetwork(FeaturePyramidNetworkBase):
    """FPN over feature maps given in increasing depth (finest first), as torchvision's
    (Lin et al., "Feature Pyramid Networks for Object Detection", CVPR 2017).

    When torchvision is installed this is a subclass of its ``FeaturePyramidNetwork`` (for its
    type only, see ``_torchvision_compat``), so torchvision's FX feature extraction keeps it as
    one leaf node (``create_feature_extractor(backbone, {"fpn": ...})`` returns the pyramid), as
    it keeps torchvision's own.

    Args:
        in_channels_list: channels of each input feature map, in input order.
        out_channels: channels of every output level.
        extra_blocks: run after the pyramid with the ``ExtraFPNBlock`` contract (e.g.
            ``LastLevelMaxPool`` or torchvision's ``LastLevelP6P7``), or None.
        norm_layer: norm after each conv (the convs then have no bias), or None.

    ``forward(x)`` takes an OrderedDict of Tensor[N, C_i, H_i, W_i] (finest first) and returns an
    OrderedDict of Tensor[N, out_channels, H_i, W_i] under the same names, then the extra levels.

    Raises:
        ValueError: an entry of in_channels_list is 0.
        TypeError: extra_blocks is not a module.
    """

    _version = 2
    __jit_unused_properties__ = ["in_channels_list"]  # Python-side introspection only

    def __init__(self, in_channels_list: List[int], out_channels: int,
                 extra_blocks: Optional[nn.Module] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None):
        # torchvision's base, if any, lends only its type: the blocks below are all there is.
        nn.Module.__init__(self)
        if any(c == 0 for c in in_channels_list):
            raise ValueError("in_channels=0 is currently not supported")
        self.inner_blocks = nn.ModuleList(_conv_block(c, out_channels, 1, norm_layer) for c in in_channels_list)
        self.layer_blocks = nn.ModuleList(_conv_block(out_channels, out_channels, 3, norm_layer)
                                          for _ in in_channels_list)
        # Before extra_blocks is attached, so its own initialisation is left alone.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight, a=1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        if extra_blocks is not None and not isinstance(extra_blocks, nn.Module):
            raise TypeError(f"extra_blocks should be an ExtraFPNBlock module, not {type(extra_blocks)}")
        self.extra_blocks = extra_blocks

    @property
    def in_channels_list(self) -> List[Optional[int]]:
        """Channels each level's lateral block takes (from its first conv; None if it has none)."""
        return [_lateral_in_channels(block) for block in self.inner_blocks]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checkpoints from before the conv+norm blocks (version < 2) name the convs directly.
        for block in ("inner_blocks", "layer_blocks"):
            for i in range(len(self.inner_blocks)):
                for kind in ("weight", "bias"):
                    old_key = f"{prefix}{block}.{i}.{kind}"
                    new_key = f"{prefix}{block}.{i}.0.{kind}"
                    if old_key in state_dict and new_key not in state_dict:
                        state_dict[new_key] = state_dict.pop(old_key)
        # nn.Module's, not torchvision's base's: the keys are renamed above, once.
        nn.Module._load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                                        unexpected_keys, error_msgs)

    def get_result_from_inner_blocks(self, x: Tensor, idx: int) -> Tensor:
        """``self.inner_blocks[idx](x)``, the lateral block of level ``idx`` (negative counts from the end)."""
        if idx < 0:
            idx += len(self.inner_blocks)
        out = x
        for i, module in enumerate(self.inner_blocks):  # a loop, as torchvision's (TorchScript indexing)
            if i == idx:
                out = module(x)
        return out

    def get_result_from_layer_blocks(self, x: Tensor, idx: int) -> Tensor:
        """``self.layer_blocks[idx](x)``, the 3x3 output block of level ``idx``."""
        if idx < 0:
            idx += len(self.layer_blocks)
        out = x
        for i, module in enumerate(self.layer_blocks):
            if i == idx:
                out = module(x)
        return out

    def _fusable_lateral(self, idx: int) -> Optional[nn.Conv2d]:
        """The plain 1x1 conv of level idx's lateral block when the fused step may replace the
        block's call (see _fast_path), else None."""
        if type(self).get_result_from_inner_blocks is not FeaturePyramidNetwork.get_result_from_inner_blocks:
            return None  # a subclass decides what a lateral is
        return fusable_lateral_conv(self.inner_blocks[idx])

    def _top_down(self, idx: int, feature: Tensor, top: Optional[Tensor]) -> Tensor:
        """Level idx's inner map: its lateral plus the nearest-upsampled coarser inner map
        (``top``; None at the coarsest level), by the one top-down step (``ops.top_down.step``)."""
        conv = self._fusable_lateral(idx)
        if conv is None:  # the block runs as a module; its output may be seen by hooks: no in place
            return top_down_step(self.get_result_from_inner_blocks(feature, idx), top, None, False, upsample_add)
        if not isinstance(feature, torch.fx.Proxy) and _grad_needed(feature, top, conv.weight, conv.bias):
            # Training: the conv keeps its bias, exactly torchvision's op (and its bias gradient,
            # computed inside the convolution's backward: a separate sum over the map in low
            # precision was far slower than float32 on CPU, benchmarks/RESULTS.md 2026-12-04); the
            # fused step adds top only.
            return top_down_step(F.conv2d(feature, conv.weight, conv.bias), top, None, False, upsample_add)
        lateral = F.conv2d(feature, conv.weight)  # fresh: only this method sees it
        # Under autocast the conv ran in low precision; so would its bias inside it.
        bias = None if conv.bias is None else conv.bias.to(lateral.dtype)
        # In place only in eager inference: a graph being captured (FX, torch.export,
        # torch.compile, torch.jit.trace) may later run with autograd, and functional ops suit
        # those tools. The ops are passed from here, where FX's wrap of them applies.
        in_place = not (isinstance(feature, torch.fx.Proxy) or ops.capturing_graph())
        return top_down_step(lateral, top, bias, in_place, upsample_add_ if in_place else upsample_add)

    def forward(self, x: Dict[str, Tensor]) -> Dict[str, Tensor]:
        """Args: x: OrderedDict of Tensor[N, C_i, H_i, W_i], finest level first.
        Returns: OrderedDict of Tensor[N, out_channels, H_i, W_i] (same names), then extra levels."""
        if torch.jit.is_scripting():
            return self._forward_scripted(x)
        return self._forward_eager(x)

    def __prepare_scriptable__(self) -> "FeaturePyramidNetwork":
        """What ``torch.jit.script`` compiles: a shallow copy sharing every submodule, whose
        fusable lateral blocks (decided now, as the eager forward decides per call) are shown
        to TorchScript as ``_ScriptedLateral`` (same conv, same state_dict keys)."""
        scripted = copy.copy(self)
        scripted._modules = OrderedDict(self._modules)
        scripted.inner_blocks = nn.ModuleList(
            _ScriptedLateral(conv) if conv is not None else block
            for conv, block in zip((self._fusable_lateral(i) for i in range(len(self.inner_blocks))),
                                   self.inner_blocks))
        return scripted

    def _lateral_scripted(self, x: Tensor, idx: int) -> Tuple[Tensor, Optional[Tensor], bool]:
        """(lateral map, bias still to add, whether the map is a fused conv's fresh output only
        the FPN sees) of level idx in TorchScript."""
        lateral = x
        bias: Optional[Tensor] = None
        fused = False
        for i, block in enumerate(self.inner_blocks):
            if i == idx:
                if hasattr(block, "fused_lateral"):  # static in TorchScript: only _ScriptedLateral has it
                    lateral = block.conv_without_bias(x)
                    bias = block.bias_of_conv(lateral.dtype)
                    fused = True
                else:
                    lateral = block(x)
        return lateral, bias, fused

    def _forward_scripted(self, x: Dict[str, Tensor]) -> Dict[str, Tensor]:
        names = list(x.keys())
        features = list(x.values())
        if len(features) != len(self.inner_blocks):
            raise ValueError("FeaturePyramidNetwork expects " + str(len(self.inner_blocks))
                             + " feature maps (one per lateral block), got " + str(len(features)))
        last = len(features) - 1
        inner: Optional[Tensor] = None
        results: List[Tensor] = []
        for idx in range(last, -1, -1):
            lateral, bias, fused = self._lateral_scripted(features[idx], idx)
            needs_grad = torch.is_grad_enabled() and (lateral.requires_grad
                                                      or (inner is not None and inner.requires_grad)
                                                      or (bias is not None and bias.requires_grad))
            current = top_down_script.step(lateral, inner, bias, fused and not needs_grad)
            results.insert(0, self.get_result_from_layer_blocks(current, idx))
            inner = current
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, features, names)
        out: Dict[str, Tensor] = OrderedDict()
        for name, result in zip(names, results):
            out[name] = result
        return out

    @torch.jit.unused
    def _forward_eager(self, x: Dict[str, Tensor]) -> Dict[str, Tensor]:
        names = list(x.keys())
        features = list(x.values())
        check_fpn_inputs(names, features, self.in_channels_list)
        last = len(features) - 1
        inner = self._top_down(last, features[last], None)
        results = [self.get_result_from_layer_blocks(inner, last)]
        for idx in range(last - 1, -1, -1):
            inner = self._top_down(idx, features[idx], inner)
            results.insert(0, self.get_result_from_layer_blocks(inner, idx))
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, features, names)
        return OrderedDict(zip(names, results))
