"""Selection rules as data, in one place: which implementation takes which call, and how each
one rounds.

Two kinds of facts, kept apart on purpose:

- **What an implementation supports** (the thresholds below). Each op's ``supports`` predicate
  (``conv.conv2d_act_supports``, ``conv.conv2d_nchw_supports``, ``lateral.lateral_supports``)
  reads them and hands ``dispatch.resolve`` the answer. A fast route is taken where it runs and
  pays, measured on the build machine (benchmarks/RESULTS.md); being supported says nothing
  about being bit-exact.
- **How an implementation rounds** (``ROUNDING``): bit-exact with the reference, or within a
  stated bound of it. The Winograd routes are supported but not bit-exact; the inference mode
  accepts them because its contract is float rounding (1e-4 of each level's scale,
  tests/inference/test_inference.py), and keeps eager's NaN/inf propagation by recomputing any result
  beyond ``WINOGRAD_FINITE_BOUND`` with the direct convolution.

This module imports nothing of fpn_fast: the op modules and their backends read it.
"""
from typing import Dict, NamedTuple, Optional, Tuple

# ---- conv2d_act / conv2d_nchw on CPU (float32) -------------------------------------------------

# oneDNN's prepacked weights pay on small maps and not reliably on large ones, so only
# convolutions over at most this many input pixels use them (benchmarks/RESULTS.md, issue 14).
PACK_MAX_PIXELS = 128 * 128

# The extension's Winograd F(4x4, 3x3) pays against oneDNN's direct convolution (its products are
# weight-bound on small maps: the kernel transforms are 4x the weight) from this many input and
# output channels ...
WINOGRAD_MIN_CHANNELS = 32
# ... on maps of at least this many 4x4 output tiles, by input channel count: the first entry
# whose channel limit (inclusive; None: no limit) holds applies (benchmarks/RESULTS.md).
WINOGRAD_MIN_TILES: Tuple[Tuple[Optional[int], int], ...] = ((127, 25), (256, 9), (None, 16))

# NNPACK's Winograd F(6x6, 3x3), where the extension's cannot run: in the ResNet body from this
# many input channels (conversions to and from NCHW included; benchmarks/RESULTS.md) ...
NNPACK_MIN_CHANNELS = 128
# ... over maps of at least this many pixels with the extension's sliced path (kernel transforms
# made once), else at least NNPACK_MIN_PIXELS_UNSLICED (torch's call transforms the kernel on
# every call).
NNPACK_MIN_PIXELS = 20 * 20
NNPACK_MIN_PIXELS_UNSLICED = 32 * 32
# The sliced path (one output-channel slice per OpenMP thread) up to this many pixels; torch's
# NNPACK call (its own thread pool, splitting the image) above (measured crossover).
NNPACK_SLICED_MAX_PIXELS = 100 * 100

# A Winograd result with a value that is not finite or beyond this magnitude is recomputed by the
# direct convolution: Winograd spreads an inf over its tile (inf - inf in the transforms), and
# near float32 overflow the two may round apart.
WINOGRAD_FINITE_BOUND = 1e30
# A Winograd route is used only if, on a test convolution probed once, it agrees with F.conv2d to
# this fraction of the output's largest value (its error is ~1e-5 of it: ROUNDING).
WINOGRAD_PROBE_TOLERANCE = 1e-4


# ---- how each implementation rounds --------------------------------------------------------------

# Machine epsilon of the accumulation dtypes (torch.finfo(...).eps; this module imports no torch).
FLOAT32_EPS = 2.0 ** -23
FLOAT64_EPS = 2.0 ** -52


class Rounding(NamedTuple):
    """How far an implementation's output may lie from its op's reference (``ops.reference`` for
    the FPN steps, F.conv2d for the convolutions) run on the same inputs, in the same dtype, on
    the same device: elementwise, ``|out - reference| <= bound * max|reference|``, where

        bound = sums * eps(accumulation dtype) + roundings * eps(output dtype)

    (the accumulation dtype is float64 for float64 tensors, float32 for every other float dtype:
    float16/bfloat16 are computed in float32). Both 0: the same bits, on every input.
    tests/ops/op_tester.py holds every implementation to its entry, for every dtype and layout.
    float32 bounds are for IEEE float32: TF32 (``torch.backends.cudnn.allow_tf32``, on by default
    for cuDNN's convolutions) cuts products to 10 mantissa bits in the reference and the fast path
    alike, and the tests turn it off.

    sums: float32/float64 work done differently from the reference (sums in another order, other
        transforms), in eps of the accumulation dtype.
    roundings: extra roundings to the output dtype (float16/bfloat16 intermediate results the
        reference rounds and the implementation keeps in float32, or the other way), in eps of
        the output dtype.
    """
    sums: float = 0.0
    roundings: float = 0.0

    @property
    def bit_exact(self) -> bool:
        return self.sums == 0 and self.roundings == 0

    def bound(self, output_eps: float, float64: bool = False) -> float:
        """The largest accepted difference as a fraction of the output's largest magnitude, for
        an output dtype of epsilon ``output_eps`` (float64: whether it is float64)."""
        return self.sums * (FLOAT64_EPS if float64 else FLOAT32_EPS) + self.roundings * output_eps


EXACT = Rounding()
# A sum of K products in another order (oneDNN's blocking, a batched matmul, a GEMM's tiles): each
# order errs by at most ~K eps of the sum of |products| and typically by ~sqrt(K) eps of it, a few
# eps of the output's largest value (measured <= 5 float32 eps for K = 256..2048, 10 float64 eps at
# 1024); 64 eps keeps room for K in the thousands.
REORDERED = 64.0
# Winograd F(4x4, 3x3) and F(6x6, 3x3): transform entries up to 8 (and their inverses) round on the
# way in and out. Measured 6e-6..1.4e-5 of the output's largest value (tests/ops/test_winograd.py);
# held to 1e-4, the inference mode's contract (docs/design.md).
WINOGRAD = Rounding(sums=1e-4 / FLOAT32_EPS)

# (op, implementation) -> how it rounds: every implementation each op's dispatch rows name (an op
# without rows runs "torch"); the in-place upsample_add_ shares upsample_add's rows and rounding.
ROUNDING: Dict[Tuple[str, str], Rounding] = {
    # The top-down step: the same float32 operations in the same order on every route
    # (docs/design.md, Exact op semantics).
    ("upsample_add", "extension"): EXACT,
    ("upsample_add", "triton"): EXACT,
    ("upsample_add", "torch"): EXACT,
    # Copies.
    ("stride2_pool", "triton"): EXACT,
    ("stride2_pool", "torch"): EXACT,
    ("to_nchw", "extension"): EXACT,
    ("to_nchw", "torch"): EXACT,
    # The convolutions. "torch" is F.conv2d and the tail as the reference writes them.
    ("conv2d_act", "winograd"): WINOGRAD,
    ("conv2d_act", "nnpack"): WINOGRAD,
    ("conv2d_act", "onednn"): Rounding(sums=REORDERED),  # a fused call blocks the sum its own way
    # The conv in the output dtype without bias, then bias, residual and ReLU in float32 rounded
    # once, where the reference rounds after the conv with its bias and again after the residual
    # add: up to two roundings of float16/bfloat16 apart (measured 0.9 eps), plus the conv's own
    # order without the bias (measured 0.8 float32 eps on CPU).
    ("conv2d_act", "triton"): Rounding(sums=REORDERED, roundings=2),
    # cuDNN's fused conv + bias (+ residual) + ReLU (CUDA, a measured route taken only where its
    # ReLU keeps NaN): its own sum order, and one rounding where the reference rounds twice.
    ("conv2d_act", "cudnn_relu"): Rounding(sums=REORDERED, roundings=2),
    # One Triton GEMM, the tail in its epilogue: the sum accumulated in float32 in its own order
    # (TF32 exactly where cuDNN's convolutions may use it), bias, residual and ReLU in float32,
    # one rounding to the output dtype where the reference rounds twice.
    ("conv2d_act", "triton_gemm"): Rounding(sums=REORDERED, roundings=2),
    ("conv2d_act", "triton_conv"): Rounding(sums=REORDERED, roundings=2),
    ("conv2d_act", "torch"): EXACT,
    ("conv2d_nchw", "winograd"): WINOGRAD,
    ("conv2d_nchw", "nnpack"): WINOGRAD,
    ("conv2d_nchw", "onednn"): Rounding(sums=REORDERED),
    # The implicit GEMM writing NCHW: its own sum order, the bias in float32, one rounding.
    ("conv2d_nchw", "triton_conv"): Rounding(sums=REORDERED, roundings=2),
    # Not F.conv2d itself: conv2d_nchw's direct route is conv2d_act's (conv.conv2d_act_direct, then
    # to_nchw), which resolves conv2d_act's own row, so under the triton backend (and on CUDA by
    # default) the Triton epilogue runs although conv2d_nchw's row names "torch" only: its rounding.
    ("conv2d_nchw", "torch"): Rounding(sums=REORDERED, roundings=2),
    # conv1x1 has no rows: its "torch" route is a batched matmul for contiguous float32/float64
    # CPU maps (a reordered sum), F.conv2d otherwise.
    ("conv1x1", "torch"): Rounding(sums=REORDERED),
    # The GEMM sums in its own order in float32 and rounds once, where the reference rounds the
    # conv's float16/bfloat16 output before adding bias and top (measured 2.5 float32 eps; 0.8
    # eps of float16/bfloat16).
    ("lateral_upsample_add", "triton"): Rounding(sums=REORDERED, roundings=2),
    # conv1x1's matmul or oneDNN's 1x1 convolution, then upsample_add_: the conv's order only.
    ("lateral_upsample_add", "torch"): Rounding(sums=REORDERED),
}
