"""The packs an optimized model caches per convolution on CPU (oneDNN's prepacked weight, NNPACK's
and the Winograd kernel transforms) follow their weights (issue 22), and the CPU buffer pool's limit
can be set at run time.

Every weight test swaps or edits the weights the way a server hot-reloading checkpoints does, after
a forward has made the packs, and compares each output level with torchvision's
``resnet_fpn_backbone`` holding the same weights (random weights, norm statistics and biases), to
1e-4 of the level's largest value, as tests/inference/test_inference.py does. A stale pack computes with the
previous checkpoint: errors of the order of the outputs themselves (the float16/bfloat16 round
trips: 1e-4 to 1e-2, the rounding of the weights).

ResNet18 on a 1x3x96x96 image: every map is at most 48x48, below ``ops.selection.PACK_MAX_PIXELS`` (128x128),
so every direct convolution runs on oneDNN's prepacked weight; the 3x3 convolutions of 64 or more
channels have >= 36 tiles (``ops.conv._winograd.worthwhile``), so they run the extension's Winograd
convolution on its cached kernel transforms; with that turned off, the FPN's 24x24 level runs
NNPACK's sliced convolution on its cached kernels. Each test runs on those three routes and checks
that their packs were made.
"""
import copy
import io
import textwrap

import pytest
import torch
from torch import nn

import fpn_fast
from fpn_fast import ops
from fpn_fast.inference import Conv2dAct
from tests._models import randomise_

torchvision = pytest.importorskip("torchvision")
from torchvision.models.detection.backbone_utils import resnet_fpn_backbone as tv_resnet_fpn_backbone  # noqa: E402

REL_TOL = 1e-4
# Conv2dAct's pack caches (as tests/inference/test_inference.py and tests/ops/test_winograd.py name them).
PACK_SLOTS = ("_onednn_weight", "_nnpack_weight", "_winograd_weight")
IMAGE = torch.randn(1, 3, 96, 96, generator=torch.Generator().manual_seed(22))

# route -> (the packs it must make, why it cannot run here or None)
ROUTES = {
    "winograd": ({"_onednn_weight", "_winograd_weight"},
                 ops.conv._onednn.unavailable_reason() or ops.conv._winograd.unavailable_reason()),
    "nnpack": ({"_onednn_weight", "_nnpack_weight"},
               ops.conv._onednn.unavailable_reason() or ops.conv._nnpack.sliced_unavailable_reason()),
    "direct": ({"_onednn_weight"}, ops.conv._onednn.unavailable_reason()),
}


@pytest.fixture(params=list(ROUTES))
def route(request, monkeypatch):
    """The CPU convolution route under test: the extension's Winograd (the default), NNPACK's
    (the extension's Winograd turned off) or direct convolutions only (``winograd=False``)."""
    reason = ROUTES[request.param][1]
    if reason is not None:
        pytest.skip(f"the {request.param} route cannot run here: {reason}")
    if request.param == "nnpack":
        monkeypatch.setattr(ops.conv._winograd, "unavailable_reason", lambda: "turned off by the test")
    ops.dispatch._PROBED.clear()
    yield request.param
    monkeypatch.undo()
    ops.dispatch._PROBED.clear()


def _reference(seed: int, half_exact: bool = False) -> nn.Module:
    """torchvision's ResNet18-FPN with random weights, norm statistics and biases. ``half_exact``:
    norms with eps=0, power-of-two scales and means and biases on a 2**-6 grid, so that the folded
    biases are exact in float16 and bfloat16 and a folded weight rounded to either is the fold of
    the rounded weight, exactly (scaling by a power of two commutes with rounding)."""
    torch.manual_seed(seed)
    model = randomise_(fpn_fast.resnet_fpn_backbone(backbone_name="resnet18"))
    reference = tv_resnet_fpn_backbone(backbone_name="resnet18", weights=None).eval()
    reference.load_state_dict(model.state_dict())
    if half_exact:
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for norm in reference.modules():
                if isinstance(norm, torchvision.ops.misc.FrozenBatchNorm2d):
                    shape = norm.running_var.shape
                    norm.eps = 0.0
                    norm.weight.copy_(2.0 ** torch.randint(-1, 2, shape, generator=generator))
                    norm.running_var.copy_(4.0 ** torch.randint(-1, 2, shape, generator=generator))
                    norm.running_mean.copy_(torch.randint(-32, 33, shape, generator=generator) / 64)
                    norm.bias.copy_(torch.randint(-32, 33, shape, generator=generator) / 64)
    return reference


def _outputs(model: nn.Module):
    with torch.no_grad():
        return model(IMAGE)


def _save(model: nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


def _load(checkpoint: bytes):
    """A state dict read afresh, as from disk (inference tensors under torch.inference_mode)."""
    return torch.load(io.BytesIO(checkpoint))


@pytest.fixture(scope="module")
def checkpoints():
    """Four checkpoints of the optimized model, each with the outputs of the torchvision model it
    was folded from: [(serialised state_dict, torchvision's outputs on IMAGE)]."""
    result = []
    for seed in range(4):
        reference = _reference(seed)
        result.append((_save(fpn_fast.optimize_for_inference(reference)), _outputs(reference)))
    return result


def _optimize(model: nn.Module, route: str) -> nn.Module:
    return fpn_fast.optimize_for_inference(model, winograd=route != "direct")


def _assert_matches(model: nn.Module, expected, what: str) -> None:
    """model(IMAGE) within 1e-4 of each of torchvision's levels' largest value."""
    got = model(IMAGE)
    for name, want in expected.items():
        scale = want.abs().max().item()
        error = (got[name] - want).abs().max().item()
        assert error <= REL_TOL * scale, f"{what}, level {name}: error {error / scale:.3g} of the level's scale"


def _assert_packs_made(model: nn.Module, route: str) -> None:
    made = {slot for m in model.modules() if isinstance(m, Conv2dAct) for slot in PACK_SLOTS if slot in m._pack_cache()}
    assert ROUTES[route][0] <= made, f"the {route} route made only {sorted(made)}"


def test_inference_mode_reload_in_place_after_an_assign_load(route, checkpoints):
    """A server under torch.inference_mode: the first checkpoint loaded with assign=True (its
    tensors are inference tensors), later ones copied into it in place."""
    with torch.inference_mode():
        fast = _optimize(_reference(10), route)
        fast.load_state_dict(_load(checkpoints[0][0]), assign=True)
        _assert_matches(fast, checkpoints[0][1], "assigned checkpoint 0")
        _assert_packs_made(fast, route)
        for k in (1, 2, 3, 0):
            fast.load_state_dict(_load(checkpoints[k][0]))
            _assert_matches(fast, checkpoints[k][1], f"checkpoint {k} loaded in place")


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
def test_repeated_assign_loads_between_forwards(route, checkpoints, mode):
    """Every other checkpoint of a sweep evaluated, each loaded afresh with assign=True: the
    checkpoint skipped frees the evaluated one's weights, and the next one's, allocated then,
    take their addresses with the same version (0)."""
    with (torch.no_grad() if mode == "no_grad" else torch.inference_mode()):
        fast = _optimize(_reference(10), route)
        for step in range(16):
            k = step % len(checkpoints)
            fast.load_state_dict(_load(checkpoints[k][0]), assign=True)
            if step % 2:
                _assert_matches(fast, checkpoints[k][1], f"step {step}, checkpoint {k}")
                _assert_packs_made(fast, route)


def test_half_float_round_trips(route):
    """``.half().float()`` (and ``.bfloat16().float()``) round the weights (``_apply`` sets
    ``param.data``: the same parameter objects and version counters, new storage, often at the old
    address). Each trip starts from a float32 checkpoint loaded in place and run, so each one can
    leave stale packs; a stale pack computes with the unrounded weights, 1e-4 to 1e-2 of a level's
    scale away (the checkpoints are made so that torchvision's rounded model holds exactly the
    optimized one's rounded weights: they agree to ~4e-6)."""
    references = [_reference(seed, half_exact=True) for seed in (20, 21)]
    saved = [_save(fpn_fast.optimize_for_inference(reference)) for reference in references]
    dtypes = (torch.float16, torch.bfloat16)
    rounded = {(k, dtype): _outputs(copy.deepcopy(reference).to(dtype).float())
               for k, reference in enumerate(references) for dtype in dtypes}
    fast = _optimize(references[0], route)
    with torch.no_grad():
        for trip in range(8):
            k, dtype = trip % 2, dtypes[trip // 2 % 2]
            fast.load_state_dict(_load(saved[k]))
            fast(IMAGE)
            _assert_packs_made(fast, route)
            fast.to(dtype).float()
            _assert_matches(fast, rounded[k, dtype], f"trip {trip}, checkpoint {k} rounded to {dtype}")


def test_in_place_writes_to_inference_tensor_weights(route, checkpoints):
    """Weights assigned as inference tensors, then scaled in place inside inference mode (allowed
    there, and not counted by inference tensors). Scaling a folded weight by s is scaling the
    torchvision convolution's weight by s (the norm's scale multiplies it; the bias is apart)."""
    reference = _reference(0)
    with torch.inference_mode():
        fast = _optimize(_reference(10), route)
        fast.load_state_dict(_load(checkpoints[0][0]), assign=True)
        _assert_matches(fast, checkpoints[0][1], "assigned checkpoint 0")
        _assert_packs_made(fast, route)
        for factor in (2.0, 0.5, -1.0):
            for module in fast.modules():
                if isinstance(module, Conv2dAct):
                    module.weight.mul_(factor)
            with torch.no_grad():
                for module in reference.modules():
                    if isinstance(module, nn.Conv2d):
                        module.weight.mul_(factor)
            _assert_matches(fast, _outputs(reference), f"weights scaled by {factor}")


def test_deepcopy_then_loads_into_the_copy_only(route, checkpoints):
    """A copy made under inference mode (deepcopy clones the parameters into inference tensors)
    takes other checkpoints, in place and assigned; the original keeps computing with its own."""
    with torch.inference_mode():
        fast = _optimize(_reference(10), route)
        fast.load_state_dict(_load(checkpoints[0][0]))
        _assert_matches(fast, checkpoints[0][1], "original, checkpoint 0")
        duplicate = copy.deepcopy(fast)
        assert not any(slot in vars(m).get("_packs", {}) for m in duplicate.modules() for slot in PACK_SLOTS)
        _assert_matches(duplicate, checkpoints[0][1], "copy, checkpoint 0")
        _assert_packs_made(duplicate, route)
        for k, assign in ((1, False), (2, True), (3, False), (1, True), (2, False)):
            duplicate.load_state_dict(_load(checkpoints[k][0]), assign=assign)
            _assert_matches(duplicate, checkpoints[k][1], f"copy, checkpoint {k}, assign={assign}")
            _assert_matches(fast, checkpoints[0][1], f"original after the copy took checkpoint {k}")


def test_weights_stay_normal_tensors_on_every_entry_point():
    """Whatever path weights arrive by inside inference mode, the module holds normal tensors
    (whose in-place writes are counted), and each path starts a new generation of packs."""
    conv = Conv2dAct(torch.randn(8, 4, 3, 3), torch.randn(8), (1, 1), (1, 1), (1, 1), 1, relu=False)
    generation = vars(conv)["_weights_generation"]
    with torch.inference_mode():
        entries = [
            lambda: setattr(conv, "weight", nn.Parameter(torch.randn(8, 4, 3, 3), requires_grad=False)),
            lambda: conv.load_state_dict({"weight": torch.randn(8, 4, 3, 3), "bias": torch.randn(8)}, assign=True),
            lambda: conv.load_state_dict({"weight": torch.randn(8, 4, 3, 3), "bias": torch.randn(8)}),
            lambda: conv.to(memory_format=torch.channels_last),
            lambda: conv.double().float(),
        ]
        for entry in entries:
            entry()
            assert not conv.weight.is_inference() and not conv.bias.is_inference()
            assert vars(conv)["_weights_generation"] > generation
            generation = vars(conv)["_weights_generation"]
        swapping = torch.__future__.get_swap_module_params_on_conversion()
        torch.__future__.set_swap_module_params_on_conversion(True)  # _apply and loads swap tensors
        try:
            for entry in (lambda: conv.half().float(),
                          lambda: conv.load_state_dict({"weight": torch.randn(8, 4, 3, 3), "bias": torch.randn(8)})):
                token = conv._pack_token()
                entry()
                assert not conv.weight.is_inference() and conv._pack_token() is not token
        finally:
            torch.__future__.set_swap_module_params_on_conversion(swapping)
        buffer = io.BytesIO()
        torch.save(conv, buffer)
        for duplicate in (copy.deepcopy(conv), torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)):
            assert not duplicate.weight.is_inference() and not duplicate.bias.is_inference()
        conv._parameters["weight"] = nn.Parameter(torch.randn(8, 4, 3, 3), requires_grad=False)  # no hook sees it
        conv(torch.randn(1, 4, 10, 10).contiguous(memory_format=torch.channels_last))
        if ops.conv._onednn.unavailable_reason() is None:  # the pack lookup found it
            assert not conv.weight.is_inference() and "_onednn_weight" in conv._pack_cache()
    assert conv.weight.dtype == torch.float32 and isinstance(conv.weight, nn.Parameter)
    assert not conv.weight.requires_grad


def test_data_assignments_and_swaps_are_seen():
    """``weight.data = t`` keeps the parameter object and its version counter, and so does a
    hand-made ``torch.utils.swap_tensors``; two of them between calls could bring the weight back
    to the address it was packed at, were its storage not held with the packs."""
    conv = Conv2dAct(torch.randn(64, 64, 3, 3) / 24, torch.randn(64), (1, 1), (1, 1), (1, 1), 1, relu=False)
    x = torch.randn(1, 64, 30, 30).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        for step in range(6):
            conv(x)
            assert any(slot in conv._pack_cache() for slot in PACK_SLOTS) or ROUTES["direct"][1] is not None
            for _ in range(2):
                if step % 2:
                    conv.weight.data = torch.randn_like(conv.weight) / 24
                else:
                    torch.utils.swap_tensors(conv.weight, nn.Parameter(torch.randn_like(conv.weight) / 24,
                                                                       requires_grad=False))
            want = torch.nn.functional.conv2d(x.double(), conv.weight.double(), conv.bias.double(), 1, 1)
            error = (conv(x) - want).abs().max() / want.abs().max()
            assert error <= REL_TOL, f"step {step}: error {error:.3g} of the output's scale"


POOL_LIMIT_SCRIPT = textwrap.dedent("""
    import os
    import torch, fpn_fast
    from fpn_fast import ops
    from tests._models import randomise_
    model = fpn_fast.optimize_for_inference(randomise_(fpn_fast.resnet_fpn_backbone(backbone_name="resnet18")))
    x = torch.randn(1, 3, 320, 320)
    with torch.no_grad():
        want = model(x)
        model(x)
        full = ops.cpu_cache_stats()
        assert full["limit_bytes"] == 1024 << 20 and full["cached_bytes"] > 16 << 20, full
        os.environ["FPN_FAST_CPU_POOL_MB"] = "0"  # read once, at first use: no effect now
        model(x)
        assert ops.cpu_cache_stats()["limit_bytes"] == 1024 << 20

        freed = ops.set_cpu_cache_limit(8)  # lower: trimmed at once, and bounded from now on
        trimmed = ops.cpu_cache_stats()
        assert trimmed["limit_bytes"] == 8 << 20 and trimmed["cached_bytes"] <= 8 << 20, trimmed
        assert freed == full["cached_bytes"] - trimmed["cached_bytes"] > 0, (freed, full, trimmed)
        got = model(x)
        bounded = ops.cpu_cache_stats()
        assert bounded["cached_bytes"] <= 8 << 20 and bounded["hits"] > trimmed["hits"], bounded

        held = model(x)  # pooled outputs alive while the pool is turned off
        holding = ops.cpu_cache_stats()
        assert holding["blocks_in_use"] > bounded["blocks_in_use"], holding
        freed = ops.set_cpu_cache_limit(0)
        off = ops.cpu_cache_stats()
        assert off["limit_bytes"] == 0 and off["cached_bytes"] == 0 and freed == holding["cached_bytes"], off
        del held  # freed, not cached
        assert ops.empty_cpu_cache() == 0
        again = model(x)
        del again  # allocated outside the pool: nothing comes back to it
        after = ops.cpu_cache_stats()
        assert after["cached_bytes"] == 0 and after["blocks_in_use"] == bounded["blocks_in_use"], after
        assert (after["hits"], after["misses"]) == (off["hits"], off["misses"]), (after, off)

        ops.set_cpu_cache_limit(64)  # on again
        model(x)
        model(x)
        on = ops.cpu_cache_stats()
        assert 0 < on["cached_bytes"] <= 64 << 20 and on["hits"] > after["hits"], on
        last = model(x)
    for name in want:
        assert torch.equal(got[name], want[name]) and torch.equal(last[name], want[name]), name
    for bad, error in ((-1, ValueError), (1.5, TypeError), (True, TypeError)):
        try:
            ops.set_cpu_cache_limit(bad)
        except error:
            pass
        else:
            raise AssertionError(f"set_cpu_cache_limit({bad!r}) did not raise {error.__name__}")
    print("ok")
""")


@pytest.mark.skipif(ops._extension.unavailable_reason("cpu") is not None,
                    reason="the CPU buffer pool is part of the compiled extension")
def test_cpu_pool_limit_set_at_run_time_bounds_and_frees_it(run_python):
    """The limit set at run time trims the pool at once and bounds it later; 0 frees it, stops
    pooling and frees blocks that were in use when they die; FPN_FAST_CPU_POOL_MB changed after
    first use does nothing (in a fresh process: the pool is process-wide)."""
    proc = run_python(POOL_LIMIT_SCRIPT, unset=["FPN_FAST_CPU_POOL_MB"])
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.skipif(ops._extension.unavailable_reason("cpu") is not None,
                    reason="the CPU buffer pool is part of the compiled extension")
def test_cpu_pool_limit_set_before_first_use_replaces_the_environment(run_python):
    proc = run_python(textwrap.dedent("""
        import torch
        from fpn_fast import ops
        from fpn_fast.ops import cpu_cache
        assert ops.set_cpu_cache_limit(0) == 0
        with cpu_cache.pooled() as active:
            assert not active
        assert ops.cpu_cache_stats()["limit_bytes"] == 0
        print("ok")
    """), env={"FPN_FAST_CPU_POOL_MB": "lots"})  # never read: the limit was set first
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize("shape", [(1, 3, 32, 32), (2, 3, 16, 16), (1, 3, 40, 56)])
def test_a_residual_into_a_1x1_map_is_not_onednns(shape):
    """ResNet18's layer4 at a 32x32 image is 1x1: oneDNN's residual-add post-op refuses to add
    into a 1x1 output map on torch 2.11 ("could not create a memory", with the channels_last
    folded weight or a prepacked one), so those convs take F.conv2d and the tail; the others
    keep oneDNN and their packs. Both match torchvision."""
    reference = _reference(0)
    optimized = fpn_fast.optimize_for_inference(reference, winograd=False)
    x = torch.randn(shape)
    with torch.inference_mode():
        got, want = optimized(x), reference(x)
    for name, expected in want.items():
        scale = expected.abs().max().item()
        assert (got[name] - expected).abs().max().item() <= REL_TOL * scale, name
    assert any("_onednn_weight" in m._pack_cache() for m in optimized.modules() if isinstance(m, Conv2dAct))
