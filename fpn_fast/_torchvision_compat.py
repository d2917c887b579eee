"""Base classes shared with torchvision when it is installed, so its type checks accept ours.

torchvision's ``FeaturePyramidNetwork`` only takes ``extra_blocks`` that are instances of its
``ExtraFPNBlock``, and its ``overwrite_eps`` (run by its detection builders after loading the
legacy COCO checkpoints) only touches instances of its ``FrozenBatchNorm2d``. Deriving ours from
theirs makes fpn_fast's modules pass both checks. torchvision stays optional: without it the
bases are plain ``nn.Module``. The bases lend their type only: our classes define their own
``__init__``, buffers and ``forward``.
"""
from torch import nn

__all__ = ["ExtraFPNBlockBase", "FrozenBatchNorm2dBase"]

try:
    from torchvision.ops.feature_pyramid_network import ExtraFPNBlock as ExtraFPNBlockBase
    from torchvision.ops.misc import FrozenBatchNorm2d as FrozenBatchNorm2dBase
except ImportError:
    ExtraFPNBlockBase = nn.Module
    FrozenBatchNorm2dBase = nn.Module
