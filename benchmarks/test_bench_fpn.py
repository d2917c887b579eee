"""Module level: the FPN neck (from precomputed C2..C5) and the whole ResNet50-FPN backbone,
fpn_fast per backend against torchvision eager and torch.compile(torchvision FPN).

Everything runs in eval() under torch.inference_mode(); bfloat16 under autocast, GPU only. The
compile and its warm-up happen in a fixture, outside the timing; the compile time goes to
extra_info["compile_s"] and to the notes printed after the tables.
"""
import time

import pytest
import torch

from fpn_fast.demo import build_models
from _bench import (DEVICES, DTYPES, FORMATS, SUMMARY, autocast_context, build_fpns, kernel_backends,
                    neck_features, rounds, run_benchmark, skip_low_precision_on_cpu)
from fpn_fast import ops

pytest.importorskip("torchvision")  # the comparisons need it

BACKENDS = ("extension", "triton", "torch")
NECK_VARIANTS = ["torchvision eager", "torchvision compiled"] + [f"fpn_fast {b}" for b in BACKENDS]
BACKBONE_VARIANTS = ["torchvision eager"] + [f"fpn_fast {b}" for b in BACKENDS]
# The whole backbone at detection size (batch 2, 800x1216) takes several seconds per run on the
# 2-core build machine, so CPU uses batch 1 at 512x640; GPUs run the full size.
BACKBONE_INPUT = {"cpu": (1, 3, 512, 640), "cuda": (2, 3, 800, 1216)}


def _variant_fn(variant: str, ours, theirs, device: str):
    """The module to call for a variant; fpn_fast variants run under their backend."""
    if variant.startswith("torchvision"):
        return theirs
    backend = variant.split()[1]
    if backend not in kernel_backends(device):
        pytest.skip(f"backend {backend!r} does not run on {device} here")

    def call(x):
        with ops.use_backend(backend):
            return ours(x)
    return call


_FPNS, _FEATURES, _COMPILED = {}, {}, {}


def _fpns(device, fmt):
    if (device, fmt) not in _FPNS:
        _FPNS[device, fmt] = build_fpns(device, FORMATS[fmt])
    return _FPNS[device, fmt]


def _compiled_fpn(theirs, features, device, dtype, fmt):
    """torch.compile(torchvision FPN), compiled and warmed up here, once per configuration."""
    key = (device, dtype, fmt)
    if key not in _COMPILED:
        # dynamic=False: one static graph per configuration, never a shape-generic recompile.
        compiled = torch.compile(theirs, dynamic=False)
        start = time.perf_counter()
        with torch.inference_mode(), autocast_context(device, dtype):
            compiled(features)
            compiled(features)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        SUMMARY.append(f"torch.compile(torchvision FPN) {device} {str(dtype)[6:]} {fmt}: "
                       f"compile + 2 warm-up calls {seconds:.1f} s")
        _COMPILED[key] = (compiled, seconds)
    return _COMPILED[key]


@pytest.mark.parametrize("variant", NECK_VARIANTS)
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_fpn_neck(benchmark, device, dtype, fmt, variant):
    skip_low_precision_on_cpu(device, dtype)
    ours, theirs = _fpns(device, fmt)
    if (device, dtype, fmt) not in _FEATURES:
        _FEATURES.clear()  # one configuration at a time: the inputs are large
        _FEATURES[device, dtype, fmt] = neck_features(device, dtype, FORMATS[fmt])
    features = _FEATURES[device, dtype, fmt]
    if variant == "torchvision compiled":
        module, compile_s = _compiled_fpn(theirs, features, device, dtype, fmt)
        benchmark.extra_info["compile_s"] = compile_s
    else:
        module = _variant_fn(variant, ours, theirs, device)
    benchmark.group = f"fpn neck {device} {str(dtype)[6:]} {fmt} batch 2 800x1216"

    def forward():
        with torch.inference_mode(), autocast_context(device, dtype):
            module(features)
    run_benchmark(benchmark, forward, device, rounds(3, 20, device))


_BACKBONES = {}


def _backbones(device, fmt):
    if (device, fmt) not in _BACKBONES:
        _BACKBONES.clear()  # one pair at a time: they are large
        _BACKBONES[device, fmt] = build_models(0, torch.device(device), FORMATS[fmt])
    return _BACKBONES[device, fmt]


@pytest.mark.parametrize("variant", BACKBONE_VARIANTS)
@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("device", DEVICES)
def test_backbone(benchmark, device, dtype, fmt, variant):
    skip_low_precision_on_cpu(device, dtype)
    ours, theirs = _backbones(device, fmt)
    module = _variant_fn(variant, ours, theirs, device)
    shape = BACKBONE_INPUT[device]
    images = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, memory_format=FORMATS[fmt])
    benchmark.group = f"backbone {device} {str(dtype)[6:]} {fmt} batch {shape[0]} {shape[2]}x{shape[3]}"

    def forward():
        with torch.inference_mode(), autocast_context(device, dtype):
            module(images)
    run_benchmark(benchmark, forward, device, rounds(3, 10, device))
