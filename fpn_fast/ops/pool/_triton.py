"""Triton kernels of the 'pool' extra block: stride2_pool and its gradient, registered as
``torch.ops.fpn_fast_triton.stride2_pool`` and ``stride2_pool_backward`` (tiling and
registration helpers: ``fpn_fast.ops._triton``).
"""
import types
from typing import List

import torch

from .._triton import (_AS_TRITON_OP, _NUM_WARPS, _empty, _grid_and_meta, _ints, _is_channels_last, _needs_int64,
                       on_device_of, registrar, triton)

if triton is not None:
    import triton.language as tl

    from .._triton import _tile_indices


if triton is not None:

    @triton.jit
    def _stride2_pool_kernel(
        x_ptr, out_ptr, N, C, OH, OW,
        x_sn, x_sc, x_sh, x_sw,
        out_sn, out_sc, out_sh, out_sw,
        CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        n, c, h, w, mask = _tile_indices(N, C, OH, OW, CHANNELS_LAST, INT64, BLOCK_R, BLOCK_C)
        v = tl.load(x_ptr + n * x_sn + c * x_sc + (2 * h) * x_sh + (2 * w) * x_sw, mask=mask)
        tl.store(out_ptr + n * out_sn + c * out_sc + h * out_sh + w * out_sw, v, mask=mask)

    @triton.jit
    def _stride2_pool_backward_kernel(
        grad_ptr, out_ptr, N, C, H, W,
        grad_sn, grad_sc, grad_sh, grad_sw,
        out_sn, out_sc, out_sh, out_sw,
        CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        """grad_x written in one pass: grad at even (h, w), zero elsewhere (a gather, no zero-fill
        followed by a scatter)."""
        n, c, h, w, mask = _tile_indices(N, C, H, W, CHANNELS_LAST, INT64, BLOCK_R, BLOCK_C)
        picked = ((h % 2) == 0) & ((w % 2) == 0)
        g = tl.load(grad_ptr + n * grad_sn + c * grad_sc + (h // 2) * grad_sh + (w // 2) * grad_sw,
                    mask=mask & picked, other=0.0)
        tl.store(out_ptr + n * out_sn + c * out_sc + h * out_sh + w * out_sw, g, mask=mask)


def _pooled_size(x_size: List[int]) -> List[int]:
    n, c, h, w = x_size
    return [n, c, (h + 1) // 2, (w + 1) // 2]


def define_ops(namespace: str, as_triton_op: bool) -> types.SimpleNamespace:
    """Register stride2_pool and stride2_pool_backward under ``namespace``; as triton_ops
    (kernels visible to torch.compile) or as opaque custom_ops with fake kernels (what works
    under the interpreter)."""
    register, launch = registrar(namespace, as_triton_op)

    @register("stride2_pool")
    def stride2_pool(x: torch.Tensor) -> torch.Tensor:
        out = _empty(_pooled_size(list(x.shape)), x, _is_channels_last(x))
        if out.numel() == 0:
            return out
        n, c, oh, ow = _ints(out.shape)
        grid, meta = _grid_and_meta(n, c, oh, ow, _is_channels_last(out))
        launch(_stride2_pool_kernel)[grid](
            x, out, n, c, oh, ow, *x.stride(), *out.stride(),
            INT64=_needs_int64(x, out), num_warps=_NUM_WARPS, **meta)
        return out

    @register("stride2_pool_backward")
    def stride2_pool_backward(grad: torch.Tensor, x_size: List[int], channels_last: bool) -> torch.Tensor:
        grad_x = _empty(x_size, grad, channels_last)
        if grad_x.numel() == 0:
            return grad_x
        n, c, h, w = _ints(x_size)
        grid, meta = _grid_and_meta(n, c, h, w, channels_last)
        launch(_stride2_pool_backward_kernel)[grid](
            grad, grad_x, n, c, h, w, *grad.stride(), *grad_x.stride(),
            INT64=_needs_int64(grad, grad_x), num_warps=_NUM_WARPS, **meta)
        return grad_x

    if not as_triton_op:  # a triton_op derives its fake kernel by tracing its body
        @stride2_pool.register_fake
        def _(x):
            return _empty(_pooled_size(list(x.shape)), x, _is_channels_last(x))

        @stride2_pool_backward.register_fake
        def _(grad, x_size, channels_last):
            return _empty(x_size, grad, channels_last)

    def stride2_pool_setup(ctx, inputs, output):
        (x,) = inputs
        ctx.x_size = list(x.shape)
        ctx.x_channels_last = _is_channels_last(x)

    def stride2_pool_grad(ctx, grad):
        return stride2_pool_backward(grad, ctx.x_size, ctx.x_channels_last)

    def pool_backward_grad(ctx, grad_grad_x):
        # stride2_pool_backward scatters to even positions; its adjoint picks them again.
        return stride2_pool(grad_grad_x), None, None

    stride2_pool.register_autograd(stride2_pool_grad, setup_context=stride2_pool_setup)
    stride2_pool_backward.register_autograd(pool_backward_grad, setup_context=lambda ctx, inputs, output: None)

    return types.SimpleNamespace(stride2_pool=stride2_pool, stride2_pool_backward=stride2_pool_backward)


if triton is not None:
    _ops = define_ops("fpn_fast_triton", _AS_TRITON_OP)


def stride2_pool(x: torch.Tensor) -> torch.Tensor:
    with on_device_of(x):
        return torch.ops.fpn_fast_triton.stride2_pool(x)
