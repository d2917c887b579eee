"""What every Triton kernel of fpn_fast shares: availability, the 2-D tiling, the nearest source
index, rounding, the op registration (``registrar``, ``define_inference_op``), and what the GEMM
kernels share (autotune mode, device limits, the dot precision that follows cuDNN's TF32 flag).

Every kernel walks its output in 2-D tiles, (rows x cols), where cols is the contiguous dimension
of the output's memory format (W for NCHW, C for channels_last) so that loads and stores along it
vectorise, and rows flatten the other three dims (decomposed once per row, not per element).
Inputs are read through their own strides, so no operand is copied to a canonical layout.

The ops live in the "fpn_fast_triton" namespace (the C++ extension owns "fpn_fast"); each op's
kernels and registration live beside the op (``top_down/_triton.py``, ``pool/_triton.py``,
``conv/_triton_epilogue.py``, ``conv/_triton_gemm.py``, ``conv/_triton_implicit_gemm.py``,
``lateral/_triton.py``). On a GPU the differentiable ones are
``torch.library.triton_op``s, so torch.compile sees the kernels; under TRITON_INTERPRET=1 (CPU
tensors) they are opaque ``custom_op``s, because compiling a triton_op traces into the launch and
the interpreter then touches fake tensors' data.
"""
import contextlib
import functools
import os
import struct
from typing import Callable, List, Optional, Tuple

import torch

from .flags import cudnn_conv_allows_tf32
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


# ---- what the GEMM kernels share (the fused lateral GEMM, the conv GEMMs): autotune mode, device
# limits, and the dot precision that follows cuDNN's TF32 flag.

def _autotune_mode() -> str:
    """FPN_FAST_AUTOTUNE, read at import by each GEMM kernel's module: "heuristic" (default)
    launches the one config the module's ``_heuristic_config`` picks, so a first call compiles one
    kernel per specialisation and times nothing; "full" autotunes every config of the module's
    _GPU_CONFIGS per GEMM shape (several seconds a shape; the choice is cached on disk with
    Triton's kernels, ``cache_results``)."""
    choice = os.environ.get("FPN_FAST_AUTOTUNE") or "heuristic"
    if choice not in ("heuristic", "full"):
        raise ValueError(f"FPN_FAST_AUTOTUNE must be 'heuristic' or 'full', not {choice!r}")
    return choice


@functools.lru_cache(maxsize=None)
def _device_limits(index: int) -> Tuple[int, int]:
    """(multiprocessors, shared memory per block in bytes) of CUDA device ``index``."""
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024
    return props.multi_processor_count, shared


def _dot_precision(dtype: torch.dtype) -> str:
    """The GEMM kernels replace cuDNN convolutions, so float32 uses TF32 exactly when cuDNN may
    (torch.backends.cudnn.allow_tf32). float16/bfloat16 get tl.dot's default, "tf32", which
    only concerns float32 operands: they always run on the tensor cores."""
    return "ieee" if dtype == torch.float32 and not cudnn_conv_allows_tf32() else "tf32"


# Source-index modes per spatial dim, chosen on the host (docs/design.md, exact op semantics).
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


# How the differentiable ops register: under the interpreter a triton_op cannot be compiled (see
# the module docstring); torch < 2.6 has no triton_op at all.
_AS_TRITON_OP = not _INTERPRET and hasattr(torch.library, "triton_op")


def on_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it t's (a model on cuda:1 while the
    current device is cuda:0). Under torch.compile inductor places the launches itself."""
    if t.is_cuda and not torch.compiler.is_compiling():
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()
