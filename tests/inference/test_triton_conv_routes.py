"""The Triton GEMM convolutions (conv2d_act's "triton_gemm" and "triton_conv" routes: bias,
residual and ReLU in the GEMM's epilogue) as a plan runs them once measurement chose them
(issue 28). On CUDA they are candidates of conv2d_act's measured row; here, on CPU tensors under
the Triton interpreter, conv2d_act's CPU row is given the same candidates and the host timer is
told they won, so the whole policy runs: decision, runner, plan, route report. Outputs are
compared with torchvision's (same random weights, norm statistics, biases) to 1e-4 of each
level's largest value in float32 (the GEMM sums in its own order, like the other fused routes:
``selection.ROUNDING``), and in bfloat16 autocast to the rounding of bfloat16 (2e-2 of a level's
scale; see tests/inference/test_inference.py ``_damp_residual_branches_``)."""
import os

import pytest
import torch

import fpn_fast
from fpn_fast.ops import dispatch, measure
from fpn_fast.ops.conv import _supports
from tests._models import randomise_

triton = pytest.importorskip("triton")
torchvision = pytest.importorskip("torchvision")

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors run Triton only under the interpreter")

GEMM_ROUTES = _supports.TRITON_GEMM_ROUTES


@pytest.fixture
def triton_gemms_win(monkeypatch):
    """conv2d_act's CPU row measured with the Triton GEMM routes as candidates, which the host
    timer reports fastest. Returns the names timed per decision."""
    key, nchw = ("conv2d_act", "cpu"), ("conv2d_nchw", "cpu")
    monkeypatch.setitem(dispatch.TABLE, key, dict(dispatch.TABLE[key], auto=GEMM_ROUTES + ("torch",)))
    monkeypatch.setitem(dispatch.TABLE, nchw, dict(dispatch.TABLE[nchw], auto=("triton_conv", "torch")))
    dispatch.MEASURED.update((key, nchw))
    timed = []

    def time(self, runs):
        timed.append(sorted(runs))
        return {name: (1.0 if name in GEMM_ROUTES else 2.0) for name in runs}, {}
    monkeypatch.setattr(measure._HostTimer, "time", time)
    dispatch.forget_runners()
    yield timed
    dispatch.MEASURED.difference_update((key, nchw))
    dispatch.forget_runners()


def _backbone(name: str = "resnet18", returned_layers=(1, 2), out_channels: int = 16):
    """A small torchvision ResNet-FPN backbone (random weights, norm statistics and biases): the
    interpreter runs each Triton program in Python, so few layers and narrow FPN outputs."""
    from torchvision.models import resnet
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.misc import FrozenBatchNorm2d
    torch.manual_seed(0)
    body = getattr(resnet, name)(weights=None, norm_layer=FrozenBatchNorm2d)
    widths = [body.inplanes // 8 * (2 ** (i - 1)) for i in returned_layers]  # 64 (resnet18), 256 (resnet50)
    reference = BackboneWithFPN(body, {f"layer{i}": str(k) for k, i in enumerate(returned_layers)}, widths,
                                out_channels)
    return randomise_(reference).eval()


def _models(**kwargs):
    reference = _backbone(**kwargs)
    return reference, fpn_fast.optimize_for_inference(fpn_fast.convert(_backbone(**kwargs)))


def _assert_close(actual, expected, rel):
    assert list(actual) == list(expected)
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape and got.dtype == want.dtype, name
        scale = want.float().abs().max().item()
        assert (got.float() - want.float()).abs().max().item() <= rel * scale, name


def test_a_plan_runs_the_triton_gemms_measurement_chose(triton_gemms_win):
    reference, optimized = _models()
    x = torch.randn(1, 3, 13, 17)
    with torch.inference_mode():
        expected = reference(x)
        first = optimized(x)
        replayed = optimized(x)
    _assert_close(first, expected, 1e-4)
    _assert_close(replayed, expected, 1e-4)
    rows = [row for row in optimized.route_report() if row["op"] in ("conv2d_act", "conv2d_nchw")]
    routes = {(row["module"], row["route"]) for row in rows}
    # The 1x1 stride-1 convs (the lateral's are the lateral op's) on the GEMM, every other on
    # the implicit GEMM: the stem, the 3x3s, the stride-2 downsamples, the FPN output convs.
    assert ("body.conv1", "triton_conv") in routes
    assert ("body.layer2.0.downsample", "triton_conv") in routes
    # The FPN output convs: conv2d_nchw's implicit GEMM, writing NCHW from its epilogue.
    assert {(row["module"], row["route"], row["via"]) for row in rows if row["op"] == "conv2d_nchw"} == {
        ("fpn.layer_blocks.0", "triton_conv", None), ("fpn.layer_blocks.1", "triton_conv", None)}
    assert all(level.is_contiguous() for level in replayed.values())
    assert {route for _, route in routes} == {"triton_conv"}  # resnet18 has no 1x1 stride-1 body conv
    assert triton_gemms_win and all(set(names) & set(GEMM_ROUTES) for names in triton_gemms_win)


def test_the_1x1_gemm_takes_a_bottleneck_1x1_with_its_residual(triton_gemms_win):
    """ResNet50's bottlenecks: conv1 and conv3 are 1x1 stride-1 (conv3 with the residual and
    ReLU in the epilogue), conv2 is 3x3."""
    reference, optimized = _models(name="resnet50", returned_layers=(1,))
    x = torch.randn(1, 3, 37, 29)
    with torch.inference_mode():
        expected = reference(x)
        actual = optimized(x)
    _assert_close(actual, expected, 1e-4)
    routes = {row["module"]: row["route"] for row in optimized.route_report() if row["op"] == "conv2d_act"}
    assert routes["body.layer1.0.convs.0"] == "triton_gemm"
    assert routes["body.layer1.0.convs.1"] == "triton_conv"
    assert routes["body.layer1.0.last"] == "triton_gemm"  # + bias, residual and ReLU in its epilogue
    assert routes["body.layer1.0.downsample"] == "triton_gemm"


def test_under_autocast_the_gemms_run_in_the_low_dtype(triton_gemms_win):
    reference, optimized = _models(returned_layers=(1,))
    x = torch.randn(1, 3, 13, 17)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        expected = reference(x)
        actual = optimized(x)
    _assert_close(actual, expected, 2e-2)
    assert {row["route"] for row in optimized.route_report() if row["op"] == "conv2d_act"} == {"triton_conv"}


def test_the_refusals_name_why():
    x = torch.randn(1, 8, 9, 9)
    w1, w3 = torch.randn(4, 8, 1, 1), torch.randn(4, 8, 3, 3)
    refusal = _supports.triton_gemm_refusal
    assert refusal("triton_gemm", x, w1, None, (1, 1), (0, 0), (1, 1), None) is None
    assert "1x1 stride-1" in refusal("triton_gemm", x, w3, None, (1, 1), (1, 1), (1, 1), None)
    assert "1x1 GEMM's" in refusal("triton_conv", x, w1, None, (1, 1), (0, 0), (1, 1), None)
    assert refusal("triton_conv", x, w1, None, (2, 2), (0, 0), (1, 1), None) is None
    assert "dilation" in refusal("triton_conv", x, w3, None, (1, 1), (2, 2), (2, 2), None)
    assert "not supported" in refusal("triton_conv", x.double(), w3.double(), None, (1, 1), (1, 1), (1, 1), None)


def test_the_triton_convs_can_be_left_out(run_python):
    """FPN_FAST_TRITON_CONV=0 (read when first probed) takes them out of the measured candidates."""
    code = ("from fpn_fast.ops import dispatch\n"
            "print(dispatch.unavailable_reason('triton_gemm', 'cuda'), '|', dispatch.unavailable_reason('triton_conv', 'cpu'))")
    off = run_python(code, env={"FPN_FAST_TRITON_CONV": "0"})
    assert off.returncode == 0, off.stderr
    assert off.stdout.strip() == "turned off by FPN_FAST_TRITON_CONV=0 | turned off by FPN_FAST_TRITON_CONV=0"
    assert os.environ.get("FPN_FAST_TRITON_CONV", "1") != "0"  # this process: on
    assert dispatch.unavailable_reason("triton_gemm", "cpu") is None
