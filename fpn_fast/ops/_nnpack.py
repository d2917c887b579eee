"""NNPACK's Winograd convolution for the FPN's 3x3 output convolutions on large CPU maps.

torch ships NNPACK (``torch._nnpack_spatial_convolution``, NCHW in and out). For a 3x3, stride-1
convolution it computes in the Winograd domain (Lavin & Gray, "Fast Algorithms for Convolutional
Neural Networks", 2016): fewer multiplications for the same result up to float rounding. Measured
on the 2-core build machine (benchmarks/RESULTS.md), 256 -> 256 channels, float32, batch 1: 2.0-2.4x
faster than oneDNN's direct convolution from 80x80 up to 200x304 pixels, 1.7x at 40x40, and slower
below 32x32 (it transforms the kernel on every call), hence ``MIN_PIXELS``. Its results differ
from the direct convolution's by about 1e-5 of the output's largest value (a few 1e-6 measured on a
whole ResNet50-FPN), where the direct one's differ from float64 by about 1e-6.

Non-finite values are where Winograd and the direct sum part ways: an inf in a 6x6 input tile
becomes NaN across the tile's outputs (inf - inf in the transforms) where the direct convolution
gives inf at its neighbours only. A Winograd output is non-finite wherever its input tile is, so
``conv2d`` checks its output (one min/max pass) and returns None when any value is non-finite or
beyond 1e30 in magnitude (near float32 overflow the two may round apart); the caller then runs the
direct convolution, so NaN and inf propagate exactly as in eager.
"""
import functools
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

# Below this many output pixels the per-call kernel transform outweighs the saving (measured:
# 256 channels at 20x20, 0.65x; at 40x40, 1.73x).
MIN_PIXELS = 32 * 32
# Outputs beyond this magnitude go to the direct convolution (see the module docstring).
_FINITE_BOUND = 1e30
# The probe's tolerance, relative to the output's largest value (measured ~1e-5 on random data).
_PROBE_TOLERANCE = 1e-4


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
           padding: Sequence[int]) -> Optional[torch.Tensor]:
    """F.conv2d(x, weight, bias, stride=1, padding) for a float32 CPU x and a 3x3 weight, as a
    contiguous NCHW tensor; None when the result has a value that is not finite or beyond 1e30
    (the caller then runs the direct convolution)."""
    out = torch._nnpack_spatial_convolution(x.contiguous(), weight.contiguous(), bias, list(padding), [1, 1])
    if out.numel():
        low, high = torch.aminmax(out)
        if not (bool(low > -_FINITE_BOUND) and bool(high < _FINITE_BOUND)):  # NaN fails both
            return None
    return out


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> Optional[str]:
    """None when torch's NNPACK runs here and agrees with F.conv2d on a test convolution, else
    why not (cached). NNPACK needs an x86-64 CPU with AVX2 and FMA3 (or ARM NEON)."""
    try:
        if not torch._nnpack_available():  # also initialises NNPACK
            return "torch's NNPACK is not available on this CPU or build"
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, 8, 33, 35, generator=generator)
        weight = torch.randn(5, 8, 3, 3, generator=generator)
        bias = torch.randn(5, generator=generator)
        with torch.no_grad():
            got = conv2d(x, weight, bias, (1, 1))
            want = F.conv2d(x, weight, bias, 1, 1)
    except (AttributeError, RuntimeError) as err:
        return f"torch's NNPACK convolution is unusable: {err}"
    if got is None or got.shape != want.shape or \
            not float((got - want).abs().max()) <= _PROBE_TOLERANCE * float(want.abs().max()):
        return "torch's NNPACK convolution disagrees with F.conv2d"
    return None
