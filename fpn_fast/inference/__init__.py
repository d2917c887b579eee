"""The inference layer: ``optimize_for_inference`` and the engine it runs on.

Files, in the order of the steps: ``fold`` (norms folded into convolutions), ``modules`` (the
optimized modules), ``select`` (each step's implementation decided once), ``plan`` (a forward per
input signature, the weight guard, the plan cache), ``cuda_graphs`` (a CUDA plan replayed as one
graph), ``optimize`` (the entry point).
"""
from .fold import fold_conv_norm, fold_norms
from .modules import Conv2dAct, FoldedResidualBlock, InferenceBackboneWithFPN, InferenceFPN
from .optimize import optimize_for_inference

__all__ = ["optimize_for_inference", "Conv2dAct", "FoldedResidualBlock", "InferenceFPN",
           "InferenceBackboneWithFPN", "fold_conv_norm", "fold_norms"]
