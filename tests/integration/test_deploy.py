"""Deployment paths (issue 11): TorchScript, tracing, ONNX (both exporters, run in ONNX Runtime),
torch.export (fused and decomposed programs, loaded elsewhere), FX feature extraction.

Every artifact is compared with the eager model it came from; relative to each level's largest
magnitude where the artifact computes in another order (1e-5: ONNX Runtime's and the scripted
optimized model's convolutions), bit for bit where it runs the same kernels."""
import copy
import subprocess
import sys
import textwrap
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import fpn_fast
from fpn_fast import ops
from fpn_fast.ops import _extension
from tests._models import IN_CHANNELS, random_features, randomise_

torchvision = pytest.importorskip("torchvision")
from torchvision.models import detection  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelP6P7  # noqa: E402

HAS_EXTENSION = ops.available_backends()["extension"]["cpu"] is None
needs_extension = pytest.mark.skipif(not HAS_EXTENSION, reason="the extension is not built")

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated",
                                        "ignore:`torch.jit.trace` is deprecated",
                                        "ignore::torch.jit.TracerWarning")


def assert_close_to_scale(actual, expected, rel=1e-5):
    assert list(actual) == list(expected)
    for name in expected:
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=rel * scale,
                                   msg=lambda m, name=name: f"level {name}: {m}")


def backbone(name="resnet18"):
    torch.manual_seed(0)
    return randomise_(fpn_fast.resnet_fpn_backbone(backbone_name=name)).eval()


def fused_op_calls(fn, *args):
    """Names of the fpn_fast:: ops a call runs (the profiler sees scripted and eager calls alike)."""
    with torch.autograd.profiler.profile() as prof, torch.no_grad():
        fn(*args)
    return [e.name for e in prof.function_events if e.name.startswith("fpn_fast::")]


def run_python(code, timeout=600):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=timeout)


# ---- TorchScript ----

FPN_VARIANTS = {
    "plain": dict(),
    "norm": dict(norm_layer=nn.BatchNorm2d),
    "maxpool": dict(extra_blocks=fpn_fast.LastLevelMaxPool()),
    "p6p7": dict(extra_blocks=LastLevelP6P7(16, 16)),
}


@pytest.mark.parametrize("variant", list(FPN_VARIANTS))
def test_scripted_fpn_equals_eager(variant):
    fpn = randomise_(fpn_fast.FeaturePyramidNetwork(IN_CHANNELS, 16, **FPN_VARIANTS[variant])).eval()
    scripted = torch.jit.script(fpn)
    feats = random_features()
    with torch.no_grad():
        expected, actual = fpn(feats), scripted(feats)
    for name in expected:  # the same kernels in the same order: bit for bit
        assert torch.equal(actual[name], expected[name]), name
    assert sorted(scripted.state_dict()) == sorted(fpn.state_dict())
    if HAS_EXTENSION and variant != "norm":  # every level's lateral is a plain 1x1 conv: all fused
        assert fused_op_calls(scripted, feats) == ["fpn_fast::upsample_add_"] * (len(IN_CHANNELS) - 1)


def test_scripted_fpn_trains_like_eager():
    fpn = randomise_(fpn_fast.FeaturePyramidNetwork(IN_CHANNELS, 16, extra_blocks=fpn_fast.LastLevelMaxPool()))
    scripted = torch.jit.script(copy.deepcopy(fpn))
    feats = random_features()
    for model in (fpn, scripted):
        sum(v.square().sum() for v in model(copy.deepcopy(feats)).values()).backward()
    grads = dict(scripted.named_parameters())
    for name, p in fpn.named_parameters():
        torch.testing.assert_close(grads[name].grad, p.grad, rtol=1e-5, atol=1e-5 * p.grad.abs().max().item())


def test_scripted_small_modules():
    pool = torch.jit.script(fpn_fast.LastLevelMaxPool())
    x = torch.randn(2, 3, 9, 11)
    results, names = pool([x], [x], ["0"])
    assert names == ["0", "pool"] and torch.equal(results[1], x[:, :, ::2, ::2])
    norm = fpn_fast.FrozenBatchNorm2d(3)
    randomise_(norm)
    assert torch.equal(torch.jit.script(norm)(x), norm(x))


def test_optimized_backbone_scripts_and_saves_after_eager_calls():
    """The prepacked weights an eager CPU call leaves on the model (opaque oneDNN tensors) stay out
    of the scripted module: torch.jit.save could not write them."""
    import io
    eager = fpn_fast.optimize_for_inference(backbone())
    image = torch.randn(1, 3, 96, 112)
    with torch.no_grad():
        expected = eager(image)  # packs made
        scripted = torch.jit.script(eager)
        buffer = io.BytesIO()
        torch.jit.save(scripted, buffer)
        loaded = torch.jit.load(io.BytesIO(buffer.getvalue()))
        # the eager model runs Winograd convolutions on CPU, the scripted one F.conv2d
        assert_close_to_scale(loaded(image), expected, rel=1e-4)


@pytest.mark.parametrize("optimized", [False, True], ids=["backbone", "optimized"])
def test_scripted_backbone_saves_and_loads_with_only_the_library(optimized, tmp_path):
    model = backbone()
    eager = fpn_fast.optimize_for_inference(model) if optimized else model
    scripted = torch.jit.script(eager)
    image = torch.randn(2, 3, 67, 91)
    with torch.no_grad():
        expected, actual = eager(image), scripted(image)
    # The scripted optimized model runs plain convolutions where eager runs oneDNN's fused ones.
    assert_close_to_scale(actual, expected, rel=1e-5 if optimized else 0)
    if not HAS_EXTENSION:
        return
    assert fused_op_calls(scripted, image).count(
        "fpn_fast::upsample_add_") == 3  # the fused top-down step, not a hidden fallback
    path = tmp_path / "model.pt"
    torch.jit.save(scripted, str(path))
    torch.save(image, tmp_path / "image.pt")
    torch.save(actual, tmp_path / "expected.pt")
    code = f"""
        import sys, torch
        assert "fpn_fast" not in sys.modules
        torch.ops.load_library({ops.library_path()!r})
        model = torch.jit.load({str(path)!r})
        with torch.no_grad():
            out = model(torch.load({str(tmp_path / 'image.pt')!r}))
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        assert all(torch.equal(out[k], expected[k]) for k in expected), "outputs differ"
        assert "fpn_fast" not in sys.modules
        print("LOADED")
    """
    result = run_python(code)
    assert "LOADED" in result.stdout, result.stderr[-2000:]
    without = run_python(f"import torch; torch.jit.load({str(path)!r})")
    assert without.returncode != 0 and "fpn_fast::" in without.stderr


def _detector(name):
    """A small detector with random weights. Few proposals and detections, all kept whatever
    their score: with random weights many scores tie, and where the top-k cut falls among ties
    torchvision's own scripted and eager post-processing may pick different boxes."""
    torch.manual_seed(0)
    kwargs = dict(weights=None, weights_backbone=None, min_size=96, max_size=128)
    if name.startswith("keypoint"):
        kwargs.update(num_classes=2, num_keypoints=5)
    else:
        kwargs.update(num_classes=3)
    if name.startswith("retinanet"):
        kwargs.update(score_thresh=0.0, topk_candidates=20, detections_per_img=3)
    else:
        kwargs.update(box_score_thresh=0.0, rpn_pre_nms_top_n_test=30, rpn_post_nms_top_n_test=5,
                      box_detections_per_img=3)
    return getattr(detection, name)(**kwargs).eval()


DETECTORS = ["fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "maskrcnn_resnet50_fpn",
             "keypointrcnn_resnet50_fpn", "retinanet_resnet50_fpn"]


@pytest.mark.parametrize("name", DETECTORS)
def test_scripted_converted_detector_equals_eager(name):
    model = fpn_fast.convert(_detector(name))
    scripted = torch.jit.script(model)
    # Sizes the transform keeps (min side 96): torchvision's scripted resize rounds some other
    # sizes differently from its eager one (seen: 100x120 -> 95 rows scripted, 96 eager).
    images = [torch.rand(3, 96, 120), torch.rand(3, 96, 101)]
    with torch.no_grad():
        expected = model(images)
        _, actual = scripted(images)
        features = model.backbone(images[0][None])
        scripted_features = scripted.backbone(images[0][None])
    for name_ in features:
        assert torch.equal(scripted_features[name_], features[name_]), name_
    for want, got in zip(expected, actual):
        assert len(want["boxes"]) > 0 and got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], msg=lambda m, key=key: f"{key}: {m}")


def test_scripted_optimized_detector_equals_eager():
    model = fpn_fast.optimize_for_inference(_detector("fasterrcnn_resnet50_fpn"))
    scripted = torch.jit.script(model)
    images = [torch.rand(3, 100, 120)]
    with torch.no_grad():
        expected = model.backbone(images[0][None])
        actual = scripted.backbone(images[0][None])
    assert_close_to_scale(actual, expected)


# ---- tracing ----

@pytest.mark.parametrize("kind", ["backbone", "detector backbone", "optimized", "optimized without winograd"])
def test_traced_backbone_matches_eager_at_another_size(kind):
    """Bit for bit, except where the eager optimized model runs Winograd convolutions on CPU (a
    traced graph records the direct ones): there within the inference mode's 1e-4 of each level's
    scale."""
    if kind == "backbone":
        model = backbone()
    elif kind == "detector backbone":
        model = fpn_fast.convert(_detector("fasterrcnn_resnet50_fpn")).backbone
    else:
        model = fpn_fast.optimize_for_inference(backbone(), winograd=kind == "optimized")
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(1, 3, 64, 80), strict=False)
        image = torch.randn(2, 3, 75, 61)  # another batch and size than traced with
        assert_close_to_scale(traced(image), model(image), rel=1e-4 if kind == "optimized" else 0)


# ---- ONNX ----

def _onnx_session(model, path, dynamo):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    example = torch.randn(2, 3, 64, 80)  # batch 2: torch.export specialises a dynamic dim seen as 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            pytest.importorskip("onnxscript")
            dims = {"x": {0: torch.export.Dim("batch"), 2: torch.export.Dim("height", min=32),
                          3: torch.export.Dim("width", min=32)}}
            torch.onnx.export(model, (example,), str(path), dynamo=True, dynamic_shapes=dims)
        else:
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "batch", 2: "height", 3: "width"}})
    op_types = {node.op_type for node in onnx.load(str(path)).graph.node}
    domains = {node.domain for node in onnx.load(str(path)).graph.node}
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]), op_types, domains


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "legacy"])
@pytest.mark.parametrize("optimized", [False, True], ids=["backbone", "optimized"])
def test_onnx_export_runs_in_onnxruntime(optimized, dynamo, tmp_path):
    model = backbone()
    if optimized:
        model = fpn_fast.optimize_for_inference(model)
    session, op_types, domains = _onnx_session(model, tmp_path / "model.onnx", dynamo)
    assert domains <= {"", "ai.onnx"}, domains  # standard ONNX ops only
    assert "Resize" in op_types and "Conv" in op_types
    image = torch.randn(3, 3, 75, 61)  # dynamic batch and size
    outputs = session.run(None, {session.get_inputs()[0].name: image.numpy()})
    with torch.no_grad():
        expected = model(image)
    assert_close_to_scale(OrderedDict(zip(expected, map(torch.from_numpy, outputs))), expected)


def test_onnx_export_of_a_converted_detector_as_torchvision_exports(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    tv = _detector("fasterrcnn_resnet50_fpn")
    ours = fpn_fast.convert(copy.deepcopy(tv))
    image = torch.rand(3, 100, 120)
    results = {}
    for name, model in (("torchvision", tv), ("fpn_fast", ours)):
        path = tmp_path / f"{name}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, ([image],), str(path), opset_version=17, dynamo=False)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        results[name] = session.run(None, {session.get_inputs()[0].name: image.numpy()})
    with torch.no_grad():
        expected = ours([image])[0]
    assert len(expected["boxes"]) > 0
    boxes = torch.from_numpy(results["fpn_fast"][0])
    torch.testing.assert_close(boxes, expected["boxes"], rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(boxes, torch.from_numpy(results["torchvision"][0]), rtol=1e-4, atol=1e-3)


# ---- torch.export ----

@pytest.mark.parametrize("optimized", [False, True], ids=["backbone", "optimized"])
def test_exported_program_keeps_fused_ops_and_decomposes_to_aten(optimized, tmp_path):
    model = backbone()
    if optimized:
        model = fpn_fast.optimize_for_inference(model)
    image = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        program = torch.export.export(model, (image,))
        expected = model(image)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    if HAS_EXTENSION:
        assert "fpn_fast.upsample_add.default" in targets
    # Device-independent where the extension has its CUDA kernels: every op then has one, so the
    # CPU export also runs on a GPU (a CPU-only build, e.g. make test-oldest's, has none).
    for node in program.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) \
                and _extension.has_cuda_kernels():
            assert torch._C._dispatch_has_kernel_for_dispatch_key(node.target.name(), "CUDA") or \
                torch._C._dispatch_has_kernel_for_dispatch_key(node.target.name(), "CompositeImplicitAutograd") or \
                torch._C._dispatch_has_kernel_for_dispatch_key(node.target.name(), "CompositeExplicitAutograd"), \
                node.target
    with torch.no_grad():
        assert_close_to_scale(program.module()(image), expected, rel=1e-5 if optimized else 0)
    portable = program.run_decompositions(fpn_fast.decompositions())
    assert not any("fpn_fast" in str(n.target) for n in portable.graph.nodes)
    torch.export.save(portable, str(tmp_path / "portable.pt2"))
    torch.save(image, tmp_path / "image.pt")
    torch.save(expected, tmp_path / "expected.pt")
    result = run_python(f"""
        import sys, torch
        program = torch.export.load({str(tmp_path / 'portable.pt2')!r})
        with torch.no_grad():
            out = program.module()(torch.load({str(tmp_path / 'image.pt')!r}))
        expected = torch.load({str(tmp_path / 'expected.pt')!r})
        worst = max(((out[k] - expected[k]).abs().max() / expected[k].abs().max()).item() for k in expected)
        assert "fpn_fast" not in sys.modules
        print("WORST", worst)
    """)
    assert "WORST" in result.stdout, result.stderr[-2000:]
    assert float(result.stdout.split("WORST")[1]) <= 1e-5


# ---- FX ----

@pytest.mark.parametrize("kind", ["backbone", "detector backbone"])
def test_fx_feature_extraction(kind):
    model = backbone() if kind == "backbone" else fpn_fast.convert(_detector("fasterrcnn_resnet50_fpn")).backbone
    traced = torch.fx.symbolic_trace(model)
    leaf_calls = [n.target for n in traced.graph.nodes if n.op == "call_function"]
    assert leaf_calls.count(fpn_fast.ops.upsample_add) == 3  # the fused step: one leaf call per level
    assert fpn_fast.ops.stride2_pool in leaf_calls
    image = torch.randn(2, 3, 67, 91)
    with torch.no_grad():
        expected = model(image)
        assert_close_to_scale(traced(image), expected, rel=0)
    # torchvision's feature extraction keeps the FPN one leaf node, as it keeps torchvision's own
    # (tests/modules/test_fx.py compares the whole node lists).
    nodes = get_graph_node_names(model)[1]
    assert "fpn" in nodes and not any(n.startswith("fpn.") for n in nodes)
    extractor = create_feature_extractor(model, return_nodes={"fpn": "p", "body.layer3": "c4"})
    with torch.no_grad():
        features = extractor(image)
    assert list(features["p"]) == list(expected)
    assert all(torch.equal(features["p"][k], expected[k]) for k in expected)
    assert features["c4"].shape[1] == model.body.layer3[-1].conv1.in_channels


@pytest.mark.cuda
def test_program_exported_on_cpu_runs_on_cuda(monkeypatch):
    """The GPU check's half of 'a program exported on CPU runs on CUDA' (the op-set half runs here)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # compare float32 with float32
    model = fpn_fast.optimize_for_inference(backbone())
    image = torch.randn(2, 3, 64, 80)
    with torch.no_grad():
        program = torch.export.export(model, (image,))
        expected = model(image)
        actual = program.module().to("cuda")(image.cuda())
    assert_close_to_scale(OrderedDict((k, v.cpu()) for k, v in actual.items()), expected)
