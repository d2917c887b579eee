"""FX sees fpn_fast's backbone as torchvision's: ``get_graph_node_names`` lists the same nodes and
``create_feature_extractor`` returns the same features, for a backbone built by fpn_fast and for a
torchvision backbone after ``fpn_fast.convert``. torchvision keeps every ``torchvision.ops`` module
(FeaturePyramidNetwork, FrozenBatchNorm2d, ExtraFPNBlock...) as one leaf node; fpn_fast's derive
from them (``fpn_fast/_torchvision_compat.py``), so they are leaves too."""
import copy
import warnings

import pytest
import torch

import fpn_fast

torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone as tv_resnet_fpn_backbone  # noqa: E402
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names  # noqa: E402
from torchvision.ops import FeaturePyramidNetwork as TvFPN  # noqa: E402

from tests._models import assert_levels_close, randomise_  # noqa: E402

# Odd sizes: levels of 23x31 .. 3x4, coarser-to-finer ratios that are not 2.
IMAGE_SIZE = (2, 3, 90, 122)
RETURN_NODES = {
    "fpn": {"fpn": "pyramid"},
    "body": {"body.layer3": "c4"},
    "mixed": {"body.maxpool": "stem", "body.layer2.0.add": "residual", "body.layer3": "c4", "fpn": "pyramid"},
}


def _backbones(backbone_name, how):
    """(torchvision's backbone, fpn_fast's) with the same random weights and frozen-norm
    statistics; ``how``: "built" by fpn_fast.resnet_fpn_backbone or "converted" by fpn_fast.convert."""
    tv = randomise_(tv_resnet_fpn_backbone(backbone_name=backbone_name, weights=None))
    if how == "converted":
        ours = fpn_fast.convert(copy.deepcopy(tv))
        assert type(ours.fpn) is fpn_fast.FeaturePyramidNetwork
    else:
        ours = fpn_fast.resnet_fpn_backbone(backbone_name=backbone_name)
        assert list(ours.state_dict()) == list(tv.state_dict())
        ours.load_state_dict(tv.state_dict())
    return tv, ours


def _assert_features_match(actual, expected):
    """Body features equal (the same arithmetic); pyramid levels close relative to each level's
    largest magnitude: fpn_fast adds the lateral bias after the 1x1 conv, in the fused top-down
    step, where torchvision adds it inside the conv, so the sums round differently (see
    test_modules.assert_levels_close)."""
    assert list(actual) == list(expected)
    for name, value in expected.items():
        if isinstance(value, dict):
            assert_levels_close(actual[name], value)
        else:
            assert torch.equal(actual[name], value), name


@pytest.mark.parametrize("how", ["built", "converted"])
@pytest.mark.parametrize("backbone_name", ["resnet18", "resnet50"])
def test_graph_node_names_are_torchvisions(backbone_name, how):
    tv, ours = _backbones(backbone_name, how)
    train_nodes, eval_nodes = get_graph_node_names(ours)
    assert (train_nodes, eval_nodes) == get_graph_node_names(tv)
    assert "fpn" in eval_nodes and not any(n.startswith("fpn.") for n in eval_nodes)


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("nodes", sorted(RETURN_NODES))
@pytest.mark.parametrize("how", ["built", "converted"])
def test_feature_extractor_returns_torchvisions_features(how, nodes, mode):
    tv, ours = _backbones("resnet50", how)
    tv.train(mode == "train")
    ours.train(mode == "train")
    image = torch.randn(IMAGE_SIZE)
    with torch.no_grad():
        expected = create_feature_extractor(tv, RETURN_NODES[nodes])(image)
        actual = create_feature_extractor(ours, RETURN_NODES[nodes])(image)
    assert list(expected) == list(RETURN_NODES[nodes].values())
    if "pyramid" in expected:
        assert list(expected["pyramid"]) == ["0", "1", "2", "3", "pool"]
    _assert_features_match(actual, expected)


def test_feature_extractor_fpn_node_is_the_backbones_output():
    """The pyramid node is the FPN's own call: the same tensors as the backbone's forward."""
    _, ours = _backbones("resnet18", "built")
    ours.eval()
    image = torch.randn(IMAGE_SIZE)
    with torch.no_grad():
        expected = ours(image)
        pyramid = create_feature_extractor(ours, {"fpn": "pyramid"})(image)["pyramid"]
    assert list(pyramid) == list(expected)
    assert all(torch.equal(pyramid[k], expected[k]) for k in expected)


def test_symbolic_trace_still_traces_into_the_fpn():
    """Plain torch.fx.symbolic_trace keeps only torch.nn modules as leaves: it traces fpn_fast's FPN
    (the fused ops are leaf calls) and the traced graph computes the module's result."""
    _, ours = _backbones("resnet18", "built")
    ours.eval()
    traced = torch.fx.symbolic_trace(ours)
    assert fpn_fast.ops.upsample_add in [n.target for n in traced.graph.nodes if n.op == "call_function"]
    image = torch.randn(IMAGE_SIZE)
    with torch.no_grad():
        expected = ours(image)
        actual = traced(image)
    assert list(actual) == list(expected)
    assert all(torch.equal(actual[k], expected[k]) for k in expected)


def test_convert_leaves_fpn_fasts_own_fpns_alone():
    """fpn_fast's FPN is a torchvision FPN by type now; convert still neither replaces it nor
    warns about it as a subclass of torchvision's, while a real subclass still gets the warning."""

    class OurSubclass(fpn_fast.FeaturePyramidNetwork):
        pass

    class TheirSubclass(TvFPN):
        pass

    for fpn in (fpn_fast.FeaturePyramidNetwork([8, 16], 4), OurSubclass([8, 16], 4)):
        assert isinstance(fpn, TvFPN)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert fpn_fast.convert(fpn) is fpn
            backbone = fpn_fast.resnet_fpn_backbone(backbone_name="resnet18")
            fpn_module = backbone.fpn
            assert fpn_fast.convert(backbone).fpn is fpn_module
    theirs = TheirSubclass([8, 16], 4)
    with pytest.warns(UserWarning, match="subclass of torchvision's FeaturePyramidNetwork"):
        assert fpn_fast.convert(theirs) is theirs


def test_without_torchvision_the_bases_are_plain_modules(run_python):
    result = run_python("""
        from collections import OrderedDict
        import torch
        from torch import nn
        import fpn_fast
        assert fpn_fast.FeaturePyramidNetwork.__bases__ == (nn.Module,)
        assert fpn_fast.ExtraFPNBlock.__bases__ == (nn.Module,)
        assert fpn_fast.FrozenBatchNorm2d.__bases__ == (nn.Module,)
        fpn = fpn_fast.FeaturePyramidNetwork([8, 16], 4, extra_blocks=fpn_fast.LastLevelMaxPool()).eval()
        fpn.load_state_dict(fpn.state_dict())
        out = fpn(OrderedDict(a=torch.randn(1, 8, 9, 7), b=torch.randn(1, 16, 5, 4)))
        assert list(out) == ["a", "b", "pool"]
        assert fpn_fast.convert(fpn) is fpn
        print("OK")
    """, block=["torchvision"], timeout=120)
    assert result.stdout.strip().endswith("OK"), result.stderr[-3000:]
