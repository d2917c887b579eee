"""fpn_fast.convert inside whole torchvision detection models: same losses, gradients, detections."""
import copy

import pytest
import torch

import fpn_fast

torchvision = pytest.importorskip("torchvision")
from torchvision.models import detection  # noqa: E402
from torchvision.ops import FeaturePyramidNetwork as TvFPN  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelP6P7  # noqa: E402

pytestmark = pytest.mark.slow

SMALL = dict(weights=None, weights_backbone=None, min_size=160, max_size=224)


def _images(n=2, size=(150, 200)):
    return [torch.rand(3, *size) for _ in range(n)]


def _targets(num_classes=5):
    boxes = [torch.tensor([[10.0, 12.0, 90.0, 110.0], [60.0, 30.0, 180.0, 140.0]]),
             torch.tensor([[5.0, 40.0, 70.0, 120.0]])]
    return [{"boxes": b, "labels": torch.randint(1, num_classes, (len(b),))} for b in boxes]


def _seeded(seed, fn):
    # RPN/ROI-head sampling draws from the global RNG: both models must see the same draws.
    torch.manual_seed(seed)
    return fn()


def _assert_shared(tv_model, converted, fpn_attr="backbone.fpn"):
    ours = converted.get_submodule(fpn_attr)
    theirs = tv_model.get_submodule(fpn_attr)
    assert isinstance(ours, fpn_fast.FeaturePyramidNetwork)
    assert isinstance(theirs, TvFPN) and not isinstance(theirs, fpn_fast.FeaturePyramidNetwork)
    # Exact type: fpn_fast's FPN derives from torchvision's (for its type checks, e.g. FX leaves).
    assert not any(type(m) is TvFPN for m in converted.modules())
    return ours


def _assert_detections_close(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.keys() == e.keys()
        assert len(e["boxes"]) > 0
        torch.testing.assert_close(a["boxes"], e["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(a["scores"], e["scores"], rtol=1e-4, atol=1e-5)
        assert torch.equal(a["labels"], e["labels"])


def test_convert_shares_parameters_and_mode():
    model = detection.fasterrcnn_resnet50_fpn(num_classes=5, **SMALL)
    tv_fpn = model.backbone.fpn
    tv_params = dict(tv_fpn.named_parameters())
    tv_fpn.layer_blocks[1].eval()  # a child in a mode of its own keeps it
    assert fpn_fast.convert(model) is model
    ours = model.backbone.fpn
    assert isinstance(ours, fpn_fast.FeaturePyramidNetwork)
    assert isinstance(ours.extra_blocks, fpn_fast.LastLevelMaxPool)
    assert ours.training and not ours.layer_blocks[1][0].training and ours.layer_blocks[0][0].training
    assert list(dict(ours.named_parameters())) == list(tv_params)
    for name, p in ours.named_parameters():
        assert p is tv_params[name], name
    model.eval()
    assert not ours.training
    # A bare torchvision FPN is returned converted, sharing its tensors too.
    bare = TvFPN([8, 16], 4)
    converted = fpn_fast.convert(bare)
    assert isinstance(converted, fpn_fast.FeaturePyramidNetwork) and converted.extra_blocks is None
    assert converted.inner_blocks[1][0].weight is bare.inner_blocks[1][0].weight


def test_fasterrcnn_training_step_and_detections_match():
    model = detection.fasterrcnn_resnet50_fpn(num_classes=5, **SMALL)
    converted = fpn_fast.convert(copy.deepcopy(model))
    ours = _assert_shared(model, converted)
    images, targets = _images(), _targets()

    model.eval()
    converted.eval()
    with torch.no_grad():
        expected = _seeded(1, lambda: model(images))
        actual = _seeded(1, lambda: converted(images))
    _assert_detections_close(actual, expected)

    model.train()
    converted.train()
    expected_losses = _seeded(2, lambda: model(images, targets))
    actual_losses = _seeded(2, lambda: converted(images, targets))
    assert actual_losses.keys() == expected_losses.keys()
    for name in expected_losses:
        torch.testing.assert_close(actual_losses[name], expected_losses[name], rtol=1e-4, atol=1e-6)
    sum(expected_losses.values()).backward()
    sum(actual_losses.values()).backward()
    tv_params = dict(model.backbone.fpn.named_parameters())
    for name, p in ours.named_parameters():
        expected_grad = tv_params[name].grad
        assert expected_grad is not None and torch.count_nonzero(expected_grad) > 0, name
        torch.testing.assert_close(p.grad, expected_grad, rtol=1e-3, atol=1e-3 * expected_grad.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_retinanet_keeps_p6p7_extra_block():
    model = detection.retinanet_resnet50_fpn(num_classes=5, **SMALL).eval()
    model.score_thresh = 0.005  # the randomly initialised head scores around 0.01
    converted = copy.deepcopy(model)
    p6p7 = converted.backbone.fpn.extra_blocks
    assert isinstance(p6p7, LastLevelP6P7)
    fpn_fast.convert(converted)
    ours = _assert_shared(model, converted)
    assert ours.extra_blocks is p6p7
    images = _images(n=1, size=(131, 170))
    with torch.no_grad():
        body = model.backbone.body(torch.randn(1, 3, 160, 208))
        expected_features = model.backbone.fpn(body)
        actual_features = ours(body)
        assert list(actual_features) == ["0", "1", "2", "p6", "p7"]
        for name, value in expected_features.items():
            torch.testing.assert_close(actual_features[name], value, rtol=1e-5,
                                       atol=1e-5 * value.abs().max().item())
        expected = model(images)
        actual = converted(images)
    _assert_detections_close(actual, expected)
