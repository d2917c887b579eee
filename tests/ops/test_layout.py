"""fpn_fast.ops.to_nchw (a pyramid level handed back in NCHW: the extension's blocked NHWC -> NCHW
transpose on CPU) under the OpTester (tests/ops/op_tester.py): a bit-exact contiguous copy on every
backend x device x dtype x layout, differentiable, with opcheck, gradcheck, compile, script and
export."""
import torch
from torch import Tensor

import fpn_fast.ops as ops
from fpn_fast.ops.layout import to_nchw_scripted
from tests._cases import laid_out
from tests.ops.op_tester import OpTester, Sample

# Odd sizes, 1x1 maps, batch 0 and empty channels (the representative ones first: OpTester.quick);
# for NHWC maps, which the extension's blocked transpose copies, channel counts and maps off its
# blocks too.
SHAPES = [(2, 5, 9, 13), (0, 3, 4, 4), (2, 3, 1, 1), (1, 1, 7, 5), (2, 0, 3, 3)]
BLOCKED = [(1, 70, 33, 65), (2, 136, 17, 9), (1, 256, 20, 20)]


def _scripted_to_nchw(x: Tensor) -> Tensor:
    return to_nchw_scripted(x)


class TestToNchw(OpTester):
    op = "to_nchw"
    function = ops.to_nchw
    reference = torch.Tensor.contiguous
    layouts = ("channels_last", "contiguous", "sliced")
    differentiable = True
    registered = {"extension": ("fpn_fast::nhwc_to_nchw",)}
    script_form = _scripted_to_nchw

    def samples(self, device, dtype, layout):
        return [Sample((laid_out(torch.randn(shape, device=device).to(dtype), layout),),
                       name=f"{'x'.join(map(str, shape))} {layout}")
                for shape in SHAPES + (BLOCKED if layout == "channels_last" else [])]

    def output_format(self, sample):
        return torch.contiguous_format

    def test_a_contiguous_map_is_returned_as_it_is(self, backend, device):
        x = torch.randn(2, 5, 9, 13, device=device)
        assert ops.to_nchw(x) is x
