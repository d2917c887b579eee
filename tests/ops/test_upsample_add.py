"""fpn_fast.ops.upsample_add / upsample_add_ (the FPN top-down step): the reference itself and the
forward map's backward, then each op under the OpTester (tests/ops/op_tester.py: every backend x
device x dtype x layout bit for bit against the pure-PyTorch reference, opcheck, gradcheck,
compile, script, export) from the one case list in tests/_cases.py, and what only these ops have
(double backward, determinism, the in-place op's refusals and aliasing, bad input).
Backend-only details live in test_extension.py and test_triton.py."""
from typing import List, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import fpn_fast.ops as ops
from fpn_fast.ops.top_down import script
from fpn_fast.ops import reference
from fpn_fast.ops.reference import memory_format_of
from tests._cases import DTYPES, LAYOUTS, SHAPES, TRITON_SHAPES, laid_out, make_inputs, running, shape_id
from tests.ops.op_tester import OpTester, Sample, grad_like, leaves


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


@pytest.mark.cuda
def test_device_mismatch_is_a_value_error():
    for args in ((torch.randn(1, 2, 4, 4, device="cuda"), torch.randn(1, 2, 2, 2)),
                 (torch.randn(1, 2, 4, 4, device="cuda"), torch.randn(1, 2, 2, 2, device="cuda"), torch.randn(2))):
        with pytest.raises(ValueError, match="device"):
            ops.upsample_add(*args)


# ----------------------------------------------------------------------------- the ops, on every backend

# A lateral with an empty plane takes a top with an empty dim: nothing is read (issue 10, item 7).
EMPTY_PLANE = ((1, 3, 4, 0), (0, 2))
# The representative cases first (OpTester.quick): odd non-2x with bias, batch 0 without, 1x1
# with, top larger than lateral without; then every other case, each with and without bias (the
# Triton interpreter runs the subset TRITON_SHAPES with bias, and those two without).
_ORDER = [(0, True), (9, False), (3, True), (6, False)]
_ORDER += [(i, b) for i in range(len(SHAPES)) for b in (True, False) if (i, b) not in _ORDER]


def top_down_samples(device: str, dtype: torch.dtype, layout: str) -> List[Sample]:
    samples = []
    for case, with_bias in [(SHAPES[i], b) for i, b in _ORDER] + [(EMPTY_PLANE, True)]:
        lateral, top, bias = make_inputs(case, dtype, layout, bias=with_bias, device=device)
        interpreted = case == EMPTY_PLANE or (case in TRITON_SHAPES and (with_bias or len(samples) < 4))
        samples.append(Sample((lateral, top, bias), name=f"{shape_id(case)}{'' if with_bias else ' no bias'} {layout}",
                              interpreter=interpreted))
    return samples


def _scripted_upsample_add(lateral: Tensor, top: Tensor, bias: Optional[Tensor]) -> Tensor:
    return script.upsample_add(lateral, top, bias)


def _scripted_upsample_add_(lateral: Tensor, top: Tensor, bias: Optional[Tensor]) -> Tensor:
    return script.upsample_add_(lateral, top, bias)


# Known gaps of fpn_fast.decompositions() (fpn_fast/export/aten.py), reported to the lead; the
# export tests hold them as expected failures:
# - it has no entry for the fpn_fast_triton ops: a program exported with the triton backend keeps them;
# - the extension op's decomposition, reference.upsample_add, gathers an empty top through
#   reference.nearest_source_index, whose in-place clamp_ aot_autograd refuses ("expected to have
#   an entirely functional graph"): programs with an empty batch or channel dim do not decompose.
_TRITON_EXPORT_GAP = "fpn_fast.decompositions() has no entry for the fpn_fast_triton ops"
_EMPTY_EXPORT_GAP = "reference.nearest_source_index's clamp_ in the decomposition of an empty map"
# - a program holding upsample_add_ keeps it: export functionalises the in-place op into
#   auto_functionalized_v2(fpn_fast.upsample_add_), which run_decompositions does not decompose, so
#   the table's upsample_add_ entry is never applied (the modules export the functional op only).
_IN_PLACE_EXPORT_GAP = "auto_functionalized_v2(fpn_fast.upsample_add_) is not decomposed"


def _export_gap(backend, sample):
    if backend == "triton":
        return _TRITON_EXPORT_GAP
    lateral, top, _ = sample.args
    if backend == "extension" and top.numel() == 0 and lateral.shape[2] * lateral.shape[3] > 0:
        return _EMPTY_EXPORT_GAP
    return None


class TestUpsampleAdd(OpTester):
    op = "upsample_add"
    function = ops.upsample_add
    reference = reference.upsample_add
    layouts = tuple(LAYOUTS)
    differentiable = True
    registered = {"extension": ("fpn_fast::upsample_add", "fpn_fast::upsample_add_backward_top"),
                  "triton": ("fpn_fast_triton::upsample_add", "fpn_fast_triton::upsample_add_backward_top")}
    script_form = _scripted_upsample_add
    non_finite_inputs = (0, 1)

    def samples(self, device, dtype, layout):
        return top_down_samples(device, dtype, layout)

    def export_gap(self, backend, sample):
        return _export_gap(backend, sample)

    def reference_grads(self, sample, grad, backend, device):
        """lateral's and bias's gradients are the reference's autograd (the bias gradient an ATen
        sum); top's is the forward map's own backward (each top window summed in destination
        order, float32 for half types), except on the torch backend on CUDA: ATen's backward,
        whose windows differ from the forward map at some non-integer ratios (docs/design.md,
        test_atens_cuda_backward_*)."""
        grads = super().reference_grads(sample, grad, backend, device)
        if not (backend == "torch" and device == "cuda"):
            top = sample.args[1]
            grads[1] = reference.nearest_upsample_backward(grad, top.shape[2], top.shape[3]).contiguous(
                memory_format=memory_format_of(grads[1]))
        return grads

    def opcheck_calls(self, implementation, sample):
        lateral, top, bias = leaves(sample).args
        grad = grad_like(lateral.detach(), "contiguous")
        if implementation == "extension":
            return [("fpn_fast::upsample_add", (lateral, top, bias)),
                    ("fpn_fast::upsample_add_backward_top", (grad, top.shape[2], top.shape[3]))]
        return [("fpn_fast_triton::upsample_add", (lateral, top, bias)),
                ("fpn_fast_triton::upsample_add_backward_top", (grad, list(top.shape),
                                                                memory_format_of(top) == torch.channels_last))]

    # ------------------------------------------------------------------------- op-specific

    def test_double_backward(self, backend, device):
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
        assert torch.autograd.gradgradcheck(ops.upsample_add, inputs, fast_mode=True)

    def test_deterministic(self, backend, device):
        lateral, top, bias = make_inputs(((2, 16, 50, 76), (25, 38)), torch.float32, device=device)
        grad = torch.randn(lateral.shape, device=device)
        runs = []
        for _ in range(2):
            t = top.clone().requires_grad_()
            out = ops.upsample_add(lateral, t, bias)
            out.backward(grad)
            runs.append((out, t.grad))
        assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])

    @pytest.mark.parametrize("call,error,match", [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUTS])
    def test_bad_input_is_the_same_error_on_every_backend(self, backend, device, call, error, match):
        with pytest.raises(error, match=match):
            call(device)


class TestUpsampleAddInPlace(OpTester):
    op = "upsample_add"  # the in-place op shares upsample_add's dispatch rows and rounding
    function = ops.upsample_add_
    reference = reference.upsample_add
    layouts = tuple(LAYOUTS)
    mutates = 0
    registered = {"extension": ("fpn_fast::upsample_add_",), "triton": ("fpn_fast_triton::upsample_add_",)}
    script_form = _scripted_upsample_add_
    non_finite_inputs = (0, 1)

    def samples(self, device, dtype, layout):
        return top_down_samples(device, dtype, layout)

    def export_gap(self, backend, sample):
        if backend == "extension":
            return _IN_PLACE_EXPORT_GAP
        return _export_gap(backend, sample)

    def opcheck_calls(self, implementation, sample):
        namespace = "fpn_fast" if implementation == "extension" else "fpn_fast_triton"
        lateral, top, bias = sample.args
        return [(f"{namespace}::upsample_add_", (lateral.clone(), top, bias))]

    # ------------------------------------------------------------------------- op-specific

    def test_reads_top_and_bias_that_share_lateral_memory(self, backend, device):
        """top a view of lateral's own storage (issue 10, item 7) and bias a view of it: the result
        is the out-of-place one, as if the inputs had been read before anything was written."""
        for dtype in (torch.float32, torch.float16):
            lateral = torch.randn(2, 3, 8, 10, device=device).to(dtype)
            top = lateral[:, :, 1:5, 2:7]
            bias = lateral[0, 0, 7, :3]
            expected = reference.upsample_add(lateral, top.clone(), bias.clone())
            assert ops.upsample_add_(lateral, top, bias) is lateral
            assert torch.equal(lateral, expected), dtype

    def test_refuses_a_non_leaf_that_needs_grad(self, backend, device):
        """As in a model: lateral the output of an op on a parameter (issue 10, item 3); left untouched."""
        lateral, top, bias = make_inputs(SHAPES[1], torch.float32, device=device)
        target = lateral * torch.ones((), device=device, requires_grad=True)
        before = target.detach().clone()
        with pytest.raises(RuntimeError, match="has no gradient"):
            ops.upsample_add_(target, top, bias)
        assert torch.equal(target.detach(), before)

    def test_refuses_an_expanded_lateral(self, backend, device):
        lateral = torch.randn(1, 2, 4, 1, device=device).expand(1, 2, 4, 6)
        with pytest.raises(RuntimeError, match="share memory"):
            ops.upsample_add_(lateral, torch.randn(1, 2, 2, 3, device=device))

