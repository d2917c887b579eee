"""Inference mode: ``fpn_fast.optimize_for_inference`` against torchvision, and the fused lateral op
it runs on.

"backbone optimized" groups: the whole ResNet50-FPN backbone at batch 2, 3x800x1216 on every
device (the CPU target is stated at that size), contiguous float32 input as a detection model
passes it; bfloat16 autocast on the GPU only. Variants: torchvision eager; torchvision compiled
with ``torch.compile(mode="max-autotune")``, compiled and warmed up outside the timing (compile
time in extra_info["compile_s"] and the notes); fpn_fast under the auto backend; and
``optimize_for_inference`` of it (its first call, which on CUDA compiles and autotunes the Triton
lateral kernel, in extra_info["first_call_s"] and the notes: it has no other set-up); on CUDA also
the optimized model under the "extension" backend ("no-triton optimized"), i.e. without its Triton
kernels (conv epilogue, fused lateral; the pool level then is torch's strided copy), to show what
they add.

"lateral fused" groups: one FPN level's lateral 1x1 conv (256 out channels) with bias plus the
nearest-upsampled coarser FPN map, channels_last, float32, for the four levels of that image
(C5 at 25x38 has no coarser map in the FPN: bias only). Variants: ``ops.lateral_upsample_add``
under "triton" (one GEMM with the top-down step in its epilogue; GPU only, on CPU Triton is its
interpreter), the same op with ``fuse=False`` under "extension" (cuDNN/oneDNN 1x1 conv, then the
extension's in-place fused step), and torchvision's eager ``F.conv2d`` + ``F.interpolate`` + add.
extra_info has TFLOP/s and % of the copy bandwidth (least bytes: x, top, weight read, out written).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import fpn_fast
from fpn_fast import ops
from fpn_fast.demo import build_models
from _bench import (DEVICES, DRY, DTYPES, SUMMARY, autocast_context, images_shape, kernel_backends, rotation_count,
                    rounds, run_benchmark, skip_low_precision_on_cpu, timed_seconds)

pytest.importorskip("torchvision")  # the comparisons need it

BACKBONE_SHAPE = images_shape((2, 3, 800, 1216))
BACKBONE_VARIANTS = ["torchvision eager", "torchvision max-autotune", "torchvision compiled", "fpn_fast auto",
                     "fpn_fast optimized", "optimized no-graphs", "no-triton optimized"]
# CUDA only: the default-mode compile (the CPU groups keep max-autotune, their stated peer) and the
# A/B of the engine's CUDA graphs.
CUDA_ONLY = ("torchvision compiled", "optimized no-graphs", "no-triton optimized")


def _ids(variants):
    """Test ids without spaces, so that -k can pick one variant ("auto" alone would also match
    "max-autotune", "optimized" every test of test_backbone_optimized)."""
    return [v.replace(" ", "_") for v in variants]


_MODELS, _COMPILED, _FIRST_CALL = {}, {}, {}


def _models(device: str):
    """(fpn_fast, torchvision, optimized fpn_fast) backbones with the same weights, one device at
    a time (with their compiled forms): they are large."""
    if device not in _MODELS:
        _MODELS.clear()
        _COMPILED.clear()
        ours, theirs = build_models(0, torch.device(device), torch.contiguous_format)
        _MODELS[device] = ours, theirs, fpn_fast.optimize_for_inference(ours)
    return _MODELS[device]


def _compiled(theirs, images, device: str, dtype: torch.dtype, mode: str = "max-autotune"):
    """torch.compile(torchvision backbone, mode=mode), compiled by its first call here. On CUDA,
    mode="max-autotune" also runs it as CUDA graphs: recorded on the next call, which is
    run_benchmark's warm-up round, so the timed rounds replay them."""
    key = (device, dtype, mode)
    if key not in _COMPILED:
        # dynamic=False: one static graph for this size, never a shape-generic recompile.
        compiled = torch.compile(theirs, mode=mode, dynamic=False)
        with torch.inference_mode(), autocast_context(device, dtype):
            seconds = timed_seconds(lambda: compiled(images))
        SUMMARY.append(f"torch.compile(torchvision backbone, {mode}) {device} {str(dtype)[6:]}: "
                       f"compile (first call) {seconds:.1f} s")
        _COMPILED[key] = compiled, seconds
    return _COMPILED[key]


@pytest.mark.parametrize("variant", BACKBONE_VARIANTS, ids=_ids(BACKBONE_VARIANTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_backbone_optimized(benchmark, device, dtype, variant):
    skip_low_precision_on_cpu(device, dtype)
    if variant in CUDA_ONLY and device != "cuda":
        pytest.skip(f"{variant}: a CUDA row")
    if variant == "no-triton optimized":
        if "extension" not in kernel_backends(device):
            pytest.skip("the A/B runs under the extension backend, which has no CUDA build here")
    ours, theirs, optimized = _models(device)
    images = torch.randn(BACKBONE_SHAPE, generator=torch.Generator().manual_seed(0)).to(device)
    n, _, h, w = BACKBONE_SHAPE
    benchmark.group = f"backbone optimized {device} {str(dtype)[6:]} batch {n} {h}x{w}"
    module = {"torchvision eager": theirs, "fpn_fast auto": ours, "fpn_fast optimized": optimized,
              "no-triton optimized": optimized}.get(variant)
    if variant == "optimized no-graphs":
        module = copy.deepcopy(optimized)  # its own engine, planned but never captured
        module.set_engine(cuda_graphs=False)
    # The A/B of the Triton kernels on CUDA: under "extension" the optimized model runs cuDNN
    # convolutions with torch's bias/residual/ReLU passes and the unfused lateral step.
    backend = "extension" if variant == "no-triton optimized" else "auto"
    if variant == "torchvision max-autotune":
        module, benchmark.extra_info["compile_s"] = _compiled(theirs, images, device, dtype)
    elif variant == "torchvision compiled":
        module, benchmark.extra_info["compile_s"] = _compiled(theirs, images, device, dtype, "default")

    def forward():
        # A set backend, whatever FPN_FAST_BACKEND says: "auto" is what a user gets by default.
        with torch.inference_mode(), autocast_context(device, dtype), ops.use_backend(backend):
            module(images)
    if variant == "fpn_fast optimized":
        if (device, dtype) not in _FIRST_CALL:
            _FIRST_CALL[device, dtype] = timed_seconds(forward)
            SUMMARY.append(f"fpn_fast optimized backbone {device} {str(dtype)[6:]}: first call "
                           f"{_FIRST_CALL[device, dtype]:.2f} s (nothing compiled ahead)")
        benchmark.extra_info["first_call_s"] = _FIRST_CALL[device, dtype]
    run_benchmark(benchmark, forward, device, rounds(3, 20, device))


# The engine at the other sizes (CUDA only: the graphs are what these rows measure).
OTHER_SHAPES = [(1, 3, 800, 1216), (1, 3, 512, 512)]
SHAPE_VARIANTS = ["torchvision eager", "fpn_fast optimized", "optimized no-graphs"]


@pytest.mark.parametrize("variant", SHAPE_VARIANTS, ids=_ids(SHAPE_VARIANTS))
@pytest.mark.parametrize("shape", OTHER_SHAPES, ids=[f"{n}x{h}x{w}" for n, _, h, w in OTHER_SHAPES])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_backbone_optimized_shapes(benchmark, device, dtype, shape, variant):
    if device != "cuda":
        pytest.skip("CUDA rows (the engine's graphs)")
    ours, theirs, optimized = _models(device)
    module = {"torchvision eager": theirs, "fpn_fast optimized": optimized}.get(variant)
    if variant == "optimized no-graphs":
        module = copy.deepcopy(optimized)
        module.set_engine(cuda_graphs=False)
    images = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device)
    n, _, h, w = shape
    benchmark.group = f"backbone optimized {device} {str(dtype)[6:]} batch {n} {h}x{w}"

    def forward():
        with torch.inference_mode(), autocast_context(device, dtype):
            module(images)
    run_benchmark(benchmark, forward, device, rounds(3, 20, device))


CHANNELS, BATCH = 256, 2
# (C_in, H, W) of C2..C5 for a batch of 800x1216 images, and the (H, W) of the coarser FPN map the
# level adds (None at C5, the top of the top-down path).
LATERAL_LEVELS = [(256, 200, 304, (100, 152)), (512, 100, 152, (50, 76)), (1024, 50, 76, (25, 38)),
                  (2048, 25, 38, None)]
if DRY:  # the GPU check's dry run: the same levels at an eighth of the size
    LATERAL_LEVELS = [(c, -(-h // 8), -(-w // 8), top and (-(-top[0] // 8), -(-top[1] // 8)))
                      for c, h, w, top in LATERAL_LEVELS]
LATERAL_VARIANTS = ["torchvision eager", "extension unfused", "triton fused"]


def eager_lateral(x, weight, bias, top):
    """torchvision's FPN step: the lateral conv with its bias, plus the interpolated coarser map
    (separate passes, two temporaries)."""
    lateral = F.conv2d(x, weight, bias)
    return lateral if top is None else lateral + F.interpolate(top, size=x.shape[-2:], mode="nearest")


def _lateral_op(variant: str, device: str):
    if variant == "torchvision eager":
        return eager_lateral
    backend, mode = variant.split()
    if backend not in kernel_backends(device):
        pytest.skip(f"backend {backend!r} does not run on {device} here")

    def call(x, weight, bias, top):
        with ops.use_backend(backend):
            return ops.lateral_upsample_add(x, weight, bias, top, fuse=mode == "fused")
    return call


@pytest.mark.parametrize("variant", LATERAL_VARIANTS, ids=_ids(LATERAL_VARIANTS))
@pytest.mark.parametrize("level", LATERAL_LEVELS, ids=[f"{c}x{h}x{w}" for c, h, w, _ in LATERAL_LEVELS])
@pytest.mark.parametrize("device", DEVICES)
def test_lateral_fused(benchmark, copy_gbps, device, level, variant):
    c, h, w, top_hw = level
    op = _lateral_op(variant, device)
    top_text = f" + top {top_hw[0]}x{top_hw[1]}" if top_hw else " (no top)"
    benchmark.group = f"lateral fused {device} float32 channels_last {c}x{h}x{w}->{CHANNELS}{top_text}"
    cl = torch.channels_last

    def make():
        x = torch.randn(BATCH, c, h, w, device=device).contiguous(memory_format=cl)
        top = (torch.randn(BATCH, CHANNELS, *top_hw, device=device).contiguous(memory_format=cl)
               if top_hw else None)
        return x, top

    # channels_last as optimize_for_inference stores it (cuDNN picks its kernel by both formats)
    weight = (torch.randn(CHANNELS, c, 1, 1, device=device) / c ** 0.5).contiguous(memory_format=cl)
    bias = torch.randn(CHANNELS, device=device)
    element = 4
    x_bytes, out_bytes = BATCH * c * h * w * element, BATCH * CHANNELS * h * w * element
    top_bytes = BATCH * CHANNELS * top_hw[0] * top_hw[1] * element if top_hw else 0
    bytes_per_call = x_bytes + top_bytes + out_bytes + (weight.numel() + bias.numel()) * element
    sets = [make() for _ in range(rotation_count(x_bytes + top_bytes + out_bytes, device))]

    def forward():
        with torch.inference_mode():
            return [op(x, weight, bias, top) for x, top in sets]
    run_benchmark(benchmark, forward, device, rounds(10, 50, device), calls_per_round=len(sets),
                  bytes_per_call=bytes_per_call, copy_gbps=copy_gbps)
    flops = 2 * BATCH * h * w * c * CHANNELS
    benchmark.extra_info["tflops"] = flops / (benchmark.extra_info["median_per_call_us"] * 1e-6) / 1e12
