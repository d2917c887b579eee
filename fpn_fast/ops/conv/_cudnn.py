"""cuDNN's fused convolution + bias (+ residual) + ReLU in one call: ``torch.cudnn_convolution_relu``
and ``torch.cudnn_convolution_add_relu`` (what TorchScript's freezing pass emits). A measured
candidate of ``conv2d_act`` on CUDA (``ops.measure``), taken only where it computes what eager
computes:

- PyTorch builds the fused graph's ReLU without NaN propagation (cudnn-frontend's default), so
  relu(NaN) may come out 0 where ``torch.relu`` keeps NaN. ``nan_refusal`` probes it once per
  device, dtype and memory format, each separately: a layout whose tiny probe graph cuDNN cannot
  build ("unable to find an engine") refuses that layout only. The reason is kept, so the route
  report says why the route never ran.
- Its algorithm choice is not covered by cuDNN's determinism flags, so it is refused under
  ``cudnn.deterministic`` or ``torch.use_deterministic_algorithms`` (and when cuDNN is off).

Not an autocast op: its operands are cast as autocast would cast a convolution's.
"""
import functools
from typing import Dict, Optional, Tuple

import torch

from ..dispatch import autocast_dtype
from ..measure import on_side_stream

__all__ = ["unavailable_reason", "flags_refusal", "nan_refusal", "route"]


def unavailable_reason(device_type: str) -> Optional[str]:
    """The dispatch probe: None where cuDNN's fused ops can run on ``device_type`` tensors."""
    if device_type != "cuda":
        return f"cuDNN's fused convolution runs on CUDA tensors only, not {device_type}"
    if not hasattr(torch, "cudnn_convolution_relu") or not hasattr(torch, "cudnn_convolution_add_relu"):
        return "this torch has no cudnn_convolution_relu / cudnn_convolution_add_relu"
    if not torch.cuda.is_available() or not torch.backends.cudnn.is_available():
        return "cuDNN is not available"
    return None


def flags_refusal() -> Optional[str]:
    """Why the flags in force refuse the fused route (None: they allow it)."""
    if not torch.backends.cudnn.enabled:
        return "cuDNN is turned off (torch.backends.cudnn.enabled)"
    if torch.backends.cudnn.deterministic or torch.are_deterministic_algorithms_enabled():
        return "deterministic algorithms are asked for, and the fused call's algorithm choice is not covered"
    return None


_LAYOUTS = {torch.contiguous_format: "NCHW", torch.channels_last: "channels_last"}
_NAN_PROBES: Dict[Tuple[str, torch.dtype, torch.memory_format], Optional[str]] = {}


def nan_refusal(device: torch.device, dtype: torch.dtype, memory_format: torch.memory_format) -> Optional[str]:
    """None when cuDNN's fused ReLU keeps NaN as torch.relu does on ``device`` for ``dtype`` maps
    in ``memory_format``, else why the route is refused. Probed once per (device, dtype, memory
    format), each key separately; never inside a capture (the caller checks)."""
    key = (str(device), dtype, memory_format)
    if key not in _NAN_PROBES:
        _NAN_PROBES[key] = _probe(device, dtype, memory_format)
    return _NAN_PROBES[key]


def _keeps_nan(device: torch.device, dtype: torch.dtype, memory_format: torch.memory_format) -> torch.Tensor:
    """Whether both fused calls keep a NaN input's NaN (a bool pair on the device)."""
    x = torch.ones(1, 16, 5, 5, device=device, dtype=dtype)
    x[0, :, 2, 2] = float("nan")
    x = x.contiguous(memory_format=memory_format)
    weight = torch.ones(16, 16, 1, 1, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    bias = torch.zeros(16, device=device, dtype=dtype)
    out = torch.cudnn_convolution_relu(x, weight, bias, [1, 1], [0, 0], [1, 1], 1)
    added = torch.cudnn_convolution_add_relu(x, weight, torch.zeros_like(out), 1.0, bias, [1, 1], [0, 0], [1, 1], 1)
    return torch.stack([out[0, :, 2, 2].isnan().all(), added[0, :, 2, 2].isnan().all()])


def _probe(device: torch.device, dtype: torch.dtype, memory_format: torch.memory_format) -> Optional[str]:
    where = f"{dtype}, {_LAYOUTS.get(memory_format, memory_format)}, on {device}"
    try:
        kept = on_side_stream(device, functools.partial(_keeps_nan, device, dtype, memory_format))
    except Exception as err:  # noqa: BLE001 (any failure refuses this key only)
        return f"cuDNN's fused convolution raised {type(err).__name__} ({where}): {err}"
    if not all(kept):
        return f"cuDNN's fused ReLU maps NaN to 0 ({where}), where torch.relu keeps NaN"
    return None


def _cast(t: Optional[torch.Tensor], low: Optional[torch.dtype]) -> Optional[torch.Tensor]:
    return t.to(low) if t is not None and low is not None and t.dtype == torch.float32 else t


def route(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation, groups: int):
    """The fused call decided for x's signature: ``run(x, weight, bias, residual, pack)``."""
    low = autocast_dtype("cuda")
    zeros = torch.zeros(weight.shape[0], device=x.device, dtype=low or weight.dtype)
    stride, padding, dilation = list(stride), list(padding), list(dilation)

    def run_cudnn(x, weight, bias=None, residual=None, pack=None):
        x, weight, bias, residual = (_cast(t, low) for t in (x, weight, bias, residual))
        bias = zeros if bias is None else bias
        if residual is None:
            return torch.cudnn_convolution_relu(x, weight, bias, stride, padding, dilation, groups)
        return torch.cudnn_convolution_add_relu(x, weight, residual, 1.0, bias, stride, padding, dilation, groups)
    return run_cudnn
