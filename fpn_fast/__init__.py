"""fpn_fast: a drop-in ResNet-FPN backbone for torchvision detection models with fused FPN kernels."""
from . import ops
from .backbone import BackboneWithFPN, IntermediateLayerGetter, resnet50_fpn_backbone, resnet_fpn_backbone
from .convert import convert
from .fpn import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool
from .export import decompositions
from .inference import optimize_for_inference, warmup
from .ops import library_path, load_choices, save_choices
from .resnet import FrozenBatchNorm2d, ResNet

__version__ = "0.1.0"

__all__ = [
    "ops", "BackboneWithFPN", "IntermediateLayerGetter", "resnet_fpn_backbone", "resnet50_fpn_backbone",
    "convert", "optimize_for_inference", "ExtraFPNBlock", "FeaturePyramidNetwork", "LastLevelMaxPool",
    "FrozenBatchNorm2d", "ResNet", "library_path", "decompositions", "warmup",
    "save_choices", "load_choices",
]
