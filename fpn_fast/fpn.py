"""Feature Pyramid Network whose top-down glue runs in ``fpn_fast.ops``.

Drop-in for ``torchvision.ops.FeaturePyramidNetwork``: same constructor, same state_dict keys
(``inner_blocks.<i>.0.weight``, ``layer_blocks.<i>.0.weight``; the old ``inner_blocks.<i>.weight``
layout loads too), same OrderedDict-in / OrderedDict-out contract and extra-block protocol.

The difference is the top-down step. torchvision computes ``conv1x1(C_i) + bias`` then
``+ interpolate(inner_{i+1})`` in separate passes; here the lateral conv runs without its bias
and ``ops.upsample_add`` applies bias and upsampled top in one pass. Under no_grad the sum is
written into the fresh lateral conv output (``ops.upsample_add_``), saving a full-size buffer,
and on CPU the convolutions run in channels_last when ``ops.prefer_channels_last`` says it pays.
"""
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import ops

__all__ = ["ExtraFPNBlock", "LastLevelMaxPool", "FeaturePyramidNetwork", "check_fpn_inputs"]


class ExtraFPNBlock(__import__("_torchvision_compat", globals(), fromlist=["ExtraFPNBlockBase"], level=1).ExtraFPNBlockBase):
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
        results.append(ops.stride2_pool(results[-1]))
        return results, names


def _conv_block(in_channels: int, out_channels: int, kernel_size: int,
                norm_layer: Optional[Callable[..., nn.Module]]) -> nn.Sequential:
    # conv (+ norm), the layout of torchvision's Conv2dNormActivation without activation, so
    # parameter names agree. The conv has a bias only when no norm follows it.
    layers: List[nn.Module] = [nn.Conv2d(in_channels, out_channels, kernel_size, padding=(kernel_size - 1) // 2,
                                         bias=norm_layer is None)]
    if norm_layer is not None:
        layers.append(norm_layer(out_channels))
    return nn.Sequential(*layers)


def check_fpn_inputs(names: List[str], features: List[Tensor], in_channels_list: List[int]) -> None:
    """ValueError naming the level unless there is one 4-D map per level with the right channels.

    Plain Python on shapes: cheap, and torch.compile folds it into guards.
    """
    if len(features) != len(in_channels_list):
        raise ValueError(f"FeaturePyramidNetwork expects {len(in_channels_list)} feature maps (one per entry "
                         f"of in_channels_list), got {len(features)}: {names}")
    for i, (name, feature, channels) in enumerate(zip(names, features, in_channels_list)):
        if not isinstance(feature, Tensor):
            raise ValueError(f"FeaturePyramidNetwork: feature map {name!r} (level {i}) is a "
                             f"{type(feature).__name__}, not a tensor")
        if feature.dim() != 4:
            raise ValueError(f"FeaturePyramidNetwork: feature map {name!r} (level {i}) must be 4-D "
                             f"(N, C, H, W), got shape {tuple(feature.shape)}")
        if feature.shape[1] != channels:
            raise ValueError(f"FeaturePyramidNetwork: feature map {name!r} (level {i}) has "
                             f"{feature.shape[1]} channels, in_channels_list expects {channels}")


def _grad_needed(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class FeaturePyramidNetwork(nn.Module):
    """FPN over feature maps given in increasing depth (finest first), as torchvision's.

    Args:
        in_channels_list: channels of each input feature map, in input order.
        out_channels: channels of every output level.
        extra_blocks: run after the pyramid with the ``ExtraFPNBlock`` contract (e.g.
            ``LastLevelMaxPool`` or torchvision's ``LastLevelP6P7``), or None.
        norm_layer: norm after each conv (the convs then have no bias), or None.
    """

    _version = 2

    def __init__(self, in_channels_list: List[int], out_channels: int,
                 extra_blocks: Optional[nn.Module] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None):
        super().__init__()
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
    def in_channels_list(self) -> List[int]:
        return [block[0].in_channels for block in self.inner_blocks]

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
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    @staticmethod
    def _lateral(block: nn.Module, x: Tensor, channels_last: bool) -> Tuple[Tensor, Optional[Tensor]]:
        """The lateral 1x1 conv output (channels_last when asked) and the bias still to add.

        Without a norm the conv runs bias-free and its bias is returned for the fused add; with a
        norm the block runs whole (its conv has no bias) and nothing is left to add.
        """
        if len(block) == 1:
            conv = block[0]
            lateral = ops.conv1x1(x, conv.weight, channels_last)
            bias = conv.bias
            if bias is not None and bias.dtype != lateral.dtype:
                # Under autocast the conv ran in low precision; so would its bias inside it.
                bias = bias.to(lateral.dtype)
            return lateral, bias
        return block(x), None

    def forward(self, x: Dict[str, Tensor]) -> Dict[str, Tensor]:
        names = list(x.keys())
        features = list(x.values())
        check_fpn_inputs(names, features, self.in_channels_list)
        # Inference on CPU NCHW maps: convolutions in channels_last (faster in oneDNN), outputs
        # converted back below so callers and extra blocks see the layout they passed in.
        channels_last = ops.prefer_channels_last(features) and not _grad_needed(*self.parameters())

        last = len(features) - 1
        lateral, bias = self._lateral(self.inner_blocks[last], features[last], channels_last)
        if bias is None:
            inner = lateral
        elif _grad_needed(lateral, bias):
            inner = lateral + bias.view(1, -1, 1, 1)
        else:
            inner = lateral.add_(bias.view(1, -1, 1, 1))
        results = [self.layer_blocks[last](inner)]

        for idx in range(last - 1, -1, -1):
            lateral, bias = self._lateral(self.inner_blocks[idx], features[idx], channels_last)
            if _grad_needed(lateral, inner, bias):
                inner = ops.upsample_add(lateral, inner, bias)
            else:
                inner = ops.upsample_add_(lateral, inner, bias)
            results.insert(0, self.layer_blocks[idx](inner))

        if channels_last:
            results = [ops.to_nchw(r) for r in results]
        if self.extra_blocks is not None:
            results, names = self.extra_blocks(results, features, names)
        return OrderedDict(zip(names, results))
