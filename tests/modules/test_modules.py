"""Module-level parity of fpn_fast's ResNet-FPN backbone with torchvision's."""
import copy
from collections import OrderedDict

import pytest
import torch
from torch import nn

import fpn_fast
from fpn_fast import ops

torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone as tv_resnet_fpn_backbone  # noqa: E402
from torchvision.ops import FeaturePyramidNetwork as TvFPN  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool as TvLastLevelMaxPool  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d as TvFrozenBatchNorm2d  # noqa: E402

from tests._models import IN_CHANNELS, ODD_SIZES, assert_levels_close, random_features, randomise_  # noqa: E402,F401


def tv_and_ours_fpn(out_channels=16, norm_layer=None):
    tv = randomise_(TvFPN(IN_CHANNELS, out_channels, extra_blocks=TvLastLevelMaxPool(), norm_layer=norm_layer))
    ours = fpn_fast.FeaturePyramidNetwork(IN_CHANNELS, out_channels, extra_blocks=fpn_fast.LastLevelMaxPool(),
                                          norm_layer=norm_layer)
    ours.load_state_dict(tv.state_dict(), strict=True)
    return tv.eval(), ours.eval()


# --- whole backbone -------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone_name", ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"])
def test_state_dict_keys_match_torchvision(backbone_name):
    tv = tv_resnet_fpn_backbone(backbone_name=backbone_name, weights=None)
    ours = fpn_fast.resnet_fpn_backbone(backbone_name=backbone_name)
    tv_sd, our_sd = tv.state_dict(), ours.state_dict()
    assert list(our_sd) == list(tv_sd)
    assert all(our_sd[k].shape == tv_sd[k].shape for k in tv_sd)
    assert "body.layer1.0.conv1.weight" in our_sd and not any(k.startswith("body.fc") for k in our_sd)
    assert ours.out_channels == tv.out_channels == 256


@pytest.mark.parametrize("backbone_name", ["resnet18", "resnet50"])
def test_backbone_output_parity(backbone_name):
    tv = randomise_(tv_resnet_fpn_backbone(backbone_name=backbone_name, weights=None)).eval()
    ours = fpn_fast.resnet_fpn_backbone(backbone_name=backbone_name).eval()
    ours.load_state_dict(tv.state_dict(), strict=True)
    x = torch.randn(1, 3, 227, 341)
    with torch.no_grad():
        expected = tv(x)
        actual = ours(x)
        # The body is the same arithmetic as torchvision's: identical, not merely close.
        for name, value in tv.body(x).items():
            torch.testing.assert_close(ours.body(x)[name], value, rtol=0, atol=0)
    assert list(actual) == ["0", "1", "2", "3", "pool"]
    assert_levels_close(actual, expected)
    # Grad mode (out-of-place path) gives the same pyramid.
    assert_levels_close(ours(x), expected)


def test_state_dict_loads_into_torchvision():
    ours = randomise_(fpn_fast.resnet_fpn_backbone(backbone_name="resnet18"))
    tv = tv_resnet_fpn_backbone(backbone_name="resnet18", weights=None)
    tv.load_state_dict(ours.state_dict(), strict=True)
    for key, value in ours.state_dict().items():
        assert torch.equal(tv.state_dict()[key], value), key
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        assert_levels_close(ours.eval()(x), tv.eval()(x))


@pytest.mark.parametrize("norm_layer", [None, nn.BatchNorm2d])
def test_trainable_layers_freeze_like_torchvision(norm_layer):
    for trainable_layers in range(6):
        tv = tv_resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=trainable_layers,
                                    **({} if norm_layer is None else {"norm_layer": norm_layer}))
        ours = fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", trainable_layers=trainable_layers,
                                            norm_layer=norm_layer)
        expected = {name: p.requires_grad for name, p in tv.named_parameters()}
        actual = {name: p.requires_grad for name, p in ours.named_parameters()}
        assert actual == expected, trainable_layers
        assert all(actual.values()) == (trainable_layers == 5)
        assert actual["body.conv1.weight"] == (trainable_layers == 5)
    for bad in (-1, 6):
        with pytest.raises(ValueError, match=r"range \[0,5\]"):
            fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", trainable_layers=bad)


def test_returned_layers_parity():
    tv = randomise_(tv_resnet_fpn_backbone(backbone_name="resnet18", weights=None, returned_layers=[2, 3, 4]))
    ours = fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", returned_layers=[2, 3, 4])
    ours.load_state_dict(tv.state_dict(), strict=True)
    assert ours.fpn.in_channels_list == [128, 256, 512]
    x = torch.randn(2, 3, 101, 75)
    with torch.no_grad():
        actual, expected = ours.eval()(x), tv.eval()(x)
    assert list(actual) == ["0", "1", "2", "pool"]
    assert_levels_close(actual, expected)
    with pytest.raises(ValueError, match=r"range \[1,4\]"):
        fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", returned_layers=[0, 1])


def test_resnet50_fpn_backbone_and_unknown_name():
    model = fpn_fast.resnet50_fpn_backbone(trainable_layers=2)
    assert model.fpn.in_channels_list == [256, 512, 1024, 2048]
    assert model.body.layer3[0].conv1.weight.requires_grad and not model.body.layer2[0].conv1.weight.requires_grad
    with pytest.raises(ValueError, match="resnet51"):
        fpn_fast.resnet_fpn_backbone(backbone_name="resnet51")


# --- FPN alone --------------------------------------------------------------------------------------

@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("grad_mode", [False, True])
def test_fpn_parity_odd_sizes(channels_last, grad_mode, backend):
    tv, ours = tv_and_ours_fpn()
    x = random_features(channels_last=channels_last)
    with torch.set_grad_enabled(grad_mode):
        expected = tv(OrderedDict(x))
        actual = ours(OrderedDict(x))
    assert list(actual) == ["feat0", "feat1", "feat2", "feat3", "pool"]
    assert_levels_close(actual, expected)
    assert actual["pool"].shape[-2:] == (2, 3)


@pytest.mark.parametrize("sizes", [[(1, 1), (1, 1), (1, 1), (1, 1)], [(9, 4), (5, 7), (6, 2), (1, 3)]])
def test_fpn_parity_degenerate_and_top_larger(sizes, backend):
    tv, ours = tv_and_ours_fpn()
    x = random_features(sizes=sizes, batch=1)
    with torch.no_grad():
        assert_levels_close(ours(x), tv(x))


@pytest.mark.parametrize("grad_mode", [False, True])
def test_fpn_under_autocast_as_accurate_as_torchvision(grad_mode, backend):
    # Under autocast the lateral conv runs in bfloat16 while conv.bias stays float32. Judge the
    # low-precision result as DESIGN.md says: its error against a float64 run must be no worse
    # than torchvision's own error under the same autocast (with 2x headroom for rounding luck).
    tv, ours = tv_and_ours_fpn()
    x = random_features()
    truth = copy.deepcopy(tv).double()(OrderedDict((k, v.double()) for k, v in x.items()))
    with torch.set_grad_enabled(grad_mode), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = tv(OrderedDict(x))
        actual = ours(OrderedDict(x))
    for name in truth:
        assert actual[name].dtype == expected[name].dtype, name
        ours_err = (actual[name].double() - truth[name]).abs().max().item()
        tv_err = (expected[name].double() - truth[name]).abs().max().item()
        assert ours_err <= 2 * tv_err + 1e-6, (name, ours_err, tv_err)


def test_fpn_with_norm_layer_parity(backend):
    tv, ours = tv_and_ours_fpn(norm_layer=nn.BatchNorm2d)
    assert list(ours.state_dict()) == list(tv.state_dict())
    assert ours.inner_blocks[0][0].bias is None
    x = random_features()
    with torch.no_grad():
        assert_levels_close(ours(x), tv(x))
    assert_levels_close(ours(x), tv(x))


def test_fpn_gradients_match_torchvision(backend):
    tv, ours = tv_and_ours_fpn()
    tv.train()
    ours.train()
    x_tv = random_features(requires_grad=True)
    x_ours = OrderedDict((k, v.detach().clone().requires_grad_()) for k, v in x_tv.items())
    out_tv, out_ours = tv(x_tv), ours(x_ours)
    upstream = {k: torch.randn_like(v) for k, v in out_tv.items()}
    sum((out_tv[k] * g).sum() for k, g in upstream.items()).backward()
    sum((out_ours[k] * g).sum() for k, g in upstream.items()).backward()
    tv_params = dict(tv.named_parameters())
    for name, p in ours.named_parameters():
        expected = tv_params[name].grad
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item(),
                                   msg=lambda m, name=name: f"{name}: {m}")
    for k in x_tv:
        expected = x_tv[k].grad
        torch.testing.assert_close(x_ours[k].grad, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def _counting(monkeypatch):
    """Count the FPN's op calls (it calls the names it imported from fpn_fast.ops)."""
    import fpn_fast.fpn as fpn_module
    calls = {"upsample_add": 0, "upsample_add_": 0}
    for name in calls:
        original = getattr(fpn_module, name)

        def wrapper(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)
        monkeypatch.setattr(fpn_module, name, wrapper)
    return calls


def test_inplace_inference_path_matches_grad_path(monkeypatch, backend):
    _, ours = tv_and_ours_fpn()
    x = random_features()
    calls = _counting(monkeypatch)
    with torch.no_grad():
        inference = ours(x)
    assert calls == {"upsample_add": 0, "upsample_add_": 3}
    with torch.inference_mode():
        inference_mode = ours(x)
    training = ours(x)
    assert calls == {"upsample_add": 3, "upsample_add_": 6}
    assert all(t.requires_grad for t in training.values())
    for name in training:
        # Training adds the bias inside the conv (torchvision's op), inference in the fused step:
        # float rounding apart, judged against the level's largest value.
        scale = training[name].detach().abs().max()
        assert (inference[name] - training[name].detach()).abs().max() <= 1e-5 * scale, name
        torch.testing.assert_close(inference_mode[name], inference[name], rtol=0, atol=0)
    # Grad mode but nothing requires grad (a fully frozen FPN): in place is safe and used.
    ours.requires_grad_(False)
    frozen = ours(x)
    assert calls["upsample_add_"] == 9
    for name in frozen:
        torch.testing.assert_close(frozen[name], inference[name], rtol=0, atol=0)


def test_old_key_layout_loads():
    tv, _ = tv_and_ours_fpn()
    old = OrderedDict()
    for key, value in tv.state_dict().items():
        old[key.replace(".0.weight", ".weight").replace(".0.bias", ".bias")] = value
    assert "inner_blocks.0.weight" in old and "layer_blocks.3.bias" in old
    ours = fpn_fast.FeaturePyramidNetwork(IN_CHANNELS, 16, extra_blocks=fpn_fast.LastLevelMaxPool())
    ours.load_state_dict(old, strict=True)
    for key, value in tv.state_dict().items():
        assert torch.equal(ours.state_dict()[key], value), key
    # Nested under a backbone prefix too.
    backbone = fpn_fast.resnet_fpn_backbone(backbone_name="resnet18")
    state = randomise_(tv_resnet_fpn_backbone(backbone_name="resnet18", weights=None)).state_dict()
    old_state = OrderedDict((k.replace("fpn.inner_blocks.1.0.", "fpn.inner_blocks.1.")
                             .replace("fpn.layer_blocks.2.0.", "fpn.layer_blocks.2."), v) for k, v in state.items())
    assert "fpn.inner_blocks.1.weight" in old_state
    backbone.load_state_dict(old_state, strict=True)
    assert torch.equal(backbone.fpn.inner_blocks[1][0].weight, state["fpn.inner_blocks.1.0.weight"])


def test_fpn_init_like_torchvision():
    ours = fpn_fast.FeaturePyramidNetwork([64, 128], 256)
    for block in (*ours.inner_blocks, *ours.layer_blocks):
        conv = block[0]
        assert torch.count_nonzero(conv.bias) == 0
        # kaiming_uniform_(a=1): U(-b, b) with b = sqrt(3 / fan_in)
        bound = (3.0 / conv.weight[0].numel()) ** 0.5
        assert conv.weight.abs().max() <= bound and conv.weight.abs().max() > 0.9 * bound


# --- bad inputs -------------------------------------------------------------------------------------

def test_fpn_rejects_bad_inputs():
    _, ours = tv_and_ours_fpn()
    x = random_features()
    three = OrderedDict(list(x.items())[:3])
    with pytest.raises(ValueError, match="expects 4 feature maps.*got 3"):
        ours(three)
    wrong_channels = OrderedDict(x)
    wrong_channels["feat2"] = torch.randn(2, 25, 7, 11)
    with pytest.raises(ValueError, match=r"'feat2' \(level 2\) has 25 channels, its lateral block expects 24"):
        ours(wrong_channels)
    not_4d = OrderedDict(x)
    not_4d["feat1"] = torch.randn(16, 13, 19)
    with pytest.raises(ValueError, match=r"'feat1' \(level 1\) must be 4-D"):
        ours(not_4d)
    not_tensor = OrderedDict(x)
    not_tensor["feat3"] = [1.0]
    with pytest.raises(ValueError, match="not a tensor"):
        ours(not_tensor)
    with pytest.raises(TypeError, match="extra_blocks"):
        fpn_fast.FeaturePyramidNetwork([8], 4, extra_blocks="pool")


# --- checkpoints ------------------------------------------------------------------------------------

def _tv_resnet18_checkpoint():
    model = randomise_(torchvision.models.resnet18(weights=None))
    return model.state_dict()  # includes fc.* and bn num_batches_tracked


def test_checkpoint_from_path_and_dict(tmp_path):
    state = _tv_resnet18_checkpoint()
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    from_path = fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=str(path))
    from_pathlike = fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=path)
    from_dict = fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=state)
    body_keys = [k for k in from_dict.body.state_dict()]
    assert len(body_keys) == len([k for k in state if not k.startswith("fc.") and "num_batches" not in k])
    for key in body_keys:
        assert torch.equal(from_dict.body.state_dict()[key], state[key]), key
        assert torch.equal(from_path.body.state_dict()[key], from_dict.body.state_dict()[key]), key
        assert torch.equal(from_pathlike.body.state_dict()[key], from_dict.body.state_dict()[key]), key
    # Loaded weights still respect the freezing.
    assert not from_path.body.conv1.weight.requires_grad and from_path.body.layer4[0].conv1.weight.requires_grad


def test_checkpoint_missing_file(tmp_path):
    missing = tmp_path / "nope" / "resnet50.pth"
    with pytest.raises(FileNotFoundError, match="nope"):
        fpn_fast.resnet_fpn_backbone(backbone_name="resnet50", weights=str(missing))


def test_checkpoint_wrong_keys_lists_them():
    state = _tv_resnet18_checkpoint()
    state["extra.weight"] = torch.randn(3)
    del state["layer2.0.conv1.weight"]
    with pytest.raises(ValueError) as info:
        fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=state)
    message = str(info.value)
    assert "missing keys ['layer2.0.conv1.weight']" in message
    assert "unexpected keys ['extra.weight']" in message
    # A resnet18 checkpoint for a resnet50 body: shapes and keys differ.
    with pytest.raises(ValueError, match="does not fit"):
        fpn_fast.resnet_fpn_backbone(backbone_name="resnet50", weights=_tv_resnet18_checkpoint())


def test_checkpoint_unsupported_type():
    with pytest.raises(TypeError, match="only local checkpoints"):
        fpn_fast.resnet_fpn_backbone(backbone_name="resnet18",
                                     weights=torchvision.models.ResNet18_Weights.IMAGENET1K_V1)
    with pytest.raises(TypeError, match="only local checkpoints"):
        fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=42)


# --- FrozenBatchNorm2d ------------------------------------------------------------------------------

def test_frozen_batchnorm_matches_torchvision_and_drops_num_batches_tracked():
    bn = randomise_(nn.BatchNorm2d(7))
    state = bn.state_dict()
    assert "num_batches_tracked" in state
    ours, tv = fpn_fast.FrozenBatchNorm2d(7), TvFrozenBatchNorm2d(7)
    ours.load_state_dict(state, strict=True)
    tv.load_state_dict(state, strict=True)
    assert list(ours.state_dict()) == list(tv.state_dict()) == ["weight", "bias", "running_mean", "running_var"]
    assert list(ours.parameters()) == []
    x = torch.randn(3, 7, 5, 6)
    torch.testing.assert_close(ours(x), tv(x), rtol=0, atol=0)
    torch.testing.assert_close(ours(x), bn.eval()(x), rtol=1e-5, atol=1e-5)
    assert fpn_fast.FrozenBatchNorm2d(4, eps=1e-3).eps == 1e-3
