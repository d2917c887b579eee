"""fpn_fast.ops.stride2_pool (the FPN 'pool' level) on every backend x device x dtype x layout,
bit for bit against torchvision's F.max_pool2d(x, 1, 2, 0), from the one case list in
tests/_cases.py. The "extension" backend names ATen's strided copy for this op (see
test_ops.test_named_backend_meaning_per_op)."""
import pytest
import torch

import fpn_fast.ops as ops
from fpn_fast.ops import reference
from tests._cases import BACKENDS, DTYPES, SHAPES, TRITON_SHAPES, laid_out, running

LAYOUTS = ("contiguous", "channels_last", "sliced")


def _maps(cases):
    """The lateral maps of the case list: odd sizes, 1x1, 3x1, batch 0, empty channels and planes."""
    return sorted({case[0] for case in cases})


def _backend_maps():
    return [pytest.param(backend, shape, id=f"{backend}-{'x'.join(map(str, shape))}")
            for backend in BACKENDS for shape in _maps(TRITON_SHAPES if backend == "triton" else SHAPES)]


@pytest.fixture
def on_backend(request, device):
    backend = request.node.callspec.params["backend"]
    with running("stride2_pool", backend, device):
        yield backend


@pytest.mark.parametrize("backend,shape", _backend_maps())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_and_backward_bit_exact(backend, shape, dtype, layout, device, on_backend):
    x = laid_out(torch.randn(shape, device=device).to(dtype), layout).requires_grad_()
    ref_x = x.detach().clone().requires_grad_()
    out = ops.stride2_pool(x)
    # torchvision's max_pool2d refuses empty channels and planes; there the definition itself
    expected = reference.stride2_pool_max_pool(ref_x) if all(shape[1:]) else ref_x[:, :, ::2, ::2]
    assert torch.equal(out, expected)
    assert out.is_contiguous(memory_format=reference.memory_format_of(x.detach()))
    grad = laid_out(torch.randn(expected.shape, device=device).to(dtype), layout)
    out.backward(grad)
    expected.backward(grad)
    assert torch.equal(x.grad, ref_x.grad)
    if x.numel() and layout != "sliced":
        assert x.grad.stride() == x.stride()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradcheck_float64(backend, device, on_backend):
    for shape in ((1, 2, 5, 6), (2, 3, 7, 1)):
        for layout in LAYOUTS:
            x = laid_out(torch.randn(shape, dtype=torch.float64, device=device), layout).requires_grad_()
            assert torch.autograd.gradcheck(ops.stride2_pool, (x,), fast_mode=True), (shape, layout)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call,error,match", [
    pytest.param(lambda d: ops.stride2_pool(torch.randn(3, 8, 8, device=d)), ValueError, "4-D", id="3-D"),
    pytest.param(lambda d: ops.stride2_pool(torch.ones(1, 3, 8, 8, dtype=torch.int32, device=d)), TypeError,
                 "floating", id="integer dtype"),
    pytest.param(lambda d: ops.stride2_pool([[1.0]]), TypeError, "must be a tensor", id="not a tensor"),
])
def test_bad_input_is_the_same_error_on_every_backend(backend, call, error, match, device, on_backend):
    with pytest.raises(error, match=match):
        call(device)
