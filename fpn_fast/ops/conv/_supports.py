"""Which implementation of ``conv2d_act`` / ``conv2d_nchw`` takes a call: the per-call
``supports`` predicates the dispatch rows are resolved with, reading the thresholds of
``ops.selection``. They say nothing of rounding (``selection.ROUNDING`` does)."""
import math
from typing import Optional

import torch

from ..dispatch import autocast_dtype, capturing_graph
from ..measure import stream_capturing
from . import _cudnn, _nnpack, _triton_epilogue, _triton_gemm, _triton_implicit_gemm, _winograd  # noqa: F401 (registers)
from ..selection import NNPACK_MIN_CHANNELS

# The Winograd implementations; they hand results with non-finite values to a direct one.
WINOGRAD_ROUTES = ("winograd", "nnpack")
# The convolutions as one Triton GEMM with the tail in its epilogue: 1x1 stride-1 windows
# (``_triton_gemm.conv1x1_act``), and every other window (``_triton_implicit_gemm.conv2d_act``).
TRITON_GEMM_ROUTES = ("triton_gemm", "triton_conv")


def channels_last_like(x: torch.Tensor) -> bool:
    """Whether F.conv2d lays its output out channels_last for this 4-D x: an NHWC map, or a
    strided view of one (a channel slice), whose channels are closer together than its columns."""
    if x.is_contiguous():
        return False
    return x.is_contiguous(memory_format=torch.channels_last) or x.stride(1) < x.stride(3)


def conv_out_shape(x: torch.Tensor, weight: torch.Tensor, stride, padding, dilation) -> torch.Size:
    """The (N, O, H', W') F.conv2d makes of a 4-D x: the fused residual add takes that shape only."""
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1
               for size, k, s, p, d in zip(x.shape[2:], weight.shape[2:], stride, padding, dilation)]
    return torch.Size([x.shape[0], weight.shape[0], *spatial])


def conv2d_act_supports(implementation: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        stride, padding, dilation, relu: bool, residual: Optional[torch.Tensor]) -> bool:
    """Whether ``implementation`` takes this conv2d_act call: dtype, shape, layout, autocast and
    the thresholds of ``ops.selection`` (where a Winograd route pays). It says nothing of
    rounding: the Winograd routes take calls they do not compute bit for bit
    (``selection.ROUNDING``). No fused implementation is used while a graph is captured:
    torch.compile fuses the tail itself, and the oneDNN ops have no fake kernels and no tracer
    support."""
    if implementation == "torch":
        return True
    if implementation in WINOGRAD_ROUTES and (weight.dim() != 4 or weight.shape[2] != 3 or weight.shape[3] != 3):
        return False  # the common case (1x1 convs) decided first: this runs for every conv call
    if capturing_graph() or x.dim() != 4:
        return False
    residual_fits = residual is None or residual.shape == conv_out_shape(x, weight, stride, padding, dilation)
    if implementation in ("winograd", "nnpack", "onednn"):  # the CPU float32 ones
        if not residual_fits or (residual is not None and (residual.dtype != torch.float32
                                                           or residual.device.type != "cpu")):
            return False
        groups = x.shape[1] // max(weight.shape[1], 1)
        if implementation == "winograd":
            return _winograd_fits(x, weight, bias, stride, padding, dilation, groups)
        if implementation == "nnpack":
            return x.shape[1] >= NNPACK_MIN_CHANNELS and _nnpack_fits(x, weight, bias, stride, padding, dilation,
                                                                       groups)
        # oneDNN's residual-add post-op cannot add into a 1x1 output map on torch 2.11 ("could
        # not create a memory", with channels_last or prepacked weights): F.conv2d and the tail then.
        into_one_pixel = residual is not None and math.prod(residual.shape[2:]) == 1
        return (x.dtype == torch.float32 and weight.dtype == torch.float32 and torch.backends.mkldnn.enabled
                and autocast_dtype("cpu") is None and not into_one_pixel)
    out_dtype = autocast_dtype(x.device.type) or x.dtype
    if implementation in TRITON_GEMM_ROUTES:
        return triton_gemm_refusal(implementation, x, weight, bias, stride, padding, dilation, residual) is None
    if implementation == "cudnn_relu":
        return residual_fits and cudnn_relu_refusal(x, weight, relu) is None
    # triton: the epilogue pass after the convolution, in the convolution's output dtype
    return (out_dtype in _triton_epilogue.SUPPORTED_DTYPES and residual_fits
            and (bias is not None or residual is not None or relu))


def cudnn_relu_refusal(x: torch.Tensor, weight: torch.Tensor, relu: bool) -> Optional[str]:
    """Why cuDNN's fused conv + bias (+ residual) + ReLU does not take this conv2d_act call (None:
    it does, given a residual of the output's shape): it needs a ReLU, no groups, cuDNN on
    without deterministic algorithms, and a ReLU that keeps NaN for x's device, dtype and layout
    (probed once per key: ``_cudnn.nan_refusal``)."""
    if not relu:
        return "no ReLU to fuse"
    if x.dim() != 4 or weight.dim() != 4 or x.shape[1] != weight.shape[1]:
        return "grouped or not 4-D"
    reason = _cudnn.flags_refusal()
    if reason is not None:
        return reason
    if capturing_graph() or stream_capturing(x.device):
        return "a graph is being captured (the probe cannot run)"
    layout = torch.channels_last if channels_last_like(x) else torch.contiguous_format
    return _cudnn.nan_refusal(x.device, autocast_dtype(x.device.type) or x.dtype, layout)


def triton_gemm_refusal(implementation: str, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        stride, padding, dilation, residual: Optional[torch.Tensor]) -> Optional[str]:
    """Why a Triton GEMM route does not take this conv2d_act call (None: it does): the 1x1
    kernel takes 1x1 stride-1 unpadded windows only, the implicit GEMM every other window; both
    no groups or dilation, and float32/float16/bfloat16 operands once autocast's casts are made
    (``_triton_gemm.problem``, on the operands as the route passes them)."""
    one_by_one = (weight.dim() == 4 and tuple(weight.shape[2:]) == (1, 1) and tuple(stride) == (1, 1)
                  and tuple(padding) == (0, 0))
    if implementation == "triton_gemm" and not one_by_one:
        return "not a 1x1 stride-1 unpadded window (the implicit GEMM's)"
    if implementation == "triton_conv" and one_by_one:
        return "a 1x1 stride-1 window (the 1x1 GEMM's)"
    low = autocast_dtype(x.device.type)
    cast = [None if t is None else (_as_dtype(t, low) if low is not None and t.dtype == torch.float32 else t)
            for t in (x, weight, bias, residual)]
    groups = x.shape[1] // max(weight.shape[1], 1) if x.dim() == 4 and weight.dim() == 4 else 1
    found = _triton_gemm.problem(implementation, *cast, stride, padding, dilation, groups)
    return None if found is None else found[1]


def _as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A tensor of t's shape and device in ``dtype`` holding one element (what a check of dtypes,
    shapes and devices needs, without casting t)."""
    return t.new_empty((), dtype=dtype).expand(t.shape)


def conv2d_nchw_supports(implementation: str, x: torch.Tensor, weight: torch.Tensor,
                         bias: Optional[torch.Tensor], stride, padding, dilation, groups: int) -> bool:
    """Whether ``implementation`` takes this conv2d_nchw call (as ``conv2d_act_supports``)."""
    if implementation == "triton_conv":
        return (not capturing_graph() and x.dim() == 4 and groups == 1
                and triton_gemm_refusal(implementation, x, weight, bias, stride, padding, dilation, None) is None)
    if implementation == "winograd":
        return _winograd_fits(x, weight, bias, stride, padding, dilation, groups)
    if implementation != "nnpack":
        return conv2d_act_supports(implementation, x, weight, bias, stride, padding, dilation, False, None)
    return _nnpack_fits(x, weight, bias, stride, padding, dilation, groups)


def _winograd_shape_fits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding,
                         dilation, groups: int) -> bool:
    """A float32 CPU 3x3 convolution both Winograd routes compute: stride and dilation 1, no
    groups, matching channels, padding 0 or 1, no autocast, nothing captured."""
    return (not capturing_graph() and x.dim() == 4 and x.dtype == torch.float32 and weight.dtype == torch.float32
            and (bias is None or bias.dtype == torch.float32) and autocast_dtype("cpu") is None
            and tuple(weight.shape[2:]) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
            and groups == 1 and weight.shape[1] == x.shape[1] and all(0 <= p <= 1 for p in padding))


def _winograd_fits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
                   groups: int) -> bool:
    """A convolution the extension's Winograd F(4x4, 3x3) computes (``_winograd_shape_fits``, with
    oneDNN enabled for its products), on a map where it pays."""
    return (_winograd_shape_fits(x, weight, bias, stride, padding, dilation, groups)
            and torch.backends.mkldnn.enabled
            and _winograd.worthwhile(x.shape[1], weight.shape[0], _winograd.tiles(x.shape, padding)))


def _nnpack_fits(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride, padding, dilation,
                 groups: int) -> bool:
    """A convolution NNPACK's Winograd computes (``_winograd_shape_fits``) over a map of at least
    ``_nnpack.min_pixels()``."""
    return (_winograd_shape_fits(x, weight, bias, stride, padding, dilation, groups)
            and x.shape[2] * x.shape[3] >= _nnpack.min_pixels())
