"""The drop-in stays faithful to torchvision's FPN under what users do with it: hooks, conv
wrappers, pruning, parametrizations, replaced laterals, FPN subclasses, threads, tracing and
training, NaN inputs, pickling, aliased and empty inputs (issue 10's seven failures)."""
import copy
import io
import threading
from collections import OrderedDict, defaultdict

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

import fpn_fast
from fpn_fast import ops
from fpn_fast.ops import reference
from tests._models import IN_CHANNELS, assert_levels_close, random_features, randomise_  # noqa: F401

torchvision = pytest.importorskip("torchvision")
from torchvision.ops import FeaturePyramidNetwork as TvFPN  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool as TvLastLevelMaxPool  # noqa: E402

OUT_CHANNELS = 16


def fpn_pair():
    """torchvision's FPN with random weights and biases, and ours loaded from it."""
    tv = randomise_(TvFPN(IN_CHANNELS, OUT_CHANNELS, extra_blocks=TvLastLevelMaxPool()))
    ours = fpn_fast.FeaturePyramidNetwork(IN_CHANNELS, OUT_CHANNELS, extra_blocks=fpn_fast.LastLevelMaxPool())
    ours.load_state_dict(tv.state_dict())
    return tv.eval(), ours.eval()


def run_both(tv, ours, grad=False):
    feats = random_features()
    with torch.set_grad_enabled(grad):
        return tv(copy.deepcopy(feats)), ours(feats)


class TwiceConv(nn.Conv2d):
    """A conv wrapper (as LoRA / fake-quant wrappers are): same weights, its own forward."""

    def forward(self, x):
        return 2 * super().forward(x)


def _twice(conv):
    wrapped = TwiceConv(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
    wrapped.load_state_dict(conv.state_dict())
    return wrapped


class Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


def _replace_lateral(fpn, level, make):
    fpn.inner_blocks[level][0] = make(fpn.inner_blocks[level][0])


LATERAL_CHANGES = {
    # Each changes what torchvision computes: the drop-in must follow.
    "conv subclass": lambda fpn: _replace_lateral(fpn, 1, _twice),
    "prune": lambda fpn: prune.l1_unstructured(fpn.inner_blocks[2][0], "weight", amount=0.5),
    "parametrization": lambda fpn: parametrize.register_parametrization(fpn.inner_blocks[0][0], "weight", Doubled()),
    "3x3 lateral": lambda fpn: fpn.inner_blocks.__setitem__(
        3, nn.Sequential(randomise_(nn.Conv2d(IN_CHANNELS[3], OUT_CHANNELS, 3, padding=1)))),
    "identity lateral": lambda fpn: fpn.inner_blocks.__setitem__(1, nn.Sequential(nn.Identity())),
    "forward hook scales": lambda fpn: fpn.inner_blocks[2].register_forward_hook(lambda m, i, o: o * 3),
    "forward pre-hook": lambda fpn: fpn.inner_blocks[0][0].register_forward_pre_hook(lambda m, i: (i[0] + 1,)),
}


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("change", list(LATERAL_CHANGES))
def test_changed_laterals_give_torchvision_outputs(change, grad, backend):
    tv, ours = fpn_pair()
    feats = random_features()
    with torch.no_grad():
        before = ours(copy.deepcopy(feats))
    for fpn in (tv, ours):
        torch.manual_seed(1)  # the 3x3 lateral's random weights: the same in both
        LATERAL_CHANGES[change](fpn)
    with torch.set_grad_enabled(grad):
        expected = tv(copy.deepcopy(feats))
        actual = ours(feats)
    assert_levels_close(actual, expected)
    # The change does change the result, so agreeing with torchvision above is not vacuous.
    assert any(not torch.allclose(actual[k], before[k], atol=1e-3) for k in before)


def _count_module_calls(model):
    """Forward pre-hooks and hooks on every submodule, counting calls by name."""
    calls = defaultdict(int)
    for name, module in model.named_modules():
        module.register_forward_pre_hook(lambda m, i, name=name: calls.__setitem__(f"pre {name}", calls[f"pre {name}"] + 1))
        module.register_forward_hook(lambda m, i, o, name=name: calls.__setitem__(name, calls[name] + 1))
    return calls


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_hooks_on_every_submodule_fire_as_in_torchvision(grad, backend):
    tv, ours = fpn_pair()
    tv_calls, our_calls = _count_module_calls(tv), _count_module_calls(ours)
    expected, actual = run_both(tv, ours, grad)
    assert dict(our_calls) == dict(tv_calls)
    assert our_calls["inner_blocks.0.0"] == 1 and our_calls["extra_blocks"] == 1
    assert_levels_close(actual, expected)  # hooks that return None change nothing


def test_lateral_maps_seen_by_hooks_are_not_overwritten(backend):
    _, ours = fpn_pair()
    seen = []
    for block in ours.inner_blocks:
        block.register_forward_hook(lambda m, i, out: seen.append((out, out.clone())))
    with torch.no_grad():
        ours(random_features())
    assert len(seen) == len(IN_CHANNELS)
    for out, copy_at_hook_time in seen:
        assert torch.equal(out, copy_at_hook_time)


class ScaledFPN(TvFPN):
    """A user's subclass: one extra parameter and its own forward."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.scale = nn.Parameter(torch.tensor(1.7))

    def forward(self, x):
        return OrderedDict((k, v * self.scale) for k, v in super().forward(x).items())


def test_convert_leaves_torchvision_fpn_subclasses_alone():
    model = nn.ModuleDict({"fpn": randomise_(ScaledFPN(IN_CHANNELS, OUT_CHANNELS)).eval()})
    feats = random_features()
    with torch.no_grad():
        before = model["fpn"](copy.deepcopy(feats))
    fpn = model["fpn"]
    with pytest.warns(UserWarning, match="fpn is a ScaledFPN, a subclass"):
        fpn_fast.convert(model)
    assert model["fpn"] is fpn
    assert "fpn.scale" in model.state_dict() and "fpn.scale" in dict(model.named_parameters())
    with torch.no_grad():
        after = model["fpn"](feats)
    for k in before:
        assert torch.equal(after[k], before[k])


def test_convert_keeps_hooks_and_blocks_of_the_torchvision_fpn():
    tv, _ = fpn_pair()
    calls = []
    handle = tv.register_forward_hook(lambda m, i, o: calls.append("fpn"))
    tv.inner_blocks[1].register_forward_hook(lambda m, i, o: calls.append("inner 1"))
    blocks = tv.inner_blocks
    model = nn.ModuleDict({"fpn": tv})
    fpn_fast.convert(model)
    assert isinstance(model["fpn"], fpn_fast.FeaturePyramidNetwork) and model["fpn"].inner_blocks is blocks
    with torch.no_grad():
        model["fpn"](random_features())
    assert sorted(calls) == ["fpn", "inner 1"]
    handle.remove()  # the handle still reaches the registry the converted FPN uses
    with torch.no_grad():
        model["fpn"](random_features())
    assert calls.count("fpn") == 1


@pytest.mark.parametrize("needs_grad", ["lateral", "top", "bias"])
def test_in_place_step_refuses_tensors_that_need_grad(needs_grad, backend):
    lateral = torch.randn(1, 3, 8, 10)
    top = torch.randn(1, 3, 4, 5)
    bias = torch.randn(3)
    leaf = {"lateral": lateral, "top": top, "bias": bias}[needs_grad].requires_grad_()
    if needs_grad == "lateral":
        lateral = leaf * 1  # a non-leaf, as a conv output would be
    with pytest.raises(RuntimeError, match="in place and has no gradient"):
        ops.upsample_add_(lateral, top, bias)
    with torch.no_grad():  # the same call without autograd is fine
        ops.upsample_add_(lateral, top, bias)


def test_registered_in_place_op_refuses_tensors_that_need_grad():
    if ops.available_backends()["extension"]["cpu"] is not None:
        pytest.skip("the extension is not built")
    lateral = torch.randn(1, 3, 8, 10, requires_grad=True) * 1
    top = torch.randn(1, 3, 4, 5, requires_grad=True)
    with pytest.raises(RuntimeError, match="in place and has no gradient"):
        torch.ops.fpn_fast.upsample_add_(lateral, top, None)
    fresh = torch.randn(1, 3, 8, 10)
    version = fresh._version
    torch.ops.fpn_fast.upsample_add_(fresh, top.detach(), None)
    assert fresh._version > version  # in-place writes are visible to autograd's version checks


def _grads(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("capture", ["jit.trace", "export"])
def test_graph_captured_under_no_grad_then_trained_gives_torchvision_grads_or_raises(capture, backend):
    tv, ours = fpn_pair()
    tv.train(), ours.train()
    feats = random_features()
    with torch.no_grad():
        if capture == "jit.trace":
            captured = torch.jit.trace(ours, (copy.deepcopy(feats),), strict=False)
        else:
            captured = torch.export.export(ours, (copy.deepcopy(feats),)).module()
    sum(v.square().sum() for v in tv(copy.deepcopy(feats)).values()).backward()
    try:
        out = captured(copy.deepcopy(feats))
        sum(v.square().sum() for v in out.values()).backward()
    except RuntimeError as err:
        assert "no gradient" in str(err)
        return
    expected = _grads(tv)
    actual = _grads(captured)
    assert set(actual) == set(expected)
    for name, grad in expected.items():
        assert actual[name] is not None, name
        torch.testing.assert_close(actual[name], grad, rtol=1e-4, atol=1e-4 * grad.abs().max().item())


def test_to_nchw_passes_the_gradient(backend):
    x = torch.randn(2, 5, 7, 9).contiguous(memory_format=torch.channels_last).requires_grad_()
    weights = torch.randn(2, 5, 7, 9)
    (ops.to_nchw(x) * weights).sum().backward()
    assert torch.equal(x.grad, weights)


def _counting(monkeypatch, module, name, calls):
    original = getattr(module, name)

    def counted(*args, **kwargs):
        calls[threading.current_thread().name].append(module.__name__.rsplit(".", 1)[-1])
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, counted)


def test_use_backend_is_per_thread(monkeypatch):
    if ops.available_backends()["extension"]["cpu"] is not None:
        pytest.skip("needs the extension beside the torch backend")
    from fpn_fast.ops.top_down import _extension
    calls = defaultdict(list)
    for module in (_extension, reference):
        _counting(monkeypatch, module, "upsample_add", calls)
    default = ops.get_backend()
    entered, leave_first = threading.Barrier(2), threading.Event()
    errors = []

    def worker(name, first):
        try:
            with ops.use_backend(name):
                entered.wait(timeout=30)  # both threads are inside their own use_backend now
                for _ in range(3):
                    ops.upsample_add(torch.randn(1, 2, 6, 6), torch.randn(1, 2, 3, 3))
                if not first:
                    leave_first.wait(timeout=30)  # exit after the other thread left its block
            if first:
                leave_first.set()
            ops.upsample_add(torch.randn(1, 2, 6, 6), torch.randn(1, 2, 3, 3))  # back to the default
        except Exception as err:  # surfaced in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=("torch", True), name="torch"),
               threading.Thread(target=worker, args=("extension", False), name="extension")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    auto_cpu = ops.TABLE[("upsample_add", "cpu")]["auto"][0]
    assert calls["torch"] == ["reference"] * 3 + ["reference" if auto_cpu == "torch" else "_extension"]
    assert calls["extension"] == ["_extension"] * 4
    assert ops.get_backend() == default


def test_compiled_function_follows_use_backend_without_graph_break():
    from torch._dynamo.testing import CompileCounter

    counter = CompileCounter()
    compiled = torch.compile(lambda lat, top: ops.upsample_add(lat, top), backend=counter, fullgraph=True)
    lateral, top = torch.randn(1, 2, 6, 6), torch.randn(1, 2, 3, 3)
    expected = reference.upsample_add(lateral, top)
    with ops.use_backend("torch"):
        assert torch.equal(compiled(lateral, top), expected)
    assert counter.frame_count == 1
    with ops.use_backend("extension" if ops.available_backends()["extension"]["cpu"] is None else "triton"):
        assert torch.equal(compiled(lateral, top), expected)
    assert counter.frame_count == 2  # recompiled for the other backend


def _random_backbone(name="resnet18"):
    torch.manual_seed(0)
    return randomise_(fpn_fast.resnet_fpn_backbone(backbone_name=name)).eval()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
# 135x161: the finest FPN level is 34x41 pixels, where the output conv runs NNPACK's Winograd;
# resnet50 at 167x175: layer2's 3x3 convs (128 channels, 21x22) run it too
@pytest.mark.parametrize("name,size", [("resnet18", (67, 91)), ("resnet18", (135, 161)), ("resnet50", (167, 175))],
                         ids=lambda v: v if isinstance(v, str) else f"{v[0]}x{v[1]}")
def test_optimized_model_propagates_non_finite_input_as_eager(value, name, size):
    model = _random_backbone(name)
    optimized = fpn_fast.optimize_for_inference(model)
    image = torch.randn(1, 3, *size)
    image[0, 1, 30, 40] = value
    with torch.no_grad():
        expected, actual = model(image), optimized(image)
    for name in expected:
        assert expected[name].isnan().any() or expected[name].isinf().any(), name  # non-trivial
        assert torch.equal(actual[name].isnan(), expected[name].isnan()), name
        assert torch.equal(actual[name] == float("inf"), expected[name] == float("inf")), name
        assert torch.equal(actual[name] == float("-inf"), expected[name] == float("-inf")), name


def test_optimized_models_pickle_and_reload():
    from torchvision.models.detection import fasterrcnn_resnet50_fpn

    backbone = fpn_fast.optimize_for_inference(_random_backbone())
    detector = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=96,
                                       max_size=128).eval()
    detector = fpn_fast.optimize_for_inference(detector)
    image = torch.rand(3, 100, 120)
    for model, inputs in ((backbone, image[None]), (detector, [image])):
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        with torch.no_grad():
            expected, actual = model(inputs), loaded(inputs)
        if isinstance(expected, list):  # detections
            expected, actual = expected[0], actual[0]
        for key in expected:
            assert torch.equal(actual[key], expected[key]), key


def test_in_place_step_with_top_aliasing_lateral(backend):
    storage = torch.randn(2, 3, 12, 14)
    lateral = storage[:, :, :9, :11]
    top = storage[:, :, 2::2, 1::2][:, :, :5, :6]  # shares elements with lateral
    bias = torch.randn(3)
    expected = reference.upsample_add(lateral.clone(), top.clone(), bias)
    ops.upsample_add_(lateral, top, bias)
    assert torch.equal(lateral, expected)
    same = torch.randn(1, 2, 5, 7)  # top is lateral itself
    expected = reference.upsample_add(same.clone(), same.clone(), None)
    ops.upsample_add_(same, same)
    assert torch.equal(same, expected)


def test_in_place_step_refuses_an_expanded_lateral(backend):
    lateral = torch.randn(1, 3, 1, 8).expand(1, 3, 6, 8)
    with pytest.raises(RuntimeError, match="memory"):
        ops.upsample_add_(lateral, torch.randn(1, 3, 3, 4))


EMPTY_CASES = {  # lateral shape, top shape
    "no channels": ((2, 0, 6, 8), (2, 0, 3, 4)),
    "no rows": ((2, 3, 0, 8), (2, 3, 3, 4)),
    "empty planes": ((2, 3, 0, 8), (2, 3, 0, 4)),
    "no batch": ((0, 3, 6, 8), (0, 3, 3, 4)),
}


@pytest.mark.parametrize("case", list(EMPTY_CASES))
def test_empty_maps_agree_on_every_backend(case, backend):
    lateral_shape, top_shape = EMPTY_CASES[case]
    lateral, top = torch.randn(lateral_shape), torch.randn(top_shape)
    bias = torch.randn(lateral_shape[1])
    out = ops.upsample_add(lateral, top, bias)
    assert out.shape == lateral.shape
    assert ops.upsample_add_(lateral, top, bias) is lateral
    lateral.requires_grad_(), top.requires_grad_(), bias.requires_grad_()
    ops.upsample_add(lateral, top, bias).sum().backward()
    assert torch.equal(top.grad, torch.zeros_like(top)) and torch.equal(bias.grad, torch.zeros_like(bias))
