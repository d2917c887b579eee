"""Op level: fpn_fast's upsample_add / stride2_pool per backend against the eager PyTorch sequence.

One group per (op, device, memory format, shape). On a GPU each round runs the op over enough
rotated input sets to exceed L2 twice, then synchronises; extra_info has the per-call time, GB/s
(minimum bytes read + written) and % of the copy bandwidth measured in the same run.
"""

import pytest
import torch
import torch.nn.functional as F

from _bench import DEVICES, FORMATS, kernel_backends, rotation_count, rounds, run_benchmark
from fpn_fast import ops

CHANNELS, BATCH = 256, 2
# Top-down steps of the FPN for an 800x1216 image: (lateral H, W) <- (top H, W).
LEVELS = [((200, 304), (100, 152)), ((100, 152), (50, 76)), ((50, 76), (25, 38)), ((25, 38), (13, 19))]
BACKENDS = ("extension", "triton", "torch")
UPSAMPLE_VARIANTS = ["eager"] + [f"{b}{mode}" for b in BACKENDS for mode in ("", " in-place")]


def eager_upsample_add(lateral, top, bias):
    """What torchvision's FPN does: conv bias, nearest interpolate, add (three passes, two temporaries)."""
    return lateral + bias.view(1, -1, 1, 1) + F.interpolate(top, size=lateral.shape[-2:], mode="nearest")


def _skip_unless_available(backend: str, device: str) -> None:
    if backend not in kernel_backends(device):
        pytest.skip(f"backend {backend!r} does not run on {device} here")


def _with_backend(backend: str, op):
    def call(*args):
        with ops.use_backend(backend):
            return op(*args)
    return call


@pytest.mark.parametrize("variant", UPSAMPLE_VARIANTS)
@pytest.mark.parametrize("level", LEVELS, ids=[f"{h}x{w}" for (h, w), _ in LEVELS])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("device", DEVICES)
def test_upsample_add(benchmark, copy_gbps, device, fmt, level, variant):
    (h, w), (th, tw) = level
    backend, _, inplace = variant.partition(" ")
    if variant == "eager":
        op = eager_upsample_add
    else:
        _skip_unless_available(backend, device)
        op = _with_backend(backend, ops.upsample_add_ if inplace else ops.upsample_add)
    benchmark.group = f"upsample_add {device} {fmt} {h}x{w}<-{th}x{tw}"

    def make():
        lateral = torch.randn(BATCH, CHANNELS, h, w, device=device).contiguous(memory_format=FORMATS[fmt])
        top = torch.randn(BATCH, CHANNELS, th, tw, device=device).contiguous(memory_format=FORMATS[fmt])
        return lateral, top, torch.randn(CHANNELS, device=device)

    element = 4
    bytes_per_call = (2 * BATCH * CHANNELS * h * w + BATCH * CHANNELS * th * tw + CHANNELS) * element
    sets = [make() for _ in range(rotation_count(bytes_per_call, device))]
    # In place, every round adds into the same laterals again: the values drift, the work does not.
    run_benchmark(benchmark, lambda: [op(*s) for s in sets], device, rounds(20, 100, device),
                  calls_per_round=len(sets), bytes_per_call=bytes_per_call, copy_gbps=copy_gbps)


POOL_SHAPE = (BATCH, CHANNELS, 25, 38)  # P5 of an 800x1216 image
# The extension has no pool kernel: under it stride2_pool is the same ATen strided copy as 'torch'.
POOL_VARIANTS = ["eager max_pool2d", "torch", "triton"]


@pytest.mark.parametrize("variant", POOL_VARIANTS)
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("device", DEVICES)
def test_stride2_pool(benchmark, copy_gbps, device, fmt, variant):
    if variant == "eager max_pool2d":
        op = lambda x: F.max_pool2d(x, 1, 2, 0)  # noqa: E731
    else:
        _skip_unless_available(variant, device)
        op = _with_backend(variant, ops.stride2_pool)
    benchmark.group = f"stride2_pool {device} {fmt} {POOL_SHAPE[2]}x{POOL_SHAPE[3]}"
    n, c, h, w = POOL_SHAPE
    # The output is every other row and column: the least a kernel must move is the output, read and written.
    bytes_per_call = 2 * n * c * ((h + 1) // 2) * ((w + 1) // 2) * 4
    inputs = [torch.randn(POOL_SHAPE, device=device).contiguous(memory_format=FORMATS[fmt])
              for _ in range(rotation_count(4 * n * c * h * w, device))]
    run_benchmark(benchmark, lambda: [op(x) for x in inputs], device, rounds(50, 200, device),
                  calls_per_round=len(inputs), bytes_per_call=bytes_per_call, copy_gbps=copy_gbps)


# The FPN's lateral 1x1 convs (bias-free) on C2..C5 of an 800x1216 image: F.conv2d (what
# torchvision runs, oneDNN on CPU) against ops.conv1x1 (a matmul on contiguous CPU maps) and a
# batched matmul with an expanded weight, which needs no transposed copies.
LATERALS = [(256, 200, 304), (512, 100, 152), (1024, 50, 76), (2048, 25, 38)]
CONV1X1_VARIANTS = {
    "eager": lambda x, w: F.conv2d(x, w),
    "ops.conv1x1": ops.conv1x1,
    "bmm expanded weight": lambda x, w: torch.bmm(w.reshape(w.shape[0], -1).expand(x.shape[0], -1, -1),
                                                  x.flatten(2)).view(x.shape[0], -1, *x.shape[2:]),
}


@pytest.mark.parametrize("variant", list(CONV1X1_VARIANTS))
@pytest.mark.parametrize("shape", LATERALS, ids=[f"{c}x{h}x{w}" for c, h, w in LATERALS])
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("device", DEVICES)
def test_lateral_conv1x1(benchmark, device, fmt, shape, variant):
    c, h, w = shape
    if variant == "bmm expanded weight" and fmt == "channels_last":
        pytest.skip("the flattened view needs a contiguous map")
    benchmark.group = f"lateral conv1x1 {device} {fmt} {c}x{h}x{w}->256"
    x = torch.randn(BATCH, c, h, w, device=device).contiguous(memory_format=FORMATS[fmt])
    weight = torch.randn(CHANNELS, c, 1, 1, device=device)
    op = CONV1X1_VARIANTS[variant]

    def forward():
        with torch.inference_mode():
            op(x, weight)
    run_benchmark(benchmark, forward, device, rounds(10, 50, device))
