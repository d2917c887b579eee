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


def test_the_route_report_names_the_modules_of_cast_weights():
    torch.manual_seed(0)
    optimized = fpn_fast.optimize_for_inference(
        randomise_(fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=None)).eval())
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        optimized(torch.randn(1, 3, 64, 96))
    rows = optimized.route_report()
    convs = [row for row in rows if row["op"] in ("conv2d_act", "conv2d_nchw", "lateral_upsample_add")]
    assert len(convs) == 1 + 8 * 2 + 3 + 4 + 4
    assert all(row["module"] is not None for row in convs)
    assert convs[0]["module"] == "body.conv1"


def test_eager_calls_under_autocast_reuse_the_cast_until_the_weight_changes():
    from fpn_fast.ops.casts import cast_once, source_of
    weight = torch.randn(8, 4, 3, 3)
    first = cast_once(weight, torch.bfloat16)
    assert first.dtype == torch.bfloat16 and torch.equal(first, weight.to(torch.bfloat16))
    assert cast_once(weight, torch.bfloat16) is first and source_of(first) is weight
    assert cast_once(weight, torch.float16) is not first  # another dtype: cast again
    with torch.no_grad():
        weight.mul_(2)
    again = cast_once(weight, torch.float16)
    assert torch.equal(again, weight.to(torch.float16)) and source_of(again) is weight
    with torch.inference_mode():
        frozen = torch.randn(3)
    assert cast_once(frozen, torch.bfloat16) is not cast_once(frozen, torch.bfloat16)  # counts no writes
