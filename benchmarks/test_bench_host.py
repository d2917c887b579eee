"""Host time of a cached plan's checks (issue 28: a replay's host time): what a call of the
optimized ResNet50-FPN backbone spends deciding that its plan still applies, before it runs the
plan (CPU) or replays its CUDA graph.

"plan guards" group, per device: 1x3x64x64 planned (the checks do not depend on the image size),
1000 checks per round. Variants: ``python guards`` (the plan's StructureGuard and WeightGuard and
the global-hook check, what every call ran before the host guard and still runs after a change)
and ``host guard`` (``_Entry.unchanged``: the extension's one call, csrc/runtime/host_guard.cpp).
"""
import pytest
import torch

import fpn_fast
from fpn_fast._fast_path import _global_hooks
from fpn_fast.inference import guards
from fpn_fast.inference.engine import _valid
from _bench import DEVICES, rounds, run_benchmark

CHECKS_PER_ROUND = 1000
VARIANTS = ["python guards", "host guard"]


@pytest.fixture(scope="module")
def planned():
    """(device) -> (optimized ResNet50-FPN backbone, its one cache entry), planned and armed."""
    made = {}

    def make(device):
        if device not in made:
            torch.manual_seed(0)
            model = fpn_fast.resnet_fpn_backbone(backbone_name="resnet50", weights=None).eval().to(device)
            model = fpn_fast.optimize_for_inference(model)
            x = torch.randn(1, 3, 64, 64, device=device)
            with torch.inference_mode():
                model(x)
                model(x)
            (entry,) = model._engine.entries.values()
            made[device] = model, entry
        return made[device]
    return make


@pytest.mark.parametrize("variant", VARIANTS, ids=[v.replace(" ", "_") for v in VARIANTS])
@pytest.mark.parametrize("device", DEVICES)
def test_plan_guards(benchmark, planned, device, variant):
    if variant == "host guard" and guards.host_guard_mechanism() is None:
        pytest.skip("no host guard here (the extension is not loaded, or FPN_FAST_HOST_GUARD=0)")
    model, entry = planned(device)
    benchmark.group = f"plan guards {device} resnet50-fpn"
    if variant == "python guards":
        def check():
            return _valid(entry) and not _global_hooks()
    else:
        def check():
            return entry.unchanged(model)
    assert check(), "the guards do not hold on an unchanged model"

    def checks():
        for _ in range(CHECKS_PER_ROUND):
            check()
    run_benchmark(benchmark, checks, "cpu", rounds(20, 20, device), calls_per_round=CHECKS_PER_ROUND)
    benchmark.extra_info["mechanism"] = guards.host_guard_mechanism()
