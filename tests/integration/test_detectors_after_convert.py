"""Every ResNet-FPN detector torchvision builds, after fpn_fast.convert, trains and evaluates as
torchvision's own with the same (random) weights and norm statistics, also on negative samples
(images without any object)."""
import copy

import pytest
import torch

import fpn_fast

torchvision = pytest.importorskip("torchvision")
from torchvision.models import detection  # noqa: E402

from tests.integration.test_detection import _seeded  # noqa: E402
from tests._models import randomise_  # noqa: E402
from tests.modules.test_torchvision_api import damp_residual_ends_  # noqa: E402

pytestmark = pytest.mark.slow

SMALL = dict(weights=None, weights_backbone=None, num_classes=3, min_size=48, max_size=64)
# Few proposals and detections: the v2 box heads and the mask / keypoint heads run convolutions per region.
RCNN = dict(rpn_pre_nms_top_n_train=50, rpn_post_nms_top_n_train=20, rpn_pre_nms_top_n_test=50,
            rpn_post_nms_top_n_test=10, box_batch_size_per_image=16, box_detections_per_img=3)
DENSE = dict(topk_candidates=50, detections_per_img=3)

# builder -> (its speed-up keyword arguments, the extra target field it trains on, the losses that
# must be exactly zero when an image has no object: nothing to regress, no mask, no keypoints).
DETECTORS = {
    "fasterrcnn_resnet50_fpn": (RCNN, None, ("loss_box_reg", "loss_rpn_box_reg")),
    "fasterrcnn_resnet50_fpn_v2": (RCNN, None, ("loss_box_reg", "loss_rpn_box_reg")),
    "maskrcnn_resnet50_fpn": (RCNN, "masks", ("loss_box_reg", "loss_rpn_box_reg", "loss_mask")),
    "maskrcnn_resnet50_fpn_v2": (RCNN, "masks", ("loss_box_reg", "loss_rpn_box_reg", "loss_mask")),
    "keypointrcnn_resnet50_fpn": (RCNN, "keypoints", ("loss_box_reg", "loss_rpn_box_reg", "loss_keypoint")),
    "retinanet_resnet50_fpn": (DENSE, None, ("bbox_regression",)),
    "retinanet_resnet50_fpn_v2": (DENSE, None, ("bbox_regression",)),
    "fcos_resnet50_fpn": (DENSE, None, ("bbox_regression", "bbox_ctrness")),
}
IMAGE_SIZES = [(60, 80), (71, 57)]
NUM_KEYPOINTS = 17


def test_every_resnet_fpn_detector_is_covered():
    builders = {name for name in dir(detection) if "resnet" in name and name.endswith(("_fpn", "_fpn_v2"))}
    assert builders == set(DETECTORS)


def _targets(field, empty):
    targets = []
    for h, w in IMAGE_SIZES:
        boxes = torch.zeros(0, 4) if empty else torch.tensor([[5.0, 8.0, 40.0, 50.0], [20.0, 15.0, 55.0, 58.0]])
        target = {"boxes": boxes, "labels": torch.randint(1, SMALL["num_classes"], (len(boxes),))}
        if field == "masks":
            target["masks"] = torch.zeros(len(boxes), h, w, dtype=torch.uint8)
            for mask, (x0, y0, x1, y1) in zip(target["masks"], boxes.int().tolist()):
                mask[y0:y1, x0:x1] = 1
        elif field == "keypoints":
            points = torch.rand(len(boxes), NUM_KEYPOINTS, 2)
            points = boxes[:, None, :2] + points * (boxes[:, None, 2:] - boxes[:, None, :2])
            target["keypoints"] = torch.cat([points, torch.ones(len(boxes), NUM_KEYPOINTS, 1)], dim=2)
        targets.append(target)
    return targets


def _assert_outputs_close(actual, expected):
    """Detections (eval) or losses (train) of the converted model against torchvision's, to float
    rounding relative to each output's largest magnitude (the FPN adds its lateral bias after the
    1x1 conv instead of inside it; a keypoint score is a heatmap maximum, which carries that
    rounding, amplified a little, to the output)."""
    if isinstance(expected, dict):  # losses
        assert actual.keys() == expected.keys()
        for name, value in expected.items():
            torch.testing.assert_close(actual[name], value, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
        return
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.keys() == e.keys()
        assert len(e["boxes"]) > 0
        assert torch.equal(a["labels"], e["labels"])
        for key, value in e.items():
            if key != "labels":
                torch.testing.assert_close(a[key], value, rtol=1e-4, atol=1e-4 * value.abs().max().item(),
                                           msg=lambda m, k=key: f"{k}: {m}")


def _fpn_grads(model):
    return {name: p.grad.double() for name, p in model.backbone.fpn.named_parameters()}


def _in_double(targets):
    # torchvision wants float32 keypoints whatever the model's dtype.
    return [{k: v.double() if v.is_floating_point() and k != "keypoints" else v for k, v in t.items()}
            for t in targets]


def _fpn_and_heads_in_double(model):
    """A copy of model whose FPN and heads compute in float64 on its body's float32 features (the
    body is torchvision's in both models, so only what follows it matters)."""
    model = copy.deepcopy(model).double()
    model.backbone.body.float()
    model.backbone.body.register_forward_hook(lambda module, args, out: {k: v.double() for k, v in out.items()})
    return model


@pytest.mark.parametrize("name", list(DETECTORS))
def test_detector_after_convert_trains_and_evaluates_like_torchvision(name):
    speed, field, zero_losses = DETECTORS[name]
    model = damp_residual_ends_(randomise_(getattr(detection, name)(**SMALL, **speed)))
    # The body stays torchvision's after convert: frozen here, so backward runs through FPN and heads only.
    model.backbone.body.requires_grad_(False)
    converted = fpn_fast.convert(copy.deepcopy(model))
    ours = converted.backbone.fpn
    assert isinstance(ours, fpn_fast.FeaturePyramidNetwork)
    assert not isinstance(model.backbone.fpn, fpn_fast.FeaturePyramidNetwork)
    images = [torch.rand(3, h, w) for h, w in IMAGE_SIZES]

    model.eval()
    converted.eval()
    with torch.no_grad():
        _assert_outputs_close(_seeded(1, lambda: converted(images)), _seeded(1, lambda: model(images)))

    # Training: same losses; FPN gradients as accurate as torchvision's own. Random heads make
    # torchvision's float32 gradients differ from a float64 run by up to a few percent of their
    # largest value (GroupNorm heads cancel a lot), so both are judged against that run: ours may
    # differ from it by a small multiple of torchvision's error (both are float32 roundings of the
    # same sums, ours rounds the lateral bias separately), a wrong gradient by orders more.
    truth = _fpn_and_heads_in_double(model)
    for m in (model, converted, truth):
        m.train()
    targets = _targets(field, empty=False)
    expected = _seeded(2, lambda: model(images, targets))
    actual = _seeded(2, lambda: converted(images, targets))
    _assert_outputs_close(actual, expected)
    sum(expected.values()).backward()
    sum(actual.values()).backward()
    sum(_seeded(2, lambda: truth(images, _in_double(targets))).values()).backward()
    tv_grads, ours_grads = _fpn_grads(model), _fpn_grads(converted)
    assert list(ours_grads) == list(tv_grads)
    for param_name, exact in _fpn_grads(truth).items():
        assert torch.count_nonzero(exact) > 0, param_name
        tv_error = (tv_grads[param_name] - exact).abs().max().item()
        ours_error = (ours_grads[param_name] - exact).abs().max().item()
        assert ours_error <= 4 * tv_error + 1e-5 * exact.abs().max().item(), (param_name, ours_error, tv_error)

    # A negative sample (an image without objects) trains too, with nothing to regress.
    empty = _targets(field, empty=True)[:1]
    expected = _seeded(3, lambda: model(images[:1], empty))
    actual = _seeded(3, lambda: converted(images[:1], empty))
    _assert_outputs_close(actual, expected)
    for loss in zero_losses:
        assert actual[loss].item() == 0.0, loss
    assert all(torch.isfinite(value) for value in actual.values())
    sum(actual.values()).backward()
