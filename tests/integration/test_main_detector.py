"""The detector job of `python -m fpn_fast` (fpn_fast.demo.run_detector): the CLI in a subprocess on
the bundled photos and on a folder of the user's images with a checkpoint, its error exits, and the
matching / checkpoint helpers. Small sizes (--min-size 128) keep each run to seconds."""
import json

import pytest
import torch

import torchvision
from PIL import Image

from fpn_fast import demo
from tests.integration.test_main import run_main, run_main_or_in_process

# Fewer proposals and detections than torchvision's 1000 and 100: the box head's cost drops tenfold.
CHEAP = {"rpn_post_nms_top_n_test": 100, "box_detections_per_img": 20}
SMALL = ["--min-size", "128", "--max-size", "200", "--repeats", "1", "--device", "cpu"] + [
    arg for name, value in CHEAP.items() for arg in ("--model-arg", f"{name}={value}")]
RESULT_KEYS = {"mode", "machine", "config", "backends", "images", "variants", "pyramid", "parity", "detections",
               "timings", "speedups", "speedups_vs_compiled", "failures", "runtime_s"}
VARIANTS = [demo.TORCHVISION, demo.CONVERTED, demo.OPTIMIZED]
FPN_LEVELS = ["0", "1", "2", "3", "pool"]


def _read(path):
    with open(path) as f:
        return json.load(f)


def _is_png(path):
    with open(path, "rb") as f:
        return f.read(8) == b"\x89PNG\r\n\x1a\n"


def check_result(result, names, levels=FPN_LEVELS, min_size=128, max_size=200):
    """What every successful detector result holds, whatever the model and photos."""
    assert RESULT_KEYS <= set(result) and result["mode"] == "detector"
    assert result["failures"] == {} and result["variants"] == VARIANTS
    assert [row["name"] for row in result["images"]] == names
    for row in result["images"]:
        h, w = row["size"]
        rh, rw = row["resized"]
        scale = min(min_size / min(h, w), max_size / max(h, w))  # GeneralizedRCNNTransform's rule
        assert abs(rh - h * scale) <= 1 and abs(rw - w * scale) <= 1
        for label in VARIANTS[1:]:
            assert list(row["pyramid"][label]) == levels
            for d in row["pyramid"][label].values():
                assert d["scale"] > 0 and 0 <= d["rel"] == d["abs"] / d["scale"]
    assert result["parity"]["applies"] is True and result["parity"]["within"] == {v: True for v in VARIANTS[1:]}
    for label in VARIANTS[1:]:
        worst = result["pyramid"][label]
        assert list(worst) == levels and all(0 <= rel < demo.PARITY_BOUND for rel in worst.values())
        assert worst == {level: max(row["pyramid"][label][level]["rel"] for row in result["images"])
                         for level in levels}
        d = result["detections"][label]
        assert d["matched"] + d["unmatched_reference"] == d["reference"]
        assert d["matched"] + d["unmatched_other"] == d["other"]
        assert d["reference"] == sum(row["detections"][label]["reference"] for row in result["images"])
    runs = result["config"]["repeats"]
    for label, t in result["timings"].items():
        assert t["pass_s"]["runs"] == t["backbone_pass_s"]["runs"] == runs
        assert 0 < t["backbone_pass_s"]["median"] < t["pass_s"]["median"] and 0 < t["backbone_share"] < 1
        n = len(names)
        assert t["per_image_ms"] == pytest.approx(t["pass_s"]["median"] / n * 1e3)
        assert t["images_per_s"] == pytest.approx(n / t["pass_s"]["median"])
        assert t["first_call_s"] > 0
    assert result["speedups"][demo.TORCHVISION] == {"detector": 1.0, "backbone": 1.0}
    assert all(s["detector"] > 0 and s["backbone"] > 0 for s in result["speedups"].values())


@pytest.fixture(scope="module")
def bundled_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("detector")
    proc = run_main(*SMALL, "--json", str(tmp / "out.json"), "--report", str(tmp / "out.png"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, _read(tmp / "out.json"), tmp


def test_default_job_on_the_bundled_photos(bundled_run):
    proc, result, tmp = bundled_run
    check_result(result, list(demo.BUNDLED_PHOTOS))
    c = result["config"]
    assert (c["model"], c["weights"], c["num_classes"], c["batch"], c["backend"], c["model_args"]) == (
        "fasterrcnn_resnet50_fpn", None, 91, 1, "auto", CHEAP)
    for label in VARIANTS[1:]:  # random weights still give boxes above the 0.05 score threshold
        assert 0 < result["detections"][label]["reference"] <= 20 * 3
    assert [row["size"] for row in result["images"]] == [[512, 512], [300, 451], [427, 640]]
    assert _is_png(tmp / "out.png")
    out = proc.stdout
    for heading in ("Photos (3)", "Pyramid vs torchvision eager", "Detections vs torchvision eager", "End to end",
                    "random weights"):
        assert heading in out
    for label in VARIANTS:
        assert f"  {label}" in out
    assert "[fpn-fast] timing" in proc.stderr and "[fpn-fast]" not in out  # progress bars: stderr


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory):
    """Two photos of odd sizes cut from a bundled one (a PNG and a JPEG), and a 5-class checkpoint
    whose box classifier favours class 1, so that detections score high enough to be drawn."""
    tmp = tmp_path_factory.mktemp("user")
    folder = tmp / "photos"
    folder.mkdir()
    with Image.open(demo.bundled_photos()[0]) as photo:
        photo.crop((20, 10, 151, 107)).save(folder / "a.png")  # (left, upper, right, lower): 97x131
        photo.crop((150, 200, 227, 323)).save(folder / "b.jpg")  # 123x77
    (folder / "notes.txt").write_text("not an image: skipped in a folder")
    model = demo.build_detector("fasterrcnn_resnet50_fpn", num_classes=5, seed=3)
    with torch.no_grad():
        model.roi_heads.box_predictor.cls_score.bias[1] = 8.0
    torch.save(model.state_dict(), tmp / "detector.pt")
    return tmp


def test_user_images_and_checkpoint(user_folder):
    tmp = user_folder
    proc = run_main(*SMALL, "--images", str(tmp / "photos"), "--weights", str(tmp / "detector.pt"),
                    "--num-classes", "5", "--batch", "2", "--json", str(tmp / "out.json"),
                    "--report", str(tmp / "out.png"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = _read(tmp / "out.json")
    check_result(result, ["a.png", "b.jpg"])
    assert [row["size"] for row in result["images"]] == [[97, 131], [123, 77]]
    c = result["config"]
    assert (c["weights_kind"], c["num_classes"], c["batch"]) == ("detector", 5, 2)
    for label in VARIANTS[1:]:
        d = result["detections"][label]
        # same weights, outputs equal to float rounding: nearly every detection finds its twin
        assert d["reference"] > 0 and d["matched"] >= 0.9 * d["reference"], d
        assert d["min_iou"] > 0.9 and d["max_score_diff"] < 1e-3, d
    assert "(detector checkpoint)" in proc.stdout and "random weights" not in proc.stdout
    assert _is_png(tmp / "out.png")


@pytest.mark.parametrize("case", ["missing path", "empty folder", "unreadable image", "missing weights",
                                  "not a checkpoint", "mismatched checkpoint", "unknown model argument"])
def test_bad_input_exits_2_with_one_line(case, user_folder, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    (tmp_path / "text.pt").write_text("hello")
    args, expected = {
        "missing path": (["--images", str(tmp_path / "nope.png")], "no such file or folder"),
        "empty folder": (["--images", str(tmp_path / "empty")], "holds no .jpg"),
        "unreadable image": (["--images", str(tmp_path / "broken.jpg")], "cannot decode"),
        "missing weights": (["--weights", str(tmp_path / "nope.pt")], "no such file"),
        "not a checkpoint": (["--weights", str(tmp_path / "text.pt")], "not a PyTorch checkpoint"),
        # the 5-class checkpoint against the default 91 classes
        "mismatched checkpoint": (["--weights", str(user_folder / "detector.pt")], "does not fit"),
        "unknown model argument": (["--model-arg", "box_detections=3"], "takes no argument 'box_detections'"),
    }[case]
    proc = run_main_or_in_process(capsys, case == "missing path", *SMALL, *args)  # one in a fresh process
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.startswith("fpn-fast: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert expected in proc.stderr and "Traceback" not in proc.stderr and proc.stdout == ""


# ---------------------------------------------------------------------------------------------
# In-process: the other detectors, checkpoints of each kind, matching

@pytest.mark.parametrize("model,levels", [
    ("fasterrcnn_resnet50_fpn_v2", FPN_LEVELS), ("maskrcnn_resnet50_fpn", FPN_LEVELS),
    ("keypointrcnn_resnet50_fpn", FPN_LEVELS), ("retinanet_resnet50_fpn", ["0", "1", "2", "p6", "p7"])])
def test_other_detectors(model, levels):
    # few boxes: the mask and keypoint heads run per detection, v2's box head (four 3x3 convs) per proposal
    cheap = ({"topk_candidates": 50, "detections_per_img": 3} if model.startswith("retinanet") else
             {"rpn_post_nms_top_n_test": 30, "box_detections_per_img": 3})
    job = demo.DetectorJob(model=model, images=[str(demo.bundled_photos()[1])], min_size=96, max_size=160,
                           repeats=1, model_args=cheap)
    result, pictures = demo.run_detector(job)
    check_result(result, ["chelsea.png"], levels, min_size=96, max_size=160)
    assert [list(p["heat_maps"]) for p in pictures["photos"]] == [levels]
    json.dumps(result)  # JSON-ready


@pytest.fixture(scope="module")
def detector():
    return demo.build_detector("fasterrcnn_resnet50_fpn", num_classes=3, seed=1)


def _fresh():
    return demo.build_detector("fasterrcnn_resnet50_fpn", num_classes=3, seed=2)


@pytest.mark.parametrize("kind", ["detector", "wrapped detector", "backbone", "classifier"])
def test_load_weights_of_each_kind(kind, detector, tmp_path):
    if kind == "classifier":
        torch.manual_seed(0)
        source = torchvision.models.resnet50()  # BatchNorm2d (num_batches_tracked) and fc keys
        state, target_of = source.state_dict(), (lambda m: m.backbone.body)
        expected = {k: v for k, v in state.items() if not k.startswith("fc.") and "num_batches" not in k}
    else:
        part = detector.backbone if kind == "backbone" else detector
        state, target_of = part.state_dict(), (lambda m: m.backbone if kind == "backbone" else m)
        expected = state
    path = tmp_path / "w.pt"
    torch.save({"model": state, "epoch": 3} if kind == "wrapped detector" else state, path)
    model = _fresh()
    assert demo.load_weights(model, str(path), "fasterrcnn_resnet50_fpn") == kind.split()[-1]
    loaded = target_of(model).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in expected.items())


def test_load_weights_rejects_what_does_not_fit(detector, tmp_path):
    path = tmp_path / "w.pt"
    torch.save(detector.state_dict(), path)
    model = demo.build_detector("fasterrcnn_resnet50_fpn", num_classes=4)
    with pytest.raises(demo.InputError, match=r"4 shape mismatches .*roi_heads.box_predictor.*--num-classes"):
        demo.load_weights(model, str(path), "fasterrcnn_resnet50_fpn")
    state = detector.state_dict()
    del state["rpn.head.conv.0.0.weight"]
    state["rpn.extra"] = torch.zeros(1)
    torch.save(state, path)
    with pytest.raises(demo.InputError, match=r"1 missing keys .*rpn.head.conv.0.0.weight.*1 unexpected keys"):
        demo.load_weights(_fresh(), str(path), "fasterrcnn_resnet50_fpn")
    torch.save({"weight": torch.zeros(2)}, path)
    with pytest.raises(demo.InputError, match="neither a detector, a backbone nor a ResNet classifier"):
        demo.load_weights(_fresh(), str(path), "fasterrcnn_resnet50_fpn")


def _detections(boxes, scores, labels):
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), "scores": torch.tensor(scores),
            "labels": torch.tensor(labels)}


def test_match_detections_counts_ious_scores_and_labels():
    reference = _detections([[0, 0, 10, 10], [20, 20, 30, 30], [50, 50, 60, 60]], [0.9, 0.8, 0.7], [1, 2, 3])
    other = _detections([[0, 0, 10, 9], [20, 20, 30, 30], [100, 100, 110, 110]], [0.85, 0.8, 0.6], [1, 5, 3])
    m = demo.match_detections(reference, other)
    assert (m["reference"], m["other"], m["matched"], m["unmatched_reference"], m["unmatched_other"]) == (3, 3, 2, 1, 1)
    assert m["min_iou"] == pytest.approx(0.9) and m["mean_iou"] == pytest.approx(0.95)
    assert m["max_score_diff"] == pytest.approx(0.05) and m["label_mismatches"] == 1
    # greedy by reference score: the higher-scoring box takes the only candidate, at a lower IoU
    greedy = demo.match_detections(_detections([[0, 0, 10, 10], [0, 0, 10, 8]], [0.9, 0.95], [1, 1]),
                                   _detections([[0, 0, 10, 10]], [0.9], [1]))
    assert (greedy["matched"], greedy["unmatched_reference"]) == (1, 1)
    assert greedy["min_iou"] == pytest.approx(0.8) and greedy["max_score_diff"] == pytest.approx(0.05)
    empty = demo.match_detections(reference, _detections([], [], []))
    assert (empty["matched"], empty["min_iou"], empty["max_score_diff"]) == (0, None, None)
    total = demo.total_matches([m, empty])
    assert (total["reference"], total["matched"], total["unmatched_reference"]) == (6, 2, 4)
    assert total["mean_iou"] == pytest.approx(0.95) and total["min_iou"] == pytest.approx(0.9)


def test_compile_adds_torchvision_max_autotune(monkeypatch):
    """--compile's wiring with dynamo's eager backend instead of an inductor max-autotune compile
    (minutes on this CPU): torchvision's backbone compiled, timed and compared like the other rows."""
    calls, real = [], torch.compile

    def fake(model, **kwargs):
        calls.append((type(model).__name__, kwargs))
        return real(model, backend="eager", dynamic=kwargs["dynamic"])
    monkeypatch.setattr(torch, "compile", fake)
    job = demo.DetectorJob(images=[str(demo.bundled_photos()[1])], min_size=96, max_size=160, repeats=1,
                           compile=True, model_args={"rpn_post_nms_top_n_test": 30, "box_detections_per_img": 3})
    try:
        result, _ = demo.run_detector(job)
    finally:
        torch._dynamo.reset()
    assert calls == [("BackboneWithFPN", {"mode": "max-autotune", "dynamic": False})]
    assert result["variants"] == VARIANTS + [demo.COMPILED] and result["failures"] == {}
    assert max(result["pyramid"][demo.COMPILED].values()) < 1e-6  # the same ops, traced
    assert result["detections"][demo.COMPILED]["unmatched_reference"] == 0
    t = result["timings"][demo.COMPILED]
    assert 0 < t["backbone_pass_s"]["median"] < t["pass_s"]["median"]  # the hooks time the compiled backbone
    assert result["speedups_vs_compiled"][demo.COMPILED] == {"detector": 1.0, "backbone": 1.0}
