"""Peak memory of one FPN neck forward (batch 2, 800x1216 features, float32, inference mode):
fpn_fast, whose in-place fused top-down step needs no full-size temporaries, against torchvision.

CUDA: torch.cuda.max_memory_allocated() after a reset, minus what was allocated before.
CPU: a child process per variant (_peak_rss.py) reports its peak RSS growth (VmHWM reset
through /proc/self/clear_refs). Both include the outputs. The numbers go to extra_info and to
the notes after the tables; the time of these benchmarks is that of the measurement itself
(one round, including the child process on CPU) and is not a speed figure.
"""
import os
import subprocess
import sys

import pytest
import torch

from _bench import DEVICES, FORMATS, SUMMARY, build_fpns, kernel_backends, neck_features
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
