"""torch.compile(fullgraph=True) of fpn_fast's FeaturePyramidNetwork: no graph break, same results."""
from collections import OrderedDict

import pytest
import torch

import fpn_fast
from fpn_fast import ops

BACKENDS = sorted(ops.available_backends())
IN_CHANNELS = [8, 16, 24, 32]
SIZES = [(25, 38), (13, 19), (7, 11), (3, 5)]


@pytest.fixture(params=BACKENDS)
def backend(request):
    reason = ops.available_backends()[request.param]["cpu"]
    if reason is not None:
        pytest.skip(f"backend {request.param!r} cannot run on cpu: {reason}")
    torch._dynamo.reset()
    with ops.use_backend(request.param):
        yield request.param
    torch._dynamo.reset()


def _fpn_and_inputs(out_channels=16, batch=2, requires_grad=False):
    fpn = fpn_fast.FeaturePyramidNetwork(IN_CHANNELS, out_channels, extra_blocks=fpn_fast.LastLevelMaxPool())
    with torch.no_grad():
        for block in (*fpn.inner_blocks, *fpn.layer_blocks):
            block[0].bias.normal_(0.0, 0.1)
    x = OrderedDict((f"p{i}", torch.randn(batch, c, h, w).requires_grad_(requires_grad))
                    for i, ((h, w), c) in enumerate(zip(SIZES, IN_CHANNELS)))
    return fpn, x


def _assert_outputs_close(actual, expected, rtol=1e-5):
    assert list(actual) == list(expected) == ["p0", "p1", "p2", "p3", "pool"]
    for name in expected:
        scale = expected[name].abs().max().item()
        torch.testing.assert_close(actual[name], expected[name], rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_compiled_inference_matches(backend, compiler):
    fpn, x = _fpn_and_inputs()
    fpn.eval()
    compiled = torch.compile(fpn, backend=compiler, fullgraph=True)
    with torch.no_grad():
        expected = fpn(x)
        actual = compiled(x)
    _assert_outputs_close(actual, expected)


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
def test_compiled_training_matches(backend, compiler):
    fpn, x = _fpn_and_inputs(requires_grad=True)
    x_compiled = OrderedDict((k, v.detach().clone().requires_grad_()) for k, v in x.items())
    compiled = torch.compile(fpn, backend=compiler, fullgraph=True)
    expected = fpn(x)
    upstream = {k: torch.randn_like(v) for k, v in expected.items()}
    sum((expected[k] * g).sum() for k, g in upstream.items()).backward()
    expected_grads = {name: p.grad.clone() for name, p in fpn.named_parameters()}
    fpn.zero_grad()
    actual = compiled(x_compiled)
    _assert_outputs_close(actual, {k: v.detach() for k, v in expected.items()})
    sum((actual[k] * g).sum() for k, g in upstream.items()).backward()
    for name, p in fpn.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-5,
                                   atol=1e-5 * expected_grads[name].abs().max().item())
    for k in x:
        torch.testing.assert_close(x_compiled[k].grad, x[k].grad, rtol=1e-5, atol=1e-5 * x[k].grad.abs().max().item())


def test_no_graph_break(backend):
    fpn, x = _fpn_and_inputs()
    fpn.eval()
    with torch.no_grad():
        explanation = torch._dynamo.explain(fpn)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_inductor_inference_and_backward(backend):
    # Default backend on small shapes: C++ codegen for the convs' surroundings and the ops.
    fpn, x = _fpn_and_inputs(out_channels=8, batch=1)
    compiled = torch.compile(fpn, fullgraph=True)
    fpn.eval()
    with torch.no_grad():
        _assert_outputs_close(compiled(x), fpn(x), rtol=1e-4)
    fpn.train()
    x_grad = OrderedDict((k, v.clone().requires_grad_()) for k, v in x.items())
    actual = compiled(x_grad)
    sum(v.sum() for v in actual.values()).backward()
    grads = {name: p.grad.clone() for name, p in fpn.named_parameters()}
    fpn.zero_grad()
    expected = fpn(x)
    sum(v.sum() for v in expected.values()).backward()
    _assert_outputs_close({k: v.detach() for k, v in actual.items()}, {k: v.detach() for k, v in expected.items()},
                          rtol=1e-4)
    for name, p in fpn.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-4 * p.grad.abs().max().item())


def test_compiled_rejects_bad_input(backend):
    fpn, x = _fpn_and_inputs()
    x["p2"] = torch.randn(2, 23, 7, 11)
    message = r"feature map 'p2' \(level 2\) has 23 channels, its lateral block expects 24"
    # Dynamo hands the raise back to Python: the caller sees our ValueError.
    with pytest.raises(ValueError, match=message):
        torch.compile(fpn, backend="eager")(x)
    # fullgraph=True cannot fall back to Python for the raise; dynamo's error carries our message.
    torch._dynamo.reset()
    with pytest.raises(Exception, match=message):
        torch.compile(fpn, backend="eager", fullgraph=True)(x)
