"""fpn_fast.ops.lateral_upsample_add (the FPN's whole top-down step from a body feature map, for
inference) under the OpTester (tests/ops/op_tester.py): every backend x device x dtype x layout
against ``upsample_add(F.conv2d(x, weight), top, bias)``, the fused Triton GEMM and the unfused route
each held to their rounding in ``selection.ROUNDING``, with opcheck, compile and export. The
GEMM's own accuracy against float64, its tiling, configs and precision flags are tested in
test_triton_lateral.py."""
from typing import Optional

import torch
import torch.nn.functional as F

import fpn_fast.ops as ops
from fpn_fast.ops import reference
from tests._cases import laid_out
from tests.ops.op_tester import OpTester, Sample

# (N, C, H, W), O, top (th, tw): odd sizes and a non-2x ratio, batch 0, a 1x1 map, top larger than
# x (the representative ones first: OpTester.quick), exact 2x, equal sizes, the float32-scale case.
# C and O are not multiples of the GEMM's blocks.
CASES = [
    ((2, 24, 7, 11), 20, (4, 6)),
    ((0, 24, 5, 7), 20, (3, 4)),
    ((1, 8, 1, 1), 12, (1, 1)),
    ((2, 24, 5, 7), 20, (9, 13)),
    ((2, 40, 8, 10), 36, (4, 5)),
    ((1, 16, 6, 9), 24, (6, 9)),
    ((1, 24, 46, 69), 20, (14, 21)),  # float32 scale: floorf(dst * scale) != dst * in // out at 23, 46
]
# No empty plane: F.conv2d (the reference, and the unfused route for float16/bfloat16 and
# channels_last float64) refuses one, while the fused GEMM and conv1x1's matmul return an empty map
# (test_triton_lateral.test_empty_plane); reported to the lead.
_OTHER_FORMAT = {"contiguous": "channels_last", "channels_last": "contiguous", "sliced": "channels_last"}


def lateral_reference(x, weight, bias=None, top=None, *, fuse: bool = True):
    """The unfused definition: the 1x1 convolution, then the top-down step (bias only at the
    coarsest level)."""
    lateral = F.conv2d(x, weight)
    if top is None:
        return lateral if bias is None else lateral + bias.view(1, -1, 1, 1)
    return reference.upsample_add(lateral, top, bias)


def _transposed(weight):
    """The same (O, C, 1, 1) values with the C dim contiguous across O: strides (1, O, ., .)."""
    o, c = weight.shape[:2]
    return weight.reshape(o, c).t().contiguous().t().reshape(o, c, 1, 1)


class TestLateralUpsampleAdd(OpTester):
    op = "lateral_upsample_add"
    function = ops.lateral_upsample_add
    reference = lateral_reference
    layouts = ("contiguous", "channels_last", "sliced")
    registered = {"triton": ("fpn_fast_triton::lateral_upsample_add",)}
    no_script_form = ("inference only: the scripted inference FPN runs F.conv2d then script.upsample_add_ "
                      "(fpn_fast/inference/modules.py)")
    non_finite_inputs = (0, 3)
    export_gaps = {"triton": "fpn_fast.decompositions() has no entry for the fpn_fast_triton ops"}

    def expected(self, sample, implementation):
        """The fused GEMM's (Triton, one dot product per pixel) on CPU in float16/bfloat16: the
        reference with its convolution computed in float32 and rounded once, as oneDNN's
        reduced-precision convolution computes it (float32 sums, one rounding), but per pixel:
        oneDNN's AMX/AVX512-BF16 kernels also put NaN beside a NaN or inf of x (an Intel Xeon with
        AMX-BF16, torch 2.14.1: a -inf at column 8 made column 7 NaN where the float32 convolution
        is finite). The other routes run that very convolution, so the reference as it is."""
        x, weight, bias, top = sample.args
        if implementation.startswith("triton") and x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
            lateral = F.conv2d(x.float(), weight.float()).to(x.dtype)
            if top is None:
                return lateral if bias is None else lateral + bias.view(1, -1, 1, 1)
            return reference.upsample_add(lateral, top, bias)
        return super().expected(sample, implementation)

    def samples(self, device, dtype, layout):
        """Each case in one of three variants, in turn: x and top in the layout; top in the other
        memory format, a transposed weight and no bias; the coarsest level (no top)."""
        samples = []
        for k, ((n, c, h, w), o, top_hw) in enumerate(CASES):
            x = laid_out(torch.randn(n, c, h, w, device=device).to(dtype), layout)
            weight = (torch.randn(o, c, 1, 1, device=device) / c ** 0.5).to(dtype)  # outputs of order 1
            bias = torch.randn(o, device=device).to(dtype)
            top = torch.randn(n, o, *top_hw, device=device).to(dtype)
            variant = k % 3
            if variant == 0:
                args: tuple = (x, weight, bias, laid_out(top, layout))
            elif variant == 1:
                args = (x, _transposed(weight), None, laid_out(top, _OTHER_FORMAT[layout]))
            else:
                args = (x, weight, bias, None)
            name = f"{n}x{c}x{h}x{w}->{o}<-{'x'.join(map(str, top_hw)) if args[3] is not None else 'none'} {layout}"
            # The interpreter pays per program: the large float32-scale case in one layout only.
            samples.append(Sample(args, name=name, interpreter=h * w < 1000 or layout == "contiguous"))
        return samples

    def implementation(self, sample, device):
        # The route the op's own runner decides for this signature (what the call runs).
        return ops.lateral.runner(*sample.args, fuse=sample.kwargs.get("fuse", True)).route

    def export_gap(self, backend, sample) -> Optional[str]:
        x, _, _, top = sample.args
        if backend == "extension" and top is not None and top.numel() == 0 and x.shape[2] * x.shape[3] > 0:
            # the unfused route's upsample_add decomposes through reference.nearest_source_index's clamp_
            return "reference.nearest_source_index's clamp_ in the decomposition of an empty map"
        return super().export_gap(backend, sample)

    def test_fuse_false_takes_the_unfused_route(self, backend, device):
        x, weight, bias, top = (torch.randn(2, 24, 7, 11, device=device), torch.randn(20, 24, 1, 1, device=device),
                                torch.randn(20, device=device), torch.randn(2, 20, 4, 6, device=device))
        assert ops.resolve("lateral_upsample_add", device,
                           lambda impl: ops.lateral.lateral_supports(impl, x.dtype, False)) == "torch"
        with torch.no_grad():
            unfused = ops.lateral_upsample_add(x, weight, bias, top, fuse=False)
        torch.testing.assert_close(unfused, lateral_reference(x, weight, bias, top), rtol=0,
                                   atol=64 * torch.finfo(torch.float32).eps * unfused.abs().max().item())
