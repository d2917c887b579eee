"""Triton backend: the FPN lateral 1x1 convolution as a GEMM with the top-down step in its epilogue.

    out[n, o, h, w] = (sum_c x[n, c, h, w] * weight[o, c] + bias[o]) + top[n, o, src_h(h), src_w(w)]

A GEMM over rows m = (n, h, w) (M = N*H*W), reduction over K = C_in, columns o (O = out channels):
A[m, k] = x[n, k, h, w], B[k, o] = weight[o, k]. The lateral map lives only in the accumulator;
the epilogue adds bias and the nearest-upsampled top (exact ATen indices, docs/design.md) and stores
``out`` once. Every operand is read through its strides: for channels_last x, A is a row-major
[M, K] matrix and out a row-major [M, O] one (the fast case); NCHW works through the same code.

Inference only: the op has no autograd (its backward would need the lateral map it never stores);
registered by ``fpn_fast.ops._triton.define_inference_op``, one opaque op on a GPU and under
TRITON_INTERPRET=1 alike.
"""
from typing import Optional, Tuple

import torch

from .._checks import check_lateral_upsample_add
from .._triton import (
    _INTERPRET, _autotune_mode, _device_limits, _dot_precision, _empty, _float32_scale, _ints, _is_channels_last,
    _needs_int64, _next_pow2, _precision, _resize_mode, define_inference_op, on_device_of, triton)

if triton is not None:
    import triton.language as tl

    from .._triton import _round_to, _source_index

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The interpreter would time every autotune config, so under it one fixed config runs; tall, as
# it pays per program (tl.dot there is a numpy matmul), not per element.
_INTERPRETER_BLOCKS = dict(BLOCK_M=128, BLOCK_N=32, BLOCK_K=32)

# Sized for the FPN's laterals at batch 2, 800x1216, O = 256: (M, K) = (121600, 256), (30400, 512),
# (7600, 1024), (1900, 2048). Large M wants wide tiles (BLOCK_N = 256 reads A once); small M with
# long K wants small tiles to fill the SMs (1900 rows are 15 tiles of 128). Shared memory per
# stage is (BLOCK_M + BLOCK_N) * BLOCK_K * 4 bytes in float32; every config fits 3-4 stages of it
# in an H100's 227 KB, so each config compiles for every dtype.
_GPU_CONFIGS = (
    # BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages
    (128, 256, 32, 8, 3),
    (128, 128, 64, 8, 3),
    (128, 128, 32, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 256, 32, 4, 4),
    (64, 128, 64, 4, 3),
    (64, 64, 64, 4, 4),
    (32, 64, 128, 4, 3),
    (64, 64, 32, 4, 2),  # 32 KB of float32 stages: fits GPUs with ~100 KB of shared memory
)


# Bytes of shared memory per operand element in a pipeline stage, by dtype.
_ELEMENT_BYTES = {torch.float32: 4, torch.float16: 2, torch.bfloat16: 2}


def _heuristic_config(m: int, o: int, k: int, dtype: torch.dtype, sm_count: int,
                      shared_memory: int) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for an [m, k] x [k, o] GEMM: the
    largest tile of _GPU_CONFIGS (fewest re-reads of A and B) that still gives every SM a tile
    and whose pipeline stages fit in ``shared_memory`` bytes; the smallest fitting tile when none
    fills the SMs (a short map with long K, e.g. C5). A rule, not a measurement: FPN_FAST_AUTOTUNE=full
    measures instead.

    Args:
        m: rows (N*H*W). o: output channels. k: input channels (the reduction).
        dtype: the operands' dtype (sizes the stages). sm_count: the GPU's multiprocessors.
        shared_memory: shared memory a block may use, in bytes.

    Returns:
        One entry of _GPU_CONFIGS.
    """
    element = _ELEMENT_BYTES.get(dtype, 4)
    fitting = [c for c in _GPU_CONFIGS if (c[0] + c[1]) * c[2] * element * c[4] <= shared_memory] or \
        [min(_GPU_CONFIGS, key=lambda c: (c[0] + c[1]) * c[2] * c[4])]
    by_size = sorted(fitting, key=lambda c: (-c[0] * c[1], -c[2]))
    for config in by_size:
        if -(-m // config[0]) * -(-o // config[1]) >= sm_count:
            return config
    return by_size[-1]


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"lateral_upsample_add (triton): {dtype} is not supported, only float32, float16 and "
            f"bfloat16; use the torch backend for {dtype}")


if triton is not None:

    @triton.jit
    def _lateral_upsample_add_kernel(
        x_ptr, w_ptr, bias_ptr, top_ptr, out_ptr,
        M, O, K, H, W, TH, TW, scale_h, scale_w,
        M_BUCKET,  # autotune key only: M rounded up to a power of two, so that a detector fed
                   # many image sizes tunes once per scale, not once per size
        x_sn, x_sc, x_sh, x_sw,
        w_so, w_sc,
        top_sn, top_sc, top_sh, top_sw,
        out_sn, out_sc, out_sh, out_sw,
        HAS_BIAS: tl.constexpr, HAS_TOP: tl.constexpr, MODE_H: tl.constexpr, MODE_W: tl.constexpr,
        DOT_PRECISION: tl.constexpr, SOFT_BF16: tl.constexpr, INT64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        # Column blocks of one row block are adjacent programs, so its A rows are still in L2
        # when the next column block reads them (O = 256 is one or a few column blocks).
        col_blocks = tl.cdiv(O, BLOCK_N)
        pid = tl.program_id(0)
        pid_m = pid // col_blocks
        if INT64:
            pid_m = pid_m.to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (pid % col_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        ks = tl.arange(0, BLOCK_K)
        if INT64:  # o or k times another operand's stride can pass 2**31 too
            cols = cols.to(tl.int64)
            ks = ks.to(tl.int64)
        # (n, h, w) decomposed once per row, outside the reduction loop.
        w = rows % W
        h = rows // W % H
        n = rows // W // H
        row_in = rows < M
        col_in = cols < O

        a_ptrs = x_ptr + (n * x_sn + h * x_sh + w * x_sw)[:, None] + ks[None, :] * x_sc
        b_ptrs = w_ptr + ks[:, None] * w_sc + cols[None, :] * w_so
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_in = ks < K - k0
            a = tl.load(a_ptrs, mask=row_in[:, None] & k_in[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_in[:, None] & col_in[None, :], other=0.0)
            if SOFT_BF16:  # the interpreter's dot multiplies bfloat16's raw bits; float32 is exact
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
            a_ptrs += BLOCK_K * x_sc
            b_ptrs += BLOCK_K * w_sc

        # Epilogue in float32, in the reference's order: (lateral + bias) + up, rounded once.
        mask = row_in[:, None] & col_in[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_in, other=0.0).to(tl.float32)[None, :]
        if HAS_TOP:
            src_h = _source_index(h, TH, scale_h, MODE_H)
            src_w = _source_index(w, TW, scale_w, MODE_W)
            up = tl.load(top_ptr + (n * top_sn + src_h * top_sh + src_w * top_sw)[:, None]
                         + cols[None, :] * top_sc, mask=mask)
            acc += up.to(tl.float32)
        tl.store(out_ptr + (n * out_sn + h * out_sh + w * out_sw)[:, None] + cols[None, :] * out_sc,
                 _round_to(acc, out_ptr.dtype.element_ty, SOFT_BF16), mask=mask)

    _AUTOTUNE = _autotune_mode() == "full" and not _INTERPRET
    if _AUTOTUNE:
        # Keyed on the GEMM's shape (the autotuner adds the tensors' dtypes itself) and the dot
        # precision (IEEE float32 runs on the CUDA cores, TF32 on the tensor cores).
        _KERNEL = triton.autotune(
            configs=[triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk), num_warps=nw, num_stages=ns)
                     for bm, bn, bk, nw, ns in _GPU_CONFIGS],
            key=["M_BUCKET", "O", "K", "DOT_PRECISION"], cache_results=True,
        )(_lateral_upsample_add_kernel)
    else:
        _KERNEL = _lateral_upsample_add_kernel


def _out_like(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    n, _, h, w = x.shape
    return _empty([n, weight.shape[0], h, w], x, _is_channels_last(x))


def _lateral_upsample_add(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          top: Optional[torch.Tensor]) -> torch.Tensor:
    """The registered op's kernel (CPU under the interpreter, CUDA)."""
    _check_dtype(x.dtype)
    out = _out_like(x, weight)
    if out.numel() == 0:
        return out
    n, k, h, w = _ints(x.shape)
    o = int(weight.shape[0])
    m = n * h * w
    th, tw = _ints(top.shape[2:]) if top is not None else (h, w)
    no_top = (0, 0, 0, 0)
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(o, meta["BLOCK_N"]),)  # noqa: E731
    _KERNEL[grid](
        x, weight, x if bias is None else bias.contiguous(), x if top is None else top, out,
        m, o, k, h, w, th, tw, _float32_scale(th, h), _float32_scale(tw, w), _next_pow2(m),
        *x.stride(), weight.stride(0), weight.stride(1),
        *(no_top if top is None else top.stride()), *out.stride(),
        HAS_BIAS=bias is not None, HAS_TOP=top is not None,
        MODE_H=_resize_mode(h, th), MODE_W=_resize_mode(w, tw),
        DOT_PRECISION=_dot_precision(x.dtype), SOFT_BF16=_precision(x.dtype)["SOFT_BF16"],
        INT64=_needs_int64(*(t for t in (x, weight, top, out) if t is not None)),
        **_launch_config(m, o, k, x))
    return out


def _launch_config(m: int, o: int, k: int, x: torch.Tensor) -> dict:
    """The block sizes (and on a GPU warps and stages) of one launch; none when autotuning."""
    if _INTERPRET:
        return _INTERPRETER_BLOCKS
    if _AUTOTUNE:
        return {}
    bm, bn, bk, warps, stages = _heuristic_config(m, o, k, x.dtype, *_device_limits(torch.cuda.current_device() if x.device.index is None else x.device.index))
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages)


if triton is not None:  # one registration on a GPU and under the interpreter (see define_inference_op)
    _op = define_inference_op("fpn_fast_triton::lateral_upsample_add", _lateral_upsample_add,
                              lambda x, weight, bias, top: _out_like(x, weight))


def lateral_upsample_add(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                         top: Optional[torch.Tensor] = None) -> torch.Tensor:
    """(conv1x1(x, weight) + bias) + nearest_upsample(top, x's H x W) in one kernel; out takes
    x's memory format. Inference only: refuses inputs that require grad while grad mode is on."""
    check_lateral_upsample_add(x, weight, bias, top)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, top)):
        raise RuntimeError(
            "lateral_upsample_add (triton) is inference only (no autograd): run it under "
            "torch.no_grad() / torch.inference_mode(), or use conv1x1 + upsample_add for training")
    with on_device_of(x):
        return torch.ops.fpn_fast_triton.lateral_upsample_add(x, weight, bias, top)
