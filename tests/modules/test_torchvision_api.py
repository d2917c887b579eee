"""Drop-in completeness against torchvision's backbone API: ResNeXt / Wide ResNet bodies, its calling
conventions, FrozenBatchNorm2d with its overwrite_eps (the COCO checkpoint recipe), extra blocks in
its FPN, and the behaviours its own backbone tests check."""
import inspect
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

import fpn_fast

torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection import FasterRCNN  # noqa: E402
from torchvision.models.detection._utils import overwrite_eps  # noqa: E402
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone as tv_resnet_fpn_backbone  # noqa: E402
from torchvision.ops import FeaturePyramidNetwork as TvFPN  # noqa: E402
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock as TvExtraFPNBlock  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool as TvLastLevelMaxPool  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d as TvFrozenBatchNorm2d  # noqa: E402

from tests.integration.test_detection import _seeded  # noqa: E402
from tests._models import IN_CHANNELS, assert_levels_close, random_features, randomise_  # noqa: E402
from tests.modules.test_modules import _counting  # noqa: E402

NEW_BODIES = ["resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d", "wide_resnet50_2", "wide_resnet101_2"]
# (inner width of layer1's bottlenecks, groups of their 3x3 conv), as torchvision lays them out.
LAYER1_CONV2 = {"resnext50_32x4d": (128, 32), "resnext101_32x8d": (256, 32), "resnext101_64x4d": (256, 64),
                "wide_resnet50_2": (128, 1), "wide_resnet101_2": (128, 1)}

POSITIONAL_WARNING = r"Using 'backbone_name'.* as positional parameter\(s\) is deprecated"
PRETRAINED_WARNING = r"The parameter 'pretrained' is deprecated"
WEIGHTS_WARNING = r"Arguments other than .* for 'weights' are deprecated.*equivalent to passing `weights=None`"


def _frozen_flags(model):
    return {name: p.requires_grad for name, p in model.named_parameters()}


# --- ResNeXt and Wide ResNet bodies -------------------------------------------------------------------

@pytest.mark.parametrize("backbone_name", [
    "resnext50_32x4d", "wide_resnet50_2",
    pytest.param("resnext101_32x8d", marks=pytest.mark.slow),
    pytest.param("resnext101_64x4d", marks=pytest.mark.slow),
    pytest.param("wide_resnet101_2", marks=pytest.mark.slow),
])
def test_new_bodies_load_both_ways_and_match_torchvision(backbone_name, monkeypatch):
    tv = randomise_(tv_resnet_fpn_backbone(backbone_name=backbone_name, weights=None)).eval()
    ours = fpn_fast.resnet_fpn_backbone(backbone_name=backbone_name).eval()
    width, groups = LAYER1_CONV2[backbone_name]
    conv2 = ours.body.layer1[0].conv2
    assert (conv2.in_channels, conv2.out_channels, conv2.groups) == (width, width, groups)
    assert ours.fpn.in_channels_list == [256, 512, 1024, 2048]
    assert list(ours.state_dict()) == list(tv.state_dict())
    assert _frozen_flags(ours) == _frozen_flags(tv)

    x = torch.randn(2, 3, 67, 93)
    calls = _counting(monkeypatch)
    ours.load_state_dict(tv.state_dict(), strict=True)
    with torch.no_grad():
        expected = tv(x)
        assert_levels_close(ours(x), expected)
        # The body is torchvision's arithmetic (grouped convs included): identical, not merely close.
        for name, value in tv.body(x).items():
            torch.testing.assert_close(ours.body(x)[name], value, rtol=0, atol=0)
    # The fused in-place top-down step ran once for each of the 3 finer levels.
    assert calls == {"upsample_add": 0, "upsample_add_": 3}

    # The other way: our state_dict, with new values in the FPN and a stage, loads strictly into
    # torchvision's backbone.
    randomise_(ours.fpn)
    randomise_(ours.body.layer2)
    tv.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(tv.state_dict()[key], value), key
    with torch.no_grad():
        assert_levels_close(ours(x), tv(x))


def test_grouped_body_in_inference_mode():
    tv = randomise_(tv_resnet_fpn_backbone(backbone_name="resnext50_32x4d", weights=None)).eval()
    ours = fpn_fast.resnet_fpn_backbone(backbone_name="resnext50_32x4d").eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        expected = tv(x)
        actual = fpn_fast.optimize_for_inference(ours)(x)
    # Norm folding changes rounding (README: held to 1e-4 of each level's largest value).
    for name, value in expected.items():
        torch.testing.assert_close(actual[name], value, rtol=0, atol=1e-4 * value.abs().max().item(),
                                   msg=lambda m, name=name: f"level {name}: {m}")


def test_unknown_and_misshapen_bodies_raise():
    with pytest.raises(ValueError, match=r"unsupported backbone_name 'resnext50'.*'resnext50_32x4d'"):
        fpn_fast.resnet_fpn_backbone(backbone_name="resnext50")
    with pytest.raises(ValueError, match="unsupported backbone_name"):
        fpn_fast.resnet_fpn_backbone(backbone_name=["resnet18"])
    with pytest.raises(ValueError, match="BasicBlock only supports groups=1 and base_width=64"):
        fpn_fast.ResNet(fpn_fast.resnet.BasicBlock, [2, 2, 2, 2], groups=32, width_per_group=4)
    with pytest.raises(ValueError, match="groups must be a positive integer, got 0"):
        fpn_fast.ResNet(fpn_fast.resnet.Bottleneck, [3, 4, 6, 3], groups=0)
    with pytest.raises(ValueError, match="width_per_group must be a positive integer, got 4.0"):
        fpn_fast.ResNet(fpn_fast.resnet.Bottleneck, [3, 4, 6, 3], width_per_group=4.0)


# --- torchvision's calling conventions ----------------------------------------------------------------

def test_signature_is_torchvisions():
    ours = inspect.signature(fpn_fast.resnet_fpn_backbone).parameters
    theirs = inspect.signature(tv_resnet_fpn_backbone).parameters
    assert list(ours) == list(theirs)
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours.values())


def test_positional_arguments_warn_and_build_what_torchvision_builds():
    with pytest.warns(UserWarning, match=POSITIONAL_WARNING):
        tv = tv_resnet_fpn_backbone("resnet18", weights=None, trainable_layers=2)
    with pytest.warns(UserWarning, match=POSITIONAL_WARNING):
        ours = fpn_fast.resnet_fpn_backbone("resnet18", weights=None, trainable_layers=2)
    assert list(ours.state_dict()) == list(tv.state_dict())
    assert _frozen_flags(ours) == _frozen_flags(tv)

    # Every parameter positionally, in the signature's order.
    args = ("resnet18", None, nn.BatchNorm2d, 4, [2, 4], None)
    with pytest.warns(UserWarning, match=POSITIONAL_WARNING):
        tv = tv_resnet_fpn_backbone(*args)
    with pytest.warns(UserWarning, match=POSITIONAL_WARNING):
        ours = fpn_fast.resnet_fpn_backbone(*args)
    assert isinstance(ours.body.bn1, nn.BatchNorm2d)
    assert ours.fpn.in_channels_list == [128, 512]
    assert list(ours.state_dict()) == list(tv.state_dict())
    assert _frozen_flags(ours) == _frozen_flags(tv)

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # keywords only: no warning
        fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=None)


def test_legacy_pretrained_false_means_no_weights_as_in_torchvision():
    for build in (tv_resnet_fpn_backbone, fpn_fast.resnet_fpn_backbone):
        with pytest.warns(UserWarning, match=PRETRAINED_WARNING), pytest.warns(UserWarning, match=WEIGHTS_WARNING):
            model = build(backbone_name="resnet18", pretrained=False, trainable_layers=1)
        assert [name for name, flag in _frozen_flags(model).items() if flag][0] == "body.layer4.0.conv1.weight"
        # A positional bool lands in `weights` and means the same (torchvision's own tests call it so).
        with pytest.warns(UserWarning, match=POSITIONAL_WARNING), pytest.warns(UserWarning, match=WEIGHTS_WARNING):
            build("resnet18", False)
    with pytest.warns(UserWarning, match=WEIGHTS_WARNING):
        fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=False)
    with pytest.warns(UserWarning, match=PRETRAINED_WARNING), pytest.warns(UserWarning, match=WEIGHTS_WARNING):
        fpn_fast.resnet50_fpn_backbone(pretrained=False)


def test_legacy_pretrained_true_is_refused_with_the_way_to_load_weights():
    # torchvision would download ImageNet weights; fpn_fast never downloads.
    message = r"pretrained=True.*'wide_resnet50_2'.*never downloads.*get_model_weights\('wide_resnet50_2'\)"
    with pytest.warns(UserWarning, match=PRETRAINED_WARNING), pytest.raises(ValueError, match=message):
        fpn_fast.resnet_fpn_backbone(backbone_name="wide_resnet50_2", pretrained=True)
    with pytest.raises(ValueError, match=message):
        fpn_fast.resnet_fpn_backbone(backbone_name="wide_resnet50_2", weights=True)
    with pytest.warns(UserWarning, match=POSITIONAL_WARNING), pytest.raises(ValueError, match=message):
        fpn_fast.resnet_fpn_backbone("wide_resnet50_2", True)


def test_calling_mistakes_raise_clear_errors():
    with pytest.raises(TypeError, match=r"got both 'weights' and the deprecated 'pretrained'"):
        fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=None, pretrained=False)
    with pytest.raises(TypeError, match=r"takes at most 6 positional arguments .* but 7 were given"):
        fpn_fast.resnet_fpn_backbone("resnet18", None, None, 3, None, None, "extra")
    with pytest.raises(TypeError, match=r"multiple values for argument\(s\) \['backbone_name'\]"):
        fpn_fast.resnet_fpn_backbone("resnet18", backbone_name="resnet50")
    with pytest.raises(TypeError, match="unexpected keyword argument 'pretrained_backbone'"):
        fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", pretrained_backbone=False)
    with pytest.raises(TypeError, match="trainable_layers must be an int in \\[0,5\\], got '3'"):
        fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", trainable_layers="3")


# --- what torchvision's own backbone tests check ------------------------------------------------------

# Frozen parameters of the resnet50 body (norms are frozen buffers): conv1, then 10/13/19/10 convs in
# layer1..layer4 (3 per bottleneck + 1 downsample), frozen from conv1 on.
@pytest.mark.parametrize("trainable_layers, frozen", [(0, 53), (1, 43), (2, 24), (3, 11), (4, 1), (5, 0)])
def test_resnet50_frozen_parameter_counts(trainable_layers, frozen):
    ours = fpn_fast.resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=trainable_layers)
    tv = tv_resnet_fpn_backbone(backbone_name="resnet50", weights=None, trainable_layers=trainable_layers)
    flags = list(_frozen_flags(ours).values())
    assert flags.count(False) == frozen
    assert not any(flags[:frozen]) and all(flags[frozen:])
    assert _frozen_flags(ours) == _frozen_flags(tv)


def test_resnet_fpn_backbone_as_torchvision_tests_it():
    x = torch.rand(1, 3, 96, 96)
    for name in ("resnet18", "resnet50"):
        with torch.no_grad():
            assert list(fpn_fast.resnet_fpn_backbone(backbone_name=name, weights=None)(x)) == [
                "0", "1", "2", "3", "pool"]
        with pytest.raises(ValueError, match=r"Trainable layers should be in the range \[0,5\], got 6"):
            fpn_fast.resnet_fpn_backbone(backbone_name=name, weights=None, trainable_layers=6)
        for bad in ([0, 1, 2, 3], [2, 3, 4, 5]):
            with pytest.warns(UserWarning), pytest.raises(
                    ValueError, match=r"Each returned layer should be in the range \[1,4\]. Got"):
                fpn_fast.resnet_fpn_backbone(name, False, returned_layers=bad)


@pytest.mark.parametrize("returned_layers", [[1], [4], [1, 3], [2, 4], [1, 2, 4]])
def test_returned_layers_subsets_match_torchvision(returned_layers):
    tv = randomise_(tv_resnet_fpn_backbone(backbone_name="resnet18", weights=None,
                                           returned_layers=returned_layers)).eval()
    ours = fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", returned_layers=returned_layers).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    assert ours.fpn.in_channels_list == [64 * 2 ** (k - 1) for k in returned_layers]
    x = torch.randn(1, 3, 83, 61)
    with torch.no_grad():
        actual = ours(x)
        assert list(actual) == [str(i) for i in range(len(returned_layers))] + ["pool"]
        assert_levels_close(actual, tv(x))


@pytest.mark.parametrize("returned_layers, error, message", [
    ([0, 1], ValueError, r"range \[1,4\]. Got \[0, 1\]"),
    ([3, 5], ValueError, r"range \[1,4\]. Got \[3, 5\]"),
    ([4, 2], ValueError, r"increasing without repeats, got \[4, 2\]"),
    ([2, 2], ValueError, r"increasing without repeats, got \[2, 2\]"),
    ([], TypeError, r"non-empty list of ints in \[1,4\], got \[\]"),
    ([1.0, 2], TypeError, r"non-empty list of ints in \[1,4\], got \[1.0, 2\]"),
    (3, TypeError, r"non-empty list of ints in \[1,4\], got 3"),
])
def test_bad_returned_layers_raise(returned_layers, error, message):
    with pytest.raises(error, match=message):
        fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", returned_layers=returned_layers)


# --- FrozenBatchNorm2d and the COCO checkpoint recipe ---------------------------------------------------

@pytest.mark.parametrize("eps", [1e-5, 1e-3, 0.0])
def test_frozen_batchnorm_repr_state_dict_and_eps(eps):
    state = randomise_(nn.BatchNorm2d(32, eps=eps)).state_dict()
    assert "num_batches_tracked" in state
    ours, tv = fpn_fast.FrozenBatchNorm2d(32, eps=eps), TvFrozenBatchNorm2d(32, eps=eps)
    ours.load_state_dict(state, strict=True)
    tv.load_state_dict(state, strict=True)
    assert repr(ours) == repr(tv) == f"FrozenBatchNorm2d(32, eps={eps})"
    assert list(ours.state_dict()) == list(tv.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert list(ours.parameters()) == []
    x = torch.randn(4, 32, 7, 9)
    torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=0)
    # nn.BatchNorm2d's eval forward, written out in float64: torch < 2.12 refuses eps=0 there.
    mean, var, weight, bias = (state[k].double().view(1, -1, 1, 1)
                               for k in ("running_mean", "running_var", "weight", "bias"))
    expected = ((x.double() - mean) / (var + eps).sqrt() * weight + bias).float()
    torch.testing.assert_close(ours(x), expected, rtol=1e-5, atol=1e-6)
    if eps > 0:
        bn = nn.BatchNorm2d(32, eps=eps).eval()
        bn.load_state_dict(state)
        torch.testing.assert_close(ours(x), bn(x), rtol=1e-5, atol=1e-6)


def test_frozen_batchnorm_is_torchvisions_for_overwrite_eps():
    assert fpn_fast.FrozenBatchNorm2d(8).eps == TvFrozenBatchNorm2d(8).eps == nn.BatchNorm2d(8).eps
    backbone = fpn_fast.resnet_fpn_backbone(backbone_name="resnet18")
    assert "(bn1): FrozenBatchNorm2d(64, eps=1e-05)" in repr(backbone.body)
    norms = [m for m in backbone.modules() if isinstance(m, fpn_fast.FrozenBatchNorm2d)]
    assert len(norms) == 20 and all(isinstance(m, TvFrozenBatchNorm2d) for m in norms)
    overwrite_eps(backbone, 0.0)
    assert all(m.eps == 0.0 for m in norms)
    assert "(bn1): FrozenBatchNorm2d(64, eps=0.0)" in repr(backbone.body)


def damp_residual_ends_(model, factor=0.2):
    """Scale the norm weights where a bottleneck's residual branch or shortcut ends by ``factor``
    (trained ResNets have small gains there). With random weights at full gain the activations grow
    about 10^4-fold over a ResNet-50 body, and a detector on top finds no box."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if name.endswith(("bn3", "downsample.1")):
                m.weight.mul_(factor)
    return model


def _coco_like_norms_(model):
    """Norm statistics as in trained detection checkpoints: small variances (1e-4..1e-2), where
    eps=1e-5 instead of 0 changes a channel's scale by up to 5%; weights such that each norm scales
    by 0.5..1.5 (0.1..0.3 at residual ends); random biases and means."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, TvFrozenBatchNorm2d):
                m.running_var.copy_(10 ** torch.empty_like(m.running_var).uniform_(-4, -2))
                m.weight.copy_(m.running_var.sqrt() * torch.empty_like(m.weight).uniform_(0.5, 1.5))
                m.bias.normal_(0.0, 0.1)
                m.running_mean.normal_(0.0, 0.1)
    return damp_residual_ends_(model)


FAST_RCNN = dict(min_size=128, max_size=160, rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
                 box_detections_per_img=20)


def test_coco_checkpoint_recipe_gives_torchvisions_detections():
    # A torchvision Faster R-CNN as its builder makes it for the COCO_V1 checkpoint (frozen norms in
    # a resnet50 FPN body, eps set to 0 by overwrite_eps), with random weights and norm statistics.
    tv = FasterRCNN(tv_resnet_fpn_backbone(backbone_name="resnet50", weights=None), num_classes=5, **FAST_RCNN)
    _coco_like_norms_(randomise_(tv))
    overwrite_eps(tv, 0.0)
    checkpoint = tv.state_dict()
    tv.eval()

    # The same recipe on fpn_fast's backbone: build, load the checkpoint, overwrite_eps.
    ours = FasterRCNN(fpn_fast.resnet_fpn_backbone(backbone_name="resnet50", weights=None), num_classes=5,
                      **FAST_RCNN).eval()
    ours.load_state_dict(checkpoint, strict=True)
    images = [torch.rand(3, 120, 150), torch.rand(3, 131, 117)]
    x = torch.rand(1, 3, 128, 160)
    with torch.no_grad():
        expected_features = tv.backbone(x)
        stale = ours.backbone(x)  # still eps=1e-5: visibly different features
        assert max(((stale[k] - v).abs().max() / v.abs().max()).item() for k, v in expected_features.items()) > 1e-3

        overwrite_eps(ours, 0.0)
        norms = [m for m in ours.modules() if isinstance(m, fpn_fast.FrozenBatchNorm2d)]
        assert len(norms) == 53 and all(m.eps == 0.0 for m in norms)
        assert_levels_close(ours.backbone(x), expected_features)
        expected = _seeded(1, lambda: tv(images))
        actual = _seeded(1, lambda: ours(images))
    assert [len(d["boxes"]) for d in expected] == [20, 20]
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a["boxes"], e["boxes"], rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(a["scores"], e["scores"], rtol=1e-4, atol=1e-5)
        assert torch.equal(a["labels"], e["labels"])


# --- our extra blocks in torchvision's FPN --------------------------------------------------------------

def test_torchvision_fpn_accepts_our_extra_blocks():
    assert issubclass(fpn_fast.LastLevelMaxPool, TvExtraFPNBlock)
    tv = randomise_(TvFPN(IN_CHANNELS, 16, extra_blocks=TvLastLevelMaxPool())).eval()
    with_ours = TvFPN(IN_CHANNELS, 16, extra_blocks=fpn_fast.LastLevelMaxPool()).eval()
    with_ours.load_state_dict(tv.state_dict(), strict=True)
    x = random_features()
    with torch.no_grad():
        expected, actual = tv(x), with_ours(x)
    assert list(actual) == ["feat0", "feat1", "feat2", "feat3", "pool"]
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)

    # Through torchvision's builder too, and our FPN keeps accepting torchvision's blocks.
    backbone = tv_resnet_fpn_backbone(backbone_name="resnet18", weights=None, extra_blocks=fpn_fast.LastLevelMaxPool())
    with torch.no_grad():
        assert backbone(torch.rand(1, 3, 64, 64))["pool"].shape == (1, 256, 1, 1)
    assert isinstance(fpn_fast.FeaturePyramidNetwork([8], 4, extra_blocks=TvLastLevelMaxPool()).extra_blocks,
                      TvLastLevelMaxPool)


def test_torchvision_stays_optional():
    # In a fresh interpreter where torchvision cannot be imported, the bases are plain nn.Module and
    # the backbone still builds and runs.
    script = """
import sys
sys.modules["torchvision"] = None
import torch
from torch import nn
import fpn_fast
assert fpn_fast.FrozenBatchNorm2d.__bases__ == (nn.Module,), fpn_fast.FrozenBatchNorm2d.__bases__
assert fpn_fast.ExtraFPNBlock.__bases__ == (nn.Module,), fpn_fast.ExtraFPNBlock.__bases__
model = fpn_fast.resnet_fpn_backbone(backbone_name="resnet18").eval()
assert repr(model.body.bn1) == "FrozenBatchNorm2d(64, eps=1e-05)", repr(model.body.bn1)
with torch.no_grad():
    out = model(torch.rand(1, 3, 64, 64))
assert list(out) == ["0", "1", "2", "3", "pool"], list(out)
assert "torchvision" not in {name.split(".")[0] for name, m in sys.modules.items() if m is not None}
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
