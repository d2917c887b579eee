"""Base classes shared with torchvision when it is installed, so its type checks accept ours.

torchvision's ``FeaturePyramidNetwork`` only takes ``extra_blocks`` that are instances of its
``ExtraFPNBlock``, and its ``overwrite_eps`` (run by its detection builders after loading the
legacy COCO checkpoints) only touches instances of its ``FrozenBatchNorm2d``. Its FX feature
extraction (``create_feature_extractor``, ``get_graph_node_names``) keeps instances of every
``torchvision.ops`` module class as leaf modules: one node each, not traced into. Deriving ours
from theirs makes fpn_fast's modules pass these checks as torchvision's own do. torchvision stays
optional: without it the bases are plain ``nn.Module``. The bases lend their type only: our
classes define their own ``__init__`` (calling ``nn.Module.__init__``, not the base's), buffers,
state_dict loading and ``forward``.
"""
from torch import nn

__all__ = ["ExtraFPNBlockBase", "FeaturePyramidNetworkBase", "FrozenBatchNorm2dBase"]

try:
    from torchvision.ops.feature_pyramid_network import ExtraFPNBlock as ExtraFPNBlockBase
    from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork as FeaturePyramidNetworkBase
    from torchvision.ops.misc import FrozenBatchNorm2d as FrozenBatchNorm2dBase
except ImportError:
    ExtraFPNBlockBase = nn.Module
    FeaturePyramidNetworkBase = nn.Module
    FrozenBatchNorm2dBase = nn.Module
