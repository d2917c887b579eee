"""Triton backend: any-window convolution as an implicit GEMM with its pointwise tail in the
epilogue, ``conv2d_act``: the 3x3 stride-1 and stride-2 convs of the bottlenecks (padding 1) and
the 1x1 stride-2 downsample projections, which ``conv1x1_act``'s plain GEMM does not take.

The kernel is ``_triton_gemm``'s (module docstring there): rows are output pixels, the reduction
runs over the window's taps and the input channels, a tap's pixels are read through x's strides
(channels_last: each row a contiguous run of channels) and taps outside the map are masked to
zero, as F.conv2d's zero padding. Same epilogue, same contract as ``conv1x1_act``: bias, then
residual, ReLU keeping NaN, one rounding, a fresh output in x's memory format.

``conv2d_nchw`` is the same kernel with a bias and nothing else in its epilogue, storing a
contiguous NCHW output whatever x's layout (the FPN's output convolutions, whose results leave the
backbone in NCHW): one pass over the output instead of a conv, then a copy to NCHW.

Inference only: the ops have no autograd; registered by ``fpn_fast.ops._triton.define_inference_op``.
"""
from typing import List, Optional, Sequence

import torch

from .._triton import define_inference_op, on_device_of, triton
from ._triton_gemm import check_no_grad, empty_output, launch, problem


def _pair(value, name: str) -> List[int]:
    """An int or a pair of ints as a list of two ints (F.conv2d's convention)."""
    pair = [value, value] if isinstance(value, int) else list(value)
    if len(pair) != 2 or not all(isinstance(v, int) for v in pair):
        raise TypeError(f"conv2d_act: {name} must be an int or two ints, got {value!r}")
    return pair


def _conv2d_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
                stride: List[int], padding: List[int], relu: bool) -> torch.Tensor:
    """The registered op's kernel (CPU under the interpreter, CUDA)."""
    return launch(x, weight, bias, residual, relu, stride, padding)


def _fake(x, weight, bias, residual, stride, padding, relu):
    return empty_output(x, weight, stride, padding)


def _conv2d_nchw(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: List[int],
                 padding: List[int]) -> torch.Tensor:
    """The registered op's kernel: F.conv2d(x, weight, bias, stride, padding) written straight
    into a contiguous NCHW output (CPU under the interpreter, CUDA)."""
    return launch(x, weight, bias, None, False, stride, padding, nchw=True)


def _fake_nchw(x, weight, bias, stride, padding):
    return empty_output(x, weight, stride, padding, nchw=True)


if triton is not None:  # one registration on a GPU and under the interpreter (see define_inference_op)
    _op = define_inference_op("fpn_fast_triton::conv2d_act", _conv2d_act, _fake)
    _nchw_op = define_inference_op("fpn_fast_triton::conv2d_nchw", _conv2d_nchw, _fake_nchw)


def supports(x, weight, bias=None, residual=None, relu: bool = False, *, stride: Sequence[int] = (1, 1),
             padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1) -> Optional[str]:
    """Why ``conv2d_act`` cannot take this call, or None when it can: any window, stride and zero
    padding without dilation or groups; float32/float16/bfloat16 operands of one dtype and device;
    a device Triton runs on here. Layout is no reason (every operand is read through its strides).

    Args:
        x, weight, bias, residual, relu, stride, padding: as ``conv2d_act``'s.
        dilation, groups: the convolution's, as F.conv2d's (a pair, an int).

    Returns:
        None, or a sentence naming what the kernel does not take.
    """
    try:
        stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    except TypeError as error:
        return str(error)
    found = problem("conv2d_act", x, weight, bias, residual, stride, padding, dilation, groups)
    return None if found is None else found[1]


def conv2d_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
               residual: Optional[torch.Tensor] = None, stride: Sequence[int] = (1, 1),
               padding: Sequence[int] = (0, 0), relu: bool = False) -> torch.Tensor:
    """``relu?((F.conv2d(x, weight, bias, stride, padding) + residual))`` in one Triton implicit
    GEMM whose epilogue adds the bias and the residual and applies the ReLU; for inference.

    Precision as ``conv1x1_act``'s: float32 accumulation (float32 operands on TF32 tensor cores
    exactly where torch.backends.cudnn.allow_tf32 lets cuDNN use TF32), bias, residual and ReLU in
    float32, one rounding to x's dtype. NaN and inf propagate as through F.conv2d and torch.relu;
    padding is multiplied like pixels, so a non-finite weight reaches the border outputs (as in
    F.conv2d's float32/float64 kernels). The output is always a fresh tensor: no input aliases it.

    Args:
        x: Tensor[N, C, H, W], float32, float16 or bfloat16, any strides (channels_last is the
            fast case). weight: Tensor[K, C, kh, kw]. bias: Tensor[K] or None.
        residual: Tensor[N, K, P, Q] (the output's shape) or None, any strides.
        stride, padding: an int or two, as F.conv2d's (stride >= 1, zero padding >= 0).
        relu: apply ReLU last. All tensors of x's dtype and device.

    Returns:
        Tensor[N, K, P, Q], P = (H + 2 padding[0] - kh) // stride[0] + 1 (Q likewise), of x's
        dtype, channels_last when x is (else contiguous).

    Raises:
        TypeError: a non-tensor operand, an unsupported dtype, operands of different dtypes,
            stride or padding not an int or two.
        ValueError: shapes that do not fit, a window larger than the padded map, stride < 1,
            padding < 0, operands on different devices, a device Triton cannot run on here.
        RuntimeError: grad mode is on and an input requires grad (there is no backward).
    """
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    found = problem("conv2d_act", x, weight, bias, residual, stride, padding)
    if found is not None:
        raise found[0](found[1])
    check_no_grad("conv2d_act", x, weight, bias, residual)
    with on_device_of(x):
        return torch.ops.fpn_fast_triton.conv2d_act(x, weight, bias, residual, stride, padding, bool(relu))


def conv2d_nchw(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0)) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding).contiguous()`` in one Triton implicit GEMM
    that stores its result straight into a contiguous NCHW tensor; for inference.

    Precision as ``conv2d_act``'s (float32 accumulation, TF32 exactly where cuDNN may use it,
    the bias added in float32, one rounding to x's dtype).

    Args:
        x: Tensor[N, C, H, W], float32, float16 or bfloat16, any strides. weight: Tensor[K, C,
            kh, kw]. bias: Tensor[K] or None. stride, padding: an int or two. Same dtype and device.

    Returns:
        Tensor[N, K, P, Q], contiguous (NCHW), of x's dtype.

    Raises:
        TypeError, ValueError, RuntimeError: as ``conv2d_act``'s.
    """
    stride, padding = _pair(stride, "stride"), _pair(padding, "padding")
    found = problem("conv2d_nchw", x, weight, bias, None, stride, padding)
    if found is not None:
        raise found[0](found[1])
    check_no_grad("conv2d_nchw", x, weight, bias)
    with on_device_of(x):
        return torch.ops.fpn_fast_triton.conv2d_nchw(x, weight, bias, stride, padding)
