"""The Triton lateral GEMM (fpn_fast.ops.lateral._triton) itself: its accuracy against
F.conv2d(x, weight) + bias + F.interpolate(top, mode="nearest") computed in float64 (on tiles much
smaller than the operands, the int64 offset path, a strided bias, FPN-sized maps on a GPU), its
configs and precision flags, and its input checks. The public op on every backend x device x
dtype x layout (parity with the reference, opcheck, compile, export) is test_lateral.py's OpTester.

Without a GPU the kernel runs on CPU tensors through the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1), whose tl.dot is a numpy matmul: float32 there is IEEE whatever the TF32 flag
says. With a GPU the same checks run compiled on CUDA tensors (the `cuda` marker), autotuned.

Tolerances (the GEMM sums in another order than a convolution, so nothing is bit-exact):
- float32: the result is fl(fl(fl(sum_k x_k w_k) + b) + up). Any summation order of K products
  errs by at most gamma_K * sum |x_k w_k| ~ K u (u = eps/2), and the two adds by u each, so
  |out - exact| <= (K + 2) * eps * (conv(|x|, |w|) + |b| + |up|): twice the first-order bound.
  With TF32 (CUDA, cudnn.allow_tf32) each operand is first cut to 10 mantissa bits: add
  3 * 2**-10 * that magnitude.
- float16/bfloat16: products of such inputs are exact in float32, so the float32 value y obeys
  the bound above, and one rounding adds half an ulp: |out - exact| <= d + (eps/2) (|exact| + d)
  (+ the smallest subnormal). And, flash-attention style: the max error against float64 is no
  worse than the same torch reference run in that dtype (which rounds after the conv, the bias
  and the add), with one ulp of the output's largest value as slack.
"""
import functools
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from fpn_fast.ops import _triton, reference  # noqa: E402  (after importorskip)
from fpn_fast.ops.lateral import _triton as _triton_lateral  # noqa: E402
from tests._cases import laid_out  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        _triton.unavailable_reason("cpu") is not None,
        reason=str(_triton.unavailable_reason("cpu")))),
    pytest.param("cuda", marks=pytest.mark.cuda),
]
# (N, C, H, W), O, top (th, tw): odd sizes, a non-2x ratio; C and O not multiples of the blocks.
CASE = ((2, 24, 7, 11), 20, (4, 6))
TF32_EPS = 2.0 ** -10


def case_id(case):
    (n, c, h, w), o, (th, tw) = case
    return f"{n}x{c}x{h}x{w}->{o}<-{th}x{tw}"


def _make(case, dtype, device):
    (n, c, h, w), o, top_hw = case
    x = torch.randn(n, c, h, w, device=device).to(dtype)
    weight = (torch.randn(o, c, 1, 1, device=device) / c ** 0.5).to(dtype)  # outputs of order 1
    bias = torch.randn(o, device=device).to(dtype)
    top = torch.randn(n, o, *top_hw, device=device).to(dtype)
    return x, weight, bias, top


def _reference(x, weight, bias, top):
    out = F.conv2d(x, weight)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    if top is not None:
        out = out + F.interpolate(top, size=x.shape[-2:], mode="nearest")
    return out


def _assert_accurate(out, x, weight, bias, top):
    """The bounds of the module docstring, against a float64 computation on the same inputs."""
    args = [None if t is None else t.double() for t in (x, weight, bias, top)]
    exact = _reference(*args)
    magnitude = _reference(*[None if t is None else t.abs() for t in args])
    k = x.shape[1]
    gemm_bound = (k + 2) * torch.finfo(torch.float32).eps * magnitude
    if x.dtype == torch.float32 and x.is_cuda and torch.backends.cudnn.allow_tf32:
        gemm_bound = gemm_bound + 3 * TF32_EPS * magnitude
    err = (out.double() - exact).abs()
    if x.dtype == torch.float32:
        assert (err <= gemm_bound).all(), (err - gemm_bound).max()
        return
    finfo = torch.finfo(x.dtype)
    bound = gemm_bound + finfo.eps / 2 * (exact.abs() + gemm_bound) + finfo.smallest_normal * finfo.eps
    assert (err <= bound).all(), (err - bound).max()
    if exact.numel():
        aten = (_reference(x, weight, bias, top).double() - exact).abs().max()
        assert err.max() <= aten + finfo.eps * exact.abs().max(), (err.max(), aten)


def _assert_same_format(out, like):
    fmt = reference.memory_format_of(like)
    assert out.is_contiguous(memory_format=fmt), (out.stride(), fmt)


# ----------------------------------------------------------------------------- accuracy, tiling

@pytest.mark.parametrize("device", DEVICES)
def test_empty_plane(device):
    """An x with no pixels: an empty output of the right shape, nothing launched (the unfused route,
    F.conv2d, refuses such an x in float16/bfloat16: test_lateral.py has no empty plane)."""
    x, weight, bias, top = _make(((2, 24, 0, 5), 20, (3, 4)), torch.float32, device)
    out = _triton_lateral.lateral_upsample_add(x, weight, bias, top)
    assert out.shape == (2, 20, 0, 5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("int64", [False, True], ids=["int32", "int64"])
def test_many_small_tiles(device, int64, monkeypatch):
    """Blocks much smaller than the operands: several row, column and K blocks, each ragged (on
    the interpreter; a GPU picks its autotuned config), and (forced) the int64 offset path that
    only >= 2**31-element tensors take otherwise."""
    monkeypatch.setitem(_triton_lateral._INTERPRETER_BLOCKS, "BLOCK_M", 16)
    monkeypatch.setitem(_triton_lateral._INTERPRETER_BLOCKS, "BLOCK_N", 16)
    monkeypatch.setitem(_triton_lateral._INTERPRETER_BLOCKS, "BLOCK_K", 16)
    if int64:
        monkeypatch.setattr(_triton_lateral, "_needs_int64", lambda *tensors: True)
    x, weight, bias, top = _make(((2, 40, 7, 11), 36, (4, 6)), torch.float32, device)
    for layout in ("contiguous", "channels_last"):
        args = (laid_out(x, layout), weight, bias, laid_out(top, layout))
        _assert_accurate(_triton_lateral.lateral_upsample_add(*args), *args)


def test_dot_precision_follows_cudnn_tf32_flag(monkeypatch):
    """float32 uses TF32 exactly when cuDNN's convolutions may; other dtypes get tl.dot's default.
    (The interpreter ignores the choice; test_float32_ieee_fpn_sized_cuda checks it on a GPU.)"""
    for allowed in (True, False):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", allowed)
        assert _triton_lateral._dot_precision(torch.float32) == ("tf32" if allowed else "ieee")
        assert _triton_lateral._dot_precision(torch.float16) == "tf32"  # tl.dot's default
        assert _triton_lateral._dot_precision(torch.bfloat16) == "tf32"


def test_autotune_mode_choice(monkeypatch):
    monkeypatch.delenv("FPN_FAST_AUTOTUNE", raising=False)
    assert _triton_lateral._autotune_mode() == "heuristic"
    monkeypatch.setenv("FPN_FAST_AUTOTUNE", "full")
    assert _triton_lateral._autotune_mode() == "full"
    for wrong in ("quick", "fast"):
        monkeypatch.setenv("FPN_FAST_AUTOTUNE", wrong)
        with pytest.raises(ValueError, match="FPN_FAST_AUTOTUNE must be 'heuristic' or 'full'"):
            _triton_lateral._autotune_mode()


H200 = dict(sm_count=132, shared_memory=227 * 1024)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_heuristic_config_for_the_fpn_laterals(dtype):
    """Batch 2, 800x1216, 256 out channels: wide tiles on the large maps, smaller ones where a
    wide tile would leave SMs idle (C4, C5), and every pick's pipeline fits shared memory."""
    pick = functools.partial(_triton_lateral._heuristic_config, dtype=dtype, **H200)
    levels = {"C2": (121600, 256), "C3": (30400, 512), "C4": (7600, 1024), "C5": (1900, 2048)}
    configs = {name: pick(m, 256, k) for name, (m, k) in levels.items()}
    assert configs["C2"] == (128, 256, 32, 8, 3)
    for name, (m, _) in levels.items():
        bm, bn, bk, _, stages = configs[name]
        tiles = -(-m // bm) * -(-256 // bn)
        assert (bm + bn) * bk * dtype.itemsize * stages <= H200["shared_memory"], name
        if name != "C5":
            assert tiles >= H200["sm_count"], (name, configs[name])
    assert configs["C5"][0] * configs["C5"][1] < configs["C2"][0] * configs["C2"][1]


def test_heuristic_config_fits_small_shared_memory():
    """A GPU with ~100 KB per block (consumer cards) gets configs whose float32 stages fit."""
    for m in (1, 1900, 121600):
        bm, bn, bk, _, stages = _triton_lateral._heuristic_config(m, 256, 512, torch.float32, 40, 99 * 1024)
        assert (bm + bn) * bk * 4 * stages <= 99 * 1024, (m, bm, bn, bk, stages)


def test_dot_precision_reads_the_newer_precision_flags():
    """After torch's per-op fp32_precision flags are set, reading the legacy allow_tf32 raises;
    the choice must then come from the new flags (a child process: the flags are global)."""
    if not hasattr(torch.backends.cudnn, "conv"):
        pytest.skip("this torch has no per-op fp32_precision flags")
    code = textwrap.dedent("""
        import torch
        from fpn_fast.ops.lateral import _triton as _triton_lateral
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        assert _triton_lateral._dot_precision(torch.float32) == "ieee"
        torch.backends.cudnn.conv.fp32_precision = "tf32"
        assert _triton_lateral._dot_precision(torch.float32) == "tf32"
        print("ok")
    """)
    env = dict(os.environ, TRITON_INTERPRET=os.environ.get("TRITON_INTERPRET", ""))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr


@pytest.mark.parametrize("device", DEVICES)
def test_strided_bias(device):
    """A bias that is a strided view (every other element) is read through its stride."""
    x, weight, _, top = _make(CASE, torch.float32, device)
    bias = torch.randn(2 * weight.shape[0], device=device)[::2]
    assert not bias.is_contiguous()
    _assert_accurate(_triton_lateral.lateral_upsample_add(x, weight, bias, top), x, weight, bias, top)


# ----------------------------------------------------------------------------- bad inputs

def _bad_inputs(device):
    x, weight, bias, top = _make(CASE, torch.float32, device)  # x (2, 24, 7, 11), O = 20
    return [
        ((x[0], weight, bias, top), ValueError, r"x must be 4-D .*\(24, 7, 11\)"),
        ((x.long(), weight.long(), None, None), TypeError, "floating dtypes only.*int64"),
        ((x, weight[:, :, 0, 0], bias, top), ValueError, r"weight must be \(O, 24, 1, 1\).*\(20, 24\)"),
        ((x, weight.expand(20, 24, 3, 3), bias, top), ValueError, r"weight must be .*\(20, 24, 3, 3\)"),
        ((x, weight[:, :23], bias, top), ValueError, r"weight must be \(O, 24, 1, 1\).*\(20, 23, 1, 1\)"),
        ((x, weight.half(), bias, top), TypeError, "weight .*float16.* must have x's dtype.*float32"),
        ((x, weight.to("meta"), bias, top), ValueError, "weight .*meta.* must be on x's device.*" + device),
        ((x, weight, bias[:19], top), ValueError, r"bias must have shape \(20,\).*\(19,\)"),
        ((x, weight, bias.double(), top), TypeError, "bias .*float64.* must have x's dtype"),
        ((x, weight, bias, top[:1]), ValueError, r"top must be \(2, 20, th, tw\).*\(1, 20, 4, 6\)"),
        ((x, weight, bias, top[:, :19]), ValueError, r"top must be \(2, 20, th, tw\).*\(2, 19, 4, 6\)"),
        ((x, weight, bias, top[0]), ValueError, r"top must be \(2, 20, th, tw\).*\(20, 4, 6\)"),
        ((x, weight, bias, top[:, :, :0]), ValueError, "top has an empty plane"),
        ((x, weight, bias, top.half()), TypeError, "top .*float16.* must have x's dtype"),
        ((x, weight, bias, "top"), TypeError, "top must be a tensor or None"),
        ((x.double(), weight.double(), None, None), TypeError, "torch.float64 is not supported"),
        ((x.clone().requires_grad_(), weight, bias, top), RuntimeError, "inference only"),
        ((x, torch.nn.Parameter(weight), bias, top), RuntimeError, "inference only"),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_raise_before_launch(device, monkeypatch):
    """Each bad input raises its documented error; the kernel is swapped for one that fails the
    test if launched, so no bad input can reach (or crash in) the real kernel."""
    class NotLaunched:
        def __getitem__(self, grid):
            raise AssertionError("the kernel was launched")

    monkeypatch.setattr(_triton_lateral, "_KERNEL", NotLaunched())
    for args, error, match in _bad_inputs(device):
        with pytest.raises(error, match=match):
            _triton_lateral.lateral_upsample_add(*args)


# ----------------------------------------------------------------------------- GPU only

# The FPN's laterals at batch 2, 800x1216 (C2..C5 -> 256 channels), with a smaller odd-sized one.
FPN_CASES = [
    ((2, 256, 200, 304), 256, (100, 152)),
    ((2, 512, 100, 152), 256, (50, 76)),
    ((2, 1024, 50, 76), 256, (25, 38)),
    ((2, 2048, 25, 38), 256, None),
    ((2, 512, 97, 151), 256, (49, 76)),
]


def _make_fpn(case, dtype):
    (n, c, h, w), o, top_hw = case
    x, weight, bias, top = _make(((n, c, h, w), o, top_hw or (1, 1)), dtype, "cuda")
    return x, weight, bias, None if top_hw is None else top


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", FPN_CASES, ids=lambda c: case_id((c[0], c[1], c[2] or (0, 0))))
def test_fpn_sized_cuda(case, dtype):
    x, weight, bias, top = _make_fpn(case, dtype)
    for fmt in (torch.channels_last, torch.contiguous_format):
        args = (x.contiguous(memory_format=fmt), weight, bias,
                None if top is None else top.contiguous(memory_format=fmt))
        out = _triton_lateral.lateral_upsample_add(*args)
        _assert_same_format(out, args[0])
        _assert_accurate(out, *args)


@pytest.mark.cuda
@pytest.mark.parametrize("case", FPN_CASES[:2], ids=lambda c: case_id((c[0], c[1], c[2] or (0, 0))))
def test_float32_ieee_fpn_sized_cuda(case, monkeypatch):
    """With cuDNN's TF32 off the dot is full float32: within 1e-4 of each output's largest value,
    and within the IEEE bound of the module docstring, which TF32 (2**-10) would break."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    x, weight, bias, top = _make_fpn(case, torch.float32)
    x = x.contiguous(memory_format=torch.channels_last)
    out = _triton_lateral.lateral_upsample_add(x, weight, bias, top)
    exact = _reference(x.double(), weight.double(), bias.double(), top.double())
    assert (out.double() - exact).abs().max() <= 1e-4 * exact.abs().max()
    _assert_accurate(out, x, weight, bias, top)
