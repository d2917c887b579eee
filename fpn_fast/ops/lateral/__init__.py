"""The FPN's whole top-down step from a body feature map, for inference: the lateral 1x1
convolution, its bias and the coarser pyramid level's nearest upsample in one op.

``lateral_upsample_add(x, weight, bias, top)`` -> upsample_add(conv1x1(x, weight), top, bias)

Implementations: on CUDA one Triton GEMM whose epilogue does the top-down step, so the lateral
map is never stored (``_triton.py``); elsewhere ("torch") the convolution, then ``upsample_add_``
on whatever backend it resolves to.
"""
from typing import Optional

import torch

from .. import _checks
from ..conv import conv1x1, conv2d_act
from ..dispatch import autocast_dtype, capturing_graph, declare, resolve, row
from ..top_down import upsample_add, upsample_add_
from . import _triton

__all__ = ["lateral_upsample_add"]

ROWS = {
    ("lateral_upsample_add", "cpu"): row(("torch",), extension=("torch",)),
    ("lateral_upsample_add", "cuda"): row(("triton", "torch"), extension=("torch",)),
}
declare(ROWS)


def lateral_supports(implementation: str, x: torch.Tensor, fuse: bool) -> bool:
    """Whether ``implementation`` takes this call: the fused GEMM only when asked for and for its
    dtypes (float64 takes the unfused path). The GEMM sums in its own order (TF32 for float32
    where cuDNN may use it), so it rounds apart from the unfused path (``selection.ROUNDING``)."""
    return implementation != "triton" or (fuse and x.dtype in _triton.SUPPORTED_DTYPES)


def lateral_upsample_add(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         top: Optional[torch.Tensor] = None, *, fuse: bool = True) -> torch.Tensor:
    """The FPN's whole top-down step from a body feature map, for inference:
    ``(conv1x1(x, weight) + bias) + nearest_upsample(top, x's H x W)``; no top at the coarsest level.

    With ``fuse`` and Triton in charge (TABLE["lateral_upsample_add", device]) one GEMM kernel
    computes the 1x1 convolution and adds bias and upsampled top in its epilogue, in x's memory
    format (float32/float16/bfloat16; float64 takes the unfused path). Otherwise the convolution
    (``conv1x1`` for NCHW CPU maps, else F.conv2d) writes the lateral map and ``upsample_add_``
    adds bias and top into it. Under autocast every float32 input is cast to the autocast dtype
    first, as the convolution it replaces would be.

    Args:
        x: Tensor[N, C, H, W]. weight: Tensor[O, C, 1, 1]. bias: Tensor[O] or None.
        top: Tensor[N, O, th, tw] or None. All of x's dtype and device.
        fuse: allow the fused GEMM.

    Returns:
        Tensor[N, O, H, W] in x's memory format.

    Raises:
        TypeError, ValueError: inputs that do not fit (named in the message).
        RuntimeError: grad mode is on and an input requires grad (there is no backward).
    """
    _checks.check_inference_only("lateral_upsample_add", x, weight, bias, top)
    low = autocast_dtype(x.device.type) if isinstance(x, torch.Tensor) else None
    if low is not None:  # as autocast casts a convolution's operands: float32 ones only
        x, weight, bias, top = (t.to(low) if t is not None and t.dtype == torch.float32 else t
                                for t in (x, weight, bias, top))
    _checks.check_lateral_upsample_add(x, weight, bias, top)
    implementation = resolve("lateral_upsample_add", x.device.type, lambda impl: lateral_supports(impl, x, fuse))
    if implementation == "triton":
        return _triton.lateral_upsample_add(x, weight, bias, top)
    lateral = conv1x1(x, weight) if x.is_contiguous() else conv2d_act(x, weight)
    in_place = not capturing_graph()  # a captured graph gets functional ops (see FeaturePyramidNetwork)
    if top is None:
        if bias is None:
            return lateral
        return lateral.add_(bias.view(1, -1, 1, 1)) if in_place else lateral + bias.view(1, -1, 1, 1)
    return upsample_add_(lateral, top, bias) if in_place else upsample_add(lateral, top, bias)
