"""The extension's Winograd F(4x4, 3x3) convolution (``fpn_fast::winograd_conv_3x3``,
``ops.conv._winograd``) and its place in ``ops.conv2d_act`` / ``ops.conv2d_nchw``.

Every result is compared with F.conv2d computed in float64 on fresh random inputs: odd map sizes
(partial 4x4 output tiles on both edges), channel counts off the kernels' 64-channel runs, batch
1-3, every padding the op takes, both output layouts, and batches of products split several ways
(padded last batch entry, several chunks). Winograd rounds differently from the direct sum
(transform entries up to 8): the bound is 1e-4 of the output's largest value; measured 6e-6 to
1.4e-5 (oneDNN's direct convolution: ~1.5e-6). Non-finite inputs must give eager's NaN / +inf /
-inf masks through the ops (the op flags them; the direct convolution recomputes). Through the
public ops, on every backend, dtype and layout, the route is held to its declared rounding by
test_conv.py's OpTester.
"""
import copy
import io
import pickle

import pytest
import torch
import torch.nn.functional as F

import fpn_fast
from fpn_fast import ops
from fpn_fast.inference import Conv2dAct
from fpn_fast.ops.conv import _winograd

pytestmark = pytest.mark.skipif(_winograd.unavailable_reason() is not None,
                                reason=f"the extension's Winograd convolution is unusable here: "
                                       f"{_winograd.unavailable_reason()}")

BOUND = 1e-4


def _inputs(n, c, h, w, k, seed, bias=True):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=generator).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(k, c, 3, 3, generator=generator) / (9 * c) ** 0.5
    b = torch.randn(k, generator=generator) if bias else None
    return x, weight, b


def _reference(x, weight, bias, padding, relu=False):
    out = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), 1, padding)
    return out.relu() if relu else out


def _error(out, want):
    return (out.double() - want).abs().max().item() / want.abs().max().item()


def _op(x, weight, bias, padding, relu=False, channels_last=True, group=None, chunk=None, packed=None):
    count = _winograd.tiles(x.shape, padding)
    group = group or _winograd.group_for(count)
    chunk = chunk or _winograd.chunk_tiles(x.shape[1], weight.shape[0], count, group)
    u = packed if packed is not None else _winograd.kernel_transforms(weight)
    return torch.ops.fpn_fast.winograd_conv_3x3(x, u, bias, weight.shape[0], list(padding), relu, channels_last,
                                                group, chunk)


_SHAPES = [(1, 32, 20, 20, 32), (2, 37, 13, 11, 19), (1, 70, 9, 17, 130), (3, 5, 6, 7, 3), (1, 130, 23, 5, 66),
           (1, 8, 3, 3, 4), (2, 64, 1, 30, 8)]
# Every shape with every padding that leaves an output pixel (a 1-row map needs padding 1).
_CASES = [(shape, padding) for shape in _SHAPES for padding in [(1, 1), (0, 0), (1, 0), (0, 1)]
          if shape[2] + 2 * padding[0] >= 3 and shape[3] + 2 * padding[1] >= 3]


@pytest.mark.parametrize("shape,padding", _CASES, ids=lambda v: "x".join(map(str, v)))
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc_out", "nchw_out"])
@pytest.mark.parametrize("bias,relu", [(True, False), (False, True), (True, True)], ids=["bias", "relu", "bias_relu"])
def test_op_matches_float64_conv2d(shape, padding, channels_last, bias, relu):
    n, c, h, w, k = shape
    x, weight, b = _inputs(n, c, h, w, k, seed=sum(shape) + padding[0], bias=bias)
    out, finite = _op(x, weight, b, padding, relu, channels_last)
    want = _reference(x, weight, b, padding, relu)
    assert finite
    assert out.shape == want.shape and out.dtype == torch.float32
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert _error(out, want) <= BOUND
    if relu:
        assert (out >= 0).all()


@pytest.mark.parametrize("group,chunk", [(1, 1), (3, 6), (5, 5), (7, 70), (16, 32), (64, 64), (128, 1024)],
                         ids=lambda v: str(v))
def test_batches_of_any_entry_size_and_chunk_agree(group, chunk):
    """The products run in batches of ``group`` tiles (the last entry padded with zero tiles),
    ``chunk`` tiles per call: every split gives the same map to float rounding."""
    x, weight, b = _inputs(2, 24, 19, 26, 40, seed=group)  # 2 x 5 x 7 = 70 tiles
    want = _reference(x, weight, b, (1, 1))
    out, finite = _op(x, weight, b, (1, 1), group=group, chunk=chunk)
    assert finite and _error(out, want) <= BOUND
    whole, _ = _op(x, weight, b, (1, 1), group=70, chunk=70)
    torch.testing.assert_close(out, whole, rtol=0, atol=1e-5 * whole.abs().max().item())


def test_a_pack_for_one_entry_size_serves_maps_of_every_size():
    """Conv2dAct keeps the entry size of its first map: maps of other sizes run in batches of it,
    from the same prepacked kernel transforms."""
    weight = torch.randn(48, 40, 3, 3) / 60 ** 0.5
    b = torch.randn(48)
    packed = _winograd.pack(weight, 25)
    for seed, (n, h, w) in enumerate([(1, 20, 20), (1, 7, 9), (2, 41, 37), (1, 100, 3)]):
        x, _, _ = _inputs(n, 40, h, w, 48, seed=seed)
        count = _winograd.tiles(x.shape, (1, 1))
        out, finite = _op(x, weight, b, (1, 1), group=25, chunk=_winograd.chunk_tiles(40, 48, count, 25),
                          packed=packed)
        assert finite and _error(out, _reference(x, weight, b, (1, 1))) <= BOUND


def test_group_to_use_pads_at_most_an_eighth_or_falls_back():
    for first, count, want in [(25, 25, 25), (25, 50, 25), (25, 26, 16), (100, 400, 100), (100, 380, 100), (100, 330, 16),
                               (100, 3800, 100), (124, 3790, 124), (9, 10, 16), (128, 112, 16), (128, 120, 128)]:
        assert _winograd.group_to_use(first, count) == want, (first, count)


def test_group_and_chunk_choices():
    for count in [1, 9, 25, 100, 128]:
        assert _winograd.group_for(count) == count  # one exact entry up to 128 tiles
    for count in [129, 247, 400, 950, 3800, 4001]:
        group = _winograd.group_for(count)
        assert 64 <= group <= 128
        padded = -(-count // group) * group
        assert all(padded <= -(-count // g) * g for g in range(64, 129))  # pads least
    for c, k, count, group in [(256, 256, 400, 100), (64, 64, 3800, 100), (512, 512, 9, 9), (2048, 2048, 300, 100)]:
        chunk = _winograd.chunk_tiles(c, k, count, group)
        assert chunk % group == 0 and group <= chunk <= -(-count // group) * group
    assert _winograd.tiles((2, 8, 13, 11), (1, 1)) == 2 * 4 * 3
    assert _winograd.tiles((1, 8, 13, 11), (0, 0)) == 3 * 3


def test_kernel_transforms_follow_the_published_matrices():
    """G g G^T with Lavin & Gray's F(4x4, 3x3) G written out here, for random kernels."""
    g = torch.tensor([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]], dtype=torch.float64)
    weight = torch.randn(3, 2, 3, 3)
    u = _winograd.kernel_transforms(weight).reshape(6, 6, 3, 2)  # rows (point, out channel), cols in
    for k in range(3):
        for c in range(2):
            want = (g @ weight[k, c].double() @ g.T).float()
            assert torch.equal(u[:, :, k, c], want)


def test_prepacked_transforms_over_several_chunks_and_a_short_last_one():
    """The opaque oneDNN pack run chunk by chunk, the last chunk narrower and its last entry padded."""
    x, weight, b = _inputs(1, 48, 37, 29, 40, seed=13)  # 10 x 7 = 70 tiles
    packed = _winograd.pack(weight, 8)
    want = _reference(x, weight, b, (1, 1), relu=True)
    for chunk in (8, 24, 64, 72):
        out, finite = _op(x, weight, b, (1, 1), relu=True, group=8, chunk=chunk, packed=packed)
        assert finite and _error(out, want) <= BOUND, chunk


def test_thread_counts_and_concurrent_calls_agree():
    """One or two intra-op threads, and two Python threads calling at once: the same map."""
    import threading
    x, weight, b = _inputs(2, 64, 45, 38, 64, seed=17)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single, _ = _op(x, weight, b, (1, 1))
        torch.set_num_threads(2)
        double, _ = _op(x, weight, b, (1, 1))
    finally:
        torch.set_num_threads(previous)
    torch.testing.assert_close(double, single, rtol=0, atol=1e-5 * single.abs().max().item())
    results = [None, None]

    def run(i):
        results[i] = _op(x, weight, b, (1, 1))[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for out in results:
        torch.testing.assert_close(out, single, rtol=0, atol=1e-5 * single.abs().max().item())


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf"), 3e36], ids=str)
def test_non_finite_and_huge_outputs_are_flagged(value):
    x, weight, b = _inputs(1, 32, 21, 22, 16, seed=7)
    x[0, 3, 10, 11] = value
    _, finite = _op(x, weight, b, (1, 1))
    assert not finite
    weight_inf = weight.clone()
    weight_inf[2, 1, 1, 1] = value  # a non-finite weight too
    _, finite = _op(_inputs(1, 32, 21, 22, 16, seed=8)[0], weight_inf, b, (1, 1))
    assert not finite


@pytest.mark.parametrize("value", [float("inf"), 3e36], ids=str)
@pytest.mark.parametrize("route", ["conv2d_act", "conv2d_nchw"])
def test_ops_hand_non_finite_results_to_the_direct_conv(value, route):
    """Winograd spreads a non-finite input over its tile (inf - inf = NaN), and near float32's
    overflow it rounds apart from the direct sum: those results are recomputed by the direct
    convolution, so the masks equal eager's (NaN, +inf and -inf through the ops on every backend:
    test_conv.py's OpTester, test_non_finite)."""
    x, weight, b = _inputs(1, 64, 33, 35, 48, seed=11)
    x[0, 2, 10, 11] = value
    x[0, 50, 30, 3] = value
    args = (x, weight, b, (1, 1), (1, 1), (1, 1), 1)
    with torch.no_grad():
        if route == "conv2d_act":
            assert ops.resolve("conv2d_act", "cpu", lambda impl: ops.conv.conv2d_act_supports(
                impl, x, weight, b, (1, 1), (1, 1), (1, 1), True, None)) == "winograd"
            out = ops.conv2d_act(x, weight, b, (1, 1), (1, 1), relu=True)
            want = F.conv2d(x, weight, b, 1, 1).relu()
        else:
            assert ops.conv.conv2d_nchw_implementation(*args) == "winograd"
            out = ops.conv2d_nchw(x, weight, b, (1, 1), (1, 1))
            want = F.conv2d(x, weight, b, 1, 1)
        raw, _ = _op(x, weight, b, (1, 1), relu=route == "conv2d_act")
    if value != 3e36:  # the case is real: Winograd alone would not match eager's mask
        assert not torch.equal(raw.isnan(), want.isnan()) or not torch.equal(raw.isinf(), want.isinf())
    for mask in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(mask(out), mask(want))
    finite = want.isfinite()
    torch.testing.assert_close(out[finite], want[finite], rtol=1e-5, atol=1e-5 * want[finite].abs().max().item())


def test_conv2d_act_hands_non_finite_results_with_a_residual_to_the_direct_conv():
    x, weight, b = _inputs(1, 64, 24, 25, 32, seed=5)
    x[0, 7, 3, 4] = float("inf")
    r = torch.randn(1, 32, 24, 25).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = ops.conv2d_act(x, weight, b, (1, 1), (1, 1), relu=True, residual=r)
        want = (F.conv2d(x, weight, b, 1, 1) + r).relu()
    for mask in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(mask(out), mask(want))
    assert not want.isfinite().all()


def test_winograd_false_keeps_the_direct_convolution():
    x, weight, b = _inputs(1, 64, 30, 30, 64, seed=6)
    with torch.no_grad():
        out = ops.conv2d_act(x, weight, b, (1, 1), (1, 1), relu=True, winograd=False)
        want = ops.conv.conv2d_act_direct(x, weight, b, (1, 1), (1, 1), (1, 1), 1, True, None, None)
        nchw = ops.conv2d_nchw(x, weight, b, (1, 1), (1, 1), winograd=False)
        nchw_want = ops.to_nchw(ops.conv.conv2d_act_direct(x, weight, b, (1, 1), (1, 1), (1, 1), 1, False, None, None))
    assert torch.equal(out, want) and torch.equal(nchw, nchw_want)
    assert ops.conv2d_nchw_input_format(x, weight, b, (1, 1), (1, 1), winograd=False) == torch.channels_last
    assert ops.conv.conv2d_nchw_implementation(x, weight, b, (1, 1), (1, 1), (1, 1), 1, False) not in ("winograd", "nnpack")


def test_models_optimized_under_inference_mode_see_weight_edits():
    """Optimized under torch.inference_mode, the folded weights are still normal tensors (inference
    tensors have no version counter): an in-place edit, even inside inference mode, remakes the packs."""
    x = torch.randn(1, 3, 96, 96)
    with torch.inference_mode():
        model = fpn_fast.optimize_for_inference(fpn_fast.resnet_fpn_backbone(backbone_name="resnet18").eval())
        model(x)
        assert any("_winograd_weight" in m._pack_cache() for m in model.modules() if hasattr(m, "_pack_cache"))
        convs = [m for m in model.modules() if isinstance(m, Conv2dAct)]
        assert not any(m.weight.is_inference() for m in convs)
        for m in convs:
            m.weight.mul_(0.5)
        got = model(x)
        want = copy.deepcopy(model)(x)  # no packs copied: made afresh from the edited weights
    for name in want:
        assert torch.equal(got[name], want[name]), name


def test_conv2d_act_lays_out_strided_views_as_conv2d_does():
    base = _inputs(1, 96, 23, 26, 8, seed=9)[0]
    weight = torch.randn(48, 64, 3, 3) / 24
    for x in (base[:, :64], base.contiguous()[:, :64], base.contiguous()[:, :64, ::2]):
        with torch.no_grad():
            out = ops.conv2d_act(x, weight, None, (1, 1), (1, 1))
            want = F.conv2d(x, weight, None, 1, 1)
        assert out.is_contiguous(memory_format=torch.channels_last) == want.is_contiguous(
            memory_format=torch.channels_last) and out.is_contiguous() == want.is_contiguous()
        assert _error(out, want.double()) <= BOUND


def test_conv2d_nchw_takes_nhwc_input_and_writes_nchw():
    x, weight, b = _inputs(1, 256, 20, 20, 256, seed=3)
    assert ops.conv2d_nchw_input_format(x, weight, b, (1, 1), (1, 1)) == torch.channels_last
    with torch.no_grad():
        out = ops.conv2d_nchw(x, weight, b, (1, 1), (1, 1))
    assert out.is_contiguous() and _error(out, _reference(x, weight, b, (1, 1))) <= BOUND


def test_dispatch_takes_winograd_only_where_it_fits_and_pays(monkeypatch):
    x, weight, b = _inputs(1, 64, 40, 40, 64, seed=1)

    def implementation(x=x, weight=weight, bias=b, stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1):
        return ops.conv.conv2d_nchw_implementation(x, weight, bias, stride, padding, dilation, groups)

    assert implementation() == "winograd"
    assert implementation(x=x.double(), weight=weight.double(), bias=b.double()) != "winograd"
    assert implementation(stride=(2, 2)) != "winograd"
    assert implementation(dilation=(2, 2)) != "winograd"
    assert implementation(padding=(2, 2)) != "winograd"
    assert implementation(weight=torch.randn(64, 32, 3, 3), groups=2) != "winograd"
    assert implementation(weight=torch.randn(64, 64, 5, 5)) != "winograd"
    assert implementation(x=x[:, :16], weight=weight[:, :16]) != "winograd"  # too few channels
    assert implementation(x=x[:, :, :12, :12]) != "winograd"  # too few tiles for 64 channels
    with ops.use_backend("torch"):
        assert implementation() == "torch"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert implementation() != "winograd"
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    assert implementation() != "winograd"  # its products run in oneDNN
    monkeypatch.undo()
    with torch.no_grad():  # a traced graph records no extension call (it may run elsewhere)
        traced = torch.jit.trace(lambda t: ops.conv2d_nchw(t, weight, b, (1, 1), (1, 1)), (x,), check_trace=False)
    assert "winograd" not in str(traced.graph)
    with pytest.raises(RuntimeError, match="inference only"):
        ops.conv2d_nchw(x, weight.clone().requires_grad_(), b, (1, 1), (1, 1))


def test_worthwhile_thresholds():
    assert not _winograd.worthwhile(16, 16, 400)
    assert _winograd.worthwhile(32, 32, 400)
    assert not _winograd.worthwhile(64, 64, 16) and _winograd.worthwhile(64, 64, 25)
    assert not _winograd.worthwhile(256, 256, 4) and _winograd.worthwhile(256, 256, 9)
    assert not _winograd.worthwhile(512, 512, 9) and _winograd.worthwhile(512, 512, 16)


def test_conv2d_act_module_keeps_its_pack_and_follows_the_weight():
    """Conv2dAct packs once, for the entry size of its first map; the pack is remade when the
    weight changes and is not pickled or copied."""
    weight = torch.randn(64, 64, 3, 3) / 24
    conv = Conv2dAct(weight, torch.randn(64), (1, 1), (1, 1), (1, 1), 1, relu=True)
    x = _inputs(1, 64, 30, 30, 64, seed=2)[0]
    with torch.no_grad():
        conv(x)
        key, group, packs = conv._pack_cache()["_winograd_weight"]
        assert group == _winograd.group_for(_winograd.tiles(x.shape, (1, 1))) == 64 and list(packs) == [64]
        packed = packs[64]
        conv(_inputs(1, 64, 45, 41, 64, seed=3)[0])  # 132 tiles: padded to 192 by 64, too much
        conv(_inputs(2, 64, 16, 15, 64, seed=3)[0])  # 32 tiles: not padded
        assert sorted(packs) == [_winograd.FALLBACK_GROUP, 64] and packs[64] is packed
        conv.weight.mul_(-1)
        out = conv(x)
    assert 64 not in conv._pack_cache()["_winograd_weight"][2] or conv._pack_cache()["_winograd_weight"][2][64] is not packed
    assert _error(out, _reference(x, conv.weight, conv.bias, (1, 1), relu=True)) <= BOUND
    assert "_winograd_weight" not in copy.deepcopy(conv)._pack_cache()
    assert "_winograd_weight" not in pickle.loads(pickle.dumps(conv))._pack_cache()
    buffer = io.BytesIO()
    torch.save(conv, buffer)
    assert "_winograd_weight" not in vars(torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)).get("_packs", {})


def test_optimized_backbone_runs_winograd_and_matches_torchvision():
    """The optimized ResNet50-FPN at an odd size: its 3x3 convs run Winograd (packs made) and every
    level stays within 1e-4 of torchvision's scale."""
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone
    from fpn_fast.demo.models import randomize_norms
    torch.manual_seed(0)
    model = fpn_fast.resnet_fpn_backbone(backbone_name="resnet50").eval()
    randomize_norms(model, 0)
    reference = resnet_fpn_backbone(backbone_name="resnet50", weights=None).eval()
    reference.load_state_dict(model.state_dict())
    optimized = fpn_fast.optimize_for_inference(model)
    x = torch.randn(1, 3, 131, 163)
    with torch.no_grad():
        got, want = optimized(x), reference(x)
    assert sum("_winograd_weight" in vars(m).get("_packs", {}) for m in optimized.modules()) >= 8
    for name in want:
        assert _error(got[name], want[name].double()) <= BOUND, name


@pytest.mark.parametrize("case", ["dtype", "layout", "padding", "packed_shape", "packed_dtype", "bias", "group",
                                  "chunk", "small", "channels", "dims"])
def test_bad_inputs_raise_clear_errors(case):
    x, weight, b = _inputs(1, 8, 10, 10, 4, seed=0)
    u = _winograd.kernel_transforms(weight)
    args = dict(x=x, packed=u, bias=b, out_channels=4, padding=[1, 1], relu=False, channels_last=True, group=4,
                chunk=8)
    expected = {"dtype": (TypeError, "float32"), "layout": (ValueError, "channels_last"),
                "padding": (ValueError, "padding"), "packed_shape": (ValueError, "packed must be"),
                "packed_dtype": (TypeError, "packed must be a float32"), "bias": (ValueError, "bias"),
                "group": (ValueError, "group"), "chunk": (ValueError, "multiple of group"),
                "small": (ValueError, "smaller than the 3x3 kernel"), "channels": (ValueError, "packed must be"),
                "dims": (ValueError, "4-D")}[case]
    if case == "dtype":
        args["x"] = x.double()
    elif case == "layout":
        args["x"] = x.contiguous()
    elif case == "padding":
        args["padding"] = [2, 1]
    elif case == "packed_shape":
        args["packed"] = u[:-1]
    elif case == "packed_dtype":
        args["packed"] = u.double()
    elif case == "bias":
        args["bias"] = torch.randn(5)
    elif case == "group":
        args["group"] = 0
    elif case == "chunk":
        args["chunk"] = 6
    elif case == "small":
        args["x"] = x[:, :, :2, :5].contiguous(memory_format=torch.channels_last)
        args["padding"] = [0, 0]
    elif case == "channels":
        args["x"] = _inputs(1, 9, 10, 10, 4, seed=0)[0]
    elif case == "dims":
        args["x"] = x[0]
    with pytest.raises(expected[0], match=expected[1]):
        torch.ops.fpn_fast.winograd_conv_3x3(**args)


def test_probe_reports_a_disagreeing_convolution(monkeypatch):
    _winograd.unavailable_reason.cache_clear()
    try:
        monkeypatch.setattr(_winograd, "kernel_transforms", lambda weight: torch.zeros(
            36 * weight.shape[0], weight.shape[1], 1, 1))
        assert "disagrees" in _winograd.unavailable_reason()
    finally:
        monkeypatch.undo()
        _winograd.unavailable_reason.cache_clear()
    assert _winograd.unavailable_reason() is None


def test_optimize_for_inference_can_keep_every_convolution_direct():
    """``winograd=False``: no Winograd route runs (no packs made) and the result equals the same
    model's with every Winograd implementation unavailable, bit for bit."""
    model = fpn_fast.resnet_fpn_backbone(backbone_name="resnet18").eval()
    direct = fpn_fast.optimize_for_inference(model, winograd=False)
    default = fpn_fast.optimize_for_inference(model)
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        got, fast = direct(x), default(x)
    assert not any("_winograd_weight" in vars(m).get("_packs", {}) or "_nnpack_weight" in vars(m).get("_packs", {}) for m in direct.modules())
    assert any("_winograd_weight" in vars(m).get("_packs", {}) for m in default.modules())
    with ops.use_backend("auto"), pytest.MonkeyPatch.context() as patch:
        patch.setattr(_winograd, "unavailable_reason", lambda: "off")
        patch.setattr(ops.conv._nnpack, "unavailable_reason", lambda: "off")
        ops.dispatch._PROBED.clear()
        try:
            with torch.no_grad():
                want = fpn_fast.optimize_for_inference(model)(x)
        finally:
            ops.dispatch._PROBED.clear()
    for name in want:
        assert torch.equal(got[name], want[name]), name
        assert _error(fast[name], want[name].double()) <= BOUND
