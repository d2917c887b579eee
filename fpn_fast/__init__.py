"""fpn_fast: a drop-in ResNet-FPN backbone for torchvision detection models with fused FPN kernels."""
from . import ops

__version__ = "0.1.0"
