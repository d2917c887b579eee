"""Triton backend: the pointwise tail of a folded convolution, in place, in one pass:

    out = relu?((out + bias[c]) + residual)

In eager PyTorch on CUDA a convolution with bias, a residual add and a ReLU are three passes
over the output (cuDNN's convolution leaves the bias to a separate add). After norm folding
that tail is all that remains of a ResNet block's pointwise work, so ``ops.conv2d_act`` runs
the convolution without bias and then this kernel once. Inference only: no autograd.

Same tiling as fpn_fast.ops._triton (columns along the output's contiguous dim); the residual
is read through its own strides. float16/bfloat16 add in float32 and round once.
"""
from typing import Optional

import torch

from .._triton import (_NUM_WARPS, _grid_and_meta, _ints, _is_channels_last, _needs_int64,
                      _precision, define_inference_op, on_device_of, triton)

if triton is not None:
    import triton.language as tl

    from .._triton import _round_to, _tile_indices

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


if triton is not None:

    @triton.jit
    def _bias_act_kernel(
        out_ptr, bias_ptr, res_ptr, N, C, H, W,
        out_sn, out_sc, out_sh, out_sw,
        res_sn, res_sc, res_sh, res_sw,
        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
        UPCAST: tl.constexpr, SOFT_BF16: tl.constexpr,
        CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        n, c, h, w, mask = _tile_indices(N, C, H, W, CHANNELS_LAST, INT64, BLOCK_R, BLOCK_C)
        ptrs = out_ptr + n * out_sn + c * out_sc + h * out_sh + w * out_sw
        acc = tl.load(ptrs, mask=mask)
        if UPCAST:
            acc = acc.to(tl.float32)
        if HAS_BIAS:  # added first, as the convolution's own bias would be
            b = tl.load(bias_ptr + c, mask=c < C)
            if UPCAST:
                b = b.to(tl.float32)
            acc = acc + b
        if HAS_RESIDUAL:
            r = tl.load(res_ptr + n * res_sn + c * res_sc + h * res_sh + w * res_sw, mask=mask)
            if UPCAST:
                r = r.to(tl.float32)
            acc = acc + r
        if RELU:  # NaN < 0 is false: NaN passes through, as torch.relu lets it
            acc = tl.where(acc < 0, 0.0, acc)
        tl.store(ptrs, _round_to(acc, out_ptr.dtype.element_ty, SOFT_BF16), mask=mask)


def _bias_act_(out: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
               relu: bool) -> None:
    """The registered op's kernel (CPU under the interpreter, CUDA)."""
    if out.numel() == 0:
        return
    n, c, h, w = _ints(out.shape)
    grid, meta = _grid_and_meta(n, c, h, w, _is_channels_last(out))
    no_residual = (0, 0, 0, 0)
    _bias_act_kernel[grid](
        out, out if bias is None else bias.contiguous(), out if residual is None else residual,
        n, c, h, w, *out.stride(), *(no_residual if residual is None else residual.stride()),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=relu,
        **_precision(out.dtype),
        INT64=_needs_int64(*(t for t in (out, residual) if t is not None)), num_warps=_NUM_WARPS, **meta)


if triton is not None:  # one registration on a GPU and under the interpreter (see define_inference_op)
    _op = define_inference_op("fpn_fast_triton::bias_act_", _bias_act_, lambda out, bias, residual, relu: None,
                              mutates_args=("out",))


def bias_act_(out: torch.Tensor, bias: Optional[torch.Tensor] = None, residual: Optional[torch.Tensor] = None,
              relu: bool = False) -> torch.Tensor:
    """out = relu?((out + bias[c]) + residual), in place; returns out. Inference only."""
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"bias_act_: out must be a tensor, got {type(out).__name__}")
    if out.dim() != 4:
        raise ValueError(f"bias_act_: out must be a 4-D tensor (N, C, H, W), got {tuple(out.shape)}")
    if out.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"bias_act_ (triton): {out.dtype} is not supported, only float32, float16 and bfloat16")
    for name, t, shape in (("bias", bias, (out.shape[1],)), ("residual", residual, tuple(out.shape))):
        if t is None:
            continue
        if t.dtype != out.dtype:
            raise TypeError(f"bias_act_: {name} must be {out.dtype} like out, got {t.dtype}")
        if tuple(t.shape) != shape or t.device != out.device:
            raise ValueError(f"bias_act_: {name} must be {shape} on {out.device}, got {tuple(t.shape)} on {t.device}")
    if any(stride == 0 and size > 1 for size, stride in zip(out.shape, out.stride())):
        raise RuntimeError(f"bias_act_: out {tuple(out.shape)} with strides {out.stride()} has elements that "
                         "overlap (an expanded view); it is written in place")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (out, bias, residual)):
        raise RuntimeError("bias_act_ (triton) is inference only (no autograd): run it under torch.no_grad() "
                           "or torch.inference_mode()")
    with on_device_of(out):
        torch.ops.fpn_fast_triton.bias_act_(out, bias, residual, relu)
    return out
