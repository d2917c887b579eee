"""Triton backend: a convolution as an (implicit) GEMM with its pointwise tail in the epilogue.

    out[n, k, p, q] = relu?((sum_{c, r, s} x[n, c, p*sh - ph + r, q*sw - pw + s] * weight[k, c, r, s]
                             + bias[k]) + residual[n, k, p, q])

A GEMM over rows m = (n, p, q) (M = N*P*Q output pixels) and columns k (K output channels),
reducing over (r, s, c) (the window's taps times C input channels). For a 1x1 stride-1 window
(``conv1x1_act``: two of a bottleneck's three convs) row m of A is x's pixel m itself, so for a
channels_last x, A is x read as a row-major [M, C] matrix and the output a row-major [M, K] one.
Larger windows and strides (``_triton_implicit_gemm``) read each tap's pixels through the same
strides, out-of-map taps masked to zero: one kernel, the window a compile-time constant.

The convolution lives only in the float32 accumulator; the epilogue adds the bias, then the
residual (the order of F.conv2d(bias) + residual), applies ReLU keeping NaN as torch.relu does,
rounds once to x's dtype and stores the output once. Zero padding is multiplied like the
pixels: a non-finite weight makes the border outputs non-finite too, as F.conv2d's float32 and
float64 CPU kernels do (zero padding, then the sum); eager is not one answer there (oneDNN's
bfloat16 kernel skips padded taps).

Inference only: the op has no autograd; registered by ``fpn_fast.ops._triton.define_inference_op``.
"""
from typing import Optional, Sequence, Tuple

import torch

from .._triton import (_INTERPRET, _autotune_mode, _device_limits, _dot_precision, _empty, _ints, _is_channels_last,
                      _needs_int64, _next_pow2, _precision, define_inference_op, on_device_of, triton,
                      unavailable_reason)

if triton is not None:
    import triton.language as tl

    from .._triton import _round_to

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# The interpreter pays per program (its tl.dot is a numpy matmul), so one tall block runs there.
_INTERPRETER_BLOCKS = dict(BLOCK_M=128, BLOCK_K=32, BLOCK_C=32)

# (BLOCK_M, BLOCK_K, BLOCK_C, num_warps, num_stages): BLOCK_M rows (pixels) by BLOCK_K output
# channels, BLOCK_C input channels per step. Sized for ResNet50's bottleneck convs at batch 2,
# 800x1216: M from 121600 (C2) to 1900 (C5), K and C from 64 to 2048. Wide tiles read A and B
# fewest times; the 256-row ones are for the narrow (K = 64, 128) outputs of the large maps.
# Stages take (BLOCK_M + BLOCK_K) * BLOCK_C * itemsize bytes of shared memory each.
_GPU_CONFIGS = (
    (128, 256, 32, 8, 3),
    (256, 128, 32, 8, 3),
    (256, 64, 32, 8, 4),
    (128, 128, 64, 8, 3),
    (128, 128, 32, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 256, 32, 4, 4),
    (64, 128, 64, 4, 3),
    (64, 64, 64, 4, 4),
    (32, 64, 128, 4, 3),
    (64, 64, 32, 4, 2),  # 32 KB of float32 stages: fits GPUs with ~100 KB of shared memory
)
_MIN_DOT = 16  # tl.dot's smallest block dimension


def _fitted(config: Tuple[int, int, int, int, int], k: int, c: int) -> Tuple[int, int, int, int, int]:
    """``config`` with BLOCK_K and BLOCK_C cut to the powers of two that cover k and c: a block
    wider than the operand would only load masked lanes. A tile cut below 128x64 gets 4 warps."""
    bm, bk, bc, warps, stages = config
    bk = min(bk, max(_MIN_DOT, _next_pow2(k)))
    bc = min(bc, max(_MIN_DOT, _next_pow2(c)))
    return bm, bk, bc, (warps if bm * bk >= 128 * 64 else 4), stages


def _heuristic_config(m: int, k: int, c: int, dtype: torch.dtype, sm_count: int,
                      shared_memory: int) -> Tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_C, num_warps, num_stages) for a conv of m output pixels, k output
    channels and c input channels per tap: among _GPU_CONFIGS cut to the operands (``_fitted``)
    whose pipeline stages fit ``shared_memory``, the largest tile (fewest re-reads of x and the
    weight) that still gives every SM a tile, wider BLOCK_C first; the smallest tile when none
    fills the SMs (a short map with many channels, e.g. C5). A rule, not a measurement:
    FPN_FAST_AUTOTUNE=full measures instead.

    Args:
        m: output pixels (N*P*Q). k: output channels. c: input channels (per tap).
        dtype: the operands' dtype (sizes the stages). sm_count: the GPU's multiprocessors.
        shared_memory: shared memory a block may use, in bytes.

    Returns:
        A config of _GPU_CONFIGS, fitted to k and c.
    """
    element = dtype.itemsize
    configs = list(dict.fromkeys(_fitted(config, k, c) for config in _GPU_CONFIGS))
    stage_bytes = lambda cfg: (cfg[0] + cfg[1]) * cfg[2] * element * cfg[4]  # noqa: E731
    fitting = [cfg for cfg in configs if stage_bytes(cfg) <= shared_memory] or [min(configs, key=stage_bytes)]
    by_size = sorted(fitting, key=lambda cfg: (-cfg[0] * cfg[1], -cfg[2]))
    for config in by_size:
        if -(-m // config[0]) * -(-k // config[1]) >= sm_count:
            return config
    return by_size[-1]


if triton is not None:

    @triton.jit
    def _conv_act_kernel(
        x_ptr, w_ptr, bias_ptr, res_ptr, out_ptr,
        M, K, C, H, W, P, Q,
        M_BUCKET,  # autotune key only: M rounded up to a power of two (one tuning per scale)
        x_sn, x_sc, x_sh, x_sw,
        w_sk, w_sc, w_sr, w_ss,
        bias_s,
        res_sn, res_sk, res_sp, res_sq,
        out_sn, out_sk, out_sp, out_sq,
        KH: tl.constexpr, KW: tl.constexpr, STRIDE_H: tl.constexpr, STRIDE_W: tl.constexpr,
        PAD_H: tl.constexpr, PAD_W: tl.constexpr,
        HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, RELU: tl.constexpr,
        DOT_PRECISION: tl.constexpr, SOFT_BF16: tl.constexpr, INT64: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        # The column blocks of one row block are adjacent programs: its x rows are still in L2
        # when the next column block reads them.
        col_blocks = tl.cdiv(K, BLOCK_K)
        pid = tl.program_id(0)
        pid_m = pid // col_blocks
        if INT64:
            pid_m = pid_m.to(tl.int64)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = (pid % col_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        cs = tl.arange(0, BLOCK_C)
        if INT64:  # k or c times another operand's stride can pass 2**31 too
            cols = cols.to(tl.int64)
            cs = cs.to(tl.int64)
        # (n, p, q) decomposed once per row, outside the reduction loop.
        q = rows % Q
        p = rows // Q % P
        n = rows // Q // P
        row_in = rows < M
        col_in = cols < K
        top = p * STRIDE_H - PAD_H  # the window's first input row and column
        left = q * STRIDE_W - PAD_W
        a_offsets = (n * x_sn + top * x_sh + left * x_sw)[:, None] + cs[None, :] * x_sc
        b_offsets = cs[:, None] * w_sc + cols[None, :] * w_sk

        # One loop over (tap, channel block), so that the pipeline spans the taps too (a 3x3
        # conv of 64 channels has one channel block per tap).
        c_blocks = tl.cdiv(C, BLOCK_C)
        acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for step in range(0, KH * KW * c_blocks):
            tap = step // c_blocks
            c0 = (step - tap * c_blocks) * BLOCK_C
            r = tap // KW
            s = tap - r * KW
            a_in = row_in
            if PAD_H > 0:  # without padding every tap of a valid row is inside the map
                a_in = a_in & (top + r >= 0) & (top + r < H)
            if PAD_W > 0:
                a_in = a_in & (left + s >= 0) & (left + s < W)
            if INT64:  # the taps' and channels' offsets below can pass 2**31 too
                r = r.to(tl.int64)
                s = s.to(tl.int64)
                c0 = c0.to(tl.int64)
            c_in = cs < C - c0
            a = tl.load(x_ptr + a_offsets + (r * x_sh + s * x_sw + c0 * x_sc),
                        mask=a_in[:, None] & c_in[None, :], other=0.0)
            b = tl.load(w_ptr + b_offsets + (r * w_sr + s * w_ss + c0 * w_sc),
                        mask=c_in[:, None] & col_in[None, :], other=0.0)
            if SOFT_BF16:  # the interpreter's dot multiplies bfloat16's raw bits; float32 is exact
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

        # Epilogue in float32, in eager's order: (conv + bias) + residual, ReLU, one rounding.
        mask = row_in[:, None] & col_in[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols * bias_s, mask=col_in, other=0.0).to(tl.float32)[None, :]
        if HAS_RESIDUAL:
            res = tl.load(res_ptr + (n * res_sn + p * res_sp + q * res_sq)[:, None] + cols[None, :] * res_sk,
                          mask=mask, other=0.0)
            acc += res.to(tl.float32)
        if RELU:  # NaN < 0 is false: NaN passes, as torch.relu lets it (a maximum may drop it)
            acc = tl.where(acc < 0, 0.0, acc)
        tl.store(out_ptr + (n * out_sn + p * out_sp + q * out_sq)[:, None] + cols[None, :] * out_sk,
                 _round_to(acc, out_ptr.dtype.element_ty, SOFT_BF16), mask=mask)

    _AUTOTUNE = _autotune_mode() == "full" and not _INTERPRET
    if _AUTOTUNE:
        # Keyed on the GEMM's shape and window (the autotuner adds the tensors' dtypes itself)
        # and the dot precision (IEEE float32 runs on the CUDA cores, TF32 on the tensor cores).
        _KERNEL = triton.autotune(
            configs=[triton.Config(dict(BLOCK_M=bm, BLOCK_K=bk, BLOCK_C=bc), num_warps=nw, num_stages=ns)
                     for bm, bk, bc, nw, ns in _GPU_CONFIGS],
            key=["M_BUCKET", "K", "C", "KH", "KW", "STRIDE_H", "STRIDE_W", "DOT_PRECISION"], cache_results=True,
        )(_conv_act_kernel)
    else:
        _KERNEL = _conv_act_kernel


def output_shape(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                 padding: Sequence[int]) -> Tuple[int, int, int, int]:
    """(N, K, P, Q) of F.conv2d(x, weight, stride=stride, padding=padding)."""
    n, _, h, w = _ints(x.shape)
    k, _, kh, kw = _ints(weight.shape)
    return n, k, (h + 2 * padding[0] - kh) // stride[0] + 1, (w + 2 * padding[1] - kw) // stride[1] + 1


def empty_output(x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
                 nchw: bool = False) -> torch.Tensor:
    """The output buffer (also the fake kernels'): x's dtype and device, x's memory format
    (channels_last for a channels_last x, as F.conv2d lays it out), or contiguous NCHW when
    ``nchw``."""
    return _empty(list(output_shape(x, weight, stride, padding)), x, not nchw and _is_channels_last(x))


def launch(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: Optional[torch.Tensor],
           relu: bool, stride: Sequence[int], padding: Sequence[int], nchw: bool = False) -> torch.Tensor:
    """Run the kernel into a fresh output (inputs already checked; ``nchw``: a contiguous NCHW
    output whatever x's layout, the epilogue storing through its strides); the registered ops' body."""
    out = empty_output(x, weight, stride, padding, nchw)
    if out.numel() == 0:
        return out
    _, c, h, w = _ints(x.shape)
    n, k, p, q = _ints(out.shape)
    kh, kw = _ints(weight.shape[2:])
    m = n * p * q
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(k, meta["BLOCK_K"]),)  # noqa: E731
    _KERNEL[grid](
        x, weight, x if bias is None else bias, x if residual is None else residual, out,
        m, k, c, h, w, p, q, _next_pow2(m),
        *x.stride(), *weight.stride(), 0 if bias is None else bias.stride(0),
        *((0, 0, 0, 0) if residual is None else residual.stride()), *out.stride(),
        KH=kh, KW=kw, STRIDE_H=int(stride[0]), STRIDE_W=int(stride[1]), PAD_H=int(padding[0]), PAD_W=int(padding[1]),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, RELU=bool(relu),
        DOT_PRECISION=_dot_precision(x.dtype), SOFT_BF16=_precision(x.dtype)["SOFT_BF16"],
        INT64=_needs_int64(*(t for t in (x, weight, residual, out) if t is not None)),
        **_launch_config(m, k, c, x))
    return out


def _launch_config(m: int, k: int, c: int, x: torch.Tensor) -> dict:
    """The block sizes (and on a GPU warps and stages) of one launch; none when autotuning."""
    if _INTERPRET:
        return _INTERPRETER_BLOCKS
    if _AUTOTUNE:
        return {}
    index = torch.cuda.current_device() if x.device.index is None else x.device.index
    bm, bk, bc, warps, stages = _heuristic_config(m, k, c, x.dtype, *_device_limits(index))
    return dict(BLOCK_M=bm, BLOCK_K=bk, BLOCK_C=bc, num_warps=warps, num_stages=stages)


def _describe(t: torch.Tensor) -> str:
    return f"{tuple(t.shape)} {t.dtype} on {t.device}"


def problem(name: str, x, weight, bias, residual, stride: Sequence[int] = (1, 1), padding: Sequence[int] = (0, 0),
            dilation: Sequence[int] = (1, 1), groups: int = 1) -> Optional[Tuple[type, str]]:
    """(exception type, message) of the first reason the kernel cannot take this call, or None.

    TypeError: a non-tensor, a dtype other than float32/float16/bfloat16, dtypes that differ.
    ValueError: shapes that do not fit, operands on other devices, dilation or groups, a device
    Triton cannot run on here. One check for ``supports`` and for the ops' errors."""
    for label, t in (("x", x), ("weight", weight)):
        if not isinstance(t, torch.Tensor):
            return TypeError, f"{name}: {label} must be a tensor, got {type(t).__name__}"
    for label, t in (("bias", bias), ("residual", residual)):
        if t is not None and not isinstance(t, torch.Tensor):
            return TypeError, f"{name}: {label} must be a tensor or None, got {type(t).__name__}"
    if x.dim() != 4 or weight.dim() != 4:
        return ValueError, f"{name}: x and weight must be 4-D, got x {tuple(x.shape)}, weight {tuple(weight.shape)}"
    if x.dtype not in SUPPORTED_DTYPES:
        return TypeError, f"{name}: {x.dtype} is not supported, only float32, float16 and bfloat16 (x {_describe(x)})"
    if tuple(dilation) != (1, 1) or groups != 1:
        return ValueError, f"{name}: dilation {tuple(dilation)} and groups {groups} are not supported, only 1"
    if len(stride) != 2 or len(padding) != 2 or min(stride) < 1 or min(padding) < 0:
        return ValueError, (f"{name}: stride {tuple(stride)} must be two positive ints, "
                            f"padding {tuple(padding)} two >= 0")
    if x.shape[1] == 0:  # F.conv2d then returns a map of no channels, not the bias
        return ValueError, f"{name}: x has no input channels: {tuple(x.shape)}"
    if weight.shape[0] == 0:  # as F.conv2d refuses it
        return ValueError, f"{name}: weight {tuple(weight.shape)} has no output channels"
    if weight.shape[1] != x.shape[1]:
        return ValueError, (f"{name}: weight {tuple(weight.shape)} must be (K, {x.shape[1]}, kh, kw) "
                            f"for x {tuple(x.shape)}")
    if any(size + 2 * pad < k for size, pad, k in zip(x.shape[2:], padding, weight.shape[2:])):
        return ValueError, (f"{name}: window {tuple(weight.shape[2:])} is larger than x {tuple(x.shape)} "
                            f"padded by {tuple(padding)}")
    out_shape = tuple(output_shape(x, weight, stride, padding))
    operands = (("weight", weight, None), ("bias", bias, (out_shape[1],)), ("residual", residual, out_shape))
    for label, t, shape in operands:
        if t is None:
            continue
        if t.dtype != x.dtype:
            return TypeError, f"{name}: {label} {_describe(t)} must have x's dtype: {_describe(x)}"
        if t.device != x.device:
            return ValueError, f"{name}: {label} {_describe(t)} must be on x's device: {_describe(x)}"
        if shape is not None and tuple(t.shape) != shape:
            return ValueError, f"{name}: {label} must have shape {shape} for x {tuple(x.shape)}, got {tuple(t.shape)}"
    reason = unavailable_reason(x.device.type)
    if reason is not None:
        return ValueError, f"{name}: Triton cannot run on {x.device}: {reason}"
    return None


def check_no_grad(name: str, *tensors: Optional[torch.Tensor]) -> None:
    """RuntimeError when grad mode is on and an input requires grad: the op has no backward."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise RuntimeError(f"{name} (triton) is inference only (no autograd): run it under torch.no_grad() or "
                           "torch.inference_mode()")


def _conv1x1_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                 residual: Optional[torch.Tensor], relu: bool) -> torch.Tensor:
    """The registered op's kernel (CPU under the interpreter, CUDA)."""
    return launch(x, weight, bias, residual, relu, (1, 1), (0, 0))


if triton is not None:  # one registration on a GPU and under the interpreter (see define_inference_op)
    _op = define_inference_op("fpn_fast_triton::conv1x1_act", _conv1x1_act,
                              lambda x, weight, bias, residual, relu: empty_output(x, weight, (1, 1), (0, 0)))


def supports(x, weight, bias=None, residual=None, relu: bool = False, *, stride: Sequence[int] = (1, 1),
             padding: Sequence[int] = (0, 0), dilation: Sequence[int] = (1, 1), groups: int = 1) -> Optional[str]:
    """Why ``conv1x1_act`` cannot take this call, or None when it can: a 1x1 window, stride 1, no
    padding, dilation or groups; float32/float16/bfloat16 operands of one dtype and device; a
    device Triton runs on here. Layout is no reason: every operand is read through its strides
    (channels_last x is the fast case). ``relu`` never is; it is taken for the callers' symmetry.

    Args:
        x, weight, bias, residual, relu: as ``conv1x1_act``'s.
        stride, padding, dilation, groups: the convolution's, as F.conv2d's (pairs, an int).

    Returns:
        None, or a sentence naming what the kernel does not take.
    """
    if isinstance(weight, torch.Tensor) and weight.dim() == 4 and tuple(weight.shape[2:]) != (1, 1):
        return f"conv1x1_act: the window must be 1x1, got {tuple(weight.shape[2:])}"
    if tuple(stride) != (1, 1) or tuple(padding) != (0, 0):
        return f"conv1x1_act: stride must be 1 and padding 0, got stride {tuple(stride)}, padding {tuple(padding)}"
    found = problem("conv1x1_act", x, weight, bias, residual, dilation=dilation, groups=groups)
    return None if found is None else found[1]


def conv1x1_act(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None, relu: bool = False) -> torch.Tensor:
    """``relu?((F.conv2d(x, weight) + bias[k]) + residual)`` for a 1x1 stride-1 convolution, in one
    Triton GEMM whose epilogue adds the bias and the residual and applies the ReLU; for inference.

    The sum is accumulated in float32 (float32 operands on TF32 tensor cores exactly where
    torch.backends.cudnn.allow_tf32 lets cuDNN's convolutions use TF32; in IEEE float32 else;
    under the interpreter always IEEE); bias, residual and ReLU are applied in float32 and the
    result rounded once to x's dtype. NaN and inf propagate as through F.conv2d and torch.relu.
    The output is always a fresh tensor, so no input can alias it; the residual may share memory
    with x or be an expanded view (both are only read).

    Args:
        x: Tensor[N, C, H, W], float32, float16 or bfloat16, any strides (channels_last is the
            fast case). weight: Tensor[K, C, 1, 1]. bias: Tensor[K] or None.
        residual: Tensor[N, K, H, W] or None, any strides. relu: apply ReLU last.
        All of x's dtype and device.

    Returns:
        Tensor[N, K, H, W] of x's dtype, channels_last when x is (else contiguous).

    Raises:
        TypeError: a non-tensor operand, an unsupported dtype, operands of different dtypes.
        ValueError: shapes that do not fit, a window other than 1x1, operands on different
            devices, a device Triton cannot run on here (CUDA; CPU only under TRITON_INTERPRET=1).
        RuntimeError: grad mode is on and an input requires grad (there is no backward).
    """
    if isinstance(weight, torch.Tensor) and weight.dim() == 4 and tuple(weight.shape[2:]) != (1, 1):
        raise ValueError(f"conv1x1_act: weight {tuple(weight.shape)} must be (K, C, 1, 1)")
    found = problem("conv1x1_act", x, weight, bias, residual)
    if found is not None:
        raise found[0](found[1])
    check_no_grad("conv1x1_act", x, weight, bias, residual)
    with on_device_of(x):
        return torch.ops.fpn_fast_triton.conv1x1_act(x, weight, bias, residual, bool(relu))
