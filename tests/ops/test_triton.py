"""What only the Triton backend (fpn_fast.ops._triton) has: the triton_op registration, inductor
compiling its kernels on a GPU, the registered in-place op's refusal, and its tiling and int64
offset paths. Parity with the reference, opcheck and torch.compile of its ops on every backend are
the OpTester's (test_upsample_add.py, test_stride2_pool.py, test_conv.py, test_lateral.py).

Without a GPU the kernels run on CPU tensors through the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1 before anything imports triton); with one, the same checks run compiled on
CUDA tensors (the `cuda` marker) and the CPU-tensor cases skip.
"""
import os

import pytest
import torch
import torch.nn.functional as F

from fpn_fast.ops import _triton, reference
from fpn_fast.ops.pool import _triton as pool_triton
from fpn_fast.ops.top_down import _triton as top_down_triton
from tests._cases import laid_out, require


@pytest.fixture
def triton_device(device):
    require("triton", device)
    return device


def test_triton_is_installed_and_runs_here():
    """A dev requirement: every other test here skips where Triton cannot run, so this one fails
    loudly instead of letting the suite pass without it."""
    assert _triton.triton is not None, _triton.unavailable_reason("cpu")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert _triton.unavailable_reason(device) is None, _triton.unavailable_reason(device)
    assert (os.environ.get("TRITON_INTERPRET") == "1") == (device == "cpu")


def _inputs(lat_hw, top_hw, dtype, device, n=2, c=3):
    lateral = torch.randn(n, c, *lat_hw, dtype=dtype, device=device)
    top = torch.randn(n, c, *top_hw, dtype=dtype, device=device)
    bias = torch.randn(c, dtype=dtype, device=device)
    return lateral, top, bias


@pytest.mark.parametrize("int64", [False, True], ids=["int32", "int64"])
def test_many_small_tiles(triton_device, int64, monkeypatch):
    """Tiles much smaller than the tensors: ragged edges in both tile dims, and (forced) the
    int64 offset path that only >= 2**31-element tensors take otherwise."""
    monkeypatch.setattr(_triton, "_TILE", 1024)
    if int64:
        for module in (top_down_triton, pool_triton):  # the modules that launch the kernels
            monkeypatch.setattr(module, "_needs_int64", lambda *tensors: True)
    lateral0, top0, bias = _inputs((46, 69), (14, 21), torch.float32, triton_device)
    for layout in ("contiguous", "channels_last"):
        lateral = laid_out(lateral0, layout)
        top = laid_out(top0.clone(), layout).requires_grad_()
        out = top_down_triton.upsample_add(lateral, top, bias)
        assert torch.equal(out, reference.upsample_add(lateral, top.detach(), bias)), layout
        grad = torch.randn_like(out)
        out.backward(grad)
        # the forward map's own backward (ATen's CUDA backward differs at 46x69 <- 14x21)
        assert torch.equal(top.grad, reference.nearest_upsample_backward(grad, 14, 21)), layout
        x = lateral.clone().requires_grad_()
        pooled = pool_triton.stride2_pool(x)
        assert torch.equal(pooled, F.max_pool2d(x.detach(), 1, 2, 0)), layout
        pooled.backward(torch.ones_like(pooled))
        expected = torch.zeros_like(x)
        expected[:, :, ::2, ::2] = 1
        assert torch.equal(x.grad, expected), layout


# ----------------------------------------------------------------------------- registration

def test_in_place_op_refuses_autograd(triton_device):
    """Called directly, the registered in-place op's Autograd kernel refuses inputs that need grad."""
    lateral, top, bias = _inputs((7, 11), (4, 6), torch.float32, triton_device)
    with pytest.raises(RuntimeError, match="has no gradient"):
        torch.ops.fpn_fast_triton.upsample_add_(lateral, top.requires_grad_(), bias)


def _pyramid_step(lateral, top, bias, p5):
    return top_down_triton.upsample_add(lateral, top, bias), pool_triton.stride2_pool(p5)


@pytest.mark.cuda
def test_compile_inductor_cuda():
    """On a GPU the ops are triton_ops: inductor sees the kernels themselves (the OpTester's
    inductor case runs the "auto" backend, the extension's op for upsample_add)."""
    require("triton", "cuda")
    compiled = torch.compile(_pyramid_step, fullgraph=True)
    lateral, top, bias = _inputs((25, 38), (13, 19), torch.float32, "cuda")
    p5 = torch.randn(2, 3, 13, 19, device="cuda")
    for g, e in zip(compiled(lateral, top, bias, p5), _pyramid_step(lateral, top, bias, p5)):
        assert torch.equal(g, e)


@pytest.mark.skipif(not hasattr(torch.library, "triton_op") or _triton.unavailable_reason("cpu") is not None,
                    reason="needs torch.library.triton_op and the interpreter")
def test_triton_op_registration_eager():
    """The GPU registration (triton_op + wrap_triton) runs eagerly under the interpreter too, so
    its launch code is exercised here; compiling it needs a GPU (see test_compile_inductor_cuda).
    torch < 2.12's wrap_triton takes compiled kernels only, not the interpreter's: there the GPU
    check runs this path, and test_triton_registration.py its registrations."""
    try:
        torch.library.wrap_triton(pool_triton._stride2_pool_kernel)
    except RuntimeError as err:
        pytest.skip(f"this torch's wrap_triton refuses the interpreter's kernels: {err}")
    top_down_ops = top_down_triton.define_ops("fpn_fast_triton_tritonop_test", as_triton_op=True)
    pool_ops = pool_triton.define_ops("fpn_fast_triton_tritonop_test", as_triton_op=True)
    lateral, top, bias = _inputs((7, 11), (4, 6), torch.float32, "cpu")
    grad = torch.randn_like(lateral)
    top_a, top_b = top.clone().requires_grad_(), top.clone().requires_grad_()
    out = top_down_ops.upsample_add(lateral, top_a, bias)
    assert torch.equal(out, reference.upsample_add(lateral, top, bias))
    out.backward(grad)
    top_down_triton.upsample_add(lateral, top_b, bias).backward(grad)
    assert torch.equal(top_a.grad, top_b.grad)
    target = lateral.clone()
    top_down_ops.upsample_add_(target, top, bias)
    assert torch.equal(target, out)
    x = torch.randn(2, 3, 7, 11)
    assert torch.equal(pool_ops.stride2_pool(x), x[:, :, ::2, ::2])
