"""ResNet + FPN detection backbone, a drop-in for torchvision's ``resnet_fpn_backbone``.

Weights come only from local checkpoints (a path or a state dict of a torchvision ResNet
classification model); nothing is ever downloaded.
"""
import os
from collections import OrderedDict
from typing import Callable, Dict, List, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from .fpn import FeaturePyramidNetwork, LastLevelMaxPool
from .resnet import FrozenBatchNorm2d, ResNet, resnet

__all__ = ["IntermediateLayerGetter", "BackboneWithFPN", "resnet_fpn_backbone", "resnet50_fpn_backbone",
           "load_resnet_checkpoint"]

Checkpoint = Union[str, "os.PathLike[str]", Mapping[str, Tensor]]


class IntermediateLayerGetter(nn.ModuleDict):
    """Runs a model's direct children in registration order and returns the outputs of the
    selected ones, renamed: ``return_layers = {child_name: output_name}``.

    Children after the last selected one are not kept (for a ResNet: no avgpool, no fc), so the
    state_dict keys are the model's own (``conv1.weight``, ``layer1.0.conv1.weight``...).
    """

    _version = 2

    def __init__(self, model: nn.Module, return_layers: Dict[str, str]):
        children = [name for name, _ in model.named_children()]
        missing = [name for name in return_layers if name not in children]
        if missing:
            raise ValueError(f"return_layers {missing} are not children of the model (it has {children})")
        pending = set(return_layers)
        kept = OrderedDict()
        for name, module in model.named_children():
            kept[name] = module
            pending.discard(name)
            if not pending:
                break
        super().__init__(kept)
        self.return_layers = {str(k): str(v) for k, v in return_layers.items()}

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        out = OrderedDict()
        for name, module in self.items():
            x = module(x)
            if name in self.return_layers:
                out[self.return_layers[name]] = x
        return out


class BackboneWithFPN(nn.Module):
    """A body returning the selected stages of ``backbone`` followed by a FeaturePyramidNetwork.

    Args:
        backbone: model whose direct children run in registration order.
        return_layers: {child name: output name} of the stages fed to the FPN.
        in_channels_list: channels of those stages, in order.
        out_channels: channels of the FPN outputs (also the ``out_channels`` attribute).
        extra_blocks: FPN extra block; ``LastLevelMaxPool()`` when None.
        norm_layer: norm layer inside the FPN, or None.
    """

    def __init__(self, backbone: nn.Module, return_layers: Dict[str, str], in_channels_list: List[int],
                 out_channels: int, extra_blocks: Optional[nn.Module] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None):
        super().__init__()
        if extra_blocks is None:
            extra_blocks = LastLevelMaxPool()
        self.body = IntermediateLayerGetter(backbone, return_layers=return_layers)
        self.fpn = FeaturePyramidNetwork(in_channels_list=in_channels_list, out_channels=out_channels,
                                         extra_blocks=extra_blocks, norm_layer=norm_layer)
        self.out_channels = out_channels

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        return self.fpn(self.body(x))


def load_resnet_checkpoint(model: ResNet, weights: Checkpoint) -> None:
    """Load a torchvision ResNet classification checkpoint (path or state dict) into ``model``.

    The ``fc.*`` keys are ignored; every other key must fit exactly.
    """
    if isinstance(weights, (str, os.PathLike)):
        path = os.fspath(weights)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ResNet checkpoint not found: {path!r}")
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        source = f"checkpoint {path!r}"
    elif isinstance(weights, Mapping):
        state_dict = weights
        source = "the given state dict"
    else:
        raise TypeError(
            f"weights must be None, a path to a local checkpoint or a state dict; got {type(weights).__name__}. "
            "fpn_fast never downloads weights: only local checkpoints are supported (for torchvision "
            "weights, load them with torchvision and pass model.state_dict() or a saved file).")
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{source} holds a {type(state_dict).__name__}, not a state dict")
    state_dict = OrderedDict((k, v) for k, v in state_dict.items() if not k.startswith("fc."))
    try:
        result = model.load_state_dict(state_dict, strict=False)
    except RuntimeError as err:  # shape mismatches
        raise ValueError(f"{source} does not fit the ResNet: {err}") from err
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{source} does not fit the ResNet: missing keys {result.missing_keys}, "
                         f"unexpected keys {result.unexpected_keys}")


def resnet_fpn_backbone(*, backbone_name: str, weights: Optional[Checkpoint] = None,
                        norm_layer: Optional[Callable[..., nn.Module]] = None, trainable_layers: int = 3,
                        returned_layers: Optional[List[int]] = None,
                        extra_blocks: Optional[nn.Module] = None) -> BackboneWithFPN:
    """ResNet body + FPN with 256 output channels, as torchvision's ``resnet_fpn_backbone``.

    Args:
        backbone_name: 'resnet18', 'resnet34', 'resnet50', 'resnet101' or 'resnet152'.
        weights: None (random init) or a local checkpoint of the ResNet classification model:
            a file path (loaded with ``weights_only=True``) or a state dict; ``fc.*`` keys ignored.
        norm_layer: the body's norm layer; ``FrozenBatchNorm2d`` when None.
        trainable_layers: how many stages, counted from layer4 back to conv1 (5 adds bn1), keep
            ``requires_grad``; the rest of the body is frozen. 0..5.
        returned_layers: which of layer1..layer4 feed the FPN (default all), output names '0','1',...
        extra_blocks: FPN extra block; ``LastLevelMaxPool()`` (the 'pool' level) when None.
    """
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"Trainable layers should be in the range [0,5], got {trainable_layers}")
    if returned_layers is None:
        returned_layers = [1, 2, 3, 4]
    if min(returned_layers) <= 0 or max(returned_layers) >= 5:
        raise ValueError(f"Each returned layer should be in the range [1,4]. Got {returned_layers}")

    body = resnet(backbone_name, norm_layer=FrozenBatchNorm2d if norm_layer is None else norm_layer)
    if weights is not None:
        load_resnet_checkpoint(body, weights)

    trainable = ["layer4", "layer3", "layer2", "layer1", "conv1"][:trainable_layers]
    if trainable_layers == 5:
        trainable.append("bn1")
    for name, parameter in body.named_parameters():
        if not name.startswith(tuple(trainable)):
            parameter.requires_grad_(False)

    return_layers = {f"layer{k}": str(i) for i, k in enumerate(returned_layers)}
    in_channels_list = [body.stage_channels[k - 1] for k in returned_layers]
    return BackboneWithFPN(body, return_layers, in_channels_list, out_channels=256, extra_blocks=extra_blocks)


def resnet50_fpn_backbone(**kwargs) -> BackboneWithFPN:
    """``resnet_fpn_backbone(backbone_name="resnet50", **kwargs)``."""
    return resnet_fpn_backbone(backbone_name="resnet50", **kwargs)
