"""fpn_fast.ops: backend choice, input validation common to all backends, conv1x1."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import fpn_fast.ops as ops
from fpn_fast.ops import reference
from tests._cases import DTYPES, SHAPES, make_inputs, shape_id

CPU_BACKENDS = [name for name, reasons in ops.available_backends().items() if reasons["cpu"] is None]


def test_available_backends_reports_every_backend_and_device():
    backends = ops.available_backends()
    assert set(backends) == {"extension", "triton", "torch"}
    for reasons in backends.values():
        assert set(reasons) == {"cpu", "cuda"}
        assert all(r is None or (isinstance(r, str) and r) for r in reasons.values())
    assert backends["torch"] == {"cpu": None, "cuda": None}


def test_unknown_backend_name_is_rejected():
    with pytest.raises(ValueError, match="unknown fpn_fast backend 'cudnn'"):
        ops.set_backend("cudnn")
    assert ops.get_backend() == "auto"


def test_use_backend_restores_previous_even_on_error():
    ops.set_backend("torch")
    with pytest.raises(RuntimeError, match="boom"):
        with ops.use_backend("auto"):
            assert ops.get_backend() == "auto"
            raise RuntimeError("boom")
    assert ops.get_backend() == "torch"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_cpu_backend_matches_reference(backend, case, dtype):
    lateral, top, bias = make_inputs(case, dtype)
    expected = reference.upsample_add(lateral, top, bias)
    with ops.use_backend(backend):
        assert torch.equal(ops.upsample_add(lateral, top, bias), expected)
        target = lateral.clone()
        assert ops.upsample_add_(target, top, bias) is target
        assert torch.equal(target, expected)
        x = torch.randn(case[0]).to(dtype)
        assert torch.equal(ops.stride2_pool(x), reference.stride2_pool_max_pool(x))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_every_cpu_backend_is_differentiable(backend):
    lateral, top, bias = make_inputs(SHAPES[0], torch.float64, requires_grad=True)
    with ops.use_backend(backend):
        assert torch.autograd.gradcheck(ops.upsample_add, (lateral, top, bias), fast_mode=True)
        x = torch.randn(1, 2, 5, 7, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(ops.stride2_pool, (x,))


def test_reference_index_formula_matches_interpolate_on_many_sizes():
    for in_size in (1, 2, 3, 5, 7, 13, 19, 25, 38, 50, 76):
        for out_size in (1, 2, 4, 7, 11, 25, 38, 49, 100, 152, 304):
            probe = torch.arange(in_size, dtype=torch.float32).view(1, 1, in_size, 1)
            expected = F.interpolate(probe, size=(out_size, 1), mode="nearest").view(-1).long()
            assert torch.equal(reference.nearest_source_index(out_size, in_size), expected), (in_size, out_size)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("call,match", [
    (lambda: ops.upsample_add(torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4)), "match lateral"),
    (lambda: ops.upsample_add(torch.randn(3, 8, 8), torch.randn(3, 4, 4)), "4-D"),
    (lambda: ops.upsample_add(torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 4), torch.randn(2)), "bias must have shape"),
    (lambda: ops.upsample_add(torch.ones(1, 3, 8, 8, dtype=torch.long), torch.ones(1, 3, 4, 4, dtype=torch.long)),
     "floating"),
    (lambda: ops.upsample_add(torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 4).double()), "dtypes differ"),
    (lambda: ops.upsample_add_(torch.randn(1, 3, 8, 8), torch.randn(1, 3, 4, 0)), "empty plane"),
    (lambda: ops.stride2_pool(torch.randn(3, 8, 8)), "4-D"),
    (lambda: ops.stride2_pool(torch.ones(1, 3, 8, 8, dtype=torch.int32)), "floating"),
])
def test_bad_input_is_rejected_by_every_backend(backend, call, match):
    with ops.use_backend(backend):
        with pytest.raises(ValueError, match=match):
            call()


def test_env_var_selects_backend_and_rejects_unavailable():
    env = dict(os.environ, FPN_FAST_BACKEND="torch")
    code = "import fpn_fast.ops as o; print(o.get_backend())"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "torch", result.stderr
    env = dict(os.environ, FPN_FAST_BACKEND="nonsense")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "unknown fpn_fast backend 'nonsense'" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error")
def test_naming_extension_for_cuda_tensors_without_gpu_is_an_error():
    reason = ops.available_backends()["extension"]["cuda"]
    assert reason is not None
    with ops.use_backend("torch"):
        pass  # a named, usable backend is fine
    if ops.available_backends()["extension"]["cpu"] is None:
        with ops.use_backend("extension"):
            with pytest.raises(ops.BackendUnavailableError, match="cannot run on cuda"):
                ops._upsample_impl("cuda")


@pytest.mark.parametrize("shape,out_channels", [((2, 16, 9, 13), 8), ((1, 3, 1, 1), 5), ((0, 4, 3, 3), 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_conv1x1_matches_conv2d(shape, out_channels, dtype):
    x = torch.randn(shape, dtype=dtype)
    weight = torch.randn(out_channels, shape[1], 1, 1, dtype=dtype)
    expected = F.conv2d(x, weight)
    with torch.no_grad():
        out = ops.conv1x1(x, weight)  # the matmul path: same sums in another order
    assert out.shape == expected.shape and out.is_contiguous()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol * shape[1])
    x_cl = x.contiguous(memory_format=torch.channels_last)
    if not x_cl.is_contiguous():  # a real NHWC layout: the convolution itself runs
        assert torch.equal(ops.conv1x1(x_cl, weight), F.conv2d(x_cl, weight))


def test_conv1x1_keeps_the_convolution_under_autograd():
    x = torch.randn(2, 6, 5, 7, requires_grad=True)
    weight = torch.randn(4, 6, 1, 1, requires_grad=True)
    out = ops.conv1x1(x, weight)
    assert torch.equal(out, F.conv2d(x, weight))
    assert "Convolution" in type(out.grad_fn).__name__


@pytest.mark.parametrize("shape", [(2, 16, 9, 13), (1, 3, 1, 1), (0, 4, 3, 3), (1, 70, 33, 65)])
def test_conv1x1_writes_channels_last_directly(shape):
    x = torch.randn(shape)
    weight = torch.randn(6, shape[1], 1, 1)
    with torch.no_grad():
        out = ops.conv1x1(x, weight, channels_last=True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, F.conv2d(x, weight), rtol=1e-5, atol=1e-5 * shape[1])


def test_prefer_channels_last_only_for_cpu_float_nchw_inference_with_extension():
    feats = [torch.randn(1, 4, 6, 6), torch.randn(1, 8, 3, 3)]
    has_extension = ops.available_backends()["extension"]["cpu"] is None
    assert ops.prefer_channels_last(feats) == has_extension
    with ops.use_backend("torch"):
        assert not ops.prefer_channels_last(feats)
    assert not ops.prefer_channels_last([f.half() for f in feats])
    assert not ops.prefer_channels_last([f.contiguous(memory_format=torch.channels_last) for f in feats])
    assert not ops.prefer_channels_last([feats[0].requires_grad_(), feats[1]])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", [(2, 5, 9, 13), (1, 70, 33, 65), (0, 3, 4, 4), (2, 3, 1, 1), (1, 1, 7, 5)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_to_nchw_is_a_bit_exact_contiguous_copy(backend, shape, dtype):
    x = torch.randn(shape).to(dtype).contiguous(memory_format=torch.channels_last)
    with ops.use_backend(backend):
        out = ops.to_nchw(x)
    assert out.is_contiguous() and torch.equal(out, x)
    plain = torch.randn(shape).to(dtype)
    assert ops.to_nchw(plain) is plain


def test_extension_transpose_op_opcheck_and_odd_views():
    if ops.available_backends()["extension"]["cpu"] is not None:
        pytest.fail("the extension is not built")
    op = torch.ops.fpn_fast.nhwc_to_nchw.default
    for shape in [(2, 5, 9, 13), (1, 70, 33, 65), (0, 3, 4, 4)]:
        torch.library.opcheck(op, (torch.randn(shape).contiguous(memory_format=torch.channels_last),))
    view = torch.randn(2, 8, 9, 14)[:, ::2, :, ::2]  # neither layout: a plain contiguous copy
    assert torch.equal(op(view), view) and op(view).is_contiguous()
    with pytest.raises(ValueError, match="4-D"):
        op(torch.randn(3, 4, 5))
