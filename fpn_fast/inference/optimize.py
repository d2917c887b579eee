"""``optimize_for_inference(model)``: an explicit inference mode for ResNet-FPN backbones.

Three changes, each optional, none touching the model passed in (it is copied):
- norm folding (``fold.py``): every frozen batch norm (and BatchNorm2d with running statistics)
  right after a convolution becomes part of that convolution's weight and bias, computed in
  float64 and cast back; the body then runs conv(+bias)(+residual)(+ReLU) only (``ops.conv2d_act``).
- channels_last: body and FPN weights and activations in channels_last (the image is converted
  once at the backbone's entry); the outputs come back in ``output_memory_format``.
- lateral fusion: each FPN level's lateral 1x1 convolution, bias, and upsample-add of the
  coarser level run as one ``ops.lateral_upsample_add`` (on a GPU a Triton GEMM whose epilogue
  does the top-down step, so the lateral map is never stored).

The backbone then decides once per input signature and replays (``plan.py``, ``cuda_graphs.py``).
On CPU (float32), the 3x3 stride-1 convolutions run a Winograd convolution where it pays, and the
backbone's forward runs inside fpn_fast's CPU buffer pool (``ops.cpu_cache``).
"""
import copy
import warnings
from typing import Tuple

import torch
from torch import nn

from .._fast_path import runs_as_written
from ..backbone import BackboneWithFPN
from ..convert import convert
from ..fpn import FeaturePyramidNetwork
from . import fold, guards
from .fold import _torchvision_classes, fold_fpn_block, fold_norms
from .optimized_backbone import InferenceBackboneWithFPN
from .folded_conv import Conv2dAct
from .modules import InferenceFPN

__all__ = ["optimize_for_inference"]

_OUTPUT_FORMATS = (torch.contiguous_format, torch.channels_last)


def inference_fpn(fpn: FeaturePyramidNetwork, *, fold_norm: bool = True, fuse_lateral: bool = True,
                  output_memory_format: torch.memory_format = torch.contiguous_format) -> InferenceFPN:
    """The InferenceFPN of ``fpn``: its blocks folded where they provably are conv(-then-norm)."""
    return InferenceFPN([fold_fpn_block(b, fold_norm) for b in fpn.inner_blocks],
                        [fold_fpn_block(b, fold_norm) for b in fpn.layer_blocks], fpn.extra_blocks,
                        fpn.in_channels_list, fuse_lateral=fuse_lateral, output_memory_format=output_memory_format)


def _optimize(module: nn.Module, options: dict) -> Tuple[nn.Module, int]:
    """(replacement of module, number of FPNs optimized in it); children replaced in place."""
    fpn_options = dict(fold_norm=options["fold_norm"], fuse_lateral=options["fuse_lateral"],
                       output_memory_format=options["output_memory_format"])
    # Exact types, nothing attached: a subclass or a hook may change what the module does.
    if (runs_as_written(module, (BackboneWithFPN, *_torchvision_classes()["backbones"]))
            and runs_as_written(module.fpn, FeaturePyramidNetwork)):
        body = module.body
        if options["fold_norm"]:
            fold_norms(body)
        optimized = InferenceBackboneWithFPN(body, inference_fpn(module.fpn, **fpn_options), module.out_channels,
                                             options["channels_last"])
    elif runs_as_written(module, FeaturePyramidNetwork):
        optimized = inference_fpn(module, **fpn_options)
    else:
        count = 0
        for name, child in list(module.named_children()):
            new_child, found = _optimize(child, options)
            if new_child is not child:
                setattr(module, name, new_child)
            count += found
        return module, count
    if options["channels_last"]:
        optimized.to(memory_format=torch.channels_last)
    for parameter in optimized.parameters():
        parameter.requires_grad_(False)
    return optimized.eval(), 1


def optimize_for_inference(model: nn.Module, *, channels_last: bool = True, fold_norm: bool = True,
                           fuse_lateral: bool = True,
                           output_memory_format: torch.memory_format = torch.contiguous_format,
                           winograd: bool = True, plan: bool = True, max_plans: int = 8,
                           cuda_graphs: bool = True, static_outputs: bool = False) -> nn.Module:
    """A copy of ``model`` whose ResNet-FPN backbones run an inference-only fast path.

    Works on an fpn_fast backbone (``resnet_fpn_backbone``/``BackboneWithFPN``), a bare
    ``FeaturePyramidNetwork``, and any model holding them, e.g. a torchvision Faster/Mask/Keypoint
    R-CNN or RetinaNet (torchvision FPNs are converted in the copy, as ``fpn_fast.convert`` does).
    ``model`` itself is not modified. Every backbone is replaced by an
    ``InferenceBackboneWithFPN`` (a bare FPN by an ``InferenceFPN``); the rest of the model
    (heads, transforms) is left as it was.

    Args:
        channels_last: run body and FPN in channels_last (weights converted, the image converted
            once at the backbone's entry).
        fold_norm: fold every FrozenBatchNorm2d / running-statistics BatchNorm2d that follows a
            convolution into it (in float64, then rounded to the weight's dtype).
        fuse_lateral: run each FPN lateral 1x1 conv and top-down step as one op (a Triton GEMM
            with the step in its epilogue on CUDA; the conv then the extension's fused step on CPU).
        output_memory_format: memory format of the returned feature maps: torch.contiguous_format
            (default: what the heads saw before) or torch.channels_last.
        winograd: on CPU, run 3x3 stride-1 convolutions as Winograd convolutions where they pay
            (~1e-5 of a conv's scale from the direct sum). False keeps every convolution direct:
            eager float32 results then agree with the traced, scripted and exported forms (which
            call F.conv2d) to float rounding: bit for bit on most sizes, ~1e-6 of a level's scale
            on some small maps, where oneDNN's fused and plain convolutions round apart.
        plan: run each backbone through the inference engine: the first call with an input
            signature (shape, strides, dtype, device, autocast dtype, grad mode, backend, conv
            flags) decides every step and packs the weights, later calls only run that plan
            (``InferenceBackboneWithFPN.set_engine`` changes these options later).
        max_plans: signatures each backbone keeps (least recently used evicted).
        cuda_graphs: on CUDA, replay each plan as one CUDA graph (static input and outputs in a
            memory pool all of a backbone's graphs share).
        static_outputs: return a graph's static outputs, which the next call with the same
            signature overwrites, instead of copies of them.

    Returns a new module in eval mode. Run it under ``torch.no_grad()`` or
    ``torch.inference_mode()``; its backbone raises in training mode, or with grad mode on and
    an input or parameter that requires grad.
    Folding, the reordered sums and (on CPU) Winograd 3x3 convolutions change rounding, not the
    math: float32 outputs agree with the original model's to a few 1e-6 of each level's largest
    value (tests hold them to 1e-4); NaN and inf propagate as in the original.

    On CPU the backbone's forward uses fpn_fast's buffer pool, which keeps up to
    FPN_FAST_CPU_POOL_MB MiB (default 1024) of large blocks between calls
    (``fpn_fast.ops.empty_cpu_cache()`` frees them).

    Raises:
        TypeError: ``model`` is not an nn.Module.
        ValueError: ``output_memory_format`` is neither contiguous nor channels_last, the model
            holds no ResNet-FPN backbone or FPN, or max_plans < 1.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize_for_inference expects an nn.Module, got {type(model).__name__}")
    if max_plans < 1:
        raise ValueError(f"max_plans must be at least 1, got {max_plans}")
    if output_memory_format not in _OUTPUT_FORMATS:
        raise ValueError(f"output_memory_format must be torch.contiguous_format or torch.channels_last, "
                         f"got {output_memory_format}")
    options = dict(channels_last=bool(channels_last), fold_norm=bool(fold_norm), fuse_lateral=bool(fuse_lateral),
                   output_memory_format=output_memory_format)
    # Copied, converted and folded outside inference mode whatever mode the caller is in: a copy
    # made under torch.inference_mode would hold inference tensors (the heads' parameters
    # included), which autograd cannot save and load_state_dict cannot write outside it.
    with torch.inference_mode(False):
        converted = convert(copy.deepcopy(model))
        left_alone = fold.left_alone(converted)
        if left_alone:
            warnings.warn("fpn_fast.optimize_for_inference leaves these modules as they are (a subclass, hooks "
                          "or parametrizations may change what they compute, so they are not folded or fused): "
                          + ", ".join(left_alone), stacklevel=2)
        optimized, found = _optimize(converted, options)
    if found == 0:
        raise ValueError(f"optimize_for_inference found no ResNet-FPN backbone (BackboneWithFPN) or "
                         f"FeaturePyramidNetwork in the {type(model).__name__} it was given")
    for module in optimized.modules():
        if isinstance(module, Conv2dAct):
            module.winograd = bool(winograd)
        elif isinstance(module, InferenceBackboneWithFPN):
            module.set_engine(plan, max_plans=max_plans, cuda_graphs=cuda_graphs, static_outputs=static_outputs)
    if plan:
        guards.host_guard_mechanism()  # its self-check, once per process: here rather than in a served call
    return optimized.eval()
