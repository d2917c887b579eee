"""ResNet + FPN detection backbone, a drop-in for torchvision's ``resnet_fpn_backbone``.

Weights come only from local checkpoints (a path or a state dict of a torchvision ResNet
classification model); nothing is ever downloaded.

``resnet_fpn_backbone`` also takes torchvision's older calling conventions, with torchvision's
deprecation warnings: positional arguments, and ``pretrained=False`` (or a bool ``weights``) for
``weights=None``. ``pretrained=True`` asks for a download and is refused with the way to load
those weights instead.
"""
import functools
import inspect
import os
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Union

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

    Args:
        model: the trunk to load into, in place.
        weights: a path to a file saved with ``torch.save`` (loaded with ``weights_only=True``)
            or a state dict.

    Raises:
        FileNotFoundError: the path names no file.
        TypeError: ``weights`` is neither a path nor a mapping (e.g. a torchvision weights enum).
        ValueError: the checkpoint is not a state dict, or its keys or shapes do not fit ``model``.
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


def _positional_as_keywords(builder_name: str, names: Sequence[str], args: tuple,
                            kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """kwargs with the positional args added under the names of the keyword-only parameters, in
    order, warning as torchvision's ``kwonly_to_pos_or_kw`` does."""
    if len(args) > len(names):
        raise TypeError(f"{builder_name}() takes at most {len(names)} positional arguments ({', '.join(names)}) "
                        f"but {len(args)} were given")
    positional = dict(zip(names, args))
    repeated = [name for name in positional if name in kwargs]
    if repeated:
        raise TypeError(f"{builder_name}() got multiple values for argument(s) {repeated}")
    warnings.warn(f"Using {', '.join(map(repr, positional))} as positional parameter(s) is deprecated (as in "
                  "torchvision since 0.13) and may be removed in the future. Please use keyword parameter(s) "
                  "instead.", stacklevel=3)
    return {**kwargs, **positional}


def _weights_from_pretrained(builder_name: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """kwargs with torchvision's legacy ``pretrained`` (or a bool ``weights``, as a positional
    ``pretrained`` lands there) turned into ``weights``, warning as torchvision's
    ``handle_legacy_interface`` does. True would mean downloading ImageNet weights: refused."""
    kwargs = dict(kwargs)
    if "pretrained" in kwargs:
        if "weights" in kwargs:
            raise TypeError(f"{builder_name}() got both 'weights' and the deprecated 'pretrained'; "
                            "pass only weights= (None, a checkpoint path or a state dict)")
        pretrained = kwargs.pop("pretrained")
        warnings.warn("The parameter 'pretrained' is deprecated (as in torchvision since 0.13) and may be removed "
                      "in the future, please use 'weights' instead.", stacklevel=3)
    else:
        pretrained = kwargs["weights"]
    if pretrained:
        name = kwargs.get("backbone_name", "<backbone_name>")
        raise ValueError(
            f"{builder_name}(): pretrained=True asks for torchvision's ImageNet weights of {name!r}, and fpn_fast "
            "never downloads weights. Load them with torchvision and pass the state dict instead: "
            f"weights=torchvision.models.get_model_weights({name!r}).IMAGENET1K_V1.get_state_dict()")
    warnings.warn("Arguments other than a checkpoint path, a state dict or `None` for 'weights' are deprecated (as "
                  "in torchvision since 0.13) and may be removed in the future. The current behavior is equivalent "
                  "to passing `weights=None`.", stacklevel=3)
    kwargs["weights"] = None
    return kwargs


def _torchvision_calling_conventions(builder: Callable[..., BackboneWithFPN]) -> Callable[..., BackboneWithFPN]:
    """Let a builder with keyword-only parameters be called as torchvision's builders can be:
    positionally, and with the legacy ``pretrained`` flag (see the module docstring)."""
    names = tuple(inspect.signature(builder).parameters)

    @functools.wraps(builder)
    def wrapper(*args: Any, **kwargs: Any) -> BackboneWithFPN:
        if args:
            kwargs = _positional_as_keywords(builder.__name__, names, args, kwargs)
        if "pretrained" in kwargs or isinstance(kwargs.get("weights"), bool):
            kwargs = _weights_from_pretrained(builder.__name__, kwargs)
        return builder(**kwargs)

    return wrapper


def _check_returned_layers(returned_layers: Sequence[int]) -> None:
    if not isinstance(returned_layers, (list, tuple)) or not returned_layers or any(
            isinstance(k, bool) or not isinstance(k, int) for k in returned_layers):
        raise TypeError(f"returned_layers must be a non-empty list of ints in [1,4], got {returned_layers!r}")
    if min(returned_layers) <= 0 or max(returned_layers) >= 5:
        raise ValueError(f"Each returned layer should be in the range [1,4]. Got {returned_layers}")
    if list(returned_layers) != sorted(set(returned_layers)):
        # The body returns its stages in execution order, so the FPN's in_channels_list must follow it.
        raise ValueError(f"returned_layers must be increasing without repeats, got {returned_layers}")


@_torchvision_calling_conventions
def resnet_fpn_backbone(*, backbone_name: str, weights: Optional[Checkpoint] = None,
                        norm_layer: Optional[Callable[..., nn.Module]] = None, trainable_layers: int = 3,
                        returned_layers: Optional[List[int]] = None,
                        extra_blocks: Optional[nn.Module] = None) -> BackboneWithFPN:
    """ResNet body + FPN with 256 output channels, as torchvision's ``resnet_fpn_backbone``.

    Keyword arguments as torchvision's; its deprecated positional arguments and ``pretrained=False``
    work too, with its deprecation warnings (see the module docstring).

    Args:
        backbone_name: 'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnext50_32x4d',
            'resnext101_32x8d', 'resnext101_64x4d', 'wide_resnet50_2' or 'wide_resnet101_2'.
        weights: None (random init) or a local checkpoint of the ResNet classification model:
            a file path (loaded with ``weights_only=True``) or a state dict; ``fc.*`` keys ignored.
        norm_layer: the body's norm layer; ``FrozenBatchNorm2d`` when None.
        trainable_layers: how many stages, counted from layer4 back to conv1 (5 adds bn1), keep
            ``requires_grad``; the rest of the body is frozen. 0..5.
        returned_layers: which of layer1..layer4 feed the FPN, increasing (default all); output
            names '0','1',...
        extra_blocks: FPN extra block; ``LastLevelMaxPool()`` (the 'pool' level) when None.

    Returns:
        A ``BackboneWithFPN`` whose ``body`` has torchvision's state_dict keys for that ResNet.

    Raises:
        ValueError: unknown ``backbone_name``; ``trainable_layers`` outside 0..5; a returned layer
            outside 1..4 or ``returned_layers`` not increasing; ``pretrained=True``; a checkpoint
            that does not fit (see ``load_resnet_checkpoint``).
        TypeError: ``trainable_layers`` not an int, ``returned_layers`` not a non-empty list of
            ints, ``weights`` of an unsupported type, too many positional arguments, an argument
            given both positionally and by keyword, or both ``weights`` and ``pretrained``.
        FileNotFoundError: ``weights`` is a path that names no file.
    """
    if isinstance(trainable_layers, bool) or not isinstance(trainable_layers, int):
        raise TypeError(f"trainable_layers must be an int in [0,5], got {trainable_layers!r}")
    if not 0 <= trainable_layers <= 5:
        raise ValueError(f"Trainable layers should be in the range [0,5], got {trainable_layers}")
    if returned_layers is None:
        returned_layers = [1, 2, 3, 4]
    _check_returned_layers(returned_layers)

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
    """``resnet_fpn_backbone(backbone_name="resnet50", **kwargs)``.

    Args:
        **kwargs: any keyword argument of ``resnet_fpn_backbone`` but ``backbone_name``.

    Returns:
        The ResNet-50 ``BackboneWithFPN``.

    Raises:
        As ``resnet_fpn_backbone``.
    """
    return resnet_fpn_backbone(backbone_name="resnet50", **kwargs)
