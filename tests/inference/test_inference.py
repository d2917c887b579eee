"""fpn_fast.optimize_for_inference: parity with the original model, the untouched original,
the inference-only guards, torchvision detection models, and the inference ops it runs on.

Parity bound (float32): 1e-4 of each output level's largest magnitude. Folding rounds the
folded weights once and the folded model sums in another order; over a ResNet the observed
difference is ~3e-6 of the level's scale, so 1e-4 leaves room without hiding a wrong fold
(a norm applied twice or skipped moves outputs by tens of percent).
"""
import copy
import io
import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import fpn_fast
from fpn_fast import ops
from fpn_fast.inference import (Conv2dAct, FoldedResidualBlock, InferenceBackboneWithFPN, InferenceFPN,
                                fold_conv_norm, fold_norms)
from tests._cases import require
from tests._models import randomise_

torchvision = pytest.importorskip("torchvision")
from torchvision.models import detection  # noqa: E402
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone as tv_resnet_fpn_backbone  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d as TvFrozenBatchNorm2d  # noqa: E402

FROZEN_NORMS = (fpn_fast.FrozenBatchNorm2d, TvFrozenBatchNorm2d)
REL_TOL = 1e-4


def _backbone(name="resnet18", **kwargs):
    return randomise_(fpn_fast.resnet_fpn_backbone(backbone_name=name, **kwargs)).eval()


def _assert_outputs_close(actual, expected, rel=REL_TOL):
    assert list(actual.keys()) == list(expected.keys())
    for name, e in expected.items():
        a = actual[name]
        assert a.shape == e.shape and a.dtype == e.dtype, name
        scale = e.abs().max().item()
        assert scale > 0, name
        err = (a.float() - e.float()).abs().max().item()
        assert err <= rel * scale, f"level {name}: max error {err:.3g} > {rel:g} * {scale:.3g}"


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
@pytest.mark.parametrize("channels_last,fold_norm,fuse_lateral",
                         [(True, True, True), (False, True, True), (True, False, True), (True, True, False),
                          (False, False, False)])
def test_parity_with_original_backbone(name, channels_last, fold_norm, fuse_lateral):
    model = _backbone(name)
    optimized = fpn_fast.optimize_for_inference(model, channels_last=channels_last, fold_norm=fold_norm,
                                                fuse_lateral=fuse_lateral)
    assert isinstance(optimized, InferenceBackboneWithFPN) and not optimized.training
    remaining = sum(isinstance(m, FROZEN_NORMS) for m in optimized.modules())
    assert (remaining == 0) if fold_norm else (remaining == sum(isinstance(m, FROZEN_NORMS) for m in model.modules()))
    x = torch.randn(2, 3, 131, 203)  # odd sizes: every level's top-down ratio is non-2x somewhere
    with torch.no_grad():
        expected = model(x)
        actual = optimized(x)
    _assert_outputs_close(actual, expected)
    assert all(t.is_contiguous() for t in actual.values())


def test_channels_last_outputs_on_request():
    model = _backbone()
    optimized = fpn_fast.optimize_for_inference(model, output_memory_format=torch.channels_last)
    x = torch.randn(1, 3, 96, 128)
    with torch.inference_mode():
        expected, actual = model(x), optimized(x)
    _assert_outputs_close(actual, expected)
    for t in actual.values():
        assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def test_original_model_is_untouched():
    model = _backbone("resnet50", trainable_layers=3)
    before = _state(model)
    grads = {k: p.requires_grad for k, p in model.named_parameters()}
    types = [type(m) for m in model.modules()]
    model.train()
    optimized = fpn_fast.optimize_for_inference(model)
    assert model.training and not optimized.training
    assert [type(m) for m in model.modules()] == types
    assert {k: p.requires_grad for k, p in model.named_parameters()} == grads
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and after[k].is_contiguous() for k in before)
    assert not any(p.data_ptr() == q.data_ptr() for p in model.parameters() for q in optimized.parameters())
    assert not any(p.requires_grad for p in optimized.parameters())


def test_refuses_training_mode_and_autograd():
    optimized = fpn_fast.optimize_for_inference(_backbone())
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(RuntimeError, match="no_grad"):
        optimized(x.clone().requires_grad_())
    assert len(optimized(x)) == 5  # grad mode on but nothing to record (as exporters and tracers run it)
    optimized.train()
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"eval\(\)"):
        optimized(x)
    optimized.eval()
    with torch.no_grad():
        assert len(optimized(x)) == 5
    # Every folded piece guards itself, also when used on its own.
    block = next(m for m in optimized.modules() if isinstance(m, FoldedResidualBlock))
    with pytest.raises(RuntimeError, match="no_grad"):
        block(torch.randn(1, block.convs[0].weight.shape[1], 8, 8, requires_grad=True))


def test_bad_arguments():
    with pytest.raises(TypeError, match="nn.Module"):
        fpn_fast.optimize_for_inference(lambda x: x)
    with pytest.raises(ValueError, match="output_memory_format"):
        fpn_fast.optimize_for_inference(_backbone(), output_memory_format=torch.preserve_format)
    with pytest.raises(ValueError, match="no ResNet-FPN backbone"):
        fpn_fast.optimize_for_inference(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    optimized = fpn_fast.optimize_for_inference(_backbone())
    with torch.no_grad(), pytest.raises(ValueError, match="channels"):
        optimized.fpn({"0": torch.randn(1, 3, 8, 8), "1": torch.randn(1, 128, 4, 4),
                       "2": torch.randn(1, 256, 2, 2), "3": torch.randn(1, 512, 1, 1)})


def test_bare_fpn_with_batchnorm_is_folded():
    fpn = randomise_(fpn_fast.FeaturePyramidNetwork([8, 16, 24], 16, extra_blocks=fpn_fast.LastLevelMaxPool(),
                                                    norm_layer=nn.BatchNorm2d)).eval()
    optimized = fpn_fast.optimize_for_inference(fpn)
    assert isinstance(optimized, InferenceFPN)
    assert all(isinstance(b, Conv2dAct) for b in (*optimized.inner_blocks, *optimized.layer_blocks))
    unfolded = fpn_fast.optimize_for_inference(fpn, fold_norm=False)
    assert all(isinstance(b, nn.Sequential) for b in unfolded.inner_blocks)
    feats = {str(i): torch.randn(2, c, h, w) for i, (c, (h, w)) in enumerate(zip([8, 16, 24], [(25, 38), (13, 19), (7, 11)]))}
    with torch.no_grad():
        expected = fpn(feats)
        _assert_outputs_close(optimized(feats), expected)
        _assert_outputs_close(unfolded(feats), expected)


@pytest.mark.parametrize("norm", ["frozen", "frozen_tv", "batchnorm", "batchnorm_no_affine"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fold_conv_norm_matches_conv_then_norm(norm, with_bias):
    conv = nn.Conv2d(6, 5, 3, stride=2, padding=1, bias=with_bias).double()
    bn = {"frozen": lambda: fpn_fast.FrozenBatchNorm2d(5), "frozen_tv": lambda: TvFrozenBatchNorm2d(5),
          "batchnorm": lambda: nn.BatchNorm2d(5), "batchnorm_no_affine": lambda: nn.BatchNorm2d(5, affine=False)}[norm]()
    randomise_(conv)
    randomise_(bn.double()).eval()
    folded = fold_conv_norm(conv, bn, relu=True)
    assert folded.weight.dtype == torch.float64 and not folded.weight.requires_grad
    x = torch.randn(2, 6, 11, 9, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), bn(conv(x)).relu(), rtol=1e-12, atol=1e-12)


def test_fold_conv_norm_float32_and_unfoldable_norms():
    conv = randomise_(nn.Conv2d(16, 8, 3, padding=1, bias=False))
    bn = randomise_(fpn_fast.FrozenBatchNorm2d(8))
    x = torch.randn(2, 16, 9, 10)
    with torch.no_grad():
        expected = bn(conv(x.double().float()))
        got = fold_conv_norm(conv, bn, relu=False)(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    batch_stats = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    assert fold_norms(batch_stats) == 0  # eval still normalises with the batch's statistics


def test_fold_norms_keeps_shared_and_returned_modules():
    act = nn.ReLU()
    seq = randomise_(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), act, nn.Conv2d(4, 4, 3), act,
                                   nn.BatchNorm2d(4))).eval()
    folded = copy.deepcopy(seq)
    assert fold_norms(folded) == 1  # conv2 is not followed by bn2: the shared ReLU runs between them
    assert isinstance(folded[5], nn.BatchNorm2d)
    x = torch.randn(1, 3, 12, 12)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), seq(x), rtol=1e-5, atol=1e-6)
    body = fpn_fast.ResNet(fpn_fast.resnet.BasicBlock, [1, 1, 1, 1], norm_layer=fpn_fast.FrozenBatchNorm2d)
    getter = randomise_(fpn_fast.IntermediateLayerGetter(body, {"bn1": "stem", "layer1": "c2"})).eval()
    folded = copy.deepcopy(getter)
    assert fold_norms(folded) == 2 + 0  # layer1's block (2 norms); the returned bn1 stays
    with torch.no_grad():
        x = torch.randn(1, 3, 32, 32)
        expected, got = getter(x), folded(x)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-5 * expected[name].abs().max().item())


def test_subclassed_fpn_is_not_replaced():
    class Doubled(fpn_fast.FeaturePyramidNetwork):
        def forward(self, x):
            return {k: 2 * v for k, v in super().forward(x).items()}

    with pytest.raises(ValueError, match="no ResNet-FPN backbone"):
        fpn_fast.optimize_for_inference(Doubled([8, 16], 8))


def test_p6p7_extra_block_fed_from_c5():
    from torchvision.ops.feature_pyramid_network import LastLevelP6P7

    model = randomise_(fpn_fast.resnet_fpn_backbone(backbone_name="resnet18",
                                                    extra_blocks=LastLevelP6P7(512, 256))).eval()
    optimized = fpn_fast.optimize_for_inference(model)
    x = torch.randn(1, 3, 128, 160)
    with torch.no_grad():
        expected, actual = model(x), optimized(x)
    assert list(actual) == ["0", "1", "2", "3", "p6", "p7"]
    _assert_outputs_close(actual, expected)
    assert all(t.is_contiguous() for t in actual.values())


def test_fold_norms_counts_and_leaves_unfoldable_blocks():
    body = fpn_fast.ResNet(fpn_fast.resnet.Bottleneck, [1, 1, 1, 1], norm_layer=fpn_fast.FrozenBatchNorm2d)
    # 1 stem + 4 blocks x (3 convs + downsample) norms
    assert fold_norms(copy.deepcopy(body)) == 1 + 4 * 4
    grouped = fpn_fast.ResNet(fpn_fast.resnet.Bottleneck, [1, 1, 1, 1], norm_layer=lambda c: nn.GroupNorm(4, c))
    assert fold_norms(grouped) == 0
    assert not any(isinstance(m, (Conv2dAct, FoldedResidualBlock)) for m in grouped.modules())


def test_torchvision_detection_models():
    """Faster R-CNN (FrozenBN body, plain FPN), with and without fpn_fast.convert first; v2 (BatchNorm2d
    in body and FPN); RetinaNet (torchvision's P6P7 extra block, fed from P5): backbone features
    within 1e-4 and the full model runs, with the heads left as they were."""
    small = dict(weights=None, weights_backbone=None, min_size=160, max_size=224)
    images = [torch.rand(3, 150, 200), torch.rand(3, 170, 190)]
    for build in (detection.fasterrcnn_resnet50_fpn, detection.fasterrcnn_resnet50_fpn_v2,
                  detection.retinanet_resnet50_fpn):
        model = randomise_(build(num_classes=5, **small)).eval()
        for convert_first in (False, True):
            source = fpn_fast.convert(copy.deepcopy(model)) if convert_first else model
            optimized = fpn_fast.optimize_for_inference(source)
            assert isinstance(optimized.backbone, InferenceBackboneWithFPN)
            assert not any(isinstance(m, (nn.BatchNorm2d, *FROZEN_NORMS)) for m in optimized.backbone.modules())
            assert type(optimized.rpn if hasattr(optimized, "rpn") else optimized.head) is type(
                model.rpn if hasattr(model, "rpn") else model.head)
            with torch.no_grad():
                batch, _ = model.transform(images)
                _assert_outputs_close(optimized.backbone(batch.tensors), model.backbone(batch.tensors))
                detections = optimized(images)
            assert len(detections) == 2 and all({"boxes", "scores", "labels"} <= d.keys() for d in detections)


def test_autocast_bfloat16_within_bfloat16_error():
    """Under CPU bf16 autocast the optimized model's error against the float32 original is of the
    same size as the original model's own autocast error (bf16 has 8 bits of mantissa)."""
    model = _backbone()
    optimized = fpn_fast.optimize_for_inference(model)
    x = torch.randn(1, 3, 96, 128)
    with torch.no_grad():
        exact = model(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            original = model(x)
            fast = optimized(x)
    for name, e in exact.items():
        scale = e.abs().max().item()
        err_original = (original[name].float() - e).abs().max().item() / scale
        err_fast = (fast[name].float() - e).abs().max().item() / scale
        assert fast[name].dtype == original[name].dtype
        assert 0 < err_fast <= 2 * err_original + 2 ** -8, (name, err_fast, err_original)


# --- the ops underneath ------------------------------------------------------------------------

_NEEDS_TRITON_CPU = pytest.mark.skipif(ops.available_backends()["triton"]["cpu"] is not None,
                                       reason=str(ops.available_backends()["triton"]["cpu"]))
EPILOGUE_DEVICES = [pytest.param("cpu", marks=_NEEDS_TRITON_CPU),
                    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
                        ops.available_backends()["triton"]["cuda"] is not None and torch.cuda.is_available(),
                        reason=str(ops.available_backends()["triton"]["cuda"]))])]


def _padded(t: torch.Tensor) -> torch.Tensor:
    """t's values in a view of a larger buffer whose margin holds NaN: a store past the view's
    elements would show up there."""
    n, c, h, w = t.shape
    big = torch.full((n, c, h + 2, w + 3), float("nan"), dtype=t.dtype, device=t.device)  # 7x11 -> 9x14
    view = big[:, :, 1:1 + h, 1:1 + w]
    view.copy_(t)
    return view


@pytest.mark.parametrize("device", EPILOGUE_DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("out_layout,res_layout", [("contiguous", "contiguous"), ("channels_last", "channels_last"),
                                                   ("channels_last", "contiguous"), ("contiguous", "channels_last"),
                                                   ("padded", "channels_last")])
@pytest.mark.parametrize("bias,residual,relu", [(True, True, True), (True, False, True), (False, True, True),
                                                (False, True, False), (True, False, False)])
@pytest.mark.parametrize("int64", [False, True], ids=["int32", "int64"])
def test_triton_epilogue_is_exact(device, dtype, out_layout, res_layout, bias, residual, relu, int64, monkeypatch):
    """relu?((out + bias) + residual) in place equals the same adds done by torch in float32
    and rounded once, bit for bit; a padded out's margin stays untouched. int64 forces the
    offset path only tensors past 2**31 elements take otherwise."""
    from fpn_fast.ops.conv import _triton_epilogue

    if int64:
        monkeypatch.setattr(_triton_epilogue, "_needs_int64", lambda *tensors: True)
    layouts = {"contiguous": lambda t: t.contiguous(), "padded": _padded,
               "channels_last": lambda t: t.contiguous(memory_format=torch.channels_last)}
    base = torch.randn(2, 24, 7, 11, device=device).to(dtype)
    out = layouts[out_layout](base.clone())
    b = torch.randn(24, device=device).to(dtype) if bias else None
    r = layouts[res_layout](torch.randn(2, 24, 7, 11, device=device).to(dtype)) if residual else None
    expected = base.float()
    if b is not None:
        expected = expected + b.float().view(1, -1, 1, 1)
    if r is not None:
        expected = expected + r.float()
    if relu:
        expected = expected.relu()
    with torch.inference_mode():
        got = _triton_epilogue.bias_act_(out, b, r, relu)
    assert got is out
    assert torch.equal(got, expected.to(dtype))
    if out_layout == "padded":
        margin = torch.ones(2, 24, 9, 14, dtype=torch.bool, device=device)
        margin[:, :, 1:8, 1:12] = False
        storage = torch.empty(0, dtype=dtype, device=device).set_(out.untyped_storage()).view(2, 24, 9, 14)
        assert torch.isnan(storage[margin]).all()


@pytest.mark.parametrize("device", EPILOGUE_DEVICES)
def test_triton_epilogue_keeps_nan_and_refuses_bad_inputs(device):
    from fpn_fast.ops.conv import _triton_epilogue

    out = torch.randn(1, 3, 4, 5, device=device)
    out[0, 1, 2, 3] = float("nan")
    with torch.inference_mode():
        _triton_epilogue.bias_act_(out, None, None, True)
        assert torch.isnan(out[0, 1, 2, 3]) and (out.nan_to_num() >= 0).all()
        with pytest.raises(ValueError, match="bias must be"):
            _triton_epilogue.bias_act_(out, torch.randn(4, device=device), None, True)
        with pytest.raises(ValueError, match=r"residual must be \(1, 3, 4, 5\)"):
            _triton_epilogue.bias_act_(out, None, torch.randn(1, 3, 4, 4, device=device), True)
        with pytest.raises(TypeError, match="residual must be torch.float32 like out, got torch.float64"):
            _triton_epilogue.bias_act_(out, None, torch.randn(1, 3, 4, 5, device=device).double(), True)
        with pytest.raises(TypeError, match="float64"):
            _triton_epilogue.bias_act_(out.double(), None, None, True)
        with pytest.raises(RuntimeError, match="overlap"):
            _triton_epilogue.bias_act_(torch.randn(1, 3, 4, 1, device=device).expand(1, 3, 4, 5), None, None, True)

CONV_CASES = [  # (in, out, kernel, stride, padding, H, W)
    (5, 7, 3, 1, 1, 13, 11), (6, 4, 3, 2, 1, 9, 14), (8, 16, 1, 1, 0, 7, 5), (8, 4, 1, 2, 0, 9, 9),
    (3, 8, 7, 2, 3, 21, 19),
]


@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("relu,residual,bias,channels_last",
                         list(itertools.product([False, True], [False, True], [False, True], [False, True])))
@pytest.mark.parametrize("backend", ["auto", "torch", pytest.param("triton", marks=_NEEDS_TRITON_CPU)])
def test_conv2d_act_matches_reference(case, relu, residual, bias, channels_last, backend):
    from fpn_fast.ops.conv import _triton_epilogue  # noqa: F401  (registers the op)

    cin, cout, k, stride, pad, h, w = case
    x = torch.randn(2, cin, h, w)
    weight = torch.randn(cout, cin, k, k) / (cin * k * k) ** 0.5
    b = torch.randn(cout) if bias else None
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(x.double(), weight.double(), None if b is None else b.double(), stride, pad)
    res = torch.randn(expected.shape) if residual else None
    if res is not None:
        expected = expected + res.double()
    if relu:
        expected = expected.relu()
    epilogue = torch.ops.fpn_fast_triton.bias_act_.default
    with ops.use_backend(backend), torch.no_grad(), _CountOps(epilogue) as counted:
        got = ops.conv2d_act(x, weight, b, (stride, stride), (pad, pad), relu=relu, residual=res)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    # The Triton backend finishes with its epilogue kernel whenever there is a tail to apply.
    assert counted.calls[epilogue] == (backend == "triton" and (relu or residual or bias))
    # float32 sums of cin*k*k unit-variance terms: 1e-5 of the scale covers their rounding.
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())


@pytest.mark.parametrize("backend", ["auto", pytest.param("triton", marks=_NEEDS_TRITON_CPU)])
def test_conv2d_act_broadcast_residual_and_unbatched_input(backend):
    """What F.conv2d + residual + relu accept, conv2d_act accepts on every path."""
    weight = torch.randn(4, 3, 3, 3)
    bias = torch.randn(4)
    x = torch.randn(2, 3, 6, 7)
    residual = torch.randn(1, 4, 1, 1)
    with ops.use_backend(backend), torch.no_grad():
        got = ops.conv2d_act(x, weight, bias, padding=(1, 1), relu=True, residual=residual)
        torch.testing.assert_close(got, (F.conv2d(x, weight, bias, padding=1) + residual).relu())
        got = ops.conv2d_act(x[0], weight, bias, padding=(1, 1), relu=True)
        torch.testing.assert_close(got, F.conv2d(x[0], weight, bias, padding=1).relu())


def test_conv2d_act_float64_and_refuses_autograd():
    x = torch.randn(1, 3, 6, 7, dtype=torch.float64)
    weight = torch.randn(4, 3, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(ops.conv2d_act(x, weight, None, padding=(1, 1), relu=True),
                                   F.conv2d(x, weight, padding=1).relu())
    with pytest.raises(RuntimeError, match="inference only"):
        ops.conv2d_act(x, weight.requires_grad_())


LATERAL_CASES = [  # (N, C, H, W), (top H, W)
    ((2, 24, 25, 38), (13, 19)), ((2, 24, 8, 10), (4, 5)), ((1, 16, 9, 13), (9, 13)), ((2, 8, 5, 7), (9, 13)),
    ((0, 8, 5, 7), (3, 4)),
]


@pytest.mark.parametrize("case", LATERAL_CASES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("with_top,with_bias", [(True, True), (True, False), (False, True)])
@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_unfused_lateral_upsample_add_matches_reference(case, channels_last, with_top, with_bias, backend):
    (n, c, h, w), (th, tw) = case
    out_channels = 12
    x = torch.randn(n, c, h, w)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(out_channels, c, 1, 1) / c ** 0.5
    bias = torch.randn(out_channels) if with_bias else None
    top = torch.randn(n, out_channels, th, tw) if with_top else None
    expected = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double())
    if top is not None:
        expected = expected + F.interpolate(top.double(), size=(h, w), mode="nearest")
    with ops.use_backend(backend), torch.inference_mode():
        got = ops.lateral_upsample_add(x, weight, bias, top, fuse=False)
    assert got.shape == expected.shape
    if channels_last and n > 0:  # the output follows x's layout
        assert got.is_contiguous(memory_format=torch.channels_last)
    scale = expected.abs().amax().item() if expected.numel() else 1.0
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * scale)


def test_compiled_optimized_backbone_matches_eager():
    optimized = fpn_fast.optimize_for_inference(_backbone())
    compiled = torch.compile(optimized, backend="aot_eager", fullgraph=True)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        eager = optimized(x)
        # Compiled, the convolutions run unfused (and inductor reorders the glue): rounding differs.
        _assert_outputs_close(compiled(x), eager)


@pytest.mark.parametrize("fuse", [False, True])
def test_lateral_upsample_add_bad_inputs_raise_before_any_kernel(fuse, monkeypatch):
    def launched(*args, **kwargs):
        raise AssertionError("a route was decided or a kernel ran on bad inputs")
    monkeypatch.setattr(ops.lateral, "runner", launched)  # every route of the op is its runner's
    if fuse and ops.available_backends()["triton"]["cpu"] is None:
        ops.set_backend("triton")  # the fused path on CPU tensors (interpreter); conftest restores it
    x = torch.randn(2, 8, 5, 7)
    weight = torch.randn(12, 8, 1, 1)
    top = torch.randn(2, 12, 3, 4)
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"weight must be \(O, 8, 1, 1\)"):
            ops.lateral_upsample_add(x, torch.randn(12, 8, 3, 3), None, top, fuse=fuse)
        with pytest.raises(ValueError, match="top must be"):
            ops.lateral_upsample_add(x, weight, None, torch.randn(2, 11, 3, 4), fuse=fuse)
        with pytest.raises(TypeError, match="bias .* must have x's dtype"):
            ops.lateral_upsample_add(x, weight, torch.randn(12, dtype=torch.float64), top, fuse=fuse)
    with pytest.raises(RuntimeError, match="inference only"):
        ops.lateral_upsample_add(x.requires_grad_(), weight, None, top, fuse=fuse)


class _CountOps(TorchDispatchMode):
    """Counts the calls of some ops, whoever makes them (a module, a plan, a runner): what
    runs, not which Python wrapper ran it."""

    def __init__(self, *ops_counted):
        super().__init__()
        self.calls = dict.fromkeys(ops_counted, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.calls:
            self.calls[func] += 1
        return func(*args, **(kwargs or {}))


def test_fused_lateral_kernel_in_the_optimized_model_under_the_interpreter():
    """The whole optimized backbone with the Triton backend named on CPU tensors: every FPN level
    runs the fused GEMM kernel (interpreted), small image to keep the interpreter quick. Under a
    dispatch mode the engine runs the modules as written; what a plan runs is counted in
    test_the_plan_runs_the_triton_kernels_it_recorded."""
    require("triton", "cpu")
    model = _backbone("resnet18")
    optimized = fpn_fast.optimize_for_inference(model)
    x = torch.randn(1, 3, 64, 96)
    fused = torch.ops.fpn_fast_triton.lateral_upsample_add.default
    with torch.no_grad():
        expected = model(x)
        for _ in range(2):
            with ops.use_backend("triton"), _CountOps(fused) as counted:
                actual = optimized(x)
            assert counted.calls[fused] == 4  # one fused call per FPN level
            _assert_outputs_close(actual, expected)
    with torch.no_grad(), ops.use_backend("triton"), _CountOps(fused) as counted:
        fpn_fast.optimize_for_inference(model, fuse_lateral=False)(x)
    assert counted.calls[fused] == 0


@pytest.fixture
def no_tf32():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _kernel_counts(optimized, x, backend):
    """(the plan of x's signature, {op: calls} of that plan's own run, of the modules run as
    written) with ``backend`` in force: counted with a dispatch mode, so what runs is counted,
    whoever calls it (the plan calls the registered ops, not their Python wrappers)."""
    from fpn_fast.inference.plan import signature
    counted = (torch.ops.fpn_fast_triton.lateral_upsample_add.default, torch.ops.fpn_fast_triton.bias_act_.default)
    with torch.inference_mode(), ops.use_backend(backend):
        optimized(x)  # plans
        plan = optimized._engine.entries[signature(x)].plan
        with _CountOps(*counted) as planned:
            plan.run(x)
        with _CountOps(*counted) as written:
            optimized._run_as_written(x)
    return plan, planned.calls, written.calls


def _epilogue_routes(plan) -> int:
    """The convolutions whose recorded route is cuDNN then the Triton epilogue (conv2d_nchw's
    "torch" route runs conv2d_act's direct one: its ``via``)."""
    return sum(r.op in ("conv2d_act", "conv2d_nchw") and "triton" in (r.route, r.via) for r in plan.routes)


@pytest.mark.parametrize("device", EPILOGUE_DEVICES)
def test_the_plan_runs_the_triton_kernels_it_recorded(device):
    """Backend "triton" named (no measurement, so every route is the table's): the plan runs the
    fused lateral GEMM once per level and the epilogue once per folded convolution with a tail:
    on CPU tensors (interpreter) ResNet18: stem + 8 blocks x 2 + 3 downsamples + 4 FPN output
    convs (bias only); on CUDA ResNet50: stem + 16 x 3 + 4 + 4. The modules run as written
    launch the same."""
    name, size, expected = ("resnet18", (1, 3, 64, 96), 1 + 8 * 2 + 3 + 4) if device == "cpu" else \
        ("resnet50", (2, 3, 259, 389), 1 + 16 * 3 + 4 + 4)
    model = _backbone(name).to(device)
    optimized = fpn_fast.optimize_for_inference(model)
    x = torch.randn(size, device=device)
    plan, planned, written = _kernel_counts(optimized, x, "triton")
    fused, epilogue = torch.ops.fpn_fast_triton.lateral_upsample_add.default, torch.ops.fpn_fast_triton.bias_act_.default
    assert planned == written == {fused: 4, epilogue: expected}
    assert _epilogue_routes(plan) == expected
    assert [r.route for r in plan.routes if r.op == "lateral_upsample_add"] == ["triton"] * 4


@pytest.mark.cuda
@pytest.mark.parametrize("channels_last", [True, False])
def test_cuda_parity_float32(no_tf32, channels_last):
    """On the GPU in float32 without TF32 (the 1e-4 bound is a float32 one), under "auto": the
    measured routes (the fused Triton lateral kernel or cuDNN's 1x1 conv and the step; cuDNN then
    the Triton epilogue, cuDNN's fused ReLU or torch's tail) agree with the original, and the plan
    launches exactly the kernels its recorded routes name."""
    model = _backbone("resnet50").cuda()
    optimized = fpn_fast.optimize_for_inference(model, channels_last=channels_last)
    x = torch.randn(2, 3, 259, 389, device="cuda")
    with torch.inference_mode():
        expected = model(x)
        actual = optimized(x)
    _assert_outputs_close(actual, expected)
    assert all(t.is_contiguous() for t in actual.values())
    plan, planned, written = _kernel_counts(optimized, x, "auto")
    fused, epilogue = torch.ops.fpn_fast_triton.lateral_upsample_add.default, torch.ops.fpn_fast_triton.bias_act_.default
    lateral = sum(r.op == "lateral_upsample_add" and r.route == "triton" for r in plan.routes)
    assert planned == written == {fused: lateral, epilogue: _epilogue_routes(plan)}
    assert all(r.decision is not None for r in plan.routes if r.op in ("conv2d_act", "lateral_upsample_add"))


@pytest.mark.cuda
def test_cuda_float64_model_runs_unfused():
    """The Triton GEMM has no float64: auto takes the conv + fused-step path for it."""
    model = _backbone().double().cuda()
    optimized = fpn_fast.optimize_for_inference(model)
    x = torch.randn(1, 3, 96, 128, device="cuda", dtype=torch.float64)
    with torch.inference_mode():
        _assert_outputs_close(optimized(x), model(x), rel=1e-10)


def _damp_residual_branches_(model: nn.Module, scale: float = 0.3) -> nn.Module:
    """Scale the last norm of every bottleneck's residual branch (bn3) by ``scale``.

    The randomised frozen norms do not normalise: their statistics are not the activations'. So
    each undamped bottleneck about doubles the activations' variance. At 2x3x256x384, ResNet50's
    float32 activations reach 1.6e5 in layer4, past float16's 65504, and a float16 autocast run is
    NaN on both sides. With the branches scaled by 0.3, the largest float32 activation of any
    module is 141 (an FPN output conv; the body's largest is 81). Trained ResNets also have small
    last branch norms; torchvision's zero_init_residual starts them at 0. Rounding every weight and
    activation to float16 (bfloat16) then moves each level by about 2e-3 (1.5e-2) of its scale.
    (Matching the norms' statistics to the activations instead keeps them small too, but the
    random network then amplifies rounding to 7e-2 (float16) and 0.6 (bfloat16) of the scale.)
    """
    damped = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.endswith(".bn3"):
                module.weight.mul_(scale)
                damped += 1
    assert damped > 0, "no bottleneck norms found"
    return model


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_autocast_within_low_precision_error(dtype, monkeypatch):
    """Under autocast the optimized model's error stays within twice eager's own low-precision
    error. Both are measured against eager IEEE float32 (TF32 off) on a model whose activations fit
    float16 (_damp_residual_branches_). Every result is finite, and eager's error is a few eps: low
    precision is a small perturbation of this model, so the comparison means something."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the reference is IEEE float32
    model = _damp_residual_branches_(_backbone("resnet50")).cuda()
    optimized = fpn_fast.optimize_for_inference(model)
    x = torch.randn(2, 3, 256, 384, device="cuda")
    with torch.inference_mode():
        exact = model(x)
        with torch.autocast("cuda", dtype=dtype):
            original = model(x)
            fast = optimized(x)
    eps = torch.finfo(dtype).eps
    for name, e in exact.items():
        scale = e.abs().max().item()
        assert torch.isfinite(e).all() and 0 < scale < torch.finfo(torch.float16).max / 64, (name, scale)
        assert torch.isfinite(original[name]).all() and torch.isfinite(fast[name]).all(), name
        assert fast[name].dtype == original[name].dtype
        err_original = (original[name].float() - e).abs().max().item() / scale
        err_fast = (fast[name].float() - e).abs().max().item() / scale
        assert err_original <= 8 * eps, (name, err_original)
        assert err_fast <= 2 * err_original + eps, (name, err_fast, err_original)


@pytest.mark.parametrize("device", EPILOGUE_DEVICES)
def test_triton_epilogue_opcheck(device):
    """The registered mutating op: schema, fake kernel, and its declared mutation of out."""
    from fpn_fast.ops.conv import _triton_epilogue  # noqa: F401  (registers the op)

    out = torch.randn(2, 5, 6, 7, device=device)
    samples = [(out.clone(), torch.randn(5, device=device), torch.randn_like(out), True),
               (out.clone().contiguous(memory_format=torch.channels_last), None, None, True),
               (out.clone(), torch.randn(5, device=device), None, False)]
    for args in samples:
        torch.library.opcheck(torch.ops.fpn_fast_triton.bias_act_.default, args)


def test_prepacked_onednn_weights_are_bit_identical_and_not_saved(monkeypatch):
    """Conv2dAct prepacks its weight for oneDNN once (channels_last inputs): the outputs are the
    unpacked path's bit for bit, at the packing size and others; the pack is not pickled or
    copied, and is remade when the weight changes."""
    if ops.conv._onednn.unavailable_reason() is not None:
        pytest.skip("needs oneDNN's fused convolution")
    # The modules' own caches (plan=False): a plan holds the packs it was made with.
    optimized = fpn_fast.optimize_for_inference(_backbone(), plan=False)
    sizes = [(1, 3, 96, 128), (2, 3, 67, 91)]
    with torch.no_grad():
        packed = [optimized(torch.randn(size, generator=torch.Generator().manual_seed(i)))
                  for i, size in enumerate(sizes)]
        assert any("_onednn_weight" in vars(m).get("_packs", {}) for m in optimized.modules())
        monkeypatch.setattr(ops.conv._onednn, "pack_weight", lambda weight, *args: weight)
        for m in optimized.modules():
            vars(m).get("_packs", {}).pop("_onednn_weight", None)
        plain = [optimized(torch.randn(size, generator=torch.Generator().manual_seed(i)))
                 for i, size in enumerate(sizes)]
    for got, want in zip(packed, plain):
        for name in want:
            assert torch.equal(got[name], want[name]), name
    monkeypatch.undo()
    with torch.no_grad():
        optimized(torch.randn(sizes[0]))
    buffer = io.BytesIO()
    torch.save(optimized, buffer)
    copied = copy.deepcopy(optimized)
    assert not any("_onednn_weight" in vars(m).get("_packs", {}) for m in copied.modules())
    # the FPN's 24x32 level ran the extension's Winograd convolution, else NNPACK's sliced path
    cache = ("_winograd_weight" if ops.conv._winograd.unavailable_reason() is None
             else "_nnpack_weight" if ops.conv._nnpack.sliced_unavailable_reason() is None else None)
    if cache is not None:
        assert any(cache in vars(m).get("_packs", {}) for m in optimized.modules())
        assert not any(cache in vars(m).get("_packs", {}) for m in copied.modules())
        assert not any(cache in vars(m).get("_packs", {}) for m in torch.load(io.BytesIO(buffer.getvalue()),
                                                            weights_only=False).modules())
    conv = next(m for m in optimized.modules() if isinstance(m, Conv2dAct) and "_onednn_weight" in vars(m).get("_packs", {}))
    with torch.no_grad():
        conv.weight.mul_(2)  # the cached pack must follow the weight
        x = torch.randn(1, conv.weight.shape[1] * conv.groups, 12, 12).contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(conv(x), ops.conv2d_act(x, conv.weight, conv.bias, conv.stride, conv.padding,
                                                          conv.dilation, conv.groups, relu=conv.relu),
                                   rtol=0, atol=0)


def test_unbatched_image_gives_torchvision_batched_maps():
    """torchvision's backbone takes a [C, H, W] image and returns [1, 256, h, w] maps (its first
    norm broadcasts against [1, C, 1, 1]); the optimized one does the same."""
    model = _backbone()
    reference = tv_resnet_fpn_backbone(backbone_name="resnet18", weights=None).eval()
    reference.load_state_dict(model.state_dict())
    image = torch.randn(3, 75, 83)
    for options in ({}, {"channels_last": False}):
        optimized = fpn_fast.optimize_for_inference(model, **options)
        with torch.no_grad():
            got, want, batched = optimized(image), reference(image), optimized(image[None])
        for name in want:
            assert got[name].shape == want[name].shape == batched[name].shape
            assert torch.equal(got[name], batched[name])
            assert (got[name] - want[name]).abs().max() <= 1e-4 * want[name].abs().max()
