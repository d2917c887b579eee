"""ResNet trunk (stem + layer1..layer4) for the FPN backbone.

Module names and state_dict keys follow torchvision's ``resnet*`` models (``conv1``, ``bn1``,
``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight``...) so their checkpoints load as they
are. There is no classification head: the detection backbone never runs ``avgpool``/``fc``, and
the checkpoint loader drops the ``fc.*`` keys.
"""
from typing import Callable, List, Optional, Type, Union

import torch
from torch import Tensor, nn

__all__ = ["FrozenBatchNorm2d", "BasicBlock", "Bottleneck", "ResNet", "RESNET_SPECS", "resnet"]

NormLayer = Callable[[int], nn.Module]


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine terms, all stored as buffers (no parameters).

    Detection fine-tuning uses batches too small for batch statistics, so the ImageNet ones are
    frozen. Checkpoints of ``nn.BatchNorm2d`` load into it: ``num_batches_tracked`` is dropped.
    """

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
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

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs with a residual; the first conv carries the stride."""

    expansion = 1

    def __init__(self, in_channels: int, planes: int, stride: int, downsample: Optional[nn.Module],
                 norm_layer: NormLayer):
        super().__init__()
        self.conv1 = _conv3x3(in_channels, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += shortcut
        return self.relu(out)


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), with the stride on the 3x3 conv ("ResNet v1.5")."""

    expansion = 4

    def __init__(self, in_channels: int, planes: int, stride: int, downsample: Optional[nn.Module],
                 norm_layer: NormLayer):
        super().__init__()
        self.conv1 = _conv1x1(in_channels, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.conv3 = _conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += shortcut
        return self.relu(out)


Block = Type[Union[BasicBlock, Bottleneck]]


class ResNet(nn.Module):
    """The convolutional trunk of a ResNet: conv1/bn1/relu/maxpool stem, then layer1..layer4.

    ``stage_channels[k]`` is the width of ``layer{k+1}``'s output. The children are registered in
    execution order, which the backbone's stage getter relies on.
    """

    def __init__(self, block: Block, layers: List[int], norm_layer: Optional[NormLayer] = None):
        super().__init__()
        if len(layers) != 4:
            raise ValueError(f"ResNet needs 4 stage depths, got {layers}")
        norm_layer = nn.BatchNorm2d if norm_layer is None else norm_layer
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.stage_channels: List[int] = []
        in_channels = 64
        for index, (planes, depth) in enumerate(zip((64, 128, 256, 512), layers)):
            stage, in_channels = self._make_stage(block, in_channels, planes, depth,
                                                  stride=1 if index == 0 else 2, norm_layer=norm_layer)
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
                    norm_layer: NormLayer):
        out_channels = planes * block.expansion
        downsample = None
        if stride != 1 or in_channels != out_channels:
            downsample = nn.Sequential(_conv1x1(in_channels, out_channels, stride), norm_layer(out_channels))
        blocks = [block(in_channels, planes, stride, downsample, norm_layer)]
        blocks += [block(out_channels, planes, 1, None, norm_layer) for _ in range(1, depth)]
        return nn.Sequential(*blocks), out_channels

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


RESNET_SPECS = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}


def resnet(name: str, norm_layer: Optional[NormLayer] = None) -> ResNet:
    """Build the named ResNet trunk (randomly initialised)."""
    if name not in RESNET_SPECS:
        raise ValueError(f"unsupported backbone_name {name!r}; choose one of {sorted(RESNET_SPECS)}")
    block, layers = RESNET_SPECS[name]
    return ResNet(block, layers, norm_layer=norm_layer)
