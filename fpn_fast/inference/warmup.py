"""``fpn_fast.warmup``: plan (and on CUDA capture) the input shapes a server will see, before it
serves, so that no request waits for a build."""
import contextlib
import time
from typing import Dict, Iterable, List, Optional, Sequence

import torch
from torch import nn

from .optimized_backbone import InferenceBackboneWithFPN

__all__ = ["warmup"]

_MODES = {"inference": torch.inference_mode, "no_grad": torch.no_grad}


def warmup(model: nn.Module, shapes: Iterable[Sequence[int]], *, dtype: Optional[torch.dtype] = None,
           device: Optional[torch.device] = None, memory_format: torch.memory_format = torch.contiguous_format,
           grad_mode: str = "inference") -> List[Dict[str, object]]:
    """Build the plan of every given input shape in every optimized backbone of ``model``.

    A plan is keyed by the backbone's input signature (shape, strides, dtype, device, autocast
    dtype, grad and inference mode, backend and convolution flags: ``plan.signature``), so warm up
    under the conditions the server calls in: the same ``dtype`` (autocast), the same grad mode
    and the same memory format. Each shape is called once with random data; on CUDA that call
    also captures the plan's graph. Later calls with a warmed signature build nothing.

    For a torchvision detector, the backbone's input shape is the batch its transform makes:
    images resized so that the short side is ``min_size`` (the long side at most ``max_size``),
    then padded to a multiple of 32 (``GeneralizedRCNNTransform.size_divisible``), e.g.
    (1, 3, 800, 1216) for one 480x640 photo at the default sizes.

    Args:
        model: an ``optimize_for_inference`` result: an optimized backbone or any module holding
            some (a whole detector). Must be in eval mode.
        shapes: backbone input shapes, each (N, C, H, W) (N may be 0) or (C, H, W).
        dtype: None for float32; torch.bfloat16 or torch.float16 to warm up autocast calls
            (the server then calls under ``torch.autocast(device.type, dtype=dtype)``).
        device: where the images live; default: the device of each backbone's first parameter.
        memory_format: of the warm-up images (torch.contiguous_format, as detectors pass them, or
            torch.channels_last): part of the signature.
        grad_mode: "inference" (``torch.inference_mode()``) or "no_grad" (``torch.no_grad()``):
            the mode the server calls in; part of the signature.

    Returns:
        One dict per (backbone, shape): ``backbone`` (its qualified name in model, "" for model
        itself), ``shape``, ``built`` (plans this call built: 0 if the signature was already
        warm), ``seconds`` (the call's wall time, synchronised on CUDA), and ``plan`` (the
        engine's entry for it: ``planned``, ``graph``, ``reason``; see
        ``InferenceBackboneWithFPN.plans``).

    Raises:
        TypeError: model is not an nn.Module, or a shape is not a sequence of ints.
        ValueError: model holds no optimized backbone, is in training mode, a shape has not 3 or 4
            dimensions or has a negative size, dtype is not a low-precision float dtype, or
            grad_mode is unknown.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"warmup expects an nn.Module, got {type(model).__name__}")
    backbones = [(name, m) for name, m in model.named_modules() if isinstance(m, InferenceBackboneWithFPN)]
    if not backbones:
        raise ValueError(f"warmup found no optimized backbone in the {type(model).__name__} it was given; "
                         "pass the result of fpn_fast.optimize_for_inference")
    if model.training:
        raise ValueError("warmup needs the model in eval mode (call model.eval()): optimized backbones "
                         "refuse training mode")
    if dtype is not None and dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be None (float32), torch.bfloat16 or torch.float16, got {dtype}")
    if grad_mode not in _MODES:
        raise ValueError(f"grad_mode must be one of {sorted(_MODES)}, got {grad_mode!r}")
    shapes = [_checked_shape(shape) for shape in shapes]
    results = []
    for name, backbone in backbones:
        where = torch.device(device) if device is not None else next(backbone.parameters()).device
        autocast = (torch.autocast(where.type, dtype=dtype) if dtype is not None else contextlib.nullcontext())
        for shape in shapes:
            images = torch.randn(shape, device=where)
            if images.dim() == 4:
                images = images.contiguous(memory_format=memory_format)
            engine = backbone.__dict__.get("_engine")
            before = engine.builds if engine is not None else 0
            begin = time.perf_counter()
            with _MODES[grad_mode](), autocast:
                backbone(images)
            if where.type == "cuda":
                torch.cuda.synchronize(where)
            seconds = time.perf_counter() - begin
            engine = backbone.__dict__.get("_engine")
            entries = backbone.plans()
            results.append(dict(backbone=name, shape=tuple(shape), seconds=seconds,
                                built=(engine.builds - before) if engine is not None else 0,
                                plan={k: entries[-1][k] for k in ("planned", "graph", "reason")} if entries else None))
    return results


def _checked_shape(shape) -> tuple:
    try:
        dims = tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        raise TypeError(f"each shape must be a sequence of ints (N, C, H, W), got {shape!r}") from None
    if len(dims) not in (3, 4) or min(dims) < 0:
        raise ValueError(f"each shape must be (N, C, H, W) or (C, H, W) with sizes >= 0, got {dims}")
    return dims
