"""Triton kernels of the top-down step: upsample_add, its in-place form and top's gradient,
registered as ``torch.ops.fpn_fast_triton.upsample_add``, ``upsample_add_`` and
``upsample_add_backward_top`` (tiling and registration helpers: ``fpn_fast.ops._triton``).
"""
import types
from typing import Callable, List, Optional

import torch

from .._triton import (_AS_TRITON_OP, _NUM_WARPS, _empty, _float32_scale, _grid_and_meta, _ints,
                       _is_channels_last, _needs_int64, _plain_launch, _precision, _resize_mode,
                       define_inference_op, on_device_of, registrar, triton)
from ..reference import memory_format_of

if triton is not None:
    import triton.language as tl

    from .._triton import _round_to, _source_index, _tile_indices


if triton is not None:

    @triton.jit
    def _first_dst_at(s, out_size, in_size, scale, n_steps, MODE: tl.constexpr):
        """Smallest dst in [0, out_size] whose source index is >= s: a binary search over the
        forward map itself, so the backward windows can never disagree with the forward."""
        if MODE == 0:
            lo = s
        elif MODE == 1:
            lo = 2 * s
        else:
            lo = tl.zeros_like(s)
            hi = lo + out_size
            for _ in range(n_steps):
                searching = lo < hi
                mid = (lo + hi) >> 1
                at_or_past = _source_index(mid, in_size, scale, MODE) >= s
                hi = tl.where(searching & at_or_past, mid, hi)
                lo = tl.where(searching & ~at_or_past, mid + 1, lo)
        return lo


    @triton.jit
    def _upsample_add_kernel(
        lat_ptr, top_ptr, bias_ptr, out_ptr,
        N, C, H, W, TH, TW, scale_h, scale_w,
        lat_sn, lat_sc, lat_sh, lat_sw,
        top_sn, top_sc, top_sh, top_sw,
        out_sn, out_sc, out_sh, out_sw,
        HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, SOFT_BF16: tl.constexpr,
        MODE_H: tl.constexpr, MODE_W: tl.constexpr,
        CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        n, c, h, w, mask = _tile_indices(N, C, H, W, CHANNELS_LAST, INT64, BLOCK_R, BLOCK_C)
        src_h = _source_index(h, TH, scale_h, MODE_H)
        src_w = _source_index(w, TW, scale_w, MODE_W)
        acc = tl.load(lat_ptr + n * lat_sn + c * lat_sc + h * lat_sh + w * lat_sw, mask=mask)
        up = tl.load(top_ptr + n * top_sn + c * top_sc + src_h * top_sh + src_w * top_sw, mask=mask)
        if UPCAST:  # float16/bfloat16: compute in float32, round once on the store
            acc = acc.to(tl.float32)
            up = up.to(tl.float32)
        if HAS_BIAS:
            b = tl.load(bias_ptr + c, mask=c < C)
            if UPCAST:
                b = b.to(tl.float32)
            acc = acc + b
        acc = acc + up
        tl.store(out_ptr + n * out_sn + c * out_sc + h * out_sh + w * out_sw,
                 _round_to(acc, out_ptr.dtype.element_ty, SOFT_BF16), mask=mask)

    @triton.jit
    def _upsample_add_backward_top_kernel(
        grad_ptr, out_ptr,
        N, C, H, W, TH, TW, scale_h, scale_w, steps_h, steps_w,
        grad_sn, grad_sc, grad_sh, grad_sw,
        out_sn, out_sc, out_sh, out_sw,
        UPCAST: tl.constexpr, SOFT_BF16: tl.constexpr, MODE_H: tl.constexpr, MODE_W: tl.constexpr,
        CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """grad_top[n, c, s, t] = sum of grad over the (H, W) window that maps to (s, t): a gather,
        summed row by row in destination order like ATen; no atomics, so deterministic."""
        n, c, s, t, mask = _tile_indices(N, C, TH, TW, CHANNELS_LAST, INT64, BLOCK_R, BLOCK_C)
        lo_h = _first_dst_at(s, H, TH, scale_h, steps_h, MODE_H)
        lo_w = _first_dst_at(t, W, TW, scale_w, steps_w, MODE_W)
        len_h = _first_dst_at(s + 1, H, TH, scale_h, steps_h, MODE_H) - lo_h
        len_w = _first_dst_at(t + 1, W, TW, scale_w, steps_w, MODE_W) - lo_w
        if MODE_H == 2:
            max_h = tl.max(len_h)
        else:
            max_h = MODE_H + 1
        if MODE_W == 2:
            max_w = tl.max(len_w)
        else:
            max_w = MODE_W + 1
        if UPCAST:
            acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.float32)
        else:
            acc = tl.zeros([BLOCK_R, BLOCK_C], dtype=out_ptr.dtype.element_ty)
        base = grad_ptr + n * grad_sn + c * grad_sc
        for i in range(max_h):
            row = base + (lo_h + i) * grad_sh
            for j in range(max_w):
                inside = mask & (i < len_h) & (j < len_w)
                g = tl.load(row + (lo_w + j) * grad_sw, mask=inside, other=0.0)
                acc += g.to(acc.dtype)
        tl.store(out_ptr + n * out_sn + c * out_sc + s * out_sh + t * out_sw,
                 _round_to(acc, out_ptr.dtype.element_ty, SOFT_BF16), mask=mask)


def define_ops(namespace: str, as_triton_op: bool) -> types.SimpleNamespace:
    """Register upsample_add, upsample_add_ and upsample_add_backward_top under ``namespace``;
    the differentiable two as triton_ops (kernels visible to torch.compile) or as opaque
    custom_ops with fake kernels (what works under the interpreter)."""
    register, launch = registrar(namespace, as_triton_op)

    def upsample_add_into(out: torch.Tensor, lateral: torch.Tensor, top: torch.Tensor,
                          bias: Optional[torch.Tensor], launch: Callable = launch) -> None:
        n, c, h, w = _ints(lateral.shape)
        th, tw = _ints(top.shape[2:])
        if out.numel() == 0:
            return
        grid, meta = _grid_and_meta(n, c, h, w, _is_channels_last(out))
        launch(_upsample_add_kernel)[grid](
            lateral, top, lateral if bias is None else bias.contiguous(), out,  # kernel reads bias[c]
            n, c, h, w, th, tw, _float32_scale(th, h), _float32_scale(tw, w),
            *lateral.stride(), *top.stride(), *out.stride(),
            HAS_BIAS=bias is not None, **_precision(lateral.dtype),
            MODE_H=_resize_mode(h, th), MODE_W=_resize_mode(w, tw),
            INT64=_needs_int64(lateral, top, out), num_warps=_NUM_WARPS, **meta)

    @register("upsample_add")
    def upsample_add(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
        out = torch.empty_like(lateral, memory_format=memory_format_of(lateral))
        upsample_add_into(out, lateral, top, bias)
        return out

    def upsample_add_(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        # Each element is read then written by the same lane: in place is safe.
        upsample_add_into(lateral, lateral, top, bias, launch=_plain_launch)

    upsample_add_ = define_inference_op(f"{namespace}::upsample_add_", upsample_add_, lambda lateral, top, bias: None,
                                        mutates_args=("lateral",))

    @register("upsample_add_backward_top")
    def upsample_add_backward_top(grad: torch.Tensor, top_size: List[int], channels_last: bool) -> torch.Tensor:
        grad_top = _empty(top_size, grad, channels_last)
        n, c, h, w = _ints(grad.shape)
        th, tw = _ints(top_size[2:])
        if grad_top.numel() == 0:
            return grad_top
        if grad.numel() == 0:  # lateral had an empty plane: nothing maps onto top
            return grad_top.zero_()
        grid, meta = _grid_and_meta(n, c, th, tw, channels_last)
        launch(_upsample_add_backward_top_kernel)[grid](
            grad, grad_top, n, c, h, w, th, tw, _float32_scale(th, h), _float32_scale(tw, w),
            h.bit_length(), w.bit_length(), *grad.stride(), *grad_top.stride(),
            **_precision(grad.dtype),
            MODE_H=_resize_mode(h, th), MODE_W=_resize_mode(w, tw),
            INT64=_needs_int64(grad, grad_top), num_warps=_NUM_WARPS, **meta)
        return grad_top

    if not as_triton_op:  # a triton_op derives its fake kernel by tracing its body
        @upsample_add.register_fake
        def _(lateral, top, bias):
            return torch.empty_like(lateral, memory_format=memory_format_of(lateral))

        @upsample_add_backward_top.register_fake
        def _(grad, top_size, channels_last):
            return _empty(top_size, grad, channels_last)

    def upsample_add_setup(ctx, inputs, output):
        _, top, bias = inputs
        ctx.top_size = list(top.shape)
        ctx.top_channels_last = _is_channels_last(top)
        ctx.has_bias = bias is not None

    def upsample_add_grad(ctx, grad):
        grad_top = grad_bias = None
        if ctx.needs_input_grad[1]:
            grad_top = upsample_add_backward_top(grad, ctx.top_size, ctx.top_channels_last)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_bias = grad.sum((0, 2, 3))
        return grad, grad_top, grad_bias

    def backward_top_setup(ctx, inputs, output):
        ctx.grad_hw = list(inputs[0].shape[2:])

    def backward_top_grad(ctx, grad_grad_top):
        # backward_top is linear in grad; its adjoint is the nearest upsample itself.
        up = torch.nn.functional.interpolate(grad_grad_top, size=ctx.grad_hw, mode="nearest")
        return up, None, None

    upsample_add.register_autograd(upsample_add_grad, setup_context=upsample_add_setup)
    upsample_add_backward_top.register_autograd(backward_top_grad, setup_context=backward_top_setup)

    return types.SimpleNamespace(upsample_add=upsample_add, upsample_add_=upsample_add_,
                                 upsample_add_backward_top=upsample_add_backward_top)


if triton is not None:
    _ops = define_ops("fpn_fast_triton", _AS_TRITON_OP)


def upsample_add(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    with on_device_of(lateral):
        return torch.ops.fpn_fast_triton.upsample_add(lateral, top, bias)


def upsample_add_(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    with on_device_of(lateral):
        torch.ops.fpn_fast_triton.upsample_add_(lateral, top, bias)
    return lateral
