"""Helpers shared by the benchmark files: devices, backends, the timed-call helper, input rotation.

Compare rows only within a pytest-benchmark group: a group holds one shape, device, dtype and
memory format, measured side by side in the same run.
"""
import os
import time
from contextlib import nullcontext

import pytest
import torch

from fpn_fast.demo import backend_reasons

HAS_CUDA = torch.cuda.is_available()

# Triton on CPU would run through its interpreter: backend_reasons reports it unavailable there.
DEVICES = [pytest.param("cpu", id="cpu"),
           pytest.param("cuda", id="cuda", marks=[pytest.mark.cuda,
                                                  pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")])]
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.bfloat16, id="bfloat16")]

# Lines printed after the benchmark tables (compile times, peak memory).
SUMMARY = []

# FPN_FAST_BENCH_DRY=1 (benchmarks/gpu_check.sh's dry run): every shape tiny and one round, so
# a CPU machine runs each step of the GPU check quickly; the numbers then mean nothing.
DRY = os.environ.get("FPN_FAST_BENCH_DRY") == "1"
DRY_IMAGES = (1, 3, 64, 96)


def images_shape(shape):
    """``shape`` (N, 3, H, W) of a benchmark's images, or DRY_IMAGES in a dry run."""
    return DRY_IMAGES if DRY else tuple(shape)


def kernel_backends(device: str):
    """fpn_fast backends that can run on ``device`` ('torch' is the pure-PyTorch reference)."""
    return [name for name, reason in backend_reasons(device).items() if reason is None]


def autocast_context(device: str, dtype: torch.dtype):
    """Low precision runs under autocast (the model keeps its float32 weights), float32 as is."""
    return torch.autocast(device, dtype=dtype) if dtype != torch.float32 else nullcontext()


def skip_low_precision_on_cpu(device: str, dtype: torch.dtype) -> None:
    if dtype != torch.float32 and device != "cuda":
        pytest.skip("low precision is benchmarked on the GPU only")


def rounds(cpu: int, cuda: int, device: str) -> int:
    if DRY:
        return 1
    return cuda if device == "cuda" else cpu


def run_benchmark(benchmark, fn, device: str, n_rounds: int, calls_per_round: int = 1, bytes_per_call=None,
                  copy_gbps=None):
    """Time ``fn`` with one warm-up round; on a GPU each round ends with a synchronisation, so the
    time is the device's. ``calls_per_round`` (inputs rotated inside ``fn`` so they do not sit in
    L2) and, for memory-bound ops, the bytes one call must move, go to extra_info as per-call time,
    GB/s and % of the copy bandwidth measured in the same run."""
    if device == "cuda":
        def timed():
            fn()
            torch.cuda.synchronize()
    else:
        timed = fn
    benchmark.pedantic(timed, rounds=n_rounds, warmup_rounds=1, iterations=1)
    per_call = benchmark.stats.stats.median / calls_per_round
    benchmark.extra_info["calls_per_round"] = calls_per_round
    benchmark.extra_info["median_per_call_us"] = per_call * 1e6
    if bytes_per_call is not None:
        gbps = bytes_per_call / per_call / 1e9
        benchmark.extra_info["bytes_per_call"] = bytes_per_call
        benchmark.extra_info["gbps"] = gbps
        if copy_gbps:
            benchmark.extra_info["copy_gbps"] = copy_gbps
            benchmark.extra_info["pct_copy_bandwidth"] = 100.0 * gbps / copy_gbps


def rotation_count(bytes_per_set: int, device: str) -> int:
    """How many input sets to cycle through so that, on a GPU, they together exceed L2 twice over."""
    if device != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2 ** 20)
    return max(1, min(64, -(-2 * l2 // max(bytes_per_set, 1))))


def timed_seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    if HAS_CUDA:
        torch.cuda.synchronize()
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# FPN neck inputs and models (shared by the timing and the peak-memory benchmarks)

FPN_IN_CHANNELS = [256, 512, 1024, 2048]
# C2..C5 of a batch of two 800x1216 images (strides 4, 8, 16, 32).
NECK_SHAPES = [(2, 256, 200, 304), (2, 512, 100, 152), (2, 1024, 50, 76), (2, 2048, 25, 38)]


def neck_features(device: str, dtype: torch.dtype, memory_format: torch.memory_format, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return {str(i): torch.randn(shape, generator=generator).to(device, dtype, memory_format=memory_format)
            for i, shape in enumerate(NECK_SHAPES)}


def build_fpns(device: str, memory_format: torch.memory_format, seed: int = 0):
    """fpn_fast's FeaturePyramidNetwork (seeded init) and torchvision's with the same weights (None
    without torchvision), both in eval()."""
    import fpn_fast
    torch.manual_seed(seed)
    ours = fpn_fast.FeaturePyramidNetwork(FPN_IN_CHANNELS, 256, extra_blocks=fpn_fast.LastLevelMaxPool())
    theirs = None
    try:
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool
    except ImportError:
        pass
    else:
        theirs = FeaturePyramidNetwork(FPN_IN_CHANNELS, 256, extra_blocks=LastLevelMaxPool())
        theirs.load_state_dict(ours.state_dict())
    return [m.eval().to(device, memory_format=memory_format) if m is not None else None for m in (ours, theirs)]
