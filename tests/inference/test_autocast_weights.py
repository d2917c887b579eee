"""Under autocast, a plan casts its float32 weights once, when it is built (issue 28): a replay
casts only the image, and a weight changed in place is cast again (the plan is rebuilt). The
casts are counted with torch.profiler (a Python dispatch mode would make the backbone run its
modules as written, not its plan)."""
import collections

import pytest
import torch

import fpn_fast
from tests._models import randomise_


def _casts(model, x) -> collections.Counter:
    """The input shapes of the dtype casts (aten::_to_copy) one call of ``model(x)`` makes."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
        model(x)
    return collections.Counter(str(e.input_shapes[0]) for e in prof.events() if e.name == "aten::_to_copy")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_replay_under_autocast_casts_only_the_image(dtype):
    torch.manual_seed(0)
    optimized = fpn_fast.optimize_for_inference(
        randomise_(fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=None)).eval())
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode(), torch.autocast("cpu", dtype=dtype):
        optimized(x)
        builds = optimized._engine.builds
        assert _casts(optimized, x) == {"[1, 3, 64, 96]": 1}  # the image; 57 with every weight cast per call
        assert optimized._engine.builds == builds
        replayed = optimized(x)
        written = optimized._run_as_written(x)
    for name, want in written.items():
        assert replayed[name].dtype == want.dtype == dtype
        assert torch.equal(replayed[name], want), name  # the same casts, the same runners


def test_a_weight_changed_in_place_is_cast_again():
    torch.manual_seed(0)
    optimized = fpn_fast.optimize_for_inference(
        randomise_(fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=None)).eval())
    x = torch.randn(1, 3, 64, 96)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = optimized(x)
        builds = optimized._engine.builds
        with torch.no_grad():
            optimized.body.layer4[1].convs[0].weight.mul_(-3)
            optimized.fpn.layer_blocks[3].bias.add_(1)
        after = optimized(x)
        assert optimized._engine.builds == builds + 1
        written = optimized._run_as_written(x)
    for name, want in written.items():
        assert torch.equal(after[name], want), name
    assert not torch.equal(after["3"], before["3"])
