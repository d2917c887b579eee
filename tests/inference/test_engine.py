"""The inference engine (fpn_fast.inference.engine, plan, guards, cuda_graphs): one plan per input signature,
run without dispatch; invalidated when a weight changes; bounded; never hiding hooks or modes.

Every plan's output is compared with the same optimized model's modules run as written
(``_run_as_written``): the plan runs the same ops with the same arguments, so bit for bit."""
import copy
import cProfile
import pickle
import pstats

import pytest
import torch

import fpn_fast
from fpn_fast.inference import InferenceBackboneWithFPN
from fpn_fast.inference.plan import signature
from fpn_fast.ops import dispatch
from tests._models import randomise_

tv_backbone_utils = pytest.importorskip("torchvision.models.detection.backbone_utils")


def _optimized(name: str = "resnet18", device: str = "cpu", **options):
    torch.manual_seed(0)
    model = randomise_(fpn_fast.resnet_fpn_backbone(backbone_name=name, weights=None)).eval().to(device)
    return fpn_fast.optimize_for_inference(model, **options)


def _assert_same(got, expected):
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].shape == expected[name].shape, name
        assert got[name].stride() == expected[name].stride(), name
        assert torch.equal(got[name], expected[name]), name


@pytest.fixture(scope="module")
def model():
    return _optimized()


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (2, 3, 97, 131), (3, 40, 56), (1, 3, 320, 320)],
                         ids=["64x64", "odd", "unbatched", "320x320"])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_plan_is_bit_identical_to_the_modules(model, shape, layout):
    x = torch.randn(shape)
    if layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        planned = model(x)
        again = model(x)
        expected = model._run_as_written(x)
        key = signature(x)
    _assert_same(planned, expected)
    _assert_same(again, expected)
    assert any(entry["planned"] and entry["signature"] == key for entry in model.plans())


def test_channels_last_outputs_and_no_grad():
    model = _optimized(output_memory_format=torch.channels_last)
    x = torch.randn(1, 3, 72, 88)
    with torch.no_grad():
        _assert_same(model(x), model._run_as_written(x))
        _assert_same(model(x), model._run_as_written(x))


def test_second_call_of_a_signature_resolves_nothing():
    """A plan holds its runners: a later call resolves no route and looks no runner up, even
    with every cached runner dropped."""
    model = _optimized()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        dispatch.forget_runners()
        start = dispatch.resolution_count()
        model(x)
        first = dispatch.resolution_count() - start
        dispatch.forget_runners()
        model(x)
        second = dispatch.resolution_count() - start - first
    assert first > 0 and second == 0, (first, second)


def test_eager_calls_and_the_plan_run_the_same_runners():
    """The plan is the recorded eager forward: the modules run as written call exactly the
    runners (the same objects, in the same order) whose functions the plan calls."""
    from fpn_fast.ops.runner import recording
    model = _optimized()
    x = torch.randn(1, 3, 72, 88)
    with torch.inference_mode():
        model(x)
        plan = model._engine.entries[signature(x)].plan
        steps = []
        with recording(steps.append):
            model._run_as_written(x)
    eager = [(step.runner.op, step.runner.route) for step in steps if step.runner is not None]
    assert eager == [(route.op, route.route) for route in plan.routes]
    constants = {id(v) for k, v in plan.run.__globals__.items() if k.startswith("c")}
    assert all(id(step.fn) in constants for step in steps)


def _python_calls(fn) -> int:
    fn()
    fn()
    profile = cProfile.Profile()
    profile.enable()
    fn()
    profile.disable()
    return pstats.Stats(profile).total_calls


def test_python_work_per_call_is_a_quarter_of_torchvisions_at_most():
    """The issue's yardstick: one steady-state forward of the optimized ResNet50-FPN backbone on
    CPU, 1x3x64x64 under inference_mode, cProfile's total call count."""
    torch.manual_seed(0)
    ours = fpn_fast.resnet_fpn_backbone(backbone_name="resnet50", weights=None).eval()
    theirs = tv_backbone_utils.resnet_fpn_backbone(backbone_name="resnet50", weights=None).eval()
    theirs.load_state_dict(ours.state_dict())
    optimized = fpn_fast.optimize_for_inference(ours)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        baseline = _python_calls(lambda: theirs(x))
        planned = _python_calls(lambda: optimized(x))
    assert planned * 4 <= baseline, (planned, baseline)


def test_cache_hits_misses_and_lru_eviction():
    model = _optimized(max_plans=2)
    shapes = [(1, 3, 64, 64), (1, 3, 64, 96), (1, 3, 96, 64)]
    with torch.inference_mode():
        for shape in shapes[:2]:
            model(torch.randn(shape))
        model(torch.randn(shapes[0]))  # a hit: shapes[0] becomes the most recent
        assert [e["signature"][0] for e in model.plans()] == [torch.Size(shapes[1]), torch.Size(shapes[0])]
        assert [e["hits"] for e in model.plans()] == [0, 1]
        model(torch.randn(shapes[2]))  # evicts the least recently used: shapes[1]
        assert [e["signature"][0] for e in model.plans()] == [torch.Size(shapes[0]), torch.Size(shapes[2])]
        builds = model._engine.builds
        x = torch.randn(shapes[1])
        _assert_same(model(x), model._run_as_written(x))  # planned anew
        assert model._engine.builds == builds + 1


def test_signature_separates_modes_and_layouts():
    x = torch.randn(1, 3, 32, 32)
    base = signature(x)
    assert signature(x.contiguous(memory_format=torch.channels_last)) != base
    assert signature(x.double()) != base
    with torch.no_grad():
        assert signature(x) != base
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert signature(x) != base
    with fpn_fast.ops.use_backend("torch"):
        assert signature(x) != base


@pytest.mark.parametrize("change", ["mul_", "load_state_dict", "load_state_dict_assign", "to_half_float"])
def test_a_weight_change_replans(change):
    model = _optimized()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        before = model(x)
    state = {k: v * 1.5 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    with torch.no_grad():
        if change == "mul_":
            model.body.conv1.weight.mul_(1.5)
        elif change == "load_state_dict":
            model.load_state_dict(state)
        elif change == "load_state_dict_assign":
            model.load_state_dict({k: v.clone() for k, v in state.items()}, assign=True)
        else:
            model.half().float()
    with torch.inference_mode():
        after = model(x)
        expected = model._run_as_written(x)
    _assert_same(after, expected)
    assert not torch.equal(after["0"], before["0"]) or change == "to_half_float"


def test_outputs_are_not_overwritten_by_the_next_call(model):
    x1, x2 = torch.randn(1, 3, 64, 64), torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        first = model(x1)
        kept = {k: v.clone() for k, v in first.items()}
        model(x2)
    _assert_same(first, kept)


def test_hooks_and_training_mode_are_never_hidden():
    model = _optimized()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model(x)
        seen = []
        handle = model.body.layer2[0].last.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        model(x)
        handle.remove()
        assert len(seen) == 1
        model.fpn.train()
        with pytest.raises(RuntimeError, match="eval mode only"):
            model(x)
        model.fpn.eval()
        model(x)


def test_grad_mode_refusal_is_as_written():
    model = _optimized()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    with pytest.raises(RuntimeError, match="computes no gradients"):
        model(x)
    model(x.detach())  # grad mode on, nothing requires grad: runs (planned)
    model.body.conv1.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="computes no gradients"):
        model(x.detach())


def test_engine_off_and_options():
    model = _optimized(plan=False)
    with torch.inference_mode():
        model(torch.randn(1, 3, 64, 64))
    assert model.plans() == []
    with pytest.raises(ValueError, match="max_plans"):
        model.set_engine(max_plans=0)
    with pytest.raises(ValueError, match="max_plans"):
        _optimized(max_plans=0)


def test_copies_pickles_and_scripts_carry_no_plans(model, tmp_path):
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
    assert model.plans()
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied.plans() == []
        with torch.inference_mode():
            _assert_same(copied(x), expected)
    scripted = torch.jit.script(model)
    with torch.inference_mode():
        got = scripted(x)
    for name in expected:
        scale = expected[name].abs().max()
        assert (got[name] - expected[name]).abs().max() <= 1e-4 * scale, name


def test_autocast_on_cpu_is_its_own_plan():
    model = _optimized()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        planned = model(x)
        expected = model._run_as_written(x)
    _assert_same(planned, expected)


def test_a_detector_plans_each_padded_shape():
    detection = pytest.importorskip("torchvision.models.detection")
    torch.manual_seed(0)
    detector = detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=96, max_size=128)
    fast = fpn_fast.optimize_for_inference(detector.eval())
    images = [torch.rand(3, 90, 120), torch.rand(3, 120, 90)]
    with torch.inference_mode():
        fast(images[:1])
        fast(images[1:])
        fast(images[:1])
    entries = fast.backbone.plans()
    assert len(entries) == 2 and sorted(e["hits"] for e in entries) == [0, 1]


# ----------------------------------------------------------------------------- GPU only

def _relative_error(got, expected):
    return max(((got[k].float() - expected[k].float()).abs().max() / expected[k].float().abs().max()).item()
               for k in expected)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(2, 3, 256, 384), (1, 3, 200, 296), (1, 3, 512, 512)])
def test_cuda_graph_replay_matches_the_modules(shape, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = _optimized("resnet50", "cuda")
    x = torch.randn(shape, device="cuda")
    with torch.inference_mode():
        first = model(x)
        replayed = model(x)
        expected = model._run_as_written(x)
        key = signature(x)
    entry = next(e for e in model.plans() if e["signature"] == key)
    assert entry["graph"], entry["reason"]
    assert entry["graph_bytes"] > 0
    assert _relative_error(first, expected) <= 1e-5
    assert _relative_error(replayed, expected) <= 1e-5


@pytest.mark.cuda
def test_cuda_graph_outputs_are_copies_unless_static_outputs_asked():
    model = _optimized("resnet18", "cuda")
    x1, x2 = torch.randn(1, 3, 128, 160, device="cuda"), torch.randn(1, 3, 128, 160, device="cuda")
    with torch.inference_mode():
        model(x1)
        first = model(x1)
        kept = {k: v.clone() for k, v in first.items()}
        model(x2)
        _assert_same(first, kept)
        model.set_engine(static_outputs=True)
        model(x1)
        static = model(x1)
        again = model(x2)
        assert all(static[k].data_ptr() == again[k].data_ptr() for k in static)


@pytest.mark.cuda
def test_cuda_bfloat16_autocast_plan():
    model = _optimized("resnet50", "cuda")
    x = torch.randn(1, 3, 256, 320, device="cuda")
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        model(x)
        replayed = model(x)
        expected = model._run_as_written(x)
    assert _relative_error(replayed, expected) <= 2e-2
    assert any(e["graph"] for e in model.plans())


@pytest.mark.cuda
def test_cuda_call_inside_a_users_capture_never_replays_or_builds():
    """Inside a capture the engine neither replays its own graph (graphs do not nest) nor builds
    (building measures, which synchronises): a cached plan runs its steps, else the modules."""
    model = _optimized("resnet18", "cuda")
    x = torch.randn(1, 3, 128, 128, device="cuda")
    with torch.inference_mode():
        model(x)
        model(x)
        expected = model._run_as_written(x)
    assert model.plans()[0]["graph"]
    for fresh in (False, True):
        if fresh:
            model.set_engine()  # no plan: the modules run as written inside the capture
        outer = torch.cuda.CUDAGraph()
        static = x.clone()
        torch.cuda.synchronize()
        with torch.inference_mode(), pytest.warns(UserWarning, match="already capturing"):
            with torch.cuda.graph(outer):
                out = model(static)
        outer.replay()
        torch.cuda.synchronize()
        assert _relative_error(out, expected) <= 1e-3
        assert len(model.plans()) == (0 if fresh else 1)


@pytest.mark.cuda
def test_cuda_static_outputs_dict_is_the_callers():
    model = _optimized("resnet18", "cuda", static_outputs=True)
    x = torch.randn(1, 3, 128, 160, device="cuda")
    with torch.inference_mode():
        model(x)
        first = model(x)
        first.pop("0")
        second = model(x)
    assert list(second) == ["0", "1", "2", "3", "pool"]


@pytest.mark.cuda
def test_cuda_graph_is_not_captured_over_a_hooked_module_and_follows_new_hooks():
    """A module the plan calls as written (RetinaNet's LastLevelP6P7): hooked at capture time, no
    graph; hooked after capture, the call runs the plan's steps so the hook fires each call."""
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    torch.manual_seed(0)
    backbone = fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=None, returned_layers=[2, 3, 4],
                                            extra_blocks=LastLevelP6P7(256, 256))
    model = fpn_fast.optimize_for_inference(randomise_(backbone).eval().cuda())
    x = torch.randn(1, 3, 96, 128, device="cuda")
    calls = []
    with torch.inference_mode():
        model(x)
        assert model.plans()[0]["graph"], model.plans()[0]["reason"]
        handle = model.fpn.extra_blocks.register_forward_hook(lambda m, i, o: calls.append(1))
        model(x)
        model(x)
        assert len(calls) == 2
        handle.remove()
        model.fpn.extra_blocks.p6.weight.mul_(0.5)  # in place: the graph reads the same address
        got = model(x)
        expected = model._run_as_written(x)
        assert _relative_error(got, expected) <= 1e-5
        model.fpn.extra_blocks.p6.weight = torch.nn.Parameter(torch.randn_like(model.fpn.extra_blocks.p6.weight))
        got = model(x)
        expected = model._run_as_written(x)
        assert _relative_error(got, expected) <= 1e-5
        model.set_engine()
        model.fpn.extra_blocks.register_forward_hook(lambda m, i, o: calls.append(1))
        model(x)
        assert not model.plans()[0]["graph"] and "hooks" in model.plans()[0]["reason"]


@pytest.mark.cuda
def test_cuda_replays_from_two_threads_agree():
    import threading
    model = _optimized("resnet18", "cuda")
    shapes = [(1, 3, 128, 128), (1, 3, 96, 160)]
    inputs = [torch.randn(s, device="cuda") for s in shapes]
    with torch.inference_mode():
        expected = [model._run_as_written(x) for x in inputs]
        for x in inputs:
            model(x)
    errors = []

    def work(i):
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(20):
                out = model(inputs[i])
                stream.synchronize()
                errors.append(_relative_error(out, expected[i]))
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 40 and max(errors) <= 1e-5


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_model_on_device_0_while_device_1_is_current():
    model = _optimized("resnet18", "cuda:0")
    x = torch.randn(1, 3, 128, 128, device="cuda:0")
    with torch.cuda.device(1), torch.inference_mode():
        model(x)
        got = model(x)
        expected = model._run_as_written(x)
    assert _relative_error(got, expected) <= 1e-3
    assert all(v.device == torch.device("cuda:0") for v in got.values())


def test_another_extra_block_is_called_as_written_inside_the_plan():
    """RetinaNet's LastLevelP6P7 (torchvision's): the plan calls it as a module (its hooks run)."""
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7
    torch.manual_seed(0)
    backbone = fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=None, returned_layers=[2, 3, 4],
                                            extra_blocks=LastLevelP6P7(256, 256))
    model = fpn_fast.optimize_for_inference(randomise_(backbone).eval())
    x = torch.randn(1, 3, 96, 128)
    calls = []
    model.fpn.extra_blocks.register_forward_hook(lambda m, i, o: calls.append(1))
    with torch.inference_mode():
        planned = model(x)
        again = model(x)
        expected = model._run_as_written(x)
    assert list(planned) == ["0", "1", "2", "p6", "p7"]
    _assert_same(planned, expected)
    _assert_same(again, expected)
    assert all(entry["planned"] for entry in model.plans())
    assert len(calls) == 3


# --- The plan follows the modules (structure), never hides hooks, never builds twice in vain.

def _as_written(model, x):
    return model._run_as_written(x)


@pytest.mark.parametrize("change", ["output_channels_last", "channels_last", "fuse_lateral", "relu", "extra_blocks",
                                    "replace_block", "return_layers", "winograd", "padding"])
def test_a_changed_module_attribute_or_submodule_replans(change):
    """Every option a plan reads, changed after the plan was made, is seen by the next call."""
    model = _optimized()
    x = torch.randn(1, 3, 72, 88)
    with torch.inference_mode():
        model(x)
        builds = model._engine.builds
        conv = model.body.layer2[0].convs[0]
        if change == "output_channels_last":
            model.fpn.output_channels_last = True
        elif change == "channels_last":
            model.channels_last = False
        elif change == "fuse_lateral":
            model.fpn.fuse_lateral = False
        elif change == "relu":
            conv.relu = False
        elif change == "extra_blocks":
            model.fpn.extra_blocks = None
        elif change == "replace_block":
            model.body.layer3[1] = torch.nn.Identity()
        elif change == "return_layers":
            model.body.return_layers["layer3"] = "x3"  # in place: the dict is the same object
        elif change == "winograd":
            for m in model.modules():
                if hasattr(m, "winograd"):
                    m.winograd = False
        elif change == "padding":
            model.fpn.layer_blocks[0].padding = (0, 0)
        got = model(x)
        again = model(x)
        expected = model._run_as_written(x)
    _assert_same(got, expected)
    _assert_same(again, expected)
    if change == "return_layers":
        assert "x3" in got
    assert model._engine.builds == builds + 1
    assert len(model.plans()) == 1  # the stale plan was dropped


def test_hook_present_at_the_first_call_fires_once_and_planning_resumes_after():
    model = _optimized()
    x = torch.randn(1, 3, 64, 64)
    calls = []
    with torch.inference_mode():
        expected = model._run_as_written(x)
        for module in (model.body, model.fpn, model.body.layer2, model.body.layer2[0].convs[0],
                       model.fpn.inner_blocks[1], model.fpn.layer_blocks[2]):
            model.set_engine()
            handle = module.register_forward_hook(lambda m, i, o: calls.append(m))
            for n in range(2):
                _assert_same(model(x), expected)
                assert len(calls) == n + 1, type(module).__name__
            handle.remove()
            calls.clear()
            _assert_same(model(x), expected)
            start = dispatch.resolution_count()
            _assert_same(model(x), expected)
            assert dispatch.resolution_count() == start, (type(module).__name__, model.plans())
            assert all(entry["planned"] for entry in model.plans()), model.plans()
            assert calls == []


def test_a_global_hook_fires_as_often_as_through_the_modules():
    from torch.nn.modules.module import register_module_forward_hook
    model = _optimized()
    x = torch.randn(1, 3, 64, 64)
    calls = []
    with torch.inference_mode():
        model(x)
        handle = register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
        try:
            model.set_engine(enabled=False)
            model(x)
            expected = list(calls)
            calls.clear()
            model.set_engine()
            model(x)
            model(x)
        finally:
            handle.remove()
    assert calls == expected * 2
    assert model.plans() == []  # nothing was built while the hook was there


def test_no_grad_with_tensors_that_require_grad_is_planned_once():
    model = _optimized()
    x = torch.randn(1, 3, 64, 64, requires_grad=True)
    model.body.conv1.weight.requires_grad_(True)
    with torch.no_grad():
        expected = model._run_as_written(x)
        for _ in range(3):
            _assert_same(model(x), expected)
    assert model._engine.builds == 1


def test_grad_mode_refusal_builds_nothing():
    model = _optimized()
    x = torch.randn(1, 3, 64, 64)
    model(x)
    model.body.conv1.weight.requires_grad_(True)
    for _ in range(3):
        with pytest.raises(RuntimeError, match="computes no gradients"):
            model(x)
    assert model._engine.builds == 1


def test_planning_that_raises_runs_as_written_warns_once_and_does_not_retry(monkeypatch):
    from fpn_fast.inference import plan
    model = _optimized()
    x = torch.randn(1, 3, 64, 64)
    attempts = []

    def broken(*args, **kwargs):
        attempts.append(1)
        raise ValueError("a planning bug")
    monkeypatch.setattr(plan._Writer, "outputs", broken)
    with torch.inference_mode():
        expected = model._run_as_written(x)
        with pytest.warns(UserWarning, match="a planning bug"):
            _assert_same(model(x), expected)
        _assert_same(model(x), expected)
    assert len(attempts) == 1
    assert model.plans()[0]["planned"] is False and "a planning bug" in model.plans()[0]["reason"]


def test_a_parametrized_weight_is_followed():
    from torch.nn.utils import parametrize

    class Double(torch.nn.Module):
        def forward(self, w):
            return w * 2

    model = _optimized()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model(x)
    conv = model.body.layer3[0].convs[0]
    parametrize.register_parametrization(conv, "weight", Double())
    with torch.inference_mode():
        got = model(x)
        expected = model._run_as_written(x)
    _assert_same(got, expected)


def test_python_modes_see_every_op():
    """Under a TorchDispatchMode (FakeTensor, FLOP counters, profilers of ops) the engine runs the
    modules as written, so the mode sees the same ops as without the engine."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    model = _optimized()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model(x)
        with Count() as planned:
            model(x)
        model.set_engine(enabled=False)
        with Count() as written:
            model(x)
    assert planned.ops == written.ops and len(written.ops) > 50


def test_the_thread_count_is_part_of_the_cpu_signature():
    x = torch.randn(1, 3, 64, 64)
    threads = torch.get_num_threads()
    try:
        first = signature(x)
        torch.set_num_threads(1 if threads > 1 else 2)
        assert signature(x) != first
    finally:
        torch.set_num_threads(threads)


def test_the_guards_notice_what_they_guard():
    from fpn_fast.inference.guards import StructureGuard
    model = _optimized()
    guard = StructureGuard(list(model.modules()), outer=model)
    assert guard.holds()
    model.register_forward_hook(lambda m, i, o: None)  # the outer module's own hooks run around the plan
    model.train().eval()
    assert guard.holds()
    model.fpn.layer_blocks[0].stride = (2, 2)
    assert not guard.holds()
    model.fpn.layer_blocks[0].stride = (1, 1)
    assert guard.holds()
    model.fpn.inner_blocks[0].foo = torch.randn(3)
    assert not guard.holds()
    del model.fpn.inner_blocks[0].foo
    model.out_channels = 7
    assert not guard.holds()


@pytest.mark.parametrize("which", ["layer_blocks", "inner_blocks"])
def test_a_replaced_fpn_block_replans(which):
    model = _optimized()
    x = torch.randn(1, 3, 64, 80)
    with torch.inference_mode():
        model(x)
        blocks = getattr(model.fpn, which)
        other = copy.deepcopy(blocks[1])
        with torch.no_grad():
            other.weight.mul_(-1.5)
        blocks[1] = other
        got = model(x)
        expected = model._run_as_written(x)
    _assert_same(got, expected)
    assert model._engine.builds == 2


def test_the_engine_holds_no_cycle_through_the_backbone():
    """Dropping the model (or its engine) frees plans, packs and graphs at once, not at the next
    garbage collection."""
    import gc
    import weakref
    model = _optimized()
    x = torch.randn(1, 3, 64, 64)
    gc.collect()
    gc.disable()
    try:
        with torch.inference_mode():
            model(x)
        engine = weakref.ref(model._engine)
        model.set_engine()
        assert engine() is None
        with torch.inference_mode():
            model(x)
        backbone = weakref.ref(model)
        del model
        assert backbone() is None
    finally:
        gc.enable()


def test_modules_that_change_on_each_call_do_not_replan_each_call():
    """A called module that writes its own attributes when it runs (a counter; a pre-hook that
    sets ``weight`` as pruning's does) keeps its plan: only type, training and hook counts of
    called modules count."""

    class Counting(torch.nn.Identity):
        def forward(self, x):
            self.calls = getattr(self, "calls", 0) + 1
            return x

    model = _optimized()
    model.body.layer2.append(Counting())
    block = model.fpn.layer_blocks[0]
    block.register_forward_pre_hook(lambda module, args: setattr(module, "bias", module.bias))
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = model._run_as_written(x)
        for _ in range(5):
            _assert_same(model(x), expected)
    assert model._engine.builds == 1
    assert model.body.layer2[-1].calls == 6


def test_an_attribute_whose_comparison_raises_replans():
    import numpy as np
    model = _optimized()
    x = torch.randn(1, 3, 64, 64)
    model.fpn.anchors = np.arange(4.0)
    with torch.inference_mode():
        model(x)
        model.fpn.anchors = np.arange(4.0)
        _assert_same(model(x), model._run_as_written(x))


def test_concurrent_first_calls_build_once():
    import threading
    model = _optimized()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = model._run_as_written(x)
    barrier = threading.Barrier(4)
    results = []

    def work():
        barrier.wait()
        with torch.inference_mode():
            results.append(model(x))
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    for out in results:
        _assert_same(out, expected)
    assert model._engine.builds == 1


def test_packs_for_new_shapes_keep_the_other_plans():
    model = _optimized()
    shapes = [(1, 3, 64, 64), (1, 3, 96, 128), (2, 3, 67, 91), (1, 3, 160, 96), (1, 3, 320, 320)]
    with torch.inference_mode():
        for shape in shapes:
            model(torch.randn(shape))
        for shape in shapes:
            model(torch.randn(shape))
    assert model._engine.builds == len(shapes)


def test_the_backbone_in_training_mode_refuses_on_every_call():
    model = _optimized()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        model(x)
        model.training = True  # the backbone alone, not its children
        with pytest.raises(RuntimeError, match="eval mode only"):
            model(x)
        model.training = False
        _assert_same(model(x), model._run_as_written(x))


def test_models_pickled_under_the_old_module_names_still_load():
    """inference/conv.py and inference/backbone.py were renamed (folded_conv.py,
    optimized_backbone.py); a model pickled before names the old modules."""
    model = _optimized()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        expected = model(x)
    text = pickle.dumps(model, protocol=0)  # module names as text lines: "c<module>\n<name>\n"
    old = text.replace(b"fpn_fast.inference.folded_conv\n", b"fpn_fast.inference.conv\n").replace(
        b"fpn_fast.inference.optimized_backbone\n", b"fpn_fast.inference.backbone\n")
    assert old != text and b"fpn_fast.inference.folded_conv\n" not in old
    with torch.inference_mode():
        _assert_same(pickle.loads(old)(x), expected)
