"""The inference layer: ``optimize_for_inference`` and the engine it runs on.

Files, in the order of the steps (each imports only those before it):
- ``conv``: ``Conv2dAct``, the folded convolution, and its packs.
- ``modules``: ``FoldedResidualBlock`` and ``InferenceFPN``.
- ``fold``: norms folded into convolutions (float64, cast back), making those modules.
- ``select``: each step's implementation decided once, bound into a runner.
- ``guards``: what a plan assumes between calls (weights, modules, what a graph hides).
- ``plan``: the forward for one input signature, written out as straight-line code.
- ``cuda_graphs``: a CUDA plan captured and replayed as one graph.
- ``engine``: the plans by signature (LRU), served per call.
- ``backbone``: ``InferenceBackboneWithFPN``, whose eager calls go through the engine.
- ``optimize``: ``optimize_for_inference``, the entry point.
"""
import sys

from . import folded_conv, optimized_backbone
from .folded_conv import Conv2dAct
from .optimized_backbone import InferenceBackboneWithFPN
from .engine import format_routes
from .fold import fold_conv_norm, fold_norms
from .modules import FoldedResidualBlock, InferenceFPN
from .optimize import optimize_for_inference

# The modules' names before issue 27, so models pickled or torch.saved then still load.
sys.modules.setdefault(__name__ + ".conv", folded_conv)
sys.modules.setdefault(__name__ + ".backbone", optimized_backbone)

__all__ = ["optimize_for_inference", "Conv2dAct", "FoldedResidualBlock", "InferenceFPN",
           "InferenceBackboneWithFPN", "fold_conv_norm", "fold_norms", "format_routes"]
