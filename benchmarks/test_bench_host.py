"""Host time of a cached plan's checks (issue 28: a replay's host time): what a call of the
optimized ResNet50-FPN backbone spends deciding that its plan still applies, before it runs the
plan (CPU) or replays its CUDA graph.

"plan guards" group, per device: 1x3x64x64 planned (the checks do not depend on the image size),
1000 checks per round. Variants: ``python guards`` (the plan's StructureGuard and WeightGuard and
the global-hook check, what every call ran before the host guard and still runs after a change)
and ``host guard`` (``_Entry.unchanged``: the extension's one call, csrc/runtime/host_guard.cpp).

"replay host" group (CUDA): one call of the optimized backbone at batch 2, 3x800x1216, float32,
served by its CUDA graph, timed on the host from an idle GPU (synchronised before each round, not
after: the time is what the call spends before it returns, the GPU's work still queued), as
headline.py's ``host_us``. Variants: ``replay copies`` (the default: the outputs are copies, one
device copy per level), ``replay static outputs`` (``set_engine(static_outputs=True)``), and
``replay static + one foreach copy`` (the static outputs copied by the caller into new tensors with
one ``torch._foreach_copy_``: what the engine's copies would cost as one multi-tensor copy, to
decide whether to make them so).
"""
import pytest
import torch

import fpn_fast
from fpn_fast._fast_path import _global_hooks
from fpn_fast.inference import guards
from fpn_fast.inference.engine import _valid
from _bench import DEVICES, HAS_CUDA, images_shape, rounds, run_benchmark

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


REPLAY_VARIANTS = ["replay copies", "replay static outputs", "replay static + one foreach copy"]


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", REPLAY_VARIANTS, ids=[v.replace(" ", "_") for v in REPLAY_VARIANTS])
def test_replay_host(benchmark, variant):
    torch.manual_seed(0)
    model = fpn_fast.resnet_fpn_backbone(backbone_name="resnet50", weights=None).eval().cuda()
    model = fpn_fast.optimize_for_inference(model)
    if variant != "replay copies":
        model.set_engine(static_outputs=True)
    x = torch.randn(images_shape((2, 3, 800, 1216)), device="cuda")
    benchmark.group = f"replay host cuda resnet50-fpn {'x'.join(map(str, x.shape))}"
    with torch.inference_mode():
        model(x)
        model(x)
        assert model.plans()[0]["graph"], model.plans()[0]["reason"]

        def call():
            out = model(x)
            if variant == "replay static + one foreach copy":
                levels = list(out.values())
                torch._foreach_copy_([torch.empty_like(level) for level in levels], levels)
        benchmark.pedantic(call, setup=torch.cuda.synchronize, rounds=rounds(50, 50, "cuda"), warmup_rounds=2)
        torch.cuda.synchronize()
    benchmark.extra_info["mechanism"] = guards.host_guard_mechanism()
