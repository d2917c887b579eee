"""The Triton backend (fpn_fast.ops._triton) against the PyTorch reference.

Without a GPU the kernels run on CPU tensors through the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1 before anything imports triton); with one, the same checks run compiled on
CUDA tensors (the `cuda` marker) and the CPU-tensor cases skip.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

import fpn_fast.ops as ops  # noqa: E402  (after importorskip)
from fpn_fast.ops import _triton, reference  # noqa: E402
from tests._cases import DTYPES, laid_out  # noqa: E402

LOW_PRECISION = (torch.float16, torch.bfloat16)
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        _triton.unavailable_reason("cpu") is not None, reason=str(_triton.unavailable_reason("cpu")))),
    pytest.param("cuda", marks=pytest.mark.cuda),
]
# (lateral H x W, top H x W): odd sizes, exact 2x, equal, non-2x up, top larger than lateral.
UPSAMPLE_SIZES = [
    ((25, 38), (13, 19)),
    ((7, 11), (4, 6)),
    ((1, 1), (1, 1)),
    ((8, 10), (4, 5)),
    ((6, 9), (6, 9)),
    ((9, 13), (5, 7)),
    ((5, 7), (9, 13)),
    ((46, 69), (14, 21)),  # float32 scale: floorf(dst * scale) != dst * in // out at 23, 46
]
POOL_SIZES = [(1, 1), (1, 7), (6, 1), (7, 11), (8, 10), (25, 38)]


def _inputs(lat_hw, top_hw, dtype, device, n=2, c=3):
    lateral = torch.randn(n, c, *lat_hw, dtype=dtype, device=device)
    top = torch.randn(n, c, *top_hw, dtype=dtype, device=device)
    bias = torch.randn(c, dtype=dtype, device=device)
    return lateral, top, bias


def _assert_same_format(out, like):
    fmt = reference.memory_format_of(like)
    assert out.is_contiguous(memory_format=fmt), (out.stride(), fmt)


# ----------------------------------------------------------------------------- upsample_add

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lat_hw,top_hw", UPSAMPLE_SIZES, ids=str)
def test_upsample_add_matches_reference(lat_hw, top_hw, dtype, device):
    """Bit-exact: both compute (lateral + bias) + top[src] with the same float32 source index,
    and float16/bfloat16 in float32 with one rounding."""
    lateral0, top0, bias = _inputs(lat_hw, top_hw, dtype, device)
    for lat_layout in ("contiguous", "channels_last", "sliced"):
        for top_layout in ("contiguous", "channels_last"):
            lateral, top = laid_out(lateral0, lat_layout), laid_out(top0, top_layout)
            for b in (bias, None):
                expected = reference.upsample_add(lateral, top, b)
                out = _triton.upsample_add(lateral, top, b)
                assert torch.equal(out, expected), (lat_layout, top_layout, b is None)
                _assert_same_format(out, lateral)
                assert torch.equal(lateral, lateral0)  # the out-of-place op left lateral alone
                target = laid_out(lateral.clone(), lat_layout)
                assert _triton.upsample_add_(target, top, b) is target
                assert torch.equal(target, expected), ("in place", lat_layout, top_layout, b is None)


@pytest.mark.parametrize("device", DEVICES)
def test_upsample_add_strided_bias(device):
    """A bias that is a strided view (every other element) is read through its stride."""
    lateral, top, _ = _inputs((7, 11), (4, 6), torch.float32, device)
    bias = torch.randn(2 * lateral.shape[1], device=device)[::2]
    expected = reference.upsample_add(lateral, top, bias)
    assert torch.equal(_triton.upsample_add(lateral, top, bias), expected)
    assert torch.equal(_triton.upsample_add_(lateral.clone(), top, bias), expected)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_upsample_add_empty(dtype, device):
    lateral, top, bias = _inputs((5, 7), (3, 4), dtype, device, n=0)
    out = _triton.upsample_add(lateral, top, bias)
    assert out.shape == lateral.shape
    assert _triton.upsample_add_(lateral, top, bias) is lateral
    # An empty lateral plane: nothing maps onto top, so its gradient is all zeros.
    lateral, top, bias = _inputs((0, 5), (2, 3), dtype, device)
    top.requires_grad_()
    out = _triton.upsample_add(lateral, top, bias)
    assert out.shape == lateral.shape
    out.sum().backward()
    assert torch.equal(top.grad, torch.zeros_like(top))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lat_hw,top_hw", UPSAMPLE_SIZES, ids=str)
def test_upsample_add_backward(lat_hw, top_hw, dtype, device):
    lateral0, top0, bias0 = _inputs(lat_hw, top_hw, dtype, device)
    for top_layout, grad_layout in (("contiguous", "contiguous"), ("channels_last", "sliced")):
        grad = laid_out(torch.randn_like(lateral0), grad_layout)
        leaves = [t.clone().requires_grad_() for t in (lateral0, laid_out(top0, top_layout), bias0)]
        _triton.upsample_add(*leaves).backward(grad)
        lateral_grad, top_grad, bias_grad = (t.grad for t in leaves)
        _assert_same_format(top_grad, leaves[1])
        assert torch.equal(lateral_grad, grad)

        ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
        reference.upsample_add(*ref_leaves).backward(grad)
        exact = [t.detach().double().requires_grad_() for t in leaves]
        reference.upsample_add(*exact).backward(grad.double())

        if dtype == torch.float64:
            # Each window is summed in destination order from zero, as ATen does: same bits.
            assert torch.equal(top_grad, ref_leaves[1].grad)
        elif dtype == torch.float32:
            # A window holds at most a handful of terms; only the summation order could differ
            # from ATen's, which moves a sum by a few float32 ulps.
            torch.testing.assert_close(top_grad, ref_leaves[1].grad, rtol=1e-5, atol=1e-6)
        else:
            # float16/bfloat16 accumulate in float32 and round once: no worse than ATen in that
            # precision, measured against a float64 computation.
            ours = (top_grad.double() - exact[1].grad).abs().max()
            aten = (ref_leaves[1].grad.double() - exact[1].grad).abs().max()
            assert ours <= aten + torch.finfo(dtype).eps * exact[1].grad.abs().max(), (ours, aten)
        # grad_bias is an ATen sum: one rounding to dtype, plus accumulation error in the
        # accumulator's precision (float32 for float16/bfloat16), bounded by a multiple of sum |g|.
        acc_eps = torch.finfo(torch.float32 if dtype in LOW_PRECISION else dtype).eps
        bound = (torch.finfo(dtype).eps * exact[2].grad.abs()
                 + 16 * acc_eps * grad.double().abs().sum((0, 2, 3)))
        assert ((bias_grad.double() - exact[2].grad).abs() <= bound).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lat_hw,top_hw", [((5, 7), (3, 4)), ((4, 6), (2, 3)), ((3, 5), (4, 7))], ids=str)
def test_upsample_add_gradcheck(lat_hw, top_hw, device):
    lateral, top, bias = (t.requires_grad_() for t in _inputs(lat_hw, top_hw, torch.float64, device, n=1))
    assert torch.autograd.gradcheck(_triton.upsample_add, (lateral, top, bias), fast_mode=True)
    assert torch.autograd.gradcheck(_triton.upsample_add, (lateral, top, None), fast_mode=True)


def test_float32_scale_case_is_not_the_exact_ratio():
    """The (46, 69) <- (14, 21) case above only tests the float32 arithmetic if it differs there."""
    for out_size, in_size in ((46, 14), (69, 21)):
        exact = torch.arange(out_size) * in_size // out_size
        assert not torch.equal(reference.nearest_source_index(out_size, in_size), exact)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("int64", [False, True], ids=["int32", "int64"])
def test_many_small_tiles(device, int64, monkeypatch):
    """Tiles much smaller than the tensors: ragged edges in both tile dims, and (forced) the
    int64 offset path that only >= 2**31-element tensors take otherwise."""
    monkeypatch.setattr(_triton, "_TILE", 1024)
    if int64:
        monkeypatch.setattr(_triton, "_needs_int64", lambda *tensors: True)
    lateral0, top0, bias = _inputs((46, 69), (14, 21), torch.float32, device)
    for layout in ("contiguous", "channels_last"):
        lateral = laid_out(lateral0, layout)
        top = laid_out(top0.clone(), layout).requires_grad_()
        out = _triton.upsample_add(lateral, top, bias)
        assert torch.equal(out, reference.upsample_add(lateral, top.detach(), bias)), layout
        grad = torch.randn_like(out)
        out.backward(grad)
        ref_top = top.detach().clone().requires_grad_()
        reference.upsample_add(lateral, ref_top, bias).backward(grad)
        torch.testing.assert_close(top.grad, ref_top.grad, rtol=1e-5, atol=1e-6)
        x = lateral.clone().requires_grad_()
        pooled = _triton.stride2_pool(x)
        assert torch.equal(pooled, F.max_pool2d(x.detach(), 1, 2, 0)), layout
        pooled.backward(torch.ones_like(pooled))
        assert torch.equal(x.grad, _pool_grad_of_ones(x)), layout


def _pool_grad_of_ones(x):
    expected = torch.zeros_like(x)
    expected[:, :, ::2, ::2] = 1
    return expected


# ----------------------------------------------------------------------------- stride2_pool

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hw", POOL_SIZES, ids=str)
def test_stride2_pool_matches_max_pool(hw, dtype, device):
    x0 = torch.randn(2, 3, *hw, dtype=dtype, device=device)
    for layout in ("contiguous", "channels_last", "sliced"):
        x = laid_out(x0.clone(), layout).requires_grad_()  # a fresh leaf per layout
        out = _triton.stride2_pool(x)
        ref_x = x.detach().clone().requires_grad_()
        expected = F.max_pool2d(ref_x, 1, 2, 0)
        assert torch.equal(out, expected), layout
        _assert_same_format(out, x)
        grad = torch.randn_like(out)
        out.backward(grad)
        expected.backward(grad)
        assert torch.equal(x.grad, ref_x.grad), layout
        _assert_same_format(x.grad, x)


@pytest.mark.parametrize("device", DEVICES)
def test_stride2_pool_empty(device):
    x = torch.randn(0, 3, 5, 7, device=device, requires_grad=True)
    out = _triton.stride2_pool(x)
    assert out.shape == (0, 3, 3, 4)
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("device", DEVICES)
def test_stride2_pool_gradcheck(device):
    x = torch.randn(1, 2, 5, 6, dtype=torch.float64, device=device, requires_grad=True)
    assert torch.autograd.gradcheck(_triton.stride2_pool, (x,), fast_mode=True)


# ----------------------------------------------------------------------------- registration

def _opcheck_samples(device):
    lateral, top, bias = _inputs((7, 11), (4, 6), torch.float32, device)
    cl = lateral.contiguous(memory_format=torch.channels_last)
    lat2, top2, _ = _inputs((8, 10), (4, 5), torch.float16, device, n=1)
    grad = torch.randn_like(lateral)
    x = torch.randn(2, 3, 7, 11, device=device)
    return [
        ("upsample_add", (lateral, top, bias)),
        ("upsample_add", (cl, top, None)),
        ("upsample_add", (lat2, top2, None)),
        ("upsample_add", (lateral.clone().requires_grad_(), top.clone().requires_grad_(), bias)),
        ("upsample_add_", (lateral.clone(), top, bias)),
        ("upsample_add_", (cl.clone(), top, None)),
        ("upsample_add_backward_top", (grad, [2, 3, 4, 6], False)),
        ("upsample_add_backward_top", (grad, [2, 3, 4, 6], True)),
        ("stride2_pool", (x,)),
        ("stride2_pool", (x.contiguous(memory_format=torch.channels_last).requires_grad_(),)),
        ("stride2_pool_backward", (torch.randn(2, 3, 4, 6, device=device), [2, 3, 7, 11], False)),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for name, args in _opcheck_samples(device):
        torch.library.opcheck(getattr(torch.ops.fpn_fast_triton, name).default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph(device):
    def pyramid_step(lateral, top, bias, p5):
        return _triton.upsample_add(lateral, top, bias), _triton.stride2_pool(p5)

    compiled = torch.compile(pyramid_step, fullgraph=True, backend="aot_eager")
    lateral, top, bias = _inputs((25, 38), (13, 19), torch.float32, device)
    p5 = torch.randn(2, 3, 13, 19, device=device)
    top.requires_grad_()
    got = compiled(lateral, top, bias, p5)
    expected = pyramid_step(lateral, top, bias, p5)
    for g, e in zip(got, expected):
        assert torch.equal(g, e)
    grad_compiled, = torch.autograd.grad(got[0].sum(), top)
    grad_eager, = torch.autograd.grad(expected[0].sum(), top)
    assert torch.equal(grad_compiled, grad_eager)


@pytest.mark.cuda
def test_compile_inductor_cuda():
    """On a GPU the ops are triton_ops: inductor sees the kernels themselves."""
    def pyramid_step(lateral, top, bias, p5):
        return _triton.upsample_add(lateral, top, bias), _triton.stride2_pool(p5)

    compiled = torch.compile(pyramid_step, fullgraph=True)
    lateral, top, bias = _inputs((25, 38), (13, 19), torch.float32, "cuda")
    p5 = torch.randn(2, 3, 13, 19, device="cuda")
    for g, e in zip(compiled(lateral, top, bias, p5), pyramid_step(lateral, top, bias, p5)):
        assert torch.equal(g, e)


@pytest.mark.skipif(not hasattr(torch.library, "triton_op") or _triton.unavailable_reason("cpu") is not None,
                    reason="needs torch.library.triton_op and the interpreter")
def test_triton_op_registration_eager():
    """The GPU registration (triton_op + wrap_triton) runs eagerly under the interpreter too, so
    its launch code is exercised here; compiling it needs a GPU (see test_compile_inductor_cuda)."""
    ops_ = _triton._define_ops("fpn_fast_triton_tritonop_test", as_triton_op=True)
    lateral, top, bias = _inputs((7, 11), (4, 6), torch.float32, "cpu")
    grad = torch.randn_like(lateral)
    top_a, top_b = top.clone().requires_grad_(), top.clone().requires_grad_()
    out = ops_.upsample_add(lateral, top_a, bias)
    assert torch.equal(out, reference.upsample_add(lateral, top, bias))
    out.backward(grad)
    _triton.upsample_add(lateral, top_b, bias).backward(grad)
    assert torch.equal(top_a.grad, top_b.grad)
    target = lateral.clone()
    ops_.upsample_add_(target, top, bias)
    assert torch.equal(target, out)
    x = torch.randn(2, 3, 7, 11)
    assert torch.equal(ops_.stride2_pool(x), x[:, :, ::2, ::2])


@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device):
    lateral, top, bias = _inputs((25, 38), (13, 19), torch.float32, device)
    grad = torch.randn_like(lateral)
    runs = []
    for _ in range(2):
        t = top.clone().requires_grad_()
        out = _triton.upsample_add(lateral, t, bias)
        out.backward(grad)
        runs.append((out, t.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


# ----------------------------------------------------------------------------- backend routing

@pytest.mark.skipif(_triton.unavailable_reason("cpu") is not None, reason="needs TRITON_INTERPRET=1")
def test_use_backend_routes_cpu_tensors_to_triton(monkeypatch):
    assert ops.available_backends()["triton"]["cpu"] is None
    calls = []
    for name in ("upsample_add", "stride2_pool"):
        original = getattr(_triton, name)
        monkeypatch.setattr(_triton, name, lambda *a, _f=original, _n=name: calls.append(_n) or _f(*a))
    lateral, top, bias = _inputs((7, 11), (4, 6), torch.float32, "cpu")
    with ops.use_backend("triton"):
        assert torch.equal(ops.upsample_add(lateral, top, bias), reference.upsample_add(lateral, top, bias))
        assert torch.equal(ops.stride2_pool(lateral), F.max_pool2d(lateral, 1, 2, 0))
    assert calls == ["upsample_add", "stride2_pool"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_triton_on_cpu_without_interpreter_is_refused():
    script = textwrap.dedent("""
        import torch
        import fpn_fast.ops as ops
        try:
            with ops.use_backend("triton"):
                ops.upsample_add(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2))
        except ops.BackendUnavailableError as e:
            print("REFUSED:", e)
        else:
            print("RAN")
    """)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("REFUSED:"), result.stdout
    assert "TRITON_INTERPRET" in result.stdout
