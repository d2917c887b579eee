"""The compiled fpn_fast._C ops (CPU kernels here; CUDA kernels under the `cuda` marker)
against the pure-PyTorch reference."""
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from fpn_fast.ops import _extension, reference
from tests._cases import DTYPES, SHAPES, make_inputs, shape_id

ops = torch.ops.fpn_fast if _extension.unavailable_reason("cpu") is None else None
needs_ext = pytest.mark.skipif(ops is None, reason=f"extension not built: {_extension.unavailable_reason('cpu')}")


def test_extension_is_built():
    # The test command builds the extension; every other test here skips without it, so
    # this one fails loudly instead of letting the suite pass on the torch fallback.
    assert _extension.unavailable_reason("cpu") is None, _extension.unavailable_reason("cpu")


@needs_ext
@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lateral_cl,top_cl", [(False, False), (True, True), (True, False), (False, True)])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_forward_bit_exact(case, dtype, lateral_cl, top_cl, bias):
    lateral, top, b = make_inputs(case, dtype, lateral_cl, top_cl, bias)
    out = ops.upsample_add(lateral, top, b)
    expected = reference.upsample_add(lateral, top, b)
    # Same operations in the same precision and order ((l + b) + t, float32 for half types,
    # one rounding): bit-equal, and laid out like lateral.
    assert torch.equal(out, expected)
    if out.numel():  # an empty tensor's strides hold no data
        assert out.stride() == expected.stride()
    assert out.is_contiguous(memory_format=reference.memory_format_of(lateral))


@needs_ext
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_float32_matches_plain_eager_sequence(bias):
    # The sequence torchvision runs: conv bias, F.interpolate, add — same order in float32.
    lateral, top, b = make_inputs(((2, 8, 50, 76), (25, 38)), torch.float32, bias=bias)
    up = F.interpolate(top, size=lateral.shape[-2:], mode="nearest")
    eager = (lateral + b.view(1, -1, 1, 1) + up) if bias else lateral + up
    assert torch.equal(ops.upsample_add(lateral, top, b), eager)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_views(dtype):
    base, top, b = make_inputs(((2, 6, 20, 27), (7, 9)), dtype)
    lateral = base[:, ::2, 1:, ::2]  # neither contiguous nor channels_last
    top_view = torch.randn(2, 3, 14, 18).to(dtype)[:, :, ::2, ::2]
    bias = torch.randn(6).to(dtype)[::2]
    assert torch.equal(ops.upsample_add(lateral, top_view, bias), reference.upsample_add(lateral, top_view, bias))


@needs_ext
@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_inplace_matches_out_of_place(case, dtype, channels_last):
    lateral, top, b = make_inputs(case, dtype, channels_last, channels_last)
    expected = ops.upsample_add(lateral, top, b)
    target = lateral.clone()
    assert ops.upsample_add_(target, top, b) is None
    assert torch.equal(target, expected)


@needs_ext
def test_inplace_writes_through_strided_view():
    base = torch.randn(2, 4, 12, 20)
    view = base[:, :, :, ::2]
    top, b = torch.randn(2, 4, 5, 7), torch.randn(4)
    expected = reference.upsample_add(view, top, b)
    untouched = base[:, :, :, 1::2].clone()
    ops.upsample_add_(view, top, b)
    assert torch.equal(base[:, :, :, ::2], expected)
    assert torch.equal(base[:, :, :, 1::2], untouched)


def _reference_grad_top(top, grad):
    """Autograd of F.interpolate; float32 for half types (summed in float32, rounded once)."""
    acc = torch.float32 if top.dtype in (torch.float16, torch.bfloat16) else top.dtype
    t = top.detach().to(acc).requires_grad_()
    F.interpolate(t, size=grad.shape[-2:], mode="nearest").backward(grad.to(acc))
    return t.grad.to(top.dtype)


@needs_ext
@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_backward_top(case, dtype, channels_last):
    _, top, _ = make_inputs(case, dtype, top_cl=channels_last)
    grad = torch.randn(case[0]).to(dtype)
    if channels_last:
        grad = grad.to(memory_format=torch.channels_last)
    grad_top = ops.upsample_add_backward_top(grad, top.shape[2], top.shape[3])
    expected = _reference_grad_top(top, grad)
    # Both sum each window rows-then-columns; a window holds at most a few elements, so
    # float32 sums of half-precision values are exact and float64/float32 orders agree:
    # assert bit equality, with a float32 tolerance of 1e-6 only in case a reference
    # kernel reorders its sum.
    if dtype == torch.float32:
        torch.testing.assert_close(grad_top, expected, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(grad_top, expected)


GRADCHECK_SHAPES = [((1, 2, 9, 13), (5, 7)), ((1, 2, 8, 10), (4, 5)), ((1, 2, 5, 7), (9, 13)), ((1, 3, 3, 1), (2, 1))]


@needs_ext
@pytest.mark.parametrize("case", GRADCHECK_SHAPES, ids=shape_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_gradcheck_float64(case, channels_last):
    inputs = make_inputs(case, torch.float64, channels_last, channels_last, requires_grad=True)
    assert torch.autograd.gradcheck(ops.upsample_add, inputs)
    assert torch.autograd.gradgradcheck(ops.upsample_add, inputs)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_matches_reference(dtype):
    lateral, top, b = make_inputs(SHAPES[0], dtype, requires_grad=True)
    grad = torch.randn(lateral.shape).to(dtype)
    ops.upsample_add(lateral, top, b).backward(grad)
    assert torch.equal(lateral.grad, grad)
    assert torch.equal(top.grad, _reference_grad_top(top, grad))
    torch.testing.assert_close(b.grad, grad.sum((0, 2, 3)))


@needs_ext
@pytest.mark.parametrize("case", [SHAPES[0], SHAPES[3], SHAPES[5], SHAPES[6], SHAPES[8]], ids=shape_id)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_opcheck(case, channels_last, bias):
    lateral, top, b = make_inputs(case, torch.float32, channels_last, channels_last, bias, requires_grad=True)
    torch.library.opcheck(ops.upsample_add.default, (lateral, top, b))
    torch.library.opcheck(ops.upsample_add_.default, (lateral.detach().clone(), top.detach(), None if b is None else b.detach()))
    grad = torch.randn(lateral.shape).contiguous(memory_format=reference.memory_format_of(lateral))
    torch.library.opcheck(ops.upsample_add_backward_top.default, (grad, top.shape[2], top.shape[3]))


@needs_ext
def test_deterministic():
    lateral, top, b = make_inputs(((2, 64, 100, 152), (50, 76)), torch.float32, requires_grad=True)
    grad = torch.randn(lateral.shape)
    runs = []
    for _ in range(2):
        out = ops.upsample_add(lateral, top, b)
        (g_top,) = torch.autograd.grad(out, top, grad)
        runs.append((out, g_top))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@needs_ext
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_fpn_level_shapes_parallel_split(channels_last):
    # Real FPN level (many parallel chunks, exact 2x path) in both layouts.
    lateral, top, b = make_inputs(((2, 32, 100, 152), (50, 76)), torch.float32, channels_last, channels_last)
    assert torch.equal(ops.upsample_add(lateral, top, b), reference.upsample_add(lateral, top, b))


# ---- index arithmetic -------------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("in_size,out_size", [(5, 9), (9, 5), (13, 25), (19, 38), (1, 7), (7, 7), (3, 1), (25, 50),
                                              (37, 100), (100, 37), (152, 304), (7, 11), (6, 7)])
def test_nearest_source_index_and_windows(in_size, out_size):
    # The float32 formula equals what F.interpolate does ...
    src = reference.nearest_source_index(out_size, in_size)
    probe = torch.arange(in_size, dtype=torch.float32).view(1, 1, 1, in_size)
    assert torch.equal(F.interpolate(probe, size=(1, out_size), mode="nearest").view(-1).long(), src)
    # ... and the C++ backward windows are exactly the preimages of the forward map.
    starts = ops._nearest_window_starts(in_size, out_size)
    expected = torch.searchsorted(src, torch.arange(in_size + 1)).tolist()
    assert starts == expected


@needs_ext
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
def test_index_arithmetic_beyond_int32(channels_last):
    # A (2, 256, 2048, 2100) lateral has 2.2e9 > 2**31 elements; probe the shared index
    # helpers at elements past 2**31 without allocating anything.
    N, C, H, W, th, tw = 2, 256, 2048, 2100, 1024, 1049
    assert N * C * H * W > 2**31
    for index in (2**31 + 12345, N * C * H * W - 1, 2**32 + 7):
        if index >= N * C * H * W:
            continue
        if channels_last:
            c, rest = index % C, index // C
            w, rest = rest % W, rest // W
            h, n = rest % H, rest // H
        else:
            w, rest = index % W, index // W
            h, rest = rest % H, rest // H
            c, n = rest % C, rest // C
        sh = int(reference.nearest_source_index(H, th)[h])
        sw = int(reference.nearest_source_index(W, tw)[w])
        offset = ((n * th + sh) * tw + sw) * C + c if channels_last else ((n * C + c) * th + sh) * tw + sw
        assert ops._upsample_add_index_probe([N, C, H, W], [th, tw], channels_last, index) == [n, c, h, w, sh, sw, offset]


# ---- bad input: each call runs in a subprocess so a crash fails the test, not the run ----

BAD_INPUTS = {
    "mismatched N": ("torch.randn(2, 3, 8, 8)", "torch.randn(1, 3, 4, 4)", "None", "match lateral"),
    "mismatched C": ("torch.randn(2, 3, 8, 8)", "torch.randn(2, 4, 4, 4)", "None", "match lateral"),
    "bias length": ("torch.randn(2, 3, 8, 8)", "torch.randn(2, 3, 4, 4)", "torch.randn(5)", "bias must have shape"),
    "mixed dtypes": ("torch.randn(2, 3, 8, 8)", "torch.randn(2, 3, 4, 4).double()", "None", "dtype"),
    "bias dtype": ("torch.randn(2, 3, 8, 8)", "torch.randn(2, 3, 4, 4)", "torch.randn(3).half()", "must match lateral"),
    "non-4D": ("torch.randn(3, 8, 8)", "torch.randn(3, 4, 4)", "None", "4-D"),
    "integer dtype": ("torch.ones(2, 3, 8, 8, dtype=torch.int32)", "torch.ones(2, 3, 4, 4, dtype=torch.int32)", "None",
                      "floating"),
    "empty top plane": ("torch.randn(2, 3, 8, 8)", "torch.randn(2, 3, 0, 4)", "None", "empty plane"),
}


def _run_isolated(code):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def bad_input_results():
    """Every bad call, in one child process: a crash there fails these tests, not the run."""
    cases = "".join(f"    ({name!r}, lambda: ({lat}, {top}, {bias})),\n" for name, (lat, top, bias, _) in BAD_INPUTS.items())
    result = _run_isolated("import torch, fpn_fast.ops\ncases = [\n" + cases + "]\n" + textwrap.dedent("""
        for name, make in cases:
            for fn in (torch.ops.fpn_fast.upsample_add, torch.ops.fpn_fast.upsample_add_, fpn_fast.ops.upsample_add):
                try:
                    fn(*make())
                except (ValueError, RuntimeError, TypeError) as exc:
                    print(name, "|", type(exc).__name__, "|", str(exc).splitlines()[0], flush=True)
                else:
                    print(name, "| NO ERROR", flush=True)
    """))
    assert result.returncode == 0, f"child crashed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    lines = {}
    for line in result.stdout.splitlines():
        lines.setdefault(line.split(" | ")[0], []).append(line)
    return lines


@needs_ext
@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_raises_before_kernel(name, bad_input_results):
    message = BAD_INPUTS[name][3]
    lines = bad_input_results.get(name, [])
    assert len(lines) == 3 and all(message in line and "NO ERROR" not in line for line in lines), lines


@needs_ext
def test_backward_op_rejects_bad_sizes():
    result = _run_isolated("""
        import torch, fpn_fast.ops
        for args in ((torch.randn(2, 3, 8), 4, 4), (torch.randn(2, 3, 8, 8), -1, 4), (torch.randn(2, 3, 8, 8), 0, 4)):
            try:
                torch.ops.fpn_fast.upsample_add_backward_top(*args)
            except (ValueError, RuntimeError) as exc:
                print("raised", str(exc).splitlines()[0])
            else:
                print("NO ERROR")
    """)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("raised") == 3, result.stdout


# ---- CUDA kernels ------------------------------------------------------------------------

needs_cuda_ext = pytest.mark.skipif(_extension.unavailable_reason("cuda") is not None,
                                    reason=f"CUDA extension unavailable: {_extension.unavailable_reason('cuda')}")


@pytest.mark.cuda
@needs_cuda_ext
@pytest.mark.parametrize("case", SHAPES + [((2, 256, 200, 304), (100, 152)), ((2, 12, 25, 38), (13, 19))], ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cuda_matches_reference_and_cpu_kernel(case, dtype, channels_last, bias):
    lateral, top, b = make_inputs(case, dtype, channels_last, channels_last, bias)
    out_cpu = ops.upsample_add(lateral, top, b)
    cuda = [t.cuda() if t is not None else None for t in (lateral, top, b)]
    out = ops.upsample_add(*cuda)
    assert out.stride() == out_cpu.stride()
    assert torch.equal(out.cpu(), out_cpu)
    assert torch.equal(out, reference.upsample_add(*cuda))
    grad = torch.randn(lateral.shape).to(dtype).contiguous(memory_format=reference.memory_format_of(lateral))
    g_cpu = ops.upsample_add_backward_top(grad, top.shape[2], top.shape[3])
    g_cuda = ops.upsample_add_backward_top(grad.cuda(), top.shape[2], top.shape[3])
    assert torch.equal(g_cuda.cpu(), g_cpu)  # same summation order on both devices
    target = cuda[0].clone()
    ops.upsample_add_(target, cuda[1], cuda[2])
    assert torch.equal(target, out)


@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_unaligned_and_strided():
    base = torch.randn(2 * 3 * 25 * 38 + 1, device="cuda")
    lateral = base[1:].view(2, 3, 25, 38)  # 4-byte offset: the scalar path
    top, b = torch.randn(2, 3, 13, 19, device="cuda"), torch.randn(3, device="cuda")
    assert torch.equal(ops.upsample_add(lateral, top, b), reference.upsample_add(lateral, top, b))
    view = torch.randn(2, 6, 25, 76, device="cuda")[:, ::2, :, ::2]
    assert torch.equal(ops.upsample_add(view, top, b), reference.upsample_add(view, top, b))


@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_gradcheck_and_opcheck():
    inputs = make_inputs(SHAPES[0], torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(ops.upsample_add, inputs)
    torch.library.opcheck(ops.upsample_add.default, inputs)


@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_device_mismatch_raises():
    with pytest.raises((ValueError, RuntimeError), match="device|cuda|cpu"):
        ops.upsample_add(torch.randn(1, 2, 4, 4, device="cuda"), torch.randn(1, 2, 2, 2), None)
