"""An optimized model used as a detection service uses it (issue 30): per-request ``.to()`` calls
keep the plans, optimizing under ``torch.inference_mode`` leaves the rest of the model normal,
``torch.compile(fullgraph=True)`` works with static and dynamic shapes, bad input is named at the
entry, and shape inference runs on the meta device.

Outputs are compared with torchvision's models holding the same random weights, norm statistics
and biases, to 1e-4 of each level's largest value (``REL_TOL``, as tests/inference/test_inference.py:
folding, the bias added after the lateral conv and the Winograd convolutions change float32
rounding by a few 1e-6 of a level's scale, and a compiled forward runs the convolutions unfused,
rounding apart by as much again).
"""
import copy
import re

import pytest
import torch
import torch._dynamo.testing

import fpn_fast
from fpn_fast.inference import Conv2dAct, InferenceBackboneWithFPN
from tests._models import randomise_

torchvision = pytest.importorskip("torchvision")
from torchvision.models import detection  # noqa: E402
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone as tv_resnet_fpn_backbone  # noqa: E402

REL_TOL = 1e-4


def _torchvision_backbone(name: str = "resnet18") -> torch.nn.Module:
    torch.manual_seed(0)
    return randomise_(tv_resnet_fpn_backbone(backbone_name=name, weights=None, trainable_layers=5)).eval()


def _assert_levels_close(actual, expected, rel=REL_TOL):
    assert list(actual) == list(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        scale = want.abs().max().item()
        assert scale > 0, name
        err = (got - want).abs().max().item()
        assert err <= rel * scale, f"level {name}: max error {err:.3g} > {rel:g} * {scale:.3g}"


def _convs(model):
    return [m for m in model.modules() if isinstance(m, Conv2dAct)]


# --- 1. a .to() that changes nothing keeps every plan and pack ---------------------------------

NO_OPS = {
    "to('cpu')": lambda m: m.to("cpu"),
    "to(device)": lambda m: m.to(torch.device("cpu")),
    "cpu()": lambda m: m.cpu(),
    "float()": lambda m: m.float(),
    "to(float32)": lambda m: m.to(torch.float32),
    "to('cpu', float32)": lambda m: m.to("cpu", torch.float32),
    "to(channels_last)": lambda m: m.to(memory_format=torch.channels_last),  # the weights already are
}


@pytest.mark.parametrize("swap", [False, True], ids=["set_data", "swap_tensors"])
def test_no_op_conversions_keep_plans_and_packs(swap):
    reference = _torchvision_backbone()
    fast = fpn_fast.optimize_for_inference(reference)
    x = torch.randn(1, 3, 96, 96)
    swapping = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        with torch.inference_mode():
            first = fast(x)
            builds = fast._engine.builds
            convs = _convs(fast)
            generations = [vars(m)["_weights_generation"] for m in convs]
            tokens = [m._pack_token() for m in convs]
            for name, convert in NO_OPS.items():
                assert convert(fast) is fast
                out = fast(x)
                assert fast._engine.builds == builds, f"{name} threw the plans away"
                for level in first:
                    assert torch.equal(out[level], first[level]), (name, level)
            assert [vars(m)["_weights_generation"] for m in convs] == generations
            assert all(m._pack_token() is token for m, token in zip(convs, tokens))
            _assert_levels_close(first, reference(x))
    finally:
        torch.__future__.set_swap_module_params_on_conversion(swapping)


def test_real_conversions_still_replan():
    """A conversion that changes a weight (dtype, layout) starts a new generation of packs, and the
    plans built from the old weights are not used again."""
    reference = _torchvision_backbone()
    fast = fpn_fast.optimize_for_inference(reference)
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        first = fast(x)
        builds = fast._engine.builds
        convs = _convs(fast)
        tokens = [m._pack_token() for m in convs]
        fast.double()
        assert all(m.weight.dtype == torch.float64 and m._pack_token() is not t for m, t in zip(convs, tokens))
        _assert_levels_close(fast(x.double()), copy.deepcopy(reference).double()(x.double()))
        assert fast._engine.builds == builds + 1
        fast.float()  # float32 -> float64 -> float32 is exact: the same weights, in new tensors
        again = fast(x)
        assert fast._engine.builds == builds + 2
        for level in first:
            assert torch.equal(again[level], first[level]), level
        tokens = [m._pack_token() for m in convs]
        fast.to(memory_format=torch.contiguous_format)  # the 3x3 and 7x7 weights change layout
        assert any(not m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
        assert all(m._pack_token() is not t for m, t in zip(convs, tokens))
        _assert_levels_close(fast(x), reference(x))
        assert fast._engine.builds == builds + 3
        generations = [vars(m)["_weights_generation"] for m in convs]
        fast.half()
        assert all(vars(m)["_weights_generation"] > g for m, g in zip(convs, generations))


# --- 2. optimize_for_inference under torch.inference_mode ---------------------------------------

def _detector() -> torch.nn.Module:
    """A small Faster R-CNN with random weights whose detections are not degenerate: the residual
    branches' last norms and the heads' output layers are scaled down (randomised norms do not
    normalise, so undamped activations grow into the thousands and every box regresses off the
    image), so it returns 20 detections per image with scores around 0.45."""
    torch.manual_seed(0)
    model = detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=4, min_size=128,
                                              max_size=160, box_score_thresh=0.0, box_detections_per_img=20)
    randomise_(model).eval()
    _damp_heads_(model)
    with torch.no_grad():
        for name, module in model.backbone.body.named_modules():
            if name.endswith(".bn3"):
                module.weight.mul_(0.3)
    return model


def _damp_heads_(model: torch.nn.Module) -> None:
    with torch.no_grad():
        for layer in (model.rpn.head.cls_logits, model.rpn.head.bbox_pred, model.roi_heads.box_predictor.cls_score,
                      model.roi_heads.box_predictor.bbox_pred):
            layer.weight.mul_(0.01)


def _assert_detections_close(actual, expected):
    """Each image's detections match: the same number, and each expected one has a counterpart of
    the same label within 1e-5 in score and 1e-3 pixel in box (on a 160-pixel image; features
    within 1e-4 of their scale move scores by about 1e-6 here). Matched rather than compared in
    order, so two scores closer than their rounding may swap places."""
    assert len(actual) == len(expected)
    for got, want in zip(actual, expected):
        assert want["boxes"].shape[0] > 0
        assert got["boxes"].shape == want["boxes"].shape
        for box, score, label in zip(want["boxes"], want["scores"], want["labels"]):
            close = ((got["labels"] == label) & ((got["scores"] - score).abs() <= 1e-5)
                     & ((got["boxes"] - box).abs().amax(dim=1) <= 1e-3))
            assert close.any(), f"no detection matches label {label.item()}, score {score.item():.6f}, box {box.tolist()}"


def test_optimized_under_inference_mode_leaves_normal_tensors():
    model = _detector()
    with torch.inference_mode():
        optimized = fpn_fast.optimize_for_inference(model)
    assert isinstance(optimized.backbone, InferenceBackboneWithFPN)
    inference = [name for name, t in [*optimized.named_parameters(), *optimized.named_buffers()] if t.is_inference()]
    assert inference == []
    generator = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 120, 150, generator=generator), torch.rand(3, 130, 140, generator=generator)]
    # Eval with grad mode on, as torchvision's models run (nothing requires grad: no refusal).
    _assert_detections_close(optimized(images), model(images))
    # New head weights, loaded in place outside inference mode (a checkpoint reload).
    heads = randomise_(copy.deepcopy(model))
    _damp_heads_(heads)
    for name in ("rpn", "roi_heads"):
        getattr(optimized, name).load_state_dict(getattr(heads, name).state_dict())
        getattr(model, name).load_state_dict(getattr(heads, name).state_dict())
    with torch.no_grad():
        _assert_detections_close(optimized(images), model(images))


# --- 3. torch.compile(fullgraph=True), static and dynamic shapes --------------------------------

# Every level, the extra 'pool' one included, is at least 2x2 at these sizes: a size-1 dimension
# is specialised by torch itself (its stride is ignored), which would recompile on its own.
COMPILE_SIZES = [(2, 3, 96, 128), (2, 3, 128, 160), (2, 3, 112, 144)]


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _frames(model, dynamic, check=None) -> int:
    """How many frames ``torch.compile(model, fullgraph=True, dynamic=dynamic)`` compiles (aot_eager)
    over COMPILE_SIZES; ``check(compiled, x)`` runs after each call's output is compared."""
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=dynamic)
    for shape in COMPILE_SIZES:
        x = torch.randn(shape)
        with torch.no_grad():
            out = compiled(x)
            if check is not None:
                check(out, x)
    return counter.frame_count


@pytest.mark.parametrize("dynamic,compiles", [(True, 1), (None, 2)], ids=["dynamic", "static_then_dynamic"])
def test_compiled_fullgraph_with_dynamic_shapes(fresh_dynamo, dynamic, compiles):
    """``dynamic=True`` compiles once for every size; the default compiles the first size
    statically, then once more with dynamic shapes, which serves the third size (``compiles``, on
    torch 2.14). Each call of the compiled model, between which eager calls run fpn_fast's ops
    too, gives torchvision's outputs, and it compiles exactly as often as torchvision's backbone
    on the same torch (on torch 2.11 both recompile once more with ``dynamic=True``: a guard
    torch's own stride checks add)."""
    reference = _torchvision_backbone()
    optimized = fpn_fast.optimize_for_inference(reference)

    def check(got, x):
        optimized(x)  # an eager call in between (it resolves dispatch rows: no recompile)
        _assert_levels_close(got, reference(x))
    ours = _frames(optimized, dynamic, check)
    assert ours == _frames(reference, dynamic)
    if torch.__version__ >= "2.12":
        assert ours == compiles


@pytest.mark.slow
def test_inductor_fullgraph_dynamic(fresh_dynamo):
    """The default compiler (inductor), dynamic shapes: one compile for two sizes, torchvision's outputs."""
    reference = _torchvision_backbone()
    compiled = torch.compile(fpn_fast.optimize_for_inference(reference), fullgraph=True, dynamic=True)
    for shape in COMPILE_SIZES[:2]:
        x = torch.randn(shape)
        with torch.no_grad():
            _assert_levels_close(compiled(x), reference(x))


# --- 4. bad input is named at the entry ---------------------------------------------------------

def test_bad_input_is_named_before_any_plan(monkeypatch):
    optimized = fpn_fast.optimize_for_inference(_torchvision_backbone())

    def no_plan_lookup(x):
        raise AssertionError("a plan was looked up for a bad input")

    monkeypatch.setattr("fpn_fast.inference.engine.signature", no_plan_lookup)
    image = torch.rand(3, 64, 64)
    with torch.no_grad():
        for bad in ([image], image.numpy(), image[None].numpy(), (image,)):
            with pytest.raises(TypeError, match=rf"Tensor of shape \(N, C, H, W\).*got a {type(bad).__name__}"):
                optimized(bad)
        for shape in [(64, 64), (1, 1, 3, 64, 64), ()]:
            with pytest.raises(ValueError, match=r"\(N, C, H, W\).*got shape " + re.escape(str(tuple(shape)))):
                optimized(torch.rand(shape))
        with pytest.raises(ValueError, match=r"\(N, 3, H, W\).*got shape \(1, 4, 64, 64\)"):
            optimized(torch.rand(1, 4, 64, 64))
    assert optimized.plans() == []


# --- 5. the meta device -------------------------------------------------------------------------

def test_shape_inference_on_meta():
    reference = _torchvision_backbone()
    unoptimized = fpn_fast.convert(copy.deepcopy(reference))
    optimized = fpn_fast.optimize_for_inference(reference).to("meta")
    x = torch.empty(2, 3, 64, 80, device="meta")
    want = {name: t.shape for name, t in copy.deepcopy(reference).to("meta")(x).items()}
    assert {name: t.shape for name, t in unoptimized.to("meta")(x).items()} == want
    for mode in (torch.enable_grad, torch.no_grad, torch.inference_mode):
        with mode():
            got = optimized(x)
        assert {name: t.shape for name, t in got.items()} == want
        assert all(t.device.type == "meta" for t in got.values())


# --- also noted: the refusal of training mode says where losses come from -----------------------

def test_training_mode_refusal_names_the_models_for_losses():
    optimized = fpn_fast.optimize_for_inference(_torchvision_backbone()).train()
    with pytest.raises(RuntimeError, match=r"model\.eval\(\).*validation loss.*fpn_fast\.convert"):
        optimized(torch.randn(1, 3, 64, 64))
