"""Memory benchmarks; the time of each is that of the measurement itself (one round, including
the child process on CPU) and is not a speed figure. The numbers go to extra_info and to the
notes after the tables.

- Peak memory of one FPN neck forward (batch 2, 800x1216 features, float32, inference mode):
  fpn_fast, whose in-place fused top-down step needs no full-size temporaries, against torchvision.
  CUDA: torch.cuda.max_memory_allocated() after a reset, minus what was allocated before.
  CPU: a child process per variant (_peak_rss.py) reports its peak RSS growth (VmHWM reset
  through /proc/self/clear_refs). Both include the outputs.
- What a whole backbone holds on CPU (ResNet18 and ResNet50 FPN backbones, batch 1, 320x320 and
  800x1216, float32, inference mode): torchvision eager against ``optimize_for_inference``'s
  model, as shipped and with the knobs that trade memory for speed (the buffer pool's limit,
  ``winograd=False``). A child process per row (_backbone_memory.py) reports the weights, the
  peak and the held RSS growth over two calls, the pool's cached bytes and the packs by kind.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from _bench import DEVICES, DRY, DRY_IMAGES, FORMATS, SUMMARY, build_fpns, kernel_backends, neck_features
from fpn_fast import ops

pytest.importorskip("torchvision")

HERE = os.path.dirname(os.path.abspath(__file__))
VARIANTS = ["torchvision eager"] + [f"fpn_fast {b}" for b in ("extension", "triton", "torch")]


def _cpu_peak_mib(variant: str, fmt: str) -> float:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_peak_rss.py"), variant, fmt],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return float(proc.stdout.split()[-1])


def _cuda_peak_mib(variant: str, fmt: str) -> float:
    ours, theirs = build_fpns("cuda", FORMATS[fmt])
    features = neck_features("cuda", torch.float32, FORMATS[fmt])
    module = theirs if variant == "torchvision eager" else ours
    backend = "torch" if variant == "torchvision eager" else variant.split()[1]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.inference_mode(), ops.use_backend(backend):
        out = module(features)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    del out
    return peak / 2 ** 20


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("device", DEVICES)
def test_fpn_peak_memory(benchmark, device, variant):
    fmt = "contiguous"
    if variant != "torchvision eager" and variant.split()[1] not in kernel_backends(device):
        pytest.skip(f"{variant} does not run on {device} here")
    if device == "cpu" and not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    measure = _cpu_peak_mib if device == "cpu" else _cuda_peak_mib
    benchmark.group = f"fpn neck peak memory {device} float32 {fmt} (time: the measurement, not a speed)"
    peak = benchmark.pedantic(measure, args=(variant, fmt), rounds=1, warmup_rounds=0, iterations=1)
    benchmark.extra_info["peak_mib"] = peak
    SUMMARY.append(f"FPN neck peak memory {device} {fmt} {variant:<20} {peak:8.1f} MiB")


BACKBONE_VARIANTS = ["torchvision eager", "optimized", "optimized pool=0", "optimized winograd=False",
                     "optimized pool=0 winograd=False"]
# Image sizes (batch 1) one process serves, two calls each: one size, or both in turn.
BACKBONE_SIZES = ["x".join(map(str, DRY_IMAGES[2:]))] if DRY else ["320x320", "800x1216", "320x320,800x1216"]
_HELD = {}  # (backbone, sizes) -> {variant: result}, for the table in the notes


def _backbone_memory(backbone: str, variant: str, sizes: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    env.pop("TRITON_INTERPRET", None)
    env.pop("FPN_FAST_CPU_POOL_MB", None)  # the rows set the limit they measure
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_backbone_memory.py"), backbone, variant, sizes],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _held_table():
    lines = ["Backbone memory on CPU (MiB; RSS growth of a child process over two calls per size, batch 1, float32; "
             "call: median of 3 more calls at the last size, ms):",
             f"  {'backbone / sizes / variant':<58} {'weights':>8} {'peak':>7} {'held':>7} {'pool':>7} "
             f"{'winograd':>8} {'nnpack':>7} {'onednn':>7} {'call ms':>8}"]
    for (backbone, sizes), rows in sorted(_HELD.items()):
        for variant in BACKBONE_VARIANTS:
            if variant in rows:
                r = rows[variant]
                lines.append(f"  {f'{backbone} {sizes} {variant}':<58} {r['weights_mib']:8.1f} {r['peak_mib']:7.1f} "
                             f"{r['held_mib']:7.1f} {r['pool_mib']:7.1f} {r['winograd_mib']:8.1f} "
                             f"{r['nnpack_mib']:7.1f} {r['onednn_mib']:7.1f} {r['call_ms']:8.1f}")
    return lines


SUMMARY.append(lambda: _held_table() if _HELD else [])


@pytest.mark.parametrize("variant", BACKBONE_VARIANTS)
@pytest.mark.parametrize("sizes", BACKBONE_SIZES)
@pytest.mark.parametrize("backbone", ["resnet18", "resnet50"])
def test_backbone_held_memory(benchmark, backbone, sizes, variant):
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the peak RSS")
    if variant != "torchvision eager" and ops.available_backends()["extension"]["cpu"] is not None:
        pytest.skip("the optimized CPU backbone's pool and Winograd convolutions are in the compiled extension")
    benchmark.group = f"backbone memory cpu {backbone} {sizes} float32 (time: the measurement, not a speed)"
    result = benchmark.pedantic(_backbone_memory, args=(backbone, variant, sizes), rounds=1, warmup_rounds=0,
                                iterations=1)
    benchmark.extra_info.update(result)  # peak_mib: what summarize.py shows for memory groups
    _HELD.setdefault((backbone, sizes), {})[variant] = result
