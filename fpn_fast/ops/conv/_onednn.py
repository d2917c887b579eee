"""oneDNN's fused CPU convolution: conv + bias [+ residual] in one call.

ATen's ``mkldnn::_convolution_pointwise`` ops are what inductor emits for these patterns on
CPU; eager code can call them too. Each fused post-op saves a full pass over the activation
(the bias add and ReLU of a folded ResNet block, the residual add). They are internal ops,
so they are probed once, on first use, against ``F.conv2d`` and not used unless they exist and agree.

oneDNN's ReLU post-op is not used: it maps NaN to 0 where torch.relu keeps NaN (its eltwise
ReLU is a max with 0); torch's in-place ReLU after the call costs about the same as the fused
post-op over a whole ResNet50-FPN (benchmarks/RESULTS.md).
"""
import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def pack_weight(weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                groups: int, input_size: Sequence[int]) -> torch.Tensor:
    """The weight reordered once into the blocked layout oneDNN's convolution picks for inputs
    of ``input_size`` (an opaque mkldnn tensor), as inductor's freezing prepacks it; saves the
    per-call reorder. Gives bit-identical results for channels_last inputs of any size."""
    return torch.ops.mkldnn._reorder_convolution_weight(
        weight, list(padding), list(stride), list(dilation), groups, list(input_size))


def conv2d_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
               padding: Sequence[int], dilation: Sequence[int], groups: int,
               residual: Optional[torch.Tensor]) -> torch.Tensor:
    """F.conv2d(x, weight, bias, ...) + residual in one oneDNN call (float32 CPU tensors;
    ``weight`` dense, or packed by ``pack_weight`` for a channels_last x)."""
    if residual is None:
        return torch.ops.mkldnn._convolution_pointwise(
            x, weight, bias, list(padding), list(stride), list(dilation), groups, "none", [], "")
    # Out of place: the in-place variant would overwrite the caller's residual tensor.
    return torch.ops.mkldnn._convolution_pointwise.binary(
        x, residual, weight, bias, list(padding), list(stride), list(dilation), groups, "add", 1.0,
        None, [], "")


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """None when the fused convolution exists and agrees with F.conv2d, else why not (cached)."""
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN (mkldnn)"
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 5, 6, generator=generator)
        weight = torch.randn(3, 4, 3, 3, generator=generator)
        bias = torch.randn(3, generator=generator)
        residual = torch.randn(1, 3, 3, 3, generator=generator)
        with torch.no_grad():
            got = conv2d_act(x, weight, bias, (2, 2), (1, 1), (1, 1), 1, residual)
            want = F.conv2d(x, weight, bias, 2, 1) + residual
    except (AttributeError, RuntimeError) as err:
        return f"oneDNN fused convolution unusable: {err}"
    if got.shape != want.shape or not torch.allclose(got, want, rtol=1e-5, atol=1e-5):
        return "oneDNN fused convolution disagrees with F.conv2d"
    return None


