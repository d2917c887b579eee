"""The Triton convolutions with the epilogue in the kernel against eager PyTorch,
relu?((F.conv2d(x, weight, bias, stride, padding) + residual)): ``conv1x1_act`` (the GEMM of a
1x1 stride-1 conv, fpn_fast.ops.conv._triton_gemm) and ``conv2d_act`` (the implicit GEMM of any
window and stride, fpn_fast.ops.conv._triton_implicit_gemm).

Without a GPU the kernels run on CPU tensors through the Triton interpreter (conftest.py sets
TRITON_INTERPRET=1), whose tl.dot is a numpy matmul: float32 there is IEEE whatever the TF32 flag
says. With a GPU the same checks run compiled on CUDA tensors (the `cuda` marker).

The reference is the same computation in float64 on the same (rounded) inputs. Tolerances, with
T = C * kh * kw the number of products each output sums, u = eps/2 and
mag = conv(|x|, |w|) + |bias| + |residual| (ReLU is 1-Lipschitz, so it adds no error):
- float32: any summation order errs by at most gamma_T * mag ~ T u mag, and the two adds by u
  each: |out - exact| <= (T + 2) eps mag holds whatever the order (twice the first-order bound).
  Rounding errors of random sign grow like sqrt(T), so also, elementwise,
  |out - exact| <= 4 sqrt(T + 2) eps mag (a few ulp times sqrt(C)); and the largest error is no
  worse than eager float32's own plus sqrt(T + 2) ulp of the output's scale. With TF32 (CUDA,
  cudnn.allow_tf32) each operand is first cut to 10 mantissa bits: add 3 * 2**-10 mag (the
  statistical bounds are then not checked).
- float16/bfloat16: the products of such inputs are exact in float32, so the float32 value obeys
  the first bound above, and one rounding adds half an ulp: |out - exact| <= d + u (|exact| + d)
  (+ the smallest subnormal). And, flash-attention style: the largest error against float64 is
  no worse than eager's in that dtype (which rounds after the conv and again after the add), plus
  one ulp of the output's largest value.
NaN and inf: where the output is NaN, +inf or -inf must be exactly where eager's is.
"""
import functools
import re

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from fpn_fast.ops import _triton  # noqa: E402  (after importorskip)
from fpn_fast.ops.conv import _triton_gemm, _triton_implicit_gemm  # noqa: E402
from tests._cases import laid_out  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(
        _triton.unavailable_reason("cpu") is not None, reason=str(_triton.unavailable_reason("cpu")))),
    pytest.param("cuda", marks=pytest.mark.cuda),
]
TF32_EPS = 2.0 ** -10

# (N, C, H, W), K: odd sizes (C, K in 3, 17, 64; H, W in 1, 3, 7, 13), none a multiple of the
# interpreter's 32-wide blocks except 64 (two blocks), one row block and several.
CASES_1X1 = [
    ((1, 3, 1, 1), 17),
    ((2, 17, 3, 7), 64),
    ((2, 64, 7, 13), 3),
    ((1, 64, 13, 13), 64),
    ((2, 17, 13, 7), 17),
]
# (x layout, residual layout, weight transposed, with bias, with residual, relu): each operand in
# each layout ("sliced": a view with no unit stride), each optional part left out.
VARIANTS = [
    ("channels_last", "channels_last", False, True, True, True),
    ("channels_last", "contiguous", True, False, True, True),
    ("contiguous", None, False, True, False, True),
    ("channels_last", None, False, False, False, False),
    ("sliced", "sliced", True, True, True, False),
]


def case_id(case):
    (n, c, h, w), k = case
    return f"{n}x{c}x{h}x{w}->{k}"


def _make(case, dtype, device, kernel=(1, 1), stride=(1, 1), padding=(0, 0)):
    """Fresh random (x, weight, bias, residual), outputs of order 1."""
    (n, c, h, w), k = case
    x = torch.randn(n, c, h, w, device=device).to(dtype)
    taps = max(c * kernel[0] * kernel[1], 1)
    weight = (torch.randn(k, c, *kernel, device=device) / taps ** 0.5).to(dtype)
    bias = torch.randn(k, device=device).to(dtype)
    p, q = ((size + 2 * pad - kk) // s + 1 for size, pad, kk, s in zip((h, w), padding, kernel, stride))
    residual = torch.randn(n, k, p, q, device=device).to(dtype)
    return x, weight, bias, residual


def _transposed(weight):
    """The same (K, C, kh, kw) values with K the fastest-moving dim."""
    return weight.permute(2, 3, 1, 0).contiguous().permute(3, 2, 0, 1)


def _variant(x, weight, bias, residual, variant):
    x_layout, residual_layout, transposed, with_bias, with_residual, relu = variant
    return (laid_out(x, x_layout), _transposed(weight) if transposed else weight, bias if with_bias else None,
            laid_out(residual, residual_layout) if with_residual else None, relu)


def eager(x, weight, bias, residual, relu, stride=(1, 1), padding=(0, 0)):
    """What the ops replace: F.conv2d with its bias, + residual, torch.relu, in x's dtype."""
    out = F.conv2d(x, weight, bias, stride, padding)
    if residual is not None:
        out = out + residual
    return torch.relu(out) if relu else out


def _double(*tensors):
    return [None if t is None else t.double() for t in tensors]


def _assert_accurate(out, x, weight, bias, residual, relu, stride=(1, 1), padding=(0, 0)):
    """The bounds of the module docstring, against float64 on the same inputs, where the
    reference is finite (test_non_finite checks the rest)."""
    exact = eager(*_double(x, weight, bias, residual), relu, stride, padding)
    magnitude = eager(*[None if t is None else t.abs() for t in _double(x, weight, bias, residual)], False,
                      stride, padding)
    finite = torch.isfinite(exact) & torch.isfinite(magnitude)
    exact, magnitude = exact[finite], magnitude[finite]
    err = (out.double()[finite] - exact).abs()
    if not exact.numel():
        return
    taps = x.shape[1] * weight.shape[2] * weight.shape[3]
    eps32 = torch.finfo(torch.float32).eps
    gemm_bound = (taps + 2) * eps32 * magnitude
    tf32 = x.dtype == torch.float32 and x.is_cuda and _triton_gemm._dot_precision(x.dtype) == "tf32"
    if tf32:
        gemm_bound = gemm_bound + 3 * TF32_EPS * magnitude
    aten = (eager(x, weight, bias, residual, relu, stride, padding).double()[finite] - exact).abs().max()
    if x.dtype == torch.float32:
        assert (err <= gemm_bound).all(), (err - gemm_bound).max()
        if not tf32:
            typical = 4 * (taps + 2) ** 0.5 * eps32 * magnitude
            assert (err <= typical).all(), (err - typical).max()
            assert err.max() <= aten + (taps + 2) ** 0.5 * eps32 * exact.abs().max(), (err.max(), aten)
        return
    finfo = torch.finfo(x.dtype)
    bound = gemm_bound + finfo.eps / 2 * (exact.abs() + gemm_bound) + finfo.smallest_normal * finfo.eps
    assert (err <= bound).all(), (err - bound).max()
    assert err.max() <= aten + finfo.eps * exact.abs().max(), (err.max(), aten)


def _assert_layout(out, x, shape):
    assert tuple(out.shape) == tuple(shape) and out.dtype == x.dtype and out.device == x.device
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), (out.stride(), fmt)


# ----------------------------------------------------------------------------- conv1x1_act

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES_1X1, ids=case_id)
def test_conv1x1_matches_reference(case, dtype, device):
    inputs = _make(case, dtype, device)
    (n, _, h, w), k = case
    for variant in VARIANTS:
        args = _variant(*inputs, variant)
        out = _triton_gemm.conv1x1_act(*args)
        _assert_layout(out, args[0], (n, k, h, w))
        _assert_accurate(out, *args)


def _non_finite(x, weight, bias, residual):
    """The inputs with NaN, +inf and -inf planted in x (whole pixels' worth of outputs), the
    weight (whole output channels), the bias and the residual (single outputs)."""
    x, weight, bias, residual = (t.clone() for t in (x, weight, bias, residual))
    n, c, h, w = x.shape
    x[0, 0, 0, 0] = float("nan")
    x[n - 1, c - 1, h - 1, w - 1] = float("inf")
    x[0, c // 2, h // 2, w - 1] = float("-inf")
    weight[1, c - 1, 0, 0] = float("nan")
    weight[2, 0, -1, -1] = float("inf")
    bias[0] = float("-inf")
    residual[0, 1, 0, residual.shape[3] - 1] = float("nan")
    residual[n - 1, 2, residual.shape[2] - 1, 0] = float("-inf")
    residual[0, 2, 0, 0] = float("inf")
    return x, weight, bias, residual


def _assert_same_non_finite(out, expected):
    for test in (torch.isnan, torch.isposinf, torch.isneginf):
        assert torch.equal(test(out), test(expected)), (test.__name__, test(out).sum(), test(expected).sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
def test_conv1x1_non_finite(dtype, relu, device):
    """NaN and inf in x, weight, bias and residual land where eager puts them, in float64 and in
    the dtype itself; ReLU keeps NaN and maps -inf to 0; the finite outputs stay accurate."""
    x, weight, bias, residual = _non_finite(*_make(((2, 17, 7, 5), 19), dtype, device))
    x = x.contiguous(memory_format=torch.channels_last)
    out = _triton_gemm.conv1x1_act(x, weight, bias, residual, relu)
    reference = eager(*_double(x, weight, bias, residual), relu)
    assert not torch.isfinite(reference).all() and torch.isfinite(reference).any()
    _assert_same_non_finite(out, reference)
    _assert_same_non_finite(out, eager(x, weight, bias, residual, relu))
    _assert_accurate(out, x, weight, bias, residual, relu)


@pytest.mark.parametrize("device", DEVICES)
def test_conv1x1_residual_aliasing(device):
    """The output is always a fresh tensor: the residual may be x itself, a view sharing x's
    storage, or an expanded (stride 0) view; nothing an input holds is written."""
    x, weight, bias, _ = _make(((2, 17, 7, 5), 17), torch.float32, device)
    base = torch.randn(2, 34, 7, 5, device=device).contiguous(memory_format=torch.channels_last)
    one = torch.randn(1, 17, 7, 5, device=device)
    cases = {
        "x itself": (x.contiguous(memory_format=torch.channels_last), None),
        "two halves of one tensor": (base[:, :17], base[:, 17:]),
        "the same view twice": (base[:, 17:], base[:, 17:]),
        "expanded over the batch": (x, one.expand(2, -1, -1, -1)),
    }
    for name, (x_in, residual) in cases.items():
        residual = x_in if residual is None else residual
        before = [t.clone() for t in (x_in, residual, base)]
        out = _triton_gemm.conv1x1_act(x_in, weight, bias, residual, True)
        storages = {t.untyped_storage().data_ptr() for t in (x_in, residual, weight, bias)}
        assert out.untyped_storage().data_ptr() not in storages, name
        assert all(torch.equal(a, b) for a, b in zip(before, (x_in, residual, base))), name
        _assert_accurate(out, x_in, weight, bias, residual, True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("int64", [False, True], ids=["int32", "int64"])
def test_conv1x1_many_small_tiles(device, int64, monkeypatch):
    """Blocks much smaller than the operands: several row, column and channel blocks, each
    ragged (on the interpreter; a GPU picks its own config), and (forced) the int64 offset path
    that only >= 2**31-element tensors take otherwise."""
    for key in ("BLOCK_M", "BLOCK_K", "BLOCK_C"):
        monkeypatch.setitem(_triton_gemm._INTERPRETER_BLOCKS, key, 16)
    if int64:
        monkeypatch.setattr(_triton_gemm, "_needs_int64", lambda *tensors: True)
    x, weight, bias, residual = _make(((2, 40, 7, 5), 36), torch.float32, device)
    for layout in ("contiguous", "channels_last"):
        args = (laid_out(x, layout), weight, bias, laid_out(residual, layout), True)
        _assert_accurate(_triton_gemm.conv1x1_act(*args), *args)


@pytest.mark.parametrize("device", DEVICES)
def test_conv1x1_empty(device):
    """An empty batch: an empty output of the right shape, nothing launched, as F.conv2d gives.
    (No pixels, no output channels, no input channels are refused: F.conv2d refuses the first
    two and returns a map of no channels for the third: test_conv1x1_bad_inputs_raise_before_launch.)"""
    x, weight, bias, residual = _make(((0, 5, 3, 3), 4), torch.float32, device)
    out = _triton_gemm.conv1x1_act(x, weight, bias, residual, True)
    assert out.shape == eager(x, weight, bias, residual, True).shape == (0, 4, 3, 3)


@pytest.mark.parametrize("device", DEVICES)
def test_conv1x1_supports(device):
    """None for a call it takes; else a reason naming what it does not take."""
    x, weight, bias, residual = _make(((2, 17, 3, 7), 5), torch.float32, device)
    call = dict(x=x, weight=weight, bias=bias, residual=residual, relu=True)
    assert _triton_gemm.supports(**call) is None
    assert _triton_gemm.supports(**dict(call, bias=None, residual=None, relu=False)) is None
    refused = {
        "the window must be 1x1": dict(weight=weight.expand(5, 17, 3, 3)),
        "stride must be 1": dict(stride=(2, 2)),
        "padding 0": dict(padding=(1, 0)),
        "dilation": dict(dilation=(2, 2)),
        "groups 17 are not supported": dict(groups=17),
        "float64 is not supported": dict(x=x.double(), weight=weight.double()),
        "residual .* must have x's dtype": dict(residual=residual.half()),
        r"residual must have shape \(2, 5, 3, 7\)": dict(residual=residual[:1]),
    }
    for reason, change in refused.items():
        found = _triton_gemm.supports(**dict(call, **change))
        assert found is not None and re.search(reason, found), (reason, found)


def _bad_inputs(device):
    x, weight, bias, residual = _make(((2, 17, 3, 7), 5), torch.float32, device)
    return [
        ((x[0], weight, bias, residual), ValueError, r"x and weight must be 4-D.*\(17, 3, 7\)"),
        (("x", weight, bias, residual), TypeError, "x must be a tensor, got str"),
        ((x, weight, "bias", residual), TypeError, "bias must be a tensor or None"),
        ((x.long(), weight.long(), None, None), TypeError, "torch.int64 is not supported"),
        ((x.double(), weight.double(), None, None), TypeError, "torch.float64 is not supported"),
        ((x, weight[:, :16], bias, residual), ValueError, r"weight \(5, 16, 1, 1\) must be \(K, 17, kh, kw\)"),
        ((x, weight.expand(5, 17, 3, 3), bias, residual), ValueError, r"must be \(K, C, 1, 1\)"),
        ((x, weight.half(), bias, residual), TypeError, "weight .*float16.* must have x's dtype"),
        ((x, weight.to("meta"), bias, residual), ValueError, "weight .*meta.* must be on x's device"),
        ((x[:, :, :0], weight, bias, None), ValueError, r"window \(1, 1\) is larger than x \(2, 17, 0, 7\)"),
        ((x[:, :0], weight[:, :0], bias, residual), ValueError, "x has no input channels"),
        ((x, weight[:0], None, None), ValueError, r"weight \(0, 17, 1, 1\) has no output channels"),
        ((x, weight, bias[:4], residual), ValueError, r"bias must have shape \(5,\).*\(4,\)"),
        ((x, weight, bias, residual[:, :4]), ValueError, r"residual must have shape \(2, 5, 3, 7\)"),
        ((x, weight, bias, residual.bfloat16()), TypeError, "residual .*bfloat16.* must have x's dtype"),
        ((x.clone().requires_grad_(), weight, bias, residual), RuntimeError, "inference only"),
        ((x, torch.nn.Parameter(weight), bias, residual), RuntimeError, "inference only"),
    ]


class _NotLaunched:
    def __getitem__(self, grid):
        raise AssertionError("the kernel was launched")


@pytest.mark.parametrize("device", DEVICES)
def test_conv1x1_bad_inputs_raise_before_launch(device, monkeypatch):
    monkeypatch.setattr(_triton_gemm, "_KERNEL", _NotLaunched())
    for args, error, match in _bad_inputs(device):
        with pytest.raises(error, match=match):
            _triton_gemm.conv1x1_act(*args, True)


@pytest.mark.parametrize("device", DEVICES)
def test_conv1x1_inference_with_parameters(device):
    """Module weights require grad; under no_grad/inference_mode the op runs on them."""
    x, weight, bias, residual = _make(CASES_1X1[1], torch.float32, device)
    expected = _triton_gemm.conv1x1_act(x, weight, bias, residual, True)
    params = [torch.nn.Parameter(t.clone()) for t in (weight, bias)]
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            assert torch.equal(_triton_gemm.conv1x1_act(x, params[0], params[1], residual, True), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_conv1x1_opcheck(device):
    # No sample requires grad (the op has no autograd, by design): the forward checks apply
    # (schema, fake tensor, AOT dispatch).
    x, weight, bias, residual = _make(CASES_1X1[1], torch.float32, device)
    x16, weight16, bias16, residual16 = _make(CASES_1X1[4], torch.float16, device)
    cl = torch.channels_last
    for args in ((x.contiguous(memory_format=cl), weight, bias, residual, True),
                 (x, weight, None, None, False),
                 (x16.contiguous(memory_format=cl), weight16, bias16, residual16.contiguous(memory_format=cl), True)):
        torch.library.opcheck(torch.ops.fpn_fast_triton.conv1x1_act.default, args)


@pytest.mark.parametrize("device", DEVICES)
def test_conv1x1_compile_fullgraph(device):
    compiled = torch.compile(_triton_gemm.conv1x1_act, fullgraph=True, backend="aot_eager")
    x, weight, bias, residual = _make(CASES_1X1[1], torch.float32, device)
    args = (x.contiguous(memory_format=torch.channels_last), weight, bias, residual, True)
    assert torch.equal(compiled(*args), _triton_gemm.conv1x1_act(*args))


# ----------------------------------------------------------------------------- conv2d_act

# name -> ((N, C, H, W), K), window, stride, padding: the bottleneck's 3x3 stride 1 and 2 and
# 1x1 stride-2 downsample on odd maps (13x7 -> 7x4), a 3x3 on a 1x1 map (only the centre tap is
# inside), the stem's 7x7 stride 2 on 3 channels, an asymmetric window, stride and padding.
CASES_IMPLICIT = {
    "3x3s1p1": (((2, 17, 13, 7), 19), (3, 3), (1, 1), (1, 1)),
    "3x3s2p1": (((2, 17, 13, 7), 19), (3, 3), (2, 2), (1, 1)),
    "3x3s1p1-1x1map": (((2, 64, 1, 1), 3), (3, 3), (1, 1), (1, 1)),
    "1x1s2": (((1, 64, 13, 13), 17), (1, 1), (2, 2), (0, 0)),
    "7x7s2p3": (((1, 3, 13, 7), 17), (7, 7), (2, 2), (3, 3)),
    "1x3s2,1p0,1": (((1, 17, 7, 13), 17), (1, 3), (2, 1), (0, 1)),
}
IMPLICIT_VARIANTS = [VARIANTS[0], VARIANTS[1], VARIANTS[4]]


def _implicit(name, dtype, device):
    case, window, stride, padding = CASES_IMPLICIT[name]
    return _make(case, dtype, device, window, stride, padding), stride, padding


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", list(CASES_IMPLICIT))
def test_conv2d_matches_reference(name, dtype, device):
    inputs, stride, padding = _implicit(name, dtype, device)
    shape = inputs[3].shape
    for variant in IMPLICIT_VARIANTS:
        x, weight, bias, residual, relu = _variant(*inputs, variant)
        out = _triton_implicit_gemm.conv2d_act(x, weight, bias, residual, stride, padding, relu)
        _assert_layout(out, x, shape)
        _assert_accurate(out, x, weight, bias, residual, relu, stride, padding)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["3x3s1p1", "3x3s2p1"])
def test_conv2d_non_finite(name, dtype, device):
    """NaN and inf where eager puts them. Eager itself differs on one point: whether a non-finite
    weight reaches the outputs whose window hangs over the border (zero padding times NaN is
    NaN): F.conv2d's float32/float64 CPU kernels say yes, as this kernel does, oneDNN's bfloat16
    one says no. So non-finite weights are checked against float64 on CPU (the definition:
    zero padding, then the sum), and eager in the dtype itself on the device with finite weights."""
    (x, weight, bias, residual), stride, padding = _implicit(name, dtype, device)
    planted = _non_finite(x, weight, bias, residual)
    for x, weight, bias, residual in (planted, planted[:1] + (weight,) + planted[2:]):
        x = x.contiguous(memory_format=torch.channels_last)
        out = _triton_implicit_gemm.conv2d_act(x, weight, bias, residual, stride, padding, True)
        reference = eager(*[t.cpu() for t in _double(x, weight, bias, residual)], True, stride, padding)
        assert not torch.isfinite(reference).all() and torch.isfinite(reference).any()
        _assert_same_non_finite(out.cpu(), reference)
        if torch.isfinite(weight).all():
            _assert_same_non_finite(out, eager(x, weight, bias, residual, True, stride, padding))
        _assert_accurate(out, x, weight, bias, residual, True, stride, padding)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("int64", [False, True], ids=["int32", "int64"])
def test_conv2d_many_small_tiles(device, int64, monkeypatch):
    """Several row, column and channel blocks per tap, each ragged, padding on every side, the
    residual being x itself; (forced) the int64 offset path."""
    for key in ("BLOCK_M", "BLOCK_K", "BLOCK_C"):
        monkeypatch.setitem(_triton_gemm._INTERPRETER_BLOCKS, key, 16)
    if int64:
        monkeypatch.setattr(_triton_gemm, "_needs_int64", lambda *tensors: True)
    x, weight, bias, _ = _make(((2, 40, 7, 5), 40), torch.float32, device, (3, 3), (1, 1), (1, 1))
    for layout in ("contiguous", "channels_last"):
        x_in = laid_out(x, layout)
        out = _triton_implicit_gemm.conv2d_act(x_in, weight, bias, x_in, 1, 1, True)
        _assert_accurate(out, x_in, weight, bias, x_in, True, (1, 1), (1, 1))


@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_supports(device):
    (x, weight, bias, residual), stride, padding = _implicit("3x3s2p1", torch.float32, device)
    call = dict(x=x, weight=weight, bias=bias, residual=residual, relu=True, stride=stride, padding=padding)
    assert _triton_implicit_gemm.supports(**call) is None
    assert _triton_implicit_gemm.supports(**dict(call, stride=2, padding=1)) is None
    refused = {
        "dilation": dict(dilation=(2, 2)),
        "groups 17 are not supported": dict(groups=17),
        "stride must be an int or two ints": dict(stride=(1, 2, 3)),
        r"stride \(0, 0\) must be two positive ints": dict(stride=0),
        r"padding \(-1, 0\) two >= 0": dict(padding=(-1, 0)),
        r"residual must have shape \(2, 19, 6, 3\) .* got \(2, 19, 7, 4\)": dict(padding=0),
        "window .* is larger than x": dict(weight=torch.randn(19, 17, 17, 3, device=device), residual=None),
        "float64 is not supported": dict(x=x.double(), weight=weight.double(), bias=None, residual=None),
    }
    for reason, change in refused.items():
        found = _triton_implicit_gemm.supports(**dict(call, **change))
        assert found is not None and re.search(reason, found), (reason, found)


@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_bad_inputs_raise_before_launch(device, monkeypatch):
    monkeypatch.setattr(_triton_gemm, "_KERNEL", _NotLaunched())
    (x, weight, bias, residual), stride, padding = _implicit("3x3s2p1", torch.float32, device)
    bad = [
        (dict(stride="2"), TypeError, "stride must be an int or two ints, got '2'"),
        (dict(padding=(1, 1.5)), TypeError, "padding must be an int or two ints"),
        (dict(stride=(0, 1)), ValueError, r"stride \(0, 1\) must be two positive ints"),
        (dict(padding=-1), ValueError, r"padding \(-1, -1\) two >= 0"),
        (dict(weight=torch.randn(19, 17, 3, 17, device=device)), ValueError, r"window \(3, 17\) is larger than x"),
        (dict(residual=residual[..., :3]), ValueError, r"residual must have shape \(2, 19, 7, 4\)"),
        (dict(x=x[:, :16]), ValueError, r"must be \(K, 16, kh, kw\)"),
        (dict(bias=bias.half()), TypeError, "bias .*float16.* must have x's dtype"),
        (dict(x=x.clone().requires_grad_()), RuntimeError, "inference only"),
    ]
    call = dict(x=x, weight=weight, bias=bias, residual=residual, stride=stride, padding=padding, relu=True)
    for change, error, match in bad:
        with pytest.raises(error, match=match):
            _triton_implicit_gemm.conv2d_act(**dict(call, **change))


@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_opcheck_and_compile(device):
    (x, weight, bias, residual), stride, padding = _implicit("3x3s2p1", torch.float32, device)
    x = x.contiguous(memory_format=torch.channels_last)
    for args in ((x, weight, bias, residual, list(stride), list(padding), True),
                 (x.contiguous(), weight, None, None, [1, 1], [1, 1], False)):
        torch.library.opcheck(torch.ops.fpn_fast_triton.conv2d_act.default, args)
    compiled = torch.compile(_triton_implicit_gemm.conv2d_act, fullgraph=True, backend="aot_eager")
    args = (x, weight, bias, residual, stride, padding, True)
    assert torch.equal(compiled(*args), _triton_implicit_gemm.conv2d_act(*args))


# ----------------------------------------------------------------------------- conv2d_nchw

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["3x3s1p1", "3x3s2p1", "3x3s1p1-1x1map", "1x3s2,1p0,1"])
def test_conv2d_nchw_writes_nchw_whatever_x_is(name, dtype, device):
    """The FPN output convs' route: F.conv2d(x, weight, bias) stored straight into a contiguous
    NCHW output from a channels_last, contiguous or sliced x, with and without the bias."""
    (x, weight, bias, _), stride, padding = _implicit(name, dtype, device)
    for layout, with_bias in (("channels_last", True), ("contiguous", False), ("sliced", True)):
        xl, b = laid_out(x, layout), bias if with_bias else None
        out = _triton_implicit_gemm.conv2d_nchw(xl, weight, b, stride, padding)
        assert out.is_contiguous() and out.dtype == dtype
        _assert_accurate(out, xl, weight, b, None, False, stride, padding)


@pytest.mark.parametrize("device", DEVICES)
def test_conv2d_nchw_non_finite_and_opcheck(device):
    (x, weight, bias, residual), stride, padding = _implicit("3x3s1p1", torch.float32, device)
    planted = _non_finite(x, weight, bias, residual)
    x_nan = planted[0].contiguous(memory_format=torch.channels_last)
    out = _triton_implicit_gemm.conv2d_nchw(x_nan, weight, bias, stride, padding)
    _assert_same_non_finite(out, eager(x_nan, weight, bias, None, False, stride, padding))
    x = x.contiguous(memory_format=torch.channels_last)
    for args in ((x, weight, bias, list(stride), list(padding)), (x.contiguous(), weight, None, [2, 2], [0, 1])):
        torch.library.opcheck(torch.ops.fpn_fast_triton.conv2d_nchw.default, args)
    with pytest.raises(ValueError, match=r"conv2d_nchw: weight \(19, 17, 3, 3\) must be \(K, 16, kh, kw\)"):
        _triton_implicit_gemm.conv2d_nchw(x[:, :16], weight, bias, stride, padding)


def test_registration_without_interpreter(run_python):
    """The registration a GPU machine makes (TRITON_INTERPRET unset), in a fresh process: the
    same schema, a fake kernel giving x's memory format, the refusal of inputs that need grad."""
    result = run_python("""
        import torch
        from torch._subclasses.fake_tensor import FakeTensorMode
        from fpn_fast.ops.conv import _triton_gemm
        from fpn_fast.ops.conv import _triton_implicit_gemm
        ns = torch.ops.fpn_fast_triton
        print(ns.conv1x1_act.default._schema)
        print(ns.conv2d_act.default._schema)
        with FakeTensorMode():
            x = torch.randn(2, 5, 7, 3).contiguous(memory_format=torch.channels_last)
            out = ns.conv1x1_act(x, torch.randn(4, 5, 1, 1), torch.randn(4), None, True)
            print((tuple(out.shape), out.stride()))
            out = ns.conv2d_act(x, torch.randn(4, 5, 3, 3), None, None, [2, 2], [1, 1], True)
            print((tuple(out.shape), out.stride()))
        for call in (lambda w: ns.conv1x1_act(torch.randn(1, 5, 2, 2), w, None, None, False),
                     lambda w: ns.conv2d_act(torch.randn(1, 5, 2, 2), w, None, None, [1, 1], [0, 0], False)):
            try:
                call(torch.randn(4, 5, 1, 1, requires_grad=True))
            except RuntimeError as e:
                print("refused:", "has no gradient" in str(e))
    """, unset=("TRITON_INTERPRET",))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == ("fpn_fast_triton::conv1x1_act(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, "
                        "bool relu) -> Tensor"), lines
    assert lines[1] == ("fpn_fast_triton::conv2d_act(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, "
                        "SymInt[] stride, SymInt[] padding, bool relu) -> Tensor"), lines
    assert lines[2:] == ["((2, 4, 7, 3), (84, 1, 12, 4))", "((2, 4, 4, 2), (32, 1, 8, 4))",
                         "refused: True", "refused: True"], lines


# ----------------------------------------------------------------------------- GPU configs

H200 = dict(sm_count=132, shared_memory=227 * 1024)
# ResNet50's bottleneck 1x1 convs at batch 2, 800x1216: (M, K, C) per stage.
BOTTLENECK_1X1 = {
    "C2 conv1 first": (121600, 64, 64), "C2 conv1": (121600, 64, 256), "C2 conv3": (121600, 256, 64),
    "C3 conv1 first": (121600, 128, 256), "C3 conv1": (30400, 128, 512), "C3 conv3": (30400, 512, 128),
    "C4 conv1": (7600, 256, 1024), "C4 conv3": (7600, 1024, 256),
    "C5 conv1": (1900, 512, 2048), "C5 conv3": (1900, 2048, 512),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_heuristic_config_for_the_bottleneck(dtype):
    """Every pick's pipeline fits shared memory, no block is wider than its operand needs, and
    the SMs all get a tile wherever a config allows it."""
    pick = functools.partial(_triton_gemm._heuristic_config, dtype=dtype, **H200)
    for name, (m, k, c) in BOTTLENECK_1X1.items():
        bm, bk, bc, warps, stages = pick(m, k, c)
        assert (bm + bk) * bc * dtype.itemsize * stages <= H200["shared_memory"], name
        assert bk <= max(16, k) and bc <= max(16, c) and min(bm, bk, bc) >= 16, name
        most_tiles = max(-(-m // cfg[0]) * -(-k // min(cfg[1], k)) for cfg in _triton_gemm._GPU_CONFIGS)
        assert -(-m // bm) * -(-k // bk) >= min(H200["sm_count"], most_tiles), (name, (bm, bk, bc))
    assert pick(121600, 64, 64)[:2] == (256, 64)  # the narrow large map: tall tiles, nothing masked
    assert pick(121600, 256, 64)[0] * pick(121600, 256, 64)[1] == 128 * 256


def test_heuristic_config_fits_small_shared_memory():
    """A GPU with ~100 KB per block (consumer cards) gets configs whose float32 stages fit; odd,
    tiny channel counts get blocks of at least tl.dot's 16."""
    for m, k, c in ((1, 256, 512), (1900, 2048, 512), (121600, 64, 64), (7, 3, 3), (300, 17, 17)):
        bm, bk, bc, _, stages = _triton_gemm._heuristic_config(m, k, c, torch.float32, 40, 99 * 1024)
        assert (bm + bk) * bc * 4 * stages <= 99 * 1024 and min(bm, bk, bc) >= 16, (m, k, c)


# ----------------------------------------------------------------------------- GPU only

@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tf32", [True, False], ids=["tf32", "ieee"])
@pytest.mark.parametrize("name", ["C2 conv3", "C3 conv1", "C4 conv3", "C5 conv1"])
def test_conv1x1_bottleneck_sized_cuda(name, tf32, dtype, monkeypatch):
    if dtype != torch.float32 and not tf32:
        pytest.skip("the TF32 flag concerns float32 only")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    m, k, c = BOTTLENECK_1X1[name]
    h, w = {121600: (200, 304), 30400: (100, 152), 7600: (50, 76), 1900: (25, 38)}[m]
    x, weight, bias, residual = _make(((2, c, h, w), k), dtype, "cuda")
    cl = torch.channels_last
    args = (x.contiguous(memory_format=cl), weight.contiguous(memory_format=cl), bias,
            residual.contiguous(memory_format=cl), True)
    out = _triton_gemm.conv1x1_act(*args)
    _assert_layout(out, args[0], (2, k, h, w))
    _assert_accurate(out, *args)


@pytest.mark.cuda
def test_conv1x1_compile_inductor_cuda():
    """Inductor calls the inference-only op as one opaque kernel and gets the same result."""
    compiled = torch.compile(_triton_gemm.conv1x1_act, fullgraph=True)
    x, weight, bias, residual = _make(((2, 256, 50, 76), 64), torch.float16, "cuda")
    args = (x.contiguous(memory_format=torch.channels_last), weight, bias, residual, True)
    out = compiled(*args)
    _assert_layout(out, args[0], (2, 64, 50, 76))
    _assert_accurate(out, *args)


# ResNet50's other convs at batch 2, 800x1216: ((N, C, H, W), K), window, stride, padding.
BOTTLENECK_IMPLICIT = {
    "C2 conv2 3x3": (((2, 64, 200, 304), 64), (3, 3), (1, 1), (1, 1)),
    "C3 conv2 first 3x3s2": (((2, 128, 200, 304), 128), (3, 3), (2, 2), (1, 1)),
    "C3 downsample 1x1s2": (((2, 256, 200, 304), 512), (1, 1), (2, 2), (0, 0)),
    "C5 conv2 3x3": (((2, 512, 25, 38), 512), (3, 3), (1, 1), (1, 1)),
}


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tf32", [True, False], ids=["tf32", "ieee"])
@pytest.mark.parametrize("name", list(BOTTLENECK_IMPLICIT))
def test_conv2d_bottleneck_sized_cuda(name, tf32, dtype, monkeypatch):
    if dtype != torch.float32 and not tf32:
        pytest.skip("the TF32 flag concerns float32 only")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    case, window, stride, padding = BOTTLENECK_IMPLICIT[name]
    x, weight, bias, residual = _make(case, dtype, "cuda", window, stride, padding)
    cl = torch.channels_last
    x, residual = x.contiguous(memory_format=cl), residual.contiguous(memory_format=cl)
    out = _triton_implicit_gemm.conv2d_act(x, weight, bias, residual, stride, padding, True)
    _assert_layout(out, x, residual.shape)
    _assert_accurate(out, x, weight, bias, residual, True, stride, padding)
