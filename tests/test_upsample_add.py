"""fpn_fast.ops.upsample_add / upsample_add_ on every backend x device x dtype x layout, bit for
bit against the pure-PyTorch reference (fpn_fast.ops.reference), from the one case list in
tests/_cases.py. Backend-only details live in test_extension.py and test_triton.py."""
import pytest
import torch
import torch.nn.functional as F

import fpn_fast.ops as ops
from fpn_fast.ops import _dispatch, reference
from tests._cases import BACKENDS, DTYPES, LAYOUTS, SHAPES, backend_cases, laid_out, make_inputs, running, shape_id


@pytest.fixture
def on_backend(request, device):
    """use_backend(backend) for a test parametrised with `backend`: skips where it cannot run,
    checks that upsample_add then runs that backend's own kernel."""
    backend = request.node.callspec.params["backend"]
    with running("upsample_add", backend, device):
        assert _dispatch.TABLE[("upsample_add", device)][backend][0] == backend
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


# ----------------------------------------------------------------------------- every backend

@pytest.mark.parametrize("backend,case", backend_cases())
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_forward_backward_in_place_bit_exact(backend, case, dtype, layout, device, on_backend, request):
    """Same operations in the same precision and order as the reference, so the same bits:
    - forward, with and without bias: laid out like lateral, inputs untouched;
    - backward: all three gradients equal the reference's autograd (each top window summed in
      destination order, float32 for half types; the bias gradient an ATen sum);
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
    assert torch.equal(leaves[0].grad, grad)
    for name, ours, theirs in zip(("lateral", "top", "bias"), leaves, ref_leaves):
        assert torch.equal(ours.grad, theirs.grad), ("backward", name)
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
