"""fpn_fast.ops.upsample_add / upsample_add_ on every backend x device x dtype x layout, bit for
bit against the pure-PyTorch reference (fpn_fast.ops.reference), from the one case list in
tests/_cases.py. Backend-only details live in test_extension.py and test_triton.py."""
import pytest
import torch
import torch.nn.functional as F

import fpn_fast.ops as ops
from fpn_fast.ops import dispatch, reference
from tests._cases import BACKENDS, DTYPES, LAYOUTS, SHAPES, backend_cases, laid_out, make_inputs, running, shape_id


@pytest.fixture
def on_backend(request, device):
    """use_backend(backend) for a test parametrised with `backend`: skips where it cannot run,
    checks that upsample_add then runs that backend's own kernel."""
    backend = request.node.callspec.params["backend"]
    with running("upsample_add", backend, device):
        assert dispatch.TABLE[("upsample_add", device)][backend][0] == backend
        yield backend


def _detached_leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def _assert_laid_out_like(out, expected):
    """Same memory format as the reference result (strides say nothing about an empty tensor)."""
    assert out.shape == expected.shape
    if out.numel():
        assert out.stride() == expected.stride(), (out.stride(), expected.stride())


# ----------------------------------------------------------------------------- the reference

@pytest.mark.parametrize("case", SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_reference_is_torchvisions_sequence(case, dtype, layout):
    """What every backend is held to: torchvision's conv bias, F.interpolate(nearest), add —
    in that order; float16/bfloat16 in float32 with one rounding."""
    lateral, top, bias = make_inputs(case, dtype, layout)
    acc = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    (n, c, h, w), (th, tw) = case
    if h * w and th * tw and c and n:
        up = F.interpolate(top.to(acc), size=(h, w), mode="nearest")
    else:  # F.interpolate refuses empty maps: gather by the same source indices
        up = top.to(acc)[:, :, reference.nearest_source_index(h, th)][:, :, :, reference.nearest_source_index(w, tw)]
    eager = ((lateral.to(acc) + bias.to(acc).view(1, -1, 1, 1)) + up).to(dtype)
    assert torch.equal(reference.upsample_add(lateral, top, bias), eager)
    assert torch.equal(reference.upsample_add(lateral, top, None), (lateral.to(acc) + up).to(dtype))


def test_reference_index_formula_matches_interpolate_on_many_sizes():
    for in_size in (1, 2, 3, 5, 7, 13, 14, 19, 21, 25, 38, 50, 76):
        for out_size in (1, 2, 4, 7, 11, 25, 38, 46, 49, 69, 100, 152, 304):
            probe = torch.arange(in_size, dtype=torch.float32).view(1, 1, in_size, 1)
            expected = F.interpolate(probe, size=(out_size, 1), mode="nearest").view(-1).long()
            assert torch.equal(reference.nearest_source_index(out_size, in_size), expected), (in_size, out_size)


def test_float32_scale_case_is_not_the_exact_ratio():
    """The (46, 69) <- (14, 21) case only tests the float32 arithmetic if it differs there."""
    assert ((1, 2, 46, 69), (14, 21)) in SHAPES
    for out_size, in_size in ((46, 14), (69, 21)):
        exact = torch.arange(out_size) * in_size // out_size
        assert not torch.equal(reference.nearest_source_index(out_size, in_size), exact)


def _forward_map_scatter(grad: torch.Tensor, top_h: int, top_w: int) -> torch.Tensor:
    """The definition, in float64: out[d] reads top[src[d]], so top's gradient at s is the sum of
    grad over the destinations d with src[d] == s (index_add_ over the forward's own map)."""
    n, c, h, w = grad.shape
    src_h = reference.nearest_source_index(h, top_h).to(grad.device)
    src_w = reference.nearest_source_index(w, top_w).to(grad.device)
    by_row = torch.zeros(n, c, top_h, w, dtype=torch.float64, device=grad.device).index_add_(2, src_h, grad.double())
    return torch.zeros(n, c, top_h, top_w, dtype=torch.float64, device=grad.device).index_add_(3, src_w, by_row)


def _atens_cuda_window_starts(out_size: int, in_size: int) -> torch.Tensor:
    """Where ATen's CUDA nearest backward starts each source's window (UpSample.cuh,
    nearest_neighbor_bw_compute_source_index, scale from compute_scales_value_backwards with no
    scale_factor): min(ceilf((float)s * ((float)out / (float)in)), out), float32 throughout; the
    forward map is min(floorf((float)d * ((float)in / (float)out)), in - 1). Equal sizes copy."""
    if out_size == in_size:
        return torch.arange(in_size + 1)
    scale = torch.tensor(out_size, dtype=torch.float32) / torch.tensor(in_size, dtype=torch.float32)
    return torch.ceil(torch.arange(in_size + 1, dtype=torch.float32) * scale).long().clamp_(max=out_size)


def _forward_map_window_starts(out_size: int, in_size: int) -> torch.Tensor:
    """Each source's window under the forward map: the first destination that reads it."""
    return torch.searchsorted(reference.nearest_source_index(out_size, in_size), torch.arange(in_size + 1))


@pytest.mark.parametrize("case", [c for c in SHAPES if c[0][2] * c[0][3] and c[1][0] * c[1][1]], ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_forward_map_backward_is_the_definition(case, dtype):
    """reference.nearest_upsample_backward sums what the forward read: with small integer
    gradients every sum is exact in every dtype, so it equals the float64 scatter-add over the
    forward's own index map whatever the order."""
    (n, c, h, w), (th, tw) = case
    grad = torch.randint(-2, 3, (n, c, h, w)).to(dtype)
    expected = _forward_map_scatter(grad, th, tw)
    for layout in ("contiguous", "channels_last", "sliced"):
        got = reference.nearest_upsample_backward(laid_out(grad, layout), th, tw)
        assert got.dtype == dtype and torch.equal(got.double(), expected), layout


@pytest.mark.parametrize("case", [c for c in SHAPES if c[0][2] * c[0][3] and c[1][0] * c[1][1] and c[0][0] * c[0][1]],
                         ids=shape_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_forward_map_backward_is_atens_cpu_backward(case, dtype, layout):
    """On CPU, ATen's nearest backward scatters each destination into the source the forward read,
    in destination order (float32 accumulation for half types): the same bits as the forward-map
    reference, 46x69 <- 14x21 included."""
    (n, c, h, w), (th, tw) = case
    grad = laid_out(torch.randn(n, c, h, w).to(dtype), layout)
    top = torch.randn(n, c, th, tw).to(dtype).requires_grad_()
    F.interpolate(top, size=(h, w), mode="nearest").backward(grad)
    assert torch.equal(reference.nearest_upsample_backward(grad, th, tw), top.grad)


def test_atens_cuda_backward_windows_differ_from_the_forward_map_in_float32():
    """The emulation behind docs/design.md: float32(14/46) * 23 = 6.9999995, so the forward reads
    top row 6 at destination 23 (and row 13 at 46 of 69), while ATen's CUDA backward, starting
    windows at ceilf(s * float32(46/14)), gives destination 23 to source 7 (and 46 to 14). At the
    FPN's own ratios (out = 2 * in, 2 * in - 1) the two agree."""
    expected = {(46, 14): {6: ((20, 24), (20, 23)), 7: ((24, 27), (23, 27))},
                (69, 21): {6: ((20, 24), (20, 23)), 7: ((24, 27), (23, 27)),
                           13: ((43, 47), (43, 46)), 14: ((47, 50), (46, 50))}}
    for (out_size, in_size), differing in expected.items():
        ours, atens = _forward_map_window_starts(out_size, in_size), _atens_cuda_window_starts(out_size, in_size)
        windows = {s: ((int(ours[s]), int(ours[s + 1])), (int(atens[s]), int(atens[s + 1])))
                   for s in range(in_size) if ours[s] != atens[s] or ours[s + 1] != atens[s + 1]}
        assert windows == differing, (out_size, in_size, windows)
    for in_size in range(1, 257):
        for out_size in (2 * in_size - 1, 2 * in_size):
            assert torch.equal(_forward_map_window_starts(out_size, in_size),
                               _atens_cuda_window_starts(out_size, in_size)), (out_size, in_size)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_cuda_kernels_follow_the_forward_map_where_atens_cuda_backward_does_not(dtype):
    """At 46x69 <- 14x21 on CUDA: the extension's and Triton's top gradient is the forward map's
    (the bits of the CPU kernels and of ATen's CPU backward); ATen's CUDA backward sums the windows
    the emulation above predicts, which credit destination row 23 and column 23 / 46 to the
    neighbouring source. If ATen's assertion fails, torch changed its CUDA backward: update
    docs/design.md."""
    (n, c, h, w), (th, tw) = (1, 2, 46, 69), (14, 21)
    grad = torch.randint(-2, 3, (n, c, h, w), device="cuda").to(dtype)  # exact sums in any order
    lateral, top, bias = make_inputs(((n, c, h, w), (th, tw)), dtype, device="cuda")
    forward_map = reference.nearest_upsample_backward(grad, th, tw)
    assert torch.equal(forward_map.double(), _forward_map_scatter(grad, th, tw))
    for backend in ("extension", "triton"):
        if ops.available_backends()[backend]["cuda"] is not None:
            continue
        leaf = top.clone().requires_grad_()
        with running("upsample_add", backend, "cuda"):
            ops.upsample_add(lateral, leaf, bias).backward(grad)
        assert torch.equal(leaf.grad, forward_map), backend
    leaf = top.clone().requires_grad_()
    F.interpolate(leaf, size=(h, w), mode="nearest").backward(grad)
    starts_h, starts_w = _atens_cuda_window_starts(h, th).tolist(), _atens_cuda_window_starts(w, tw).tolist()
    owner_h = torch.tensor([s for s in range(th) for _ in range(starts_h[s], starts_h[s + 1])], device="cuda")
    owner_w = torch.tensor([s for s in range(tw) for _ in range(starts_w[s], starts_w[s + 1])], device="cuda")
    by_row = torch.zeros(n, c, th, w, dtype=torch.float64, device="cuda").index_add_(2, owner_h, grad.double())
    atens = torch.zeros(n, c, th, tw, dtype=torch.float64, device="cuda").index_add_(3, owner_w, by_row)
    assert torch.equal(leaf.grad.double(), atens), "ATen's CUDA nearest backward changed: update docs/design.md"
    assert not torch.equal(leaf.grad, forward_map)


# ----------------------------------------------------------------------------- every backend

@pytest.mark.parametrize("backend,case", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_backward_in_place_bit_exact(backend, case, dtype, layout, device, on_backend, request):
    """Same operations in the same precision and order as the reference, so the same bits:
    - forward, with and without bias: laid out like lateral, inputs untouched;
    - backward: lateral's and bias's gradients equal the reference's autograd (the bias gradient
      an ATen sum); top's equals the forward map's own backward (each top window summed in
      destination order, float32 for half types: reference.nearest_upsample_backward);
    - in place: the same bits written through lateral's view, nothing around it touched."""
    leaves = make_inputs(case, dtype, layout, device=device, requires_grad=True)
    lateral, top, bias = (t.detach() for t in leaves)
    for b in (bias, None):
        expected = reference.upsample_add(lateral, top, b)
        out = ops.upsample_add(lateral, top, b)
        assert torch.equal(out, expected), ("forward", b is None)
        _assert_laid_out_like(out, expected)
    assert all(torch.equal(t.detach(), t0) for t, t0 in zip(leaves, (lateral, top, bias)))

    grad = laid_out(torch.randn(lateral.shape, device=device).to(dtype), LAYOUTS[layout][0])
    ops.upsample_add(*leaves).backward(grad)
    ref_leaves = _detached_leaves(*leaves)
    reference.upsample_add(*ref_leaves).backward(grad)
    top_grad = reference.nearest_upsample_backward(grad, top.shape[2], top.shape[3])
    if backend == "torch" and device == "cuda":
        # The torch backend is ATen's backward, torchvision's own; on CUDA its windows differ from
        # the forward map at some non-integer ratios (docs/design.md, test_atens_cuda_backward_*).
        top_grad = ref_leaves[1].grad
    assert torch.equal(leaves[0].grad, grad)
    for name, i in (("lateral", 0), ("bias", 2)):
        assert torch.equal(leaves[i].grad, ref_leaves[i].grad), ("backward", name)
    assert torch.equal(leaves[1].grad, top_grad), ("backward", "top")
    _assert_laid_out_like(leaves[1].grad, ref_leaves[1].grad)

    for b in (bias, None):
        expected = reference.upsample_add(lateral, top, b)
        target = laid_out(lateral.clone(), LAYOUTS[layout][0])
        around = None if target._base is None else target._base.clone()
        assert ops.upsample_add_(target, top, b) is target
        assert torch.equal(target, expected), ("in place", b is None)
        if around is not None:  # a view: everything outside it is as it was
            around.as_strided(target.shape, target.stride(), target.storage_offset()).copy_(expected)
            assert torch.equal(target._base, around)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [((1, 2, 9, 13), (5, 7)), ((1, 3, 3, 5), (4, 7)), ((1, 2, 4, 6), (2, 3))],
                         ids=shape_id)
def test_gradcheck_float64(backend, case, device, on_backend):
    for layout in ("contiguous", "channels_last"):
        for bias in (True, False):
            inputs = make_inputs(case, torch.float64, layout, bias=bias, device=device, requires_grad=True)
            assert torch.autograd.gradcheck(ops.upsample_add, inputs, fast_mode=True), (layout, bias)


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward(backend, device, on_backend):
    """The gradient of top's gradient with respect to the incoming gradient is the nearest
    upsample itself, as for the reference; then gradgradcheck."""
    inputs = make_inputs(((1, 2, 5, 7), (3, 4)), torch.float64, device=device, requires_grad=True)
    grad = torch.randn(1, 2, 5, 7, dtype=torch.float64, device=device, requires_grad=True)
    v = torch.randn(1, 2, 3, 4, dtype=torch.float64, device=device)
    results = []
    for upsample_add in (ops.upsample_add, reference.upsample_add):
        (grad_top,) = torch.autograd.grad(upsample_add(*inputs), inputs[1], grad, create_graph=True)
        results.append(torch.autograd.grad(grad_top, grad, v)[0])
    assert torch.equal(results[0], results[1])
    assert torch.autograd.gradgradcheck(ops.upsample_add, inputs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend, device, on_backend):
    lateral, top, bias = make_inputs(((2, 16, 50, 76), (25, 38)), torch.float32, device=device)
    grad = torch.randn(lateral.shape, device=device)
    runs = []
    for _ in range(2):
        t = top.clone().requires_grad_()
        out = ops.upsample_add(lateral, t, bias)
        out.backward(grad)
        runs.append((out, t.grad))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_plane_with_an_empty_top_dim(backend, device, on_backend):
    """Lateral (1, 3, 4, 0) takes a top with 0 rows: nothing is read, every backend returns the
    empty map (issue 10, item 7: backends agree on empty maps)."""
    lateral, top = torch.randn(1, 3, 4, 0, device=device), torch.randn(1, 3, 0, 2, device=device)
    assert ops.upsample_add(lateral, top).shape == lateral.shape
    assert ops.upsample_add_(lateral, top) is lateral
    top.requires_grad_()
    ops.upsample_add(lateral, top).sum().backward()
    assert top.grad.shape == top.shape


# ----------------------------------------------------------------------------- the in-place op

@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_reads_top_and_bias_that_share_lateral_memory(backend, device, on_backend):
    """top a view of lateral's own storage (issue 10, item 7) and bias a view of it: the result
    is the out-of-place one, as if the inputs had been read before anything was written."""
    for dtype in (torch.float32, torch.float16):
        lateral = torch.randn(2, 3, 8, 10, device=device).to(dtype)
        top = lateral[:, :, 1:5, 2:7]
        bias = lateral[0, 0, 7, :3]
        expected = reference.upsample_add(lateral, top.clone(), bias.clone())
        assert ops.upsample_add_(lateral, top, bias) is lateral
        assert torch.equal(lateral, expected), dtype


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_refuses_inputs_that_need_grad(backend, device, on_backend):
    """It has no gradient: under grad mode an input that requires grad is an error on every
    backend (issue 10, item 3), left untouched; under no_grad it runs."""
    lateral, top, bias = make_inputs(SHAPES[1], torch.float32, device=device)
    for needs_grad in range(3):
        args = [t.clone() for t in (lateral, top, bias)]
        args[needs_grad].requires_grad_()
        target = args[0] * 1 if needs_grad == 0 else args[0]  # a non-leaf lateral, as in a model
        before = target.detach().clone()
        with pytest.raises(RuntimeError, match="has no gradient"):
            ops.upsample_add_(target, *args[1:])
        assert torch.equal(target.detach(), before)
        with torch.no_grad():
            ops.upsample_add_(target, *args[1:])
        assert torch.equal(target.detach(), reference.upsample_add(lateral, top, bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_in_place_refuses_an_expanded_lateral(backend, device, on_backend):
    lateral = torch.randn(1, 2, 4, 1, device=device).expand(1, 2, 4, 6)
    with pytest.raises(RuntimeError, match="share memory"):
        ops.upsample_add_(lateral, torch.randn(1, 2, 2, 3, device=device))


# ----------------------------------------------------------------------------- bad input

BAD_INPUTS = [  # (id, call(device), exception type, message): the same on every backend
    ("mismatched C", lambda d: ops.upsample_add(torch.randn(2, 3, 8, 8, device=d), torch.randn(2, 4, 4, 4, device=d)),
     ValueError, "match lateral"),
    ("mismatched N", lambda d: ops.upsample_add(torch.randn(2, 3, 8, 8, device=d), torch.randn(1, 3, 4, 4, device=d)),
     ValueError, "match lateral"),
    ("3-D", lambda d: ops.upsample_add(torch.randn(3, 8, 8, device=d), torch.randn(3, 4, 4, device=d)),
     ValueError, "4-D"),
    ("bias length", lambda d: ops.upsample_add(torch.randn(1, 3, 8, 8, device=d), torch.randn(1, 3, 4, 4, device=d),
                                               torch.randn(2, device=d)), ValueError, "bias must have shape"),
    ("empty top plane", lambda d: ops.upsample_add_(torch.randn(1, 3, 8, 8, device=d),
                                                    torch.randn(1, 3, 4, 0, device=d)), ValueError, "empty plane"),
    ("integer dtype", lambda d: ops.upsample_add(torch.ones(1, 3, 8, 8, dtype=torch.long, device=d),
                                                 torch.ones(1, 3, 4, 4, dtype=torch.long, device=d)),
     TypeError, "floating"),
    ("mixed dtypes", lambda d: ops.upsample_add(torch.randn(1, 3, 8, 8, device=d),
                                                torch.randn(1, 3, 4, 4, device=d).double()), TypeError, "dtypes differ"),
    ("bias dtype", lambda d: ops.upsample_add_(torch.randn(1, 3, 8, 8, device=d), torch.randn(1, 3, 4, 4, device=d),
                                               torch.randn(3, device=d).half()), TypeError, "lateral's dtype"),
    ("top not a tensor", lambda d: ops.upsample_add(torch.randn(1, 3, 8, 8, device=d), [[1.0]]),
     TypeError, "must be tensors"),
    ("bias not a tensor", lambda d: ops.upsample_add(torch.randn(1, 3, 8, 8, device=d),
                                                     torch.randn(1, 3, 4, 4, device=d), 1.0), TypeError, "bias must be"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("call,error,match", [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS])
def test_bad_input_is_the_same_error_on_every_backend(backend, call, error, match, device, on_backend):
    with pytest.raises(error, match=match):
        call(device)


@pytest.mark.cuda
def test_device_mismatch_is_a_value_error():
    for args in ((torch.randn(1, 2, 4, 4, device="cuda"), torch.randn(1, 2, 2, 2)),
                 (torch.randn(1, 2, 4, 4, device="cuda"), torch.randn(1, 2, 2, 2, device="cuda"), torch.randn(2))):
        with pytest.raises(ValueError, match="device"):
            ops.upsample_add(*args)
