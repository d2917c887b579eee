"""A plan whose only use of its input is converting it to channels_last says so
(``Plan.input_format``): a CUDA graph then allocates its static input in channels_last, so each
replay copies the image once (into the static input) instead of twice (issue 28). The capture
itself runs in the cuda-marked tests of test_engine.py and test_inference.py."""
import pytest
import torch

import fpn_fast
from tests._models import randomise_


def _plan(x, **options):
    torch.manual_seed(0)
    optimized = fpn_fast.optimize_for_inference(
        randomise_(fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=None)).eval(), **options)
    with torch.inference_mode():
        optimized(x)
    (entry,) = optimized._engine.entries.values()
    return entry.plan


def test_an_nchw_image_converted_first_is_taken_in_channels_last():
    assert _plan(torch.randn(1, 3, 64, 96)).input_format == torch.channels_last


@pytest.mark.parametrize("case", ["channels_last input", "NCHW model", "unbatched"])
def test_other_plans_keep_the_callers_strides(case):
    if case == "channels_last input":  # nothing to convert: the stem reads the image itself
        plan = _plan(torch.randn(1, 3, 64, 96).contiguous(memory_format=torch.channels_last))
    elif case == "NCHW model":
        plan = _plan(torch.randn(1, 3, 64, 96), channels_last=False)
    else:  # a [C, H, W] image: unsqueezed first
        plan = _plan(torch.randn(3, 64, 96))
    assert plan.input_format is None


@pytest.mark.cuda
def test_cuda_graph_takes_the_image_in_channels_last():
    torch.manual_seed(0)
    model = randomise_(fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=None)).eval().cuda()
    optimized = fpn_fast.optimize_for_inference(model)
    x = torch.randn(2, 3, 96, 128, device="cuda")
    with torch.inference_mode():
        optimized(x)
        replayed = optimized(torch.randn_like(x)) and optimized(x)  # a replay after another image
        expected = optimized._run_as_written(x)
    (entry,) = optimized._engine.entries.values()
    assert entry.graphed is not None, entry.reason
    assert entry.graphed.static_input.is_contiguous(memory_format=torch.channels_last)
    for name, want in expected.items():
        assert torch.equal(replayed[name], want), name
