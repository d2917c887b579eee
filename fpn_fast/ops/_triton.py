"""Triton backend: upsample_add and stride2_pool as Triton kernels, registered as torch ops.

Every kernel walks its output in 2-D tiles, (rows x cols), where cols is the contiguous dimension
of the output's memory format (W for NCHW, C for channels_last) so that loads and stores along it
vectorise, and rows flatten the other three dims (decomposed once per row, not per element).
Inputs are read through their own strides, so no operand is copied to a canonical layout.

The ops live in the "fpn_fast_triton" namespace (the C++ extension owns "fpn_fast"). On a GPU they
are ``torch.library.triton_op``s, so torch.compile sees the kernels; under TRITON_INTERPRET=1 (CPU
tensors) they are opaque ``custom_op``s, because compiling a triton_op traces into the launch and
the interpreter then touches fake tensors' data.
"""
import contextlib
import os
import struct
import types
from typing import Callable, List, Optional, Tuple

import torch

from .reference import memory_format_of

try:
    import triton
    import triton.language as tl
except ImportError:  # the module still imports; unavailable_reason says why it cannot run
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def unavailable_reason(device_type: str) -> Optional[str]:
    if triton is None:
        return "triton is not installed (pip install triton)"
    if device_type == "cuda":
        if _INTERPRET:
            return "TRITON_INTERPRET=1 is set: the kernels would run in the interpreter, not on the GPU"
        return None if torch.cuda.is_available() else "no CUDA GPU"
    if device_type == "cpu":
        return None if _INTERPRET else "Triton runs on CPU tensors only under TRITON_INTERPRET=1"
    return f"Triton has no {device_type} support here"


# Source-index modes per spatial dim, chosen on the host (see DESIGN.md, exact semantics).
_SAME, _DOUBLE, _GENERAL = 0, 1, 2


def _resize_mode(out_size: int, in_size: int) -> int:
    if out_size == in_size:
        return _SAME
    return _DOUBLE if out_size == 2 * in_size else _GENERAL


def _float32_scale(in_size: int, out_size: int) -> float:
    """float32(in) / float32(out), as PyTorch's nearest kernels compute it. A float64 quotient
    rounded to float32 equals the float32 quotient (53 >= 2*24 + 2 bits: double rounding is
    innocuous for division), and sizes below 2**24 are exact in float32."""
    if out_size == 0:
        return 0.0
    return struct.unpack("f", struct.pack("f", in_size / out_size))[0]


def _needs_int64(*tensors: torch.Tensor) -> bool:
    """int64 offsets only when some offset (or element count) could pass 2**31; the factor 2
    covers the one-tile overshoot of masked-off lanes."""
    largest = 0
    for t in tensors:
        if t.numel() == 0:
            continue
        span = 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
        largest = max(largest, span, t.numel())
    return 2 * largest >= 2 ** 31


_COL_BLOCKS = (128, 64, 32, 16)
_TILE = 16384 if _INTERPRET else 2048  # the interpreter pays per program, a GPU per register
_NUM_WARPS = 4


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _tile_shape(rows: int, cols: int) -> Tuple[int, int]:
    """Column block that wastes the fewest masked lanes on a row (ties: the wider), and as many
    rows as fill the tile."""
    candidates = [b for b in _COL_BLOCKS if b <= _next_pow2(cols)] or [_next_pow2(cols)]
    block_c = min(candidates, key=lambda b: (-(-cols // b) * b, -b))
    block_r = min(_next_pow2(rows), max(1, _TILE // block_c))
    return block_r, block_c


def _grid_and_meta(n: int, c: int, h: int, w: int, channels_last: bool):
    rows, cols = (n * h * w, c) if channels_last else (n * c * h, w)
    block_r, block_c = _tile_shape(rows, cols)
    grid = (triton.cdiv(rows, block_r) * triton.cdiv(cols, block_c),)
    return grid, dict(CHANNELS_LAST=channels_last, BLOCK_R=block_r, BLOCK_C=block_c)


if triton is not None:

    @triton.jit
    def _tile_indices(N, C, H, W, CHANNELS_LAST: tl.constexpr, INT64: tl.constexpr,
                      BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        """(n, c, h, w, mask) of this program's tile, each broadcastable to (BLOCK_R, BLOCK_C):
        the contiguous dim (C or W) along the columns, the other three flattened into rows."""
        if CHANNELS_LAST:
            n_cols = C
        else:
            n_cols = W
        col_blocks = tl.cdiv(n_cols, BLOCK_C)
        pid = tl.program_id(0)
        pid_r = pid // col_blocks
        if INT64:
            pid_r = pid_r.to(tl.int64)
        rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        cols = (pid % col_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
        if INT64:  # c or w times another operand's stride can pass 2**31 too
            cols = cols.to(tl.int64)
        if CHANNELS_LAST:
            w = (rows % W)[:, None]
            h = (rows // W % H)[:, None]
            n = (rows // W // H)[:, None]
            c = cols[None, :]
            mask = (n < N) & (c < C)  # n < N: the row count itself could overflow int32
        else:
            h = (rows % H)[:, None]
            c = (rows // H % C)[:, None]
            n = (rows // H // C)[:, None]
            w = cols[None, :]
            mask = (n < N) & (w < W)
        return n, c, h, w, mask

    @triton.jit
    def _source_index(dst, in_size, scale, MODE: tl.constexpr):
        """Nearest source index of dst: floorf(float(dst) * scale) clamped, like ATen (a plain
        multiply: nothing to contract into an FMA); exact shortcuts for equal and doubled sizes."""
        if MODE == 0:
            src = dst
        elif MODE == 1:
            src = dst >> 1
        else:
            src = tl.minimum((dst.to(tl.float32) * scale).to(dst.dtype), in_size - 1)
        return src

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
    def _round_to(acc, dtype: tl.constexpr, SOFT_BF16: tl.constexpr):
        """acc.to(dtype), rounding to nearest even. The interpreter (triton 3.8) truncates
        float32 -> bfloat16, so under it the bfloat16 rounding is done on the bits here."""
        if SOFT_BF16:
            bits = acc.to(tl.uint32, bitcast=True)
            rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            quiet_nan = (bits >> 16) | 0x40
            bits = tl.where(acc != acc, quiet_nan, rounded)
            out = bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
        else:
            out = acc.to(dtype)
        return out

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


def _precision(dtype: torch.dtype) -> dict:
    """float16/bfloat16 compute in float32 and round once; see _round_to for SOFT_BF16."""
    return dict(UPCAST=dtype in (torch.float16, torch.bfloat16),
                SOFT_BF16=_INTERPRET and dtype == torch.bfloat16)


def _ints(sizes) -> List[int]:
    """Plain ints for the host-side launch arithmetic (float32 scale, block shapes); under
    torch.compile with dynamic shapes this specialises on the sizes."""
    return [int(s) for s in sizes]


def _is_channels_last(t: torch.Tensor) -> bool:
    return memory_format_of(t) == torch.channels_last


def _pooled_size(x_size: List[int]) -> List[int]:
    n, c, h, w = x_size
    return [n, c, (h + 1) // 2, (w + 1) // 2]


def _empty(size: List[int], like: torch.Tensor, channels_last: bool) -> torch.Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(size, dtype=like.dtype, device=like.device, memory_format=fmt)


def _plain_launch(kernel):
    """A kernel launched as it is: by ops defined with define_inference_op, which torch.compile
    treats as opaque (wrap_triton is for a triton_op's body)."""
    return kernel


def registrar(namespace: str, as_triton_op: bool):
    """(register, launch) for ops under ``namespace``: ``register(name, mutates_args=())`` makes a
    triton_op (kernels visible to torch.compile) or an opaque custom_op, which then needs a fake
    kernel (what works under the interpreter); ``launch(kernel)`` wraps a kernel for the former."""
    if as_triton_op:
        def register(name, mutates_args=()):
            return torch.library.triton_op(f"{namespace}::{name}", mutates_args=mutates_args)
        return register, torch.library.wrap_triton

    def register(name, mutates_args=()):
        return torch.library.custom_op(f"{namespace}::{name}", mutates_args=mutates_args)
    return register, _plain_launch


_LIBRARIES: List["torch.library.Library"] = []  # a registration lives as long as its Library


def define_inference_op(qualname: str, kernel: Callable, fake: Callable, mutates_args: Tuple[str, ...] = ()):
    """Register ``kernel`` as the op ``qualname`` without a derivative (in place, or inference
    only), with a fake kernel and an Autograd kernel that refuses inputs needing grad.

    The op is defined with the plain ``torch.library.Library`` API (schema inferred from the
    kernel's annotations) rather than as a ``custom_op``/``triton_op``: those register an Autograd
    kernel of their own, and a second one, the refusing kernel, is an override that torch < 2.12
    forbids and newer torch accepts only by replacing theirs. Here the refusing kernel is the only
    Autograd kernel, so every supported torch takes the same registration, on a GPU and under the
    interpreter alike. torch.compile sees the op as one opaque call (functionalised when it mutates).

    Args:
        qualname: "namespace::name".
        kernel: runs the op on CPU and CUDA tensors; annotated like a custom_op's function.
        fake: the fake (meta) kernel: output metadata only.
        mutates_args: names of the arguments written in place (their version counters are bumped).

    Raises:
        RuntimeError (when the op is called): grad mode is on and a tensor argument requires grad;
            a custom op without this kernel would let autograd drop those gradients silently.
    """
    namespace, name = qualname.split("::")
    library = torch.library.Library(namespace, "FRAGMENT")
    library.define(name + torch.library.infer_schema(kernel, mutates_args=mutates_args))
    for dispatch_key in ("CPU", "CUDA"):
        library.impl(name, kernel, dispatch_key)
    torch.library.register_fake(qualname, fake, lib=library)
    op = getattr(getattr(torch.ops, namespace), name).default
    mutated = [i for i, argument in enumerate(op._schema.arguments) if argument.name in mutates_args]

    def autograd_kernel(keyset, *args):
        if torch.is_grad_enabled() and any(isinstance(a, torch.Tensor) and a.requires_grad for a in args):
            raise RuntimeError(f"{qualname} has no gradient, but an input requires grad: run it under "
                               "torch.no_grad() or torch.inference_mode()")
        with torch._C._AutoDispatchBelowADInplaceOrView():
            result = op.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args)
        for i in mutated:  # as ATen's in-place ops do (inference tensors have no counter)
            if not args[i].is_inference():
                torch.autograd.graph.increment_version(args[i])
        return result

    library.impl(name, autograd_kernel, "Autograd", with_keyset=True)
    _LIBRARIES.append(library)
    return op


def _define_ops(namespace: str, as_triton_op: bool) -> types.SimpleNamespace:
    """Register the five ops under ``namespace``; as triton_ops (kernels visible to torch.compile)
    or as opaque custom_ops with fake kernels (what works under the interpreter)."""
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
        @upsample_add.register_fake
        def _(lateral, top, bias):
            return torch.empty_like(lateral, memory_format=memory_format_of(lateral))

        @upsample_add_backward_top.register_fake
        def _(grad, top_size, channels_last):
            return _empty(top_size, grad, channels_last)

        @stride2_pool.register_fake
        def _(x):
            return _empty(_pooled_size(list(x.shape)), x, _is_channels_last(x))

        @stride2_pool_backward.register_fake
        def _(grad, x_size, channels_last):
            return _empty(x_size, grad, channels_last)

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

    def stride2_pool_setup(ctx, inputs, output):
        (x,) = inputs
        ctx.x_size = list(x.shape)
        ctx.x_channels_last = _is_channels_last(x)

    def stride2_pool_grad(ctx, grad):
        return stride2_pool_backward(grad, ctx.x_size, ctx.x_channels_last)

    def backward_top_setup(ctx, inputs, output):
        ctx.grad_hw = list(inputs[0].shape[2:])

    def backward_top_grad(ctx, grad_grad_top):
        # backward_top is linear in grad; its adjoint is the nearest upsample itself.
        up = torch.nn.functional.interpolate(grad_grad_top, size=ctx.grad_hw, mode="nearest")
        return up, None, None

    def pool_backward_grad(ctx, grad_grad_x):
        # stride2_pool_backward scatters to even positions; its adjoint picks them again.
        return stride2_pool(grad_grad_x), None, None

    upsample_add.register_autograd(upsample_add_grad, setup_context=upsample_add_setup)
    stride2_pool.register_autograd(stride2_pool_grad, setup_context=stride2_pool_setup)
    upsample_add_backward_top.register_autograd(backward_top_grad, setup_context=backward_top_setup)
    stride2_pool_backward.register_autograd(pool_backward_grad, setup_context=lambda ctx, inputs, output: None)

    return types.SimpleNamespace(
        upsample_add=upsample_add, upsample_add_=upsample_add_,
        upsample_add_backward_top=upsample_add_backward_top,
        stride2_pool=stride2_pool, stride2_pool_backward=stride2_pool_backward)


# Under the interpreter a triton_op cannot be compiled (see the module docstring); torch < 2.6
# has no triton_op at all.
_AS_TRITON_OP = not _INTERPRET and hasattr(torch.library, "triton_op")
if triton is not None:
    _ops = _define_ops("fpn_fast_triton", _AS_TRITON_OP)


def on_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's (a model on cuda:1 while the
    current device is cuda:0). Under torch.compile inductor places the launches itself."""
    if t.is_cuda and not torch.compiler.is_compiling():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def upsample_add(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    with on_device_of(lateral):
        return torch.ops.fpn_fast_triton.upsample_add(lateral, top, bias)


def upsample_add_(lateral: torch.Tensor, top: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    with on_device_of(lateral):
        torch.ops.fpn_fast_triton.upsample_add_(lateral, top, bias)
    return lateral


def stride2_pool(x: torch.Tensor) -> torch.Tensor:
    with on_device_of(x):
        return torch.ops.fpn_fast_triton.stride2_pool(x)
