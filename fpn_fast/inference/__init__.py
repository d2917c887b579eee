"""The inference layer: ``optimize_for_inference`` and the engine it runs on (fold the norms,
record the optimized forward once per input signature as a plan, replay it, on CUDA as a graph).
Its files, in the order of the steps: docs/design.md, "How the code is laid out"; each imports
only those before it, and none imports a backend of the ops (tests/inference/test_layers.py).
"""
import sys

from . import folded_conv, optimized_backbone
from .folded_conv import Conv2dAct
from .optimized_backbone import InferenceBackboneWithFPN
from .engine import format_routes
from .fold import fold_conv_norm, fold_norms
from .modules import FoldedResidualBlock, InferenceFPN
from .optimize import optimize_for_inference
from .warmup import warmup

# The modules' names before issue 27, so models pickled or torch.saved then still load.
sys.modules.setdefault(__name__ + ".conv", folded_conv)
sys.modules.setdefault(__name__ + ".backbone", optimized_backbone)

__all__ = ["optimize_for_inference", "Conv2dAct", "FoldedResidualBlock", "InferenceFPN",
           "InferenceBackboneWithFPN", "fold_conv_norm", "fold_norms", "format_routes", "warmup"]
