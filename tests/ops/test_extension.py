"""What only the compiled extension has: its registered ops (torch.ops.fpn_fast.*) called
directly — the C++ input checks and their exception types, the in-place op's Autograd kernel,
index arithmetic beyond int32, the parallel split of a real FPN level, the CUDA kernels against the
CPU ones. Parity with the reference and opcheck on every backend are the OpTester's
(test_upsample_add.py, test_layout.py)."""
import json
import re

import pytest
import torch
import torch.nn.functional as F

import fpn_fast.ops
from fpn_fast.ops import _extension, reference
from tests._cases import SHAPES, make_inputs, require, shape_id

ops = torch.ops.fpn_fast if _extension.unavailable_reason("cpu") is None else None
needs_ext = pytest.mark.skipif(ops is None, reason=f"extension not built: {_extension.unavailable_reason('cpu')}")


def test_extension_is_built():
    # The test command builds the extension; every other test here skips without it, so
    # this one fails loudly instead of letting the suite pass on the torch fallback.
    assert _extension.unavailable_reason("cpu") is None, _extension.unavailable_reason("cpu")


# ---- registration ------------------------------------------------------------------------

@needs_ext
def test_nhwc_to_nchw_refuses_what_is_not_4d():
    with pytest.raises(ValueError, match="4-D"):
        ops.nhwc_to_nchw(torch.randn(3, 4, 5))


# ---- the in-place op: Autograd kernel, aliasing, overlap ---------------------------------

@needs_ext
def test_in_place_op_refuses_autograd_and_bumps_the_version():
    """Called directly (not through fpn_fast.ops), the C++ op's own Autograd kernel refuses
    inputs that require grad in grad mode (issue 10, item 3), and otherwise bumps lateral's
    version counter as ATen's in-place ops do."""
    lateral, top, bias = make_inputs(SHAPES[1], torch.float32)
    for needs_grad in range(3):
        args = [t.clone() for t in (lateral, top, bias)]
        args[needs_grad].requires_grad_()
        target = args[0] * 1 if needs_grad == 0 else args[0]
        before = target.detach().clone()
        with pytest.raises(RuntimeError, match="has no gradient"):
            ops.upsample_add_(target, *args[1:])
        assert torch.equal(target.detach(), before)
        version = target._version
        with torch.no_grad():
            ops.upsample_add_(target, *args[1:])
        assert target._version == version + 1
        assert torch.equal(target.detach(), reference.upsample_add(lateral, top, bias))


@needs_ext
def test_in_place_op_reads_inputs_sharing_lateral_memory_before_writing():
    lateral = torch.randn(2, 3, 8, 10)
    for layout in (torch.contiguous_format, torch.channels_last):
        target = lateral.clone(memory_format=layout)
        top, bias = target[:, :, 1:5, 2:7], target[0, 0, 7, :3]
        expected = reference.upsample_add(target, top.clone(), bias.clone())
        ops.upsample_add_(target, top, bias)
        assert torch.equal(target, expected)


@needs_ext
def test_in_place_op_refuses_an_expanded_lateral():
    with pytest.raises(RuntimeError, match="unsupported operation|overlap"):
        ops.upsample_add_(torch.randn(1, 2, 4, 1).expand(1, 2, 4, 6), torch.randn(1, 2, 2, 3), None)


# ---- bad input: one child process for every call, so a crash fails these tests, not the run ----

# name -> (arguments of the op, exception type, regex the message matches); fpn_fast.ops raises the
# same type for the same arguments before any kernel (test_upsample_add.py), the C++ ops here.
BAD_INPUTS = {
    "mismatched N": ("torch.randn(2, 3, 8, 8), torch.randn(1, 3, 4, 4), None", "ValueError", "match lateral"),
    "mismatched C": ("torch.randn(2, 3, 8, 8), torch.randn(2, 4, 4, 4), None", "ValueError", "match lateral"),
    "bias length": ("torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4), torch.randn(5)", "ValueError",
                    "bias must have shape"),
    "non-4D": ("torch.randn(3, 8, 8), torch.randn(3, 4, 4), None", "ValueError", "4-D"),
    "empty top plane": ("torch.randn(2, 3, 8, 8), torch.randn(2, 3, 0, 4), None", "ValueError", "empty plane"),
    "mixed dtypes": ("torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4).double(), None", "TypeError", "dtype"),
    "bias dtype": ("torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4), torch.randn(3).half()", "TypeError",
                   "bias.*dtype"),
    "integer dtype": ("torch.ones(2, 3, 8, 8, dtype=torch.int32), torch.ones(2, 3, 4, 4, dtype=torch.int32), None",
                      "TypeError", "floating"),
}
BAD_BACKWARD = {  # upsample_add_backward_top(grad, top_h, top_w)
    "backward 3-D grad": ("torch.randn(2, 3, 8), 4, 4", "ValueError", "4-D"),
    "backward negative size": ("torch.randn(2, 3, 8, 8), -1, 4", "ValueError", "negative"),
    "backward empty top": ("torch.randn(2, 3, 8, 8), 0, 4", "ValueError", "empty"),
    "backward integer grad": ("torch.ones(2, 3, 8, 8, dtype=torch.int32), 4, 4", "TypeError", "floating"),
}


@pytest.fixture(scope="module")
def bad_input_results(run_python):
    """{name: [(function, exception type name, first message line)]}, from one child process."""
    calls = [(name, fn, args) for name, (args, _, _) in BAD_INPUTS.items()
             for fn in ("torch.ops.fpn_fast.upsample_add", "torch.ops.fpn_fast.upsample_add_",
                        "fpn_fast.ops.upsample_add")]
    calls += [(name, "torch.ops.fpn_fast.upsample_add_backward_top", args) for name, (args, _, _) in BAD_BACKWARD.items()]
    code = "import json, torch, fpn_fast.ops\n" + "".join(
        f"try:\n    {fn}({args})\nexcept Exception as exc:\n"
        f"    print(json.dumps([{name!r}, {fn!r}, type(exc).__name__, str(exc).splitlines()[0]]), flush=True)\n"
        f"else:\n    print(json.dumps([{name!r}, {fn!r}, 'NO ERROR', '']), flush=True)\n"
        for name, fn, args in calls)
    result = run_python(code)
    assert result.returncode == 0, f"child crashed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    lines = {}
    for line in result.stdout.splitlines():
        name, fn, error, message = json.loads(line)
        lines.setdefault(name, []).append((fn, error, message))
    return lines


@needs_ext
@pytest.mark.parametrize("name", list(BAD_INPUTS) + list(BAD_BACKWARD))
def test_bad_input_raises_the_same_type_in_cpp_and_python(name, bad_input_results):
    _, error, pattern = {**BAD_INPUTS, **BAD_BACKWARD}[name]
    results = bad_input_results.get(name, [])
    assert len(results) == (3 if name in BAD_INPUTS else 1), results
    for fn, raised, message in results:
        assert raised == error and re.search(pattern, message), (fn, raised, message)


# ---- index arithmetic --------------------------------------------------------------------

@needs_ext
@pytest.mark.parametrize("in_size,out_size", [(5, 9), (9, 5), (13, 25), (19, 38), (1, 7), (7, 7), (3, 1), (25, 50),
                                              (37, 100), (100, 37), (152, 304), (7, 11), (6, 7), (14, 46), (21, 69)])
def test_backward_windows_are_the_preimages_of_the_forward_map(in_size, out_size):
    src = reference.nearest_source_index(out_size, in_size)
    starts = ops._nearest_window_starts(in_size, out_size)
    assert starts == torch.searchsorted(src, torch.arange(in_size + 1)).tolist()


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


# ---- the parallel split of a real FPN level ----------------------------------------------

@needs_ext
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_fpn_level_parallel_split(layout):
    """A real level (many parallel chunks, the exact 2x path): forward, in place and backward
    equal the reference, and two runs give the same bits."""
    lateral, top, b = make_inputs(((2, 32, 100, 152), (50, 76)), torch.float32, layout)
    expected = reference.upsample_add(lateral, top, b)
    assert torch.equal(ops.upsample_add(lateral, top, b), expected)
    target = lateral.clone()
    ops.upsample_add_(target, top, b)
    assert torch.equal(target, expected)
    grad = torch.randn(lateral.shape).contiguous(memory_format=reference.memory_format_of(lateral))
    t = top.clone().requires_grad_()
    F.interpolate(t, size=lateral.shape[-2:], mode="nearest").backward(grad)
    runs = [ops.upsample_add_backward_top(grad, 50, 76) for _ in range(2)]
    assert torch.equal(runs[0], t.grad) and torch.equal(runs[1], t.grad)


# ---- CUDA kernels ------------------------------------------------------------------------

needs_cuda_ext = pytest.mark.skipif(_extension.unavailable_reason("cuda") is not None,
                                    reason=f"CUDA extension unavailable: {_extension.unavailable_reason('cuda')}")


@pytest.mark.cuda
@needs_cuda_ext
@pytest.mark.parametrize("case", SHAPES + [((2, 256, 200, 304), (100, 152)), ((2, 12, 25, 38), (13, 19))], ids=shape_id)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_cuda_kernels_give_the_cpu_kernels_bits(case, layout):
    """Same arithmetic, same summation order on both devices, for every dtype."""
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        lateral, top, b = make_inputs(case, dtype, layout)
        out_cpu = ops.upsample_add(lateral, top, b)
        out = ops.upsample_add(*(t.cuda() for t in (lateral, top, b)))
        assert out.stride() == out_cpu.stride() or out.numel() == 0
        assert torch.equal(out.cpu(), out_cpu), dtype
        grad = torch.randn(lateral.shape).to(dtype).contiguous(memory_format=reference.memory_format_of(lateral))
        g_cpu = ops.upsample_add_backward_top(grad, top.shape[2], top.shape[3])
        g_cuda = ops.upsample_add_backward_top(grad.cuda(), top.shape[2], top.shape[3])
        assert torch.equal(g_cuda.cpu(), g_cpu), dtype


@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_unaligned_storage():
    base = torch.randn(2 * 3 * 25 * 38 + 1, device="cuda")
    lateral = base[1:].view(2, 3, 25, 38)  # 4-byte offset: the scalar path
    top, b = torch.randn(2, 3, 13, 19, device="cuda"), torch.randn(3, device="cuda")
    assert torch.equal(ops.upsample_add(lateral, top, b), reference.upsample_add(lateral, top, b))
    target = lateral.clone()
    ops.upsample_add_(lateral, top, b)
    assert torch.equal(lateral, reference.upsample_add(target, top, b))


@pytest.mark.cuda
@needs_cuda_ext
def test_cuda_device_mismatch_is_a_value_error():
    with pytest.raises(ValueError, match="device|cuda|cpu"):
        ops.upsample_add(torch.randn(1, 2, 4, 4, device="cuda"), torch.randn(1, 2, 2, 2), None)
    with pytest.raises(ValueError, match="device|cuda|cpu"):
        ops.upsample_add(torch.randn(1, 2, 4, 4, device="cuda"), torch.randn(1, 2, 2, 2, device="cuda"),
                         torch.randn(2))
    assert fpn_fast.ops.available_backends()["extension"]["cuda"] is None
