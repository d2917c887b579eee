"""ResNet trunk (stem + layer1..layer4) for the FPN backbone.

Module names and state_dict keys follow torchvision's ``resnet*`` models (``conv1``, ``bn1``,
``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight``...) so their checkpoints load as they
are. There is no classification head: the detection backbone never runs ``avgpool``/``fc``, and
the checkpoint loader drops the ``fc.*`` keys.

Besides resnet18..152 the trunks of ResNeXt (grouped 3x3 convs in the bottleneck) and Wide ResNet
(wider bottlenecks) are built with torchvision's layout: a bottleneck of ``planes`` has inner width
``int(planes * width_per_group / 64) * groups``.
"""
from typing import Callable, List, NamedTuple, Optional, Type, Union

import torch
from torch import Tensor, nn

from ._torchvision_compat import FrozenBatchNorm2dBase

__all__ = ["FrozenBatchNorm2d", "BasicBlock", "Bottleneck", "ResNet", "ResNetSpec", "RESNET_SPECS", "resnet"]

NormLayer = Callable[[int], nn.Module]


class FrozenBatchNorm2d(FrozenBatchNorm2dBase):
    """BatchNorm2d with fixed statistics and affine terms, all stored as buffers (no parameters).

    Detection fine-tuning uses batches too small for batch statistics, so the ImageNet ones are
    frozen. Checkpoints of ``nn.BatchNorm2d`` load into it: ``num_batches_tracked`` is dropped.
    When torchvision is installed this is a subclass of its ``FrozenBatchNorm2d``, so
    torchvision's ``overwrite_eps`` (eps=0 for the legacy COCO detection checkpoints) applies.

    Args:
        num_features: number of channels ``C`` of the ``(N, C, H, W)`` input.
        eps: added to ``running_var`` before the square root.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        # torchvision's base, if any, lends only its type: the buffers below are all there is.
        nn.Module.__init__(self)
        self.eps = eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, x: Tensor) -> Tensor:
        # Fold the four vectors into one per-channel scale and shift, then a single multiply-add
        # over the feature map (the same arithmetic as torchvision's, so outputs match bit for bit).
        scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
        shift = self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale
        return x * scale + shift

    def __repr__(self) -> str:
        # torchvision's format, whichever base is in use.
        return f"{type(self).__name__}({self.weight.shape[0]}, eps={self.eps})"


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, groups=groups,
                     bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; the first conv carries the stride.

    ``groups`` and ``base_width`` exist for a uniform block interface; like torchvision's, the
    basic block supports only 1 and 64.
    """

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, downsample: Optional[nn.Module],
                 norm_layer: NormLayer, groups: int = 1, base_width: int = 64):
        super().__init__()
        if groups != 1 or base_width != 64:
            raise ValueError(f"BasicBlock only supports groups=1 and base_width=64, got groups={groups}, "
                             f"base_width={base_width}")
        self.conv1 = _conv3x3(in_channels, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        # The shortcut after the main branch, as torchvision's: hooks and FX graphs see the same order.
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), with the stride on the 3x3 conv ("ResNet v1.5").

    The inner width is ``int(planes * base_width / 64) * groups`` and the 3x3 conv has ``groups``
    groups: ResNeXt (e.g. 32 groups of 4) and Wide ResNet (base_width 128) bottlenecks.
    """

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, downsample: Optional[nn.Module],
                 norm_layer: NormLayer, groups: int = 1, base_width: int = 64):
        super().__init__()
        width = int(planes * (base_width / 64.0)) * groups
        self.conv1 = _conv1x1(in_channels, width)
        self.bn1 = norm_layer(width)
        self.conv2 = _conv3x3(width, width, stride, groups)
        self.bn2 = norm_layer(width)
        self.conv3 = _conv1x1(width, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        # The shortcut after the main branch, as torchvision's: hooks and FX graphs see the same order.
        out += x if self.downsample is None else self.downsample(x)
        return self.relu(out)


Block = Type[Union[BasicBlock, Bottleneck]]


class ResNet(nn.Module):
    """The convolutional trunk of a ResNet: conv1/bn1/relu/maxpool stem, then layer1..layer4.

    ``stage_channels[k]`` is the width of ``layer{k+1}``'s output. The children are registered in
    execution order, which the backbone's stage getter relies on.

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        layers: number of blocks in each of the 4 stages.
        norm_layer: norm after every conv, called with the channel count; ``nn.BatchNorm2d`` when None.
        groups: groups of the bottleneck's 3x3 conv (ResNeXt's cardinality).
        width_per_group: channels per group of the bottleneck's 3x3 conv at ``planes=64`` (64 for
            ResNet, 128 for Wide ResNet).

    Raises:
        ValueError: ``layers`` does not have 4 entries, ``groups`` or ``width_per_group`` is not a
            positive integer, or ``BasicBlock`` is asked for groups or width other than 1 and 64.
    """

    def __init__(self, block: Block, layers: List[int], norm_layer: Optional[NormLayer] = None, groups: int = 1,
                 width_per_group: int = 64):
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"ResNet needs 4 stage depths, got {layers}")
        for name, value in (("groups", groups), ("width_per_group", width_per_group)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ResNet {name} must be a positive integer, got {value!r}")
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stage_channels: List[int] = []
        in_channels = 64
        for index, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers)):
            stage, in_channels = self._make_stage(block, in_channels, planes, depth, stride=1 if index == 0 else 2,
                                                  norm_layer=norm_layer, groups=groups, base_width=width_per_group)
            self.add_module(f"layer{index + 1}", stage)
            self.stage_channels.append(in_channels)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_stage(block: Block, in_channels: int, planes: int, depth: int, stride: int,
                    norm_layer: NormLayer, groups: int, base_width: int):
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(_conv1x1(in_channels, out_channels, stride), norm_layer(out_channels))
        blocks = [block(in_channels, planes, stride, downsample, norm_layer, groups, base_width)]
        blocks += [block(out_channels, planes, 1, None, norm_layer, groups, base_width) for _ in range(1, depth)]
        return nn.Sequential(*blocks), out_channels

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


class ResNetSpec(NamedTuple):
    """How torchvision's builder of that name lays out the trunk (see ``ResNet``'s arguments)."""

    block: Block
    layers: List[int]
    groups: int = 1
    width_per_group: int = 64


RESNET_SPECS = {
    "resnet18": ResNetSpec(BasicBlock, [2, 2, 2, 2]),
    "resnet34": ResNetSpec(BasicBlock, [3, 4, 6, 3]),
    "resnet50": ResNetSpec(Bottleneck, [3, 4, 6, 3]),
    "resnet101": ResNetSpec(Bottleneck, [3, 4, 23, 3]),
    "resnet152": ResNetSpec(Bottleneck, [3, 8, 36, 3]),
    "resnext50_32x4d": ResNetSpec(Bottleneck, [3, 4, 6, 3], groups=32, width_per_group=4),
    "resnext101_32x8d": ResNetSpec(Bottleneck, [3, 4, 23, 3], groups=32, width_per_group=8),
    "resnext101_64x4d": ResNetSpec(Bottleneck, [3, 4, 23, 3], groups=64, width_per_group=4),
    "wide_resnet50_2": ResNetSpec(Bottleneck, [3, 4, 6, 3], width_per_group=128),
    "wide_resnet101_2": ResNetSpec(Bottleneck, [3, 4, 23, 3], width_per_group=128),
}


def resnet(name: str, norm_layer: Optional[NormLayer] = None) -> ResNet:
    """Build the named ResNet trunk (randomly initialised), laid out as torchvision's model of that name.

    Args:
        name: a key of ``RESNET_SPECS``: 'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152',
            'resnext50_32x4d', 'resnext101_32x8d', 'resnext101_64x4d', 'wide_resnet50_2' or
            'wide_resnet101_2'.
        norm_layer: norm after every conv; ``nn.BatchNorm2d`` when None.

    Returns:
        The trunk (stem and layer1..layer4, no avgpool/fc).

    Raises:
        ValueError: ``name`` is not one of the above.
    """
    if not isinstance(name, str) or name not in RESNET_SPECS:
        raise ValueError(f"unsupported backbone_name {name!r}; choose one of {sorted(RESNET_SPECS)}")
    spec = RESNET_SPECS[name]
    return ResNet(spec.block, spec.layers, norm_layer=norm_layer, groups=spec.groups,
                  width_per_group=spec.width_per_group)
