"""``fpn_fast.warmup``: every warmed signature is planned before the first request, so a call of a
warmed shape builds nothing and resolves nothing; bad arguments are refused before any call."""
import pytest
import torch

import fpn_fast
from fpn_fast.ops import dispatch
from tests._models import randomise_

tv_detection = pytest.importorskip("torchvision.models.detection")

SHAPES = [(1, 3, 64, 96), (2, 3, 97, 65), (3, 48, 64)]


def _optimized_backbone():
    torch.manual_seed(0)
    model = randomise_(fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=None)).eval()
    return fpn_fast.optimize_for_inference(model)


def _builds_and_resolutions(backbone, shapes, autocast_dtype=None, memory_format=torch.contiguous_format):
    """(plans built, dispatch resolutions made) by one call of each shape, as a server calls."""
    builds, resolutions = backbone._engine.builds, dispatch.resolution_count()
    for shape in shapes:
        x = torch.randn(shape)
        if x.dim() == 4:
            x = x.contiguous(memory_format=memory_format)
        with torch.inference_mode(), torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16,
                                                    enabled=autocast_dtype is not None):
            backbone(x)
    return backbone._engine.builds - builds, dispatch.resolution_count() - resolutions


def test_warmed_shapes_build_nothing_later():
    backbone = _optimized_backbone()
    results = fpn_fast.warmup(backbone, SHAPES)
    assert [r["shape"] for r in results] == SHAPES
    assert [r["built"] for r in results] == [1, 1, 1]
    assert all(r["plan"]["planned"] for r in results)
    assert _builds_and_resolutions(backbone, SHAPES) == (0, 0)
    # Warming up again finds every signature warm.
    assert [r["built"] for r in fpn_fast.warmup(backbone, SHAPES)] == [0, 0, 0]
    # A shape that was not warmed builds on its first call, deciding its steps.
    built, resolved = _builds_and_resolutions(backbone, [(1, 3, 32, 32)])
    assert built == 1 and resolved > 0


def test_warmup_follows_the_signature_dtype_and_layout():
    backbone = _optimized_backbone()
    fpn_fast.warmup(backbone, SHAPES[:1], dtype=torch.bfloat16, memory_format=torch.channels_last)
    assert _builds_and_resolutions(backbone, SHAPES[:1], torch.bfloat16, torch.channels_last) == (0, 0)
    # float32 contiguous is another signature: not warmed by the call above.
    assert _builds_and_resolutions(backbone, SHAPES[:1])[0] == 1


def test_warmup_of_a_whole_detector():
    torch.manual_seed(0)
    detector = tv_detection.fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, min_size=64, max_size=96)
    optimized = fpn_fast.optimize_for_inference(randomise_(detector).eval())
    images = [torch.rand(3, 60, 90)]
    # The transform resizes 60x90 to 64x96 (scale 64/60) and pads to multiples of 32: 64x96.
    results = fpn_fast.warmup(optimized, [(1, 3, 64, 96)])
    assert [(r["backbone"], r["built"]) for r in results] == [("backbone", 1)]
    builds, resolutions = optimized.backbone._engine.builds, dispatch.resolution_count()
    with torch.inference_mode():
        optimized(images)
    assert optimized.backbone._engine.builds == builds
    assert dispatch.resolution_count() == resolutions


@pytest.mark.parametrize("arguments, error, match", [
    (dict(model="not a module", shapes=SHAPES), TypeError, "nn.Module"),
    (dict(model=torch.nn.Conv2d(3, 3, 1), shapes=SHAPES), ValueError, "no optimized backbone"),
    (dict(shapes=[(3, 40, 64)]), None, None),  # (C, H, W) is a valid unbatched shape
    (dict(shapes=[(3, 64)]), ValueError, r"\(N, C, H, W\)"),
    (dict(shapes=[(1, 3, -1, 64)]), ValueError, ">= 0"),
    (dict(shapes=["1x3x64x64"]), TypeError, "sequence of ints"),
    (dict(shapes=SHAPES, dtype=torch.int8), ValueError, "dtype"),
    (dict(shapes=SHAPES, grad_mode="train"), ValueError, "grad_mode"),
])
def test_bad_arguments_are_refused_before_any_call(arguments, error, match):
    backbone = _optimized_backbone()
    model = arguments.pop("model", backbone)
    if error is None:
        assert fpn_fast.warmup(model, **arguments)[0]["built"] == 1
        return
    with pytest.raises(error, match=match):
        fpn_fast.warmup(model, **arguments)
    assert backbone.__dict__.get("_engine") is None or backbone._engine.builds == 0


def test_training_mode_is_refused():
    backbone = _optimized_backbone()
    backbone.train()
    with pytest.raises(ValueError, match="eval mode"):
        fpn_fast.warmup(backbone, SHAPES)
