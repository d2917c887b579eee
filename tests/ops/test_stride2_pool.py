"""fpn_fast.ops.stride2_pool (the FPN 'pool' level) under the OpTester (tests/ops/op_tester.py):
every backend x device x dtype x layout bit for bit against torchvision's F.max_pool2d(x, 1, 2, 0),
with opcheck, gradcheck, compile, script and export. The "extension" backend names ATen's strided
copy for this op (see test_ops.test_named_backend_meaning_per_op)."""
import pytest
import torch
from torch import Tensor

import fpn_fast.ops as ops
from fpn_fast.ops.pool import script
from fpn_fast.ops import reference
from fpn_fast.ops.reference import memory_format_of
from tests._cases import SHAPES, TRITON_SHAPES, laid_out
from tests.ops.op_tester import OpTester, Sample, grad_like, leaves

# The lateral maps of the case list (odd sizes, 1x1, 3x1, batch 0, empty channels and planes) and
# two small ones for gradcheck; the representative ones first (OpTester.quick).
_QUICK = [(2, 3, 25, 38), (0, 3, 9, 13), (1, 2, 1, 1), (2, 3, 7, 1), (1, 2, 5, 6)]
MAPS = _QUICK + sorted({case[0] for case in SHAPES} - set(_QUICK))
INTERPRETED = {case[0] for case in TRITON_SHAPES} | {(2, 3, 7, 1), (1, 2, 5, 6)}


def pool_reference(x: Tensor) -> Tensor:
    """torchvision's formulation; where its max_pool2d refuses empty channels and planes, the
    definition itself (every other row and column)."""
    if all(x.shape[1:]):
        return reference.stride2_pool_max_pool(x)
    return x[:, :, ::2, ::2]


def _scripted_stride2_pool(x: Tensor) -> Tensor:
    return script.stride2_pool(x)


class TestStride2Pool(OpTester):
    op = "stride2_pool"
    function = ops.stride2_pool
    reference = pool_reference
    layouts = ("contiguous", "channels_last", "sliced")
    differentiable = True
    registered = {"triton": ("fpn_fast_triton::stride2_pool", "fpn_fast_triton::stride2_pool_backward")}
    script_form = _scripted_stride2_pool
    # fpn_fast.decompositions() (fpn_fast/export/aten.py) has no entry for the fpn_fast_triton ops.
    export_gaps = {"triton": "fpn_fast.decompositions() has no entry for the fpn_fast_triton ops"}

    def samples(self, device, dtype, layout):
        return [Sample((laid_out(torch.randn(shape, device=device).to(dtype), layout),),
                       name=f"{'x'.join(map(str, shape))} {layout}", interpreter=shape in INTERPRETED)
                for shape in MAPS]

    def opcheck_calls(self, implementation, sample):
        (x,) = leaves(sample).args
        grad = grad_like(pool_reference(x.detach()), "contiguous")
        channels_last = memory_format_of(x) == torch.channels_last
        return [("fpn_fast_triton::stride2_pool", (x,)),
                ("fpn_fast_triton::stride2_pool_backward", (grad, list(x.shape), channels_last))]

    @pytest.mark.parametrize("call,error,match", [
        pytest.param(lambda d: ops.stride2_pool(torch.randn(3, 8, 8, device=d)), ValueError, "4-D", id="3-D"),
        pytest.param(lambda d: ops.stride2_pool(torch.ones(1, 3, 8, 8, dtype=torch.int32, device=d)), TypeError,
                     "floating", id="integer dtype"),
        pytest.param(lambda d: ops.stride2_pool([[1.0]]), TypeError, "must be a tensor", id="not a tensor"),
    ])
    def test_bad_input_is_the_same_error_on_every_backend(self, backend, device, call, error, match):
        with pytest.raises(error, match=match):
            call(device)
