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

class Rounding(NamedTuple):
    """How an implementation's results compare with its op's reference (``ops.reference`` for
    the FPN steps, F.conv2d for the convolutions).

    bit_exact: the same bits, on every input.
    bound: otherwise, the largest difference the tests accept, as a fraction of the output's
        largest magnitude (None where the difference is float rounding of a reordered sum).
    source: where the bound is stated and tested.
    """
    bit_exact: bool
    bound: Optional[float]
    source: str


_EXACT_TOP_DOWN = Rounding(True, None, "docs/design.md, Exact op semantics; tests/ops/test_upsample_add.py")
_REORDERED_SUM = "sums ordered differently from the direct convolution's: float rounding"

# (op, implementation) -> Rounding. Ops not listed take the reference's bits on every route.
ROUNDING: Dict[Tuple[str, str], Rounding] = {
    ("upsample_add", "extension"): _EXACT_TOP_DOWN,
    ("upsample_add", "triton"): _EXACT_TOP_DOWN,
    ("upsample_add", "torch"): _EXACT_TOP_DOWN,
    ("stride2_pool", "triton"): Rounding(True, None, "a copy; tests/ops/test_stride2_pool.py"),
    ("stride2_pool", "torch"): Rounding(True, None, "a copy; tests/ops/test_stride2_pool.py"),
    ("to_nchw", "extension"): Rounding(True, None, "a copy; tests/ops/test_extension.py"),
    # The convolutions: the Winograd routes round differently from the direct sum (~1e-5 of the
    # output's scale, measured; held to 1e-4: tests/ops/test_winograd.py BOUND,
    # tests/ops/test_cpu_inference_paths.py; docs/design.md, Exact op semantics).
    ("conv2d_act", "winograd"): Rounding(False, 1e-4, "tests/ops/test_winograd.py"),
    ("conv2d_act", "nnpack"): Rounding(False, 1e-4, "tests/ops/test_cpu_inference_paths.py"),
    ("conv2d_nchw", "winograd"): Rounding(False, 1e-4, "tests/ops/test_winograd.py"),
    ("conv2d_nchw", "nnpack"): Rounding(False, 1e-4, "tests/ops/test_cpu_inference_paths.py"),
    # oneDNN's fused call and F.conv2d's plain one may block the sum apart on some small maps.
    ("conv2d_act", "onednn"): Rounding(False, 1e-5, "tests/ops/test_cpu_inference_paths.py"),
    ("conv2d_nchw", "onednn"): Rounding(False, 1e-5, "tests/ops/test_cpu_inference_paths.py"),
    # The epilogue adds the bias after cuDNN's convolution, in the reference's order.
    ("conv2d_act", "triton"): Rounding(False, None, "tests/inference/test_inference.py; " + _REORDERED_SUM),
    ("conv1x1", "bmm"): Rounding(False, None, "tests/inference/test_inference.py; " + _REORDERED_SUM),
    # The GEMM's sum order is its own; TF32 for float32 exactly where cuDNN may use it.
    ("lateral_upsample_add", "triton"): Rounding(False, None, "tests/ops/test_triton_lateral.py; " + _REORDERED_SUM),
}
