"""Measured route choices kept across processes (fpn_fast.save_choices / load_choices): a round
trip measures nothing, a file from another environment or device model, or one that cannot be
read, gives a warning and the routes are measured again. On CPU tensors with conv2d_act's CPU
row measured as the CUDA one is (the host clock stands in for CUDA events); a "restarted
process" is this one with its decided runners forgotten."""
import json
import warnings

import pytest
import torch

import fpn_fast
from fpn_fast import ops
from fpn_fast.ops import choices, dispatch, measure
from tests._models import randomise_


def _count_timings(monkeypatch, timer) -> list:
    """Make ``timer.time`` (a measure timer class) append the names it times to the list returned."""
    timed = []
    time = timer.time

    def counted(self, runs):
        timed.append(sorted(runs))
        return time(self, runs)
    monkeypatch.setattr(timer, "time", counted)
    return timed


@pytest.fixture
def measured_on_cpu(monkeypatch):
    """conv2d_act's CPU row measured; returns the list of candidate sets timed (each timing
    appends the names it timed)."""
    dispatch.MEASURED.add(("conv2d_act", "cpu"))
    dispatch.forget_runners()
    yield _count_timings(monkeypatch, measure._HostTimer)
    dispatch.MEASURED.discard(("conv2d_act", "cpu"))
    dispatch.forget_runners()
    measure.forget_loaded()


def _restart():
    """What a new process starts without: the decided runners (the loaded choices stay)."""
    dispatch.forget_runners()


def _conv_runner(seed=0):
    torch.manual_seed(seed)
    x = torch.randn(1, 32, 19, 23)
    weight = torch.randn(32, 32, 3, 3) / 17
    with torch.inference_mode():
        return ops.conv.runner(x, weight, torch.randn(32), padding=(1, 1), relu=True), x, weight


def test_a_loaded_choice_is_taken_without_measuring(measured_on_cpu, tmp_path):
    run, _, _ = _conv_runner()
    assert run.decision is not None and run.decision.loaded_from is None
    timed = len(measured_on_cpu)
    assert timed >= 1
    path = tmp_path / "choices.json"
    assert fpn_fast.save_choices(path) >= 1
    saved = json.loads(path.read_text())
    assert saved["format"] == choices.FORMAT and saved["environment"] == choices.environment()
    entry = next(d for d in saved["decisions"] if d["signature"] == run.decision.signature)
    assert entry["chosen"] == run.route and entry["device_name"] == "cpu"

    _restart()
    assert fpn_fast.load_choices(path) == len(saved["decisions"])
    again, _, _ = _conv_runner()
    assert len(measured_on_cpu) == timed  # nothing timed after the restart
    assert again.route == run.route and again.decision.loaded_from == str(path)
    assert again.decision.candidates == run.decision.candidates
    assert any(d["loaded_from"] == str(path) for d in measure.choices())


def test_a_new_signature_is_measured_even_with_a_file_loaded(measured_on_cpu, tmp_path):
    _conv_runner()
    timed = len(measured_on_cpu)
    fpn_fast.save_choices(tmp_path / "c.json")
    _restart()
    fpn_fast.load_choices(tmp_path / "c.json")
    torch.manual_seed(1)
    with torch.inference_mode():
        run = ops.conv.runner(torch.randn(2, 32, 19, 23), torch.randn(32, 32, 3, 3), None, padding=(1, 1))
    assert len(measured_on_cpu) > timed and run.decision.loaded_from is None


def _edit(path, change):
    document = json.loads(path.read_text())
    change(document)
    path.write_text(json.dumps(document))


@pytest.mark.parametrize("key", ["torch", "cudnn", "triton", "fpn_fast"])
def test_a_file_from_another_environment_is_not_used(measured_on_cpu, tmp_path, key):
    _conv_runner()
    timed = len(measured_on_cpu)
    path = tmp_path / "c.json"
    fpn_fast.save_choices(path)
    _edit(path, lambda d: d["environment"].__setitem__(key, "0.0-other"))
    _restart()
    with pytest.warns(choices.ChoicesWarning, match=rf"measured under {key} 0.0-other \(this process: "):
        assert fpn_fast.load_choices(path) == 0
    run, _, _ = _conv_runner()
    assert len(measured_on_cpu) == 2 * timed and run.decision.loaded_from is None


def test_a_choice_measured_on_another_device_model_is_skipped(measured_on_cpu, tmp_path):
    _conv_runner()
    path = tmp_path / "c.json"
    count = fpn_fast.save_choices(path)
    _edit(path, lambda d: d["decisions"][0].__setitem__("device_name", "NVIDIA H200"))
    _restart()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert fpn_fast.load_choices(path) == count - 1


def test_a_loaded_choice_that_is_no_longer_a_candidate_is_measured_again(measured_on_cpu, tmp_path):
    run, _, _ = _conv_runner()
    timed = len(measured_on_cpu)
    path = tmp_path / "c.json"
    fpn_fast.save_choices(path)

    def elsewhere(document):
        entry = next(d for d in document["decisions"] if d["signature"] == run.decision.signature)
        entry["candidates"]["gone"] = {"status": "chosen", "ms": 0.001, "reason": None}
        entry["chosen"] = "gone"
    _edit(path, elsewhere)
    _restart()
    fpn_fast.load_choices(path)
    again, _, _ = _conv_runner()
    assert len(measured_on_cpu) > timed and again.decision.loaded_from is None and again.route != "gone"


@pytest.mark.parametrize("content", [
    "{not json", "", "[]", json.dumps({"format": "something else"}),
    json.dumps({"format": choices.FORMAT, "environment": {}, "decisions": [{"op": "conv2d_act"}]}),
    json.dumps({"format": choices.FORMAT, "environment": {}, "decisions": [
        {"op": "conv2d_act", "signature": "s", "chosen": "x", "device": "cpu", "device_name": "cpu",
         "candidates": {"y": {"status": "chosen", "ms": 1.0, "reason": None}}}]}),
    json.dumps({"format": choices.FORMAT, "environment": {}, "decisions": [
        {"op": "conv2d_act", "signature": "s", "chosen": "y", "device": "cpu", "device_name": "cpu",
         "candidates": {"y": {"status": "chosen", "ms": "fast", "reason": None}}}]}),
], ids=["truncated", "empty", "list", "format", "missing-keys", "chosen-not-a-candidate", "ms-not-a-number"])
def test_a_file_that_cannot_be_used_warns_and_measures_again(measured_on_cpu, tmp_path, content):
    path = tmp_path / "c.json"
    path.write_text(content)
    with pytest.warns(choices.ChoicesWarning, match=r"cannot be used .*measured again"):
        assert fpn_fast.load_choices(path) == 0
    run, _, _ = _conv_runner()
    assert len(measured_on_cpu) >= 1 and run.decision.loaded_from is None


def test_a_missing_file_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        fpn_fast.load_choices(tmp_path / "absent.json")


def test_a_restarted_server_warms_up_without_measuring(measured_on_cpu, tmp_path):
    """warmup, save, restart, load, warmup: the second warmup plans (a new process has no
    plans) but times no candidate, and its routes are the first's."""
    torch.manual_seed(0)
    model = fpn_fast.optimize_for_inference(
        randomise_(fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=None)).eval())
    shapes = [(1, 3, 64, 64), (1, 3, 48, 80)]
    fpn_fast.warmup(model, shapes)
    first = [(r["module"], r["op"], r["route"]) for r in model.route_report()]
    timed = len(measured_on_cpu)
    assert timed >= 2
    path = tmp_path / "choices.json"
    fpn_fast.save_choices(path)

    _restart()
    restarted = fpn_fast.optimize_for_inference(
        randomise_(fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=None)).eval())
    restarted.load_state_dict(model.state_dict())
    assert fpn_fast.load_choices(path) >= timed
    fpn_fast.warmup(restarted, shapes)
    assert len(measured_on_cpu) == timed
    assert [(r["module"], r["op"], r["route"]) for r in restarted.route_report()] == first
    assert all(r["candidates"] for r in restarted.route_report() if r["op"] == "conv2d_act")


@pytest.mark.cuda
def test_cuda_choices_round_trip_without_timing(monkeypatch, tmp_path):
    """On the GPU under "auto" (conv2d_act and the lateral step measured with CUDA events): a
    restarted process with the saved choices plans the same routes and times nothing."""
    timed = _count_timings(monkeypatch, measure._CudaTimer)
    dispatch.forget_runners()
    try:
        torch.manual_seed(0)
        model = fpn_fast.optimize_for_inference(
            randomise_(fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=None)).eval().cuda())
        fpn_fast.warmup(model, [(1, 3, 96, 128)])
        first = [(r["module"], r["op"], r["route"]) for r in model.route_report()]
        assert timed, "nothing was measured on the GPU"
        count = len(timed)
        path = tmp_path / "choices.json"
        saved = fpn_fast.save_choices(path)
        assert all(d["device_name"] == torch.cuda.get_device_name(0) for d in json.loads(path.read_text())["decisions"]
                   if d["device"].startswith("cuda"))
        _restart()
        assert fpn_fast.load_choices(path) == saved
        restarted = fpn_fast.optimize_for_inference(
            randomise_(fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=None)).eval().cuda())
        fpn_fast.warmup(restarted, [(1, 3, 96, 128)])
        assert len(timed) == count
        assert [(r["module"], r["op"], r["route"]) for r in restarted.route_report()] == first
    finally:
        dispatch.forget_runners()
        measure.forget_loaded()
