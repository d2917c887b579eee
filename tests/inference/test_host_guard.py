"""The host guard (csrc/runtime/host_guard.cpp, fpn_fast/inference/guards.py ``arm``/``HostGuard``):
a cached plan's calls skip the Python guards while the extension says that nothing they read has
changed since they last held.

What must hold, tested here on every change a plan's guards watch (and a few they do not):
- the host guard never says "unchanged" where the Python guards would fail (so a change can never
  be served by a stale plan: exactness rests on the Python guards, as before);
- it says "changed" on each change that the guards watch (else its speed would be an accident);
- a steady-state call runs none of the Python guards; and a call after a change is right
  (compared with the modules run as written).
"""
import contextlib
import copy
import sys
from collections import OrderedDict

import pytest
import torch
from torch import nn

import fpn_fast
from fpn_fast.inference import guards
from fpn_fast.inference.engine import _valid
from fpn_fast._fast_path import _global_hooks
from fpn_fast.ops import host_guard
from tests.inference.test_engine import _assert_same, _relative_error
from tests._models import randomise_

if host_guard.functions() is None:
    pytest.skip("the host guard is not available here (no extension, or FPN_FAST_HOST_GUARD=0)",
                allow_module_level=True)

IMAGE = torch.randn(1, 3, 64, 80, generator=torch.Generator().manual_seed(3))
HANDLES = []  # hooks a test registered (not on the model: a list there would be guarded too)


def _optimized(device="cpu"):
    torch.manual_seed(0)
    model = randomise_(fpn_fast.resnet_fpn_backbone(backbone_name="resnet18", weights=None)).eval().to(device)
    return fpn_fast.optimize_for_inference(model)


def _entry(model):
    (entry,) = model._engine.entries.values()
    return entry


def _armed(model):
    """The model after two calls: planned, its host guard armed and holding."""
    with torch.inference_mode():
        model(IMAGE)
        model(IMAGE)
    entry = _entry(model)
    assert entry.host is not None and entry.unchanged(model)
    return entry


def _python_guards_hold(entry, model) -> bool:
    return _valid(entry) and not _global_hooks()


def _set_list_attribute(model):
    model.fpn.inner_blocks[0].tags.append("b")


def _add_to_set(model):
    model.body.layer1._non_persistent_buffers_set.add("x")


def _reorder(model):
    model.fpn.ordered.move_to_end("a")


def _swap_class(model):
    class Conv(type(model.fpn.layer_blocks[0])):
        pass
    model.fpn.layer_blocks[0].__class__ = Conv


def _replace_dict(model):
    module = model.body.layer2[0]
    module.__dict__ = dict(module.__dict__)


def _data_assign(model):
    conv = model.body.layer3[0].convs[0]
    conv.weight.data = conv.weight.data.clone()


def _in_place(model):
    with torch.no_grad():
        model.body.conv1.weight.mul_(1.5)


def _bias_in_place(model):
    with torch.no_grad():
        model.fpn.layer_blocks[1].bias.add_(0.25)


def _load_state_dict(model):
    model.load_state_dict({k: v * 1.5 if v.is_floating_point() else v for k, v in model.state_dict().items()})


def _assign_state_dict(model):
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)


def _global_hook(model):
    HANDLES.append(torch.nn.modules.module.register_module_forward_hook(lambda *args: None))


def _global_pre_hook(model):
    HANDLES.append(torch.nn.modules.module.register_module_forward_pre_hook(lambda *args: None))


def _hook(model):
    HANDLES.append(model.body.layer2[0].register_forward_hook(lambda *args: None))


def _swap_tensors(model):
    conv = model.body.layer3[0].convs[0]
    torch.utils.swap_tensors(conv.weight, nn.Parameter(conv.weight.detach() * 2, requires_grad=conv.weight.requires_grad))


class _Kept:
    """Keeps a tensor alive until the test's clean-up (which calls ``remove``)."""

    def __init__(self, tensor):
        self.tensor = tensor

    def remove(self):
        self.tensor = None


class Meta(dict):
    """A dict subclass attribute: compared by content, not watched."""


def _parametrize(model):
    from torch.nn.utils import parametrize

    class Double(nn.Module):
        def forward(self, w):
            return w * 2
    parametrize.register_parametrization(model.body.layer3[0].convs[0], "weight", Double())


# Each changes something a plan's guards watch: the host guard must see it.
WATCHED = {
    "attribute": lambda m: setattr(m.fpn.layer_blocks[0], "padding", (0, 0)),
    "new attribute": lambda m: setattr(m.fpn.inner_blocks[0], "foo", 3),
    "deleted attribute": lambda m: delattr(m.fpn, "foo"),
    "equal tuple": lambda m: setattr(m.fpn.layer_blocks[0], "padding", tuple(list(m.fpn.layer_blocks[0].padding))),
    "submodule": lambda m: m.body.layer3.__setitem__(1, nn.Identity()),
    "return_layers in place": lambda m: m.body.return_layers.__setitem__("layer3", "x3"),
    "list in place": _set_list_attribute,
    "set in place": _add_to_set,
    "OrderedDict order": _reorder,
    "dict subclass in place": lambda m: m.fpn.meta.__setitem__("b", 2),
    "class": _swap_class,
    "__dict__ replaced": _replace_dict,
    "training (inner)": lambda m: m.fpn.train(),
    "training (outer)": lambda m: setattr(m, "training", True),
    "outer attribute": lambda m: setattr(m, "out_channels", 7),
    "forward hook": _hook,
    "global forward hook": _global_hook,
    "global pre-hook": _global_pre_hook,
    "in-place weight": _in_place,
    "in-place bias": _bias_in_place,
    ".data assigned": _data_assign,
    "swap_tensors": _swap_tensors,
    "a copy-on-write clone": lambda m: HANDLES.append(_Kept(torch._lazy_clone(m.fpn.layer_blocks[1].weight))),
    "load_state_dict": _load_state_dict,
    "load_state_dict(assign=True)": _assign_state_dict,
    "half().float()": lambda m: m.half().float(),
    "parametrization": _parametrize,
}


def _prepared():
    """A fresh model, with the attributes that some changes edit in place set before planning."""
    model = _optimized()
    model.fpn.foo = 1
    model.fpn.inner_blocks[0].tags = ["a"]
    model.fpn.ordered = OrderedDict(a=1, b=2)
    model.fpn.meta = Meta(a=1)
    return model


@contextlib.contextmanager
def _changed(change):
    """(model, its armed cache entry) after ``change(model)``; the hooks it registered removed after."""
    model = _prepared()
    entry = _armed(model)
    try:
        change(model)
        yield model, entry
    finally:
        while HANDLES:
            HANDLES.pop().remove()


@pytest.mark.parametrize("name", list(WATCHED))
def test_each_watched_change_is_seen_and_the_next_call_is_right(name):
    with _changed(WATCHED[name]) as (model, entry):
        assert not entry.unchanged(model), name
        if name in ("training (inner)", "training (outer)"):
            return  # the backbone refuses training mode (tests/inference/test_engine.py)
        with torch.inference_mode():
            _assert_same(model(IMAGE), model._run_as_written(IMAGE))


# Each leaves the plan valid: the Python guards still hold, the next call builds nothing, and the
# host guard holds again after it. The first four touch no dict the host guard reads: it must
# still hold at once (no false alarm); the others change a watched dict and back.
KEPT = {
    "outer forward hook": lambda m: HANDLES.append(m.register_forward_hook(lambda *args: None)),
    "outer eval()": lambda m: m.eval(),
    "inner eval()": lambda m: m.body.eval(),
    "read state_dict": lambda m: m.state_dict(),
    "another module's attribute": lambda m: setattr(nn.Linear(1, 1), "foo", 1),
    "a hook added and removed": lambda m: m.body.layer1.register_forward_hook(lambda *args: None).remove(),
    "an equal tuple": lambda m: setattr(m.fpn.layer_blocks[0], "padding", tuple(list(m.fpn.layer_blocks[0].padding))),
}
QUIET = ("outer forward hook", "outer eval()", "inner eval()", "read state_dict")


@pytest.mark.parametrize("name", list(KEPT))
def test_a_change_that_keeps_the_plan_builds_nothing_and_re_arms(name):
    with _changed(KEPT[name]) as (model, entry):
        assert _python_guards_hold(entry, model), name
        if name in QUIET:
            assert entry.unchanged(model), f"{name}: a false alarm"
        with torch.inference_mode():
            model(IMAGE)
        assert model._engine.builds == 1 and _entry(model) is entry
        assert entry.unchanged(model), f"{name}: not re-armed after the guards held"


class Tag(nn.Identity):
    """A module the plan calls as written (its type is not one the plan sees through)."""


def test_called_modules_type_training_and_hooks_are_seen_other_attributes_are_not():
    model = _optimized()
    tag = Tag().eval()
    model.body.layer2.append(tag)
    entry = _armed(model)
    assert tag in entry.plan.called
    tag.calls = 5  # a called module's own attributes are its business (it reads them when called)
    assert entry.unchanged(model) and _python_guards_hold(entry, model)
    for change, undo in [(lambda: tag.train(), lambda: tag.eval()),
                         (lambda: HANDLES.append(tag.register_forward_pre_hook(lambda *args: None)),
                          lambda: HANDLES.pop().remove()),
                         (lambda: setattr(tag, "__class__", nn.Identity), lambda: setattr(tag, "__class__", Tag))]:
        change()
        assert not entry.unchanged(model) and not _python_guards_hold(entry, model)
        undo()
        with torch.inference_mode():
            model(IMAGE)
        assert entry.unchanged(model) and model._engine.builds == 1


def test_calls_in_grad_mode_keep_the_record(monkeypatch):
    """Grad mode on, nothing requiring grad: planned, and the Python guards run once, not per call."""
    model = _optimized()
    model(IMAGE)
    counts = _count_python_guards(monkeypatch)
    for _ in range(3):
        model(IMAGE)
    assert len(counts) == 4 and _entry(model).host is not None  # one re-arm: the two guards, twice


def test_a_steady_call_runs_no_python_guard(monkeypatch):
    model = _optimized()
    _armed(model)
    counts = _count_python_guards(monkeypatch)
    with torch.inference_mode():
        for _ in range(3):
            model(IMAGE)
    assert counts == []
    model.fpn.layer_blocks[0].padding = (1, 1)  # an equal value: the Python guards run once, hold, re-arm
    with torch.inference_mode():
        for _ in range(3):
            model(IMAGE)
    assert len(counts) == 4  # the plan's structure and weight guards, before and after the record is taken
    assert model._engine.builds == 1


def test_the_guard_is_not_the_callers():
    """Another backbone object (a copy sharing nothing) is not the armed one: no stale answer."""
    model = _optimized()
    entry = _armed(model)
    other = copy.deepcopy(model)
    assert not entry.unchanged(other)


def test_the_graph_part_watches_the_called_modules_tensors():
    """A CUDA graph's guard (its structure and its tensors' data pointers) armed on CPU modules: the
    C++ side reads the same things for any device."""
    block = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    graph = guards.GraphGuard([block])
    host = guards.arm([], [], graph)
    assert host is not None and host.holds() and graph.holds()
    block[1].running_mean.data = block[1].running_mean.clone()  # a new address the graph never read
    assert not host.holds() and not graph.holds()
    host = guards.arm([], [], graph)  # the Python guard fails: arming again records the new address
    assert host.holds() and not graph.holds()
    block[1].running_var.add_(1)  # in place: the graph reads it at its address, nothing to guard
    assert host.holds()


def test_the_self_check_passes_and_the_mechanism_follows_the_python_version():
    mechanism = guards.host_guard_mechanism()
    assert mechanism is not None, "the host guard's self-check failed on this Python (see the warning)"
    assert ("watchers" in mechanism) == (sys.version_info >= (3, 12)), mechanism


def _count_python_guards(monkeypatch) -> list:
    counts = []
    for cls in (guards.StructureGuard, guards.WeightGuard, guards.GraphGuard):
        original = cls.holds
        monkeypatch.setattr(cls, "holds", lambda self, _original=original: counts.append(1) or _original(self))
    return counts


@pytest.mark.cuda
def test_cuda_replays_skip_the_python_guards_and_see_each_change(monkeypatch):
    """On the GPU machine's Python (3.12: dict watchers): replays run no Python guard, and a weight
    written in place, a hook and a changed attribute are each seen by the next call."""
    assert guards.host_guard_mechanism() is not None, "the host guard's self-check failed on this Python"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    model = _optimized("cuda")
    x = IMAGE.cuda()
    with torch.inference_mode():
        model(x)
        model(x)
    entry = _entry(model)
    assert entry.graphed is not None, entry.reason
    assert entry.host is not None and entry.host[1] is entry.graph_guard
    counts = _count_python_guards(monkeypatch)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
    assert counts == []
    seen = []
    with torch.inference_mode():
        model.body.conv1.weight.mul_(1.5)
        _assert_close(model(x), model._run_as_written(x))
        handle = model.body.layer2[0].register_forward_hook(lambda *args: seen.append(1))
        try:
            _assert_close(model(x), model._run_as_written(x))
        finally:
            handle.remove()
        assert seen == [1, 1]  # in the engine's call (as written: a hook is never hidden) and in ours
        model.fpn.layer_blocks[0].padding = (0, 0)
        _assert_close(model(x), model._run_as_written(x))
    assert model._engine.builds == 3  # the weight, then the padding; the hooked call built nothing


def _assert_close(got, expected):
    """Within 1e-5 of each level's largest value: the plan and the modules run the same convolutions
    (TF32 off), in possibly different cuDNN algorithms."""
    assert list(got) == list(expected)
    assert _relative_error(got, expected) <= 1e-5


def test_a_host_guard_that_misses_a_change_is_not_used(monkeypatch):
    """The self-check at first use: functions whose ``holds`` never notices anything are refused,
    with a warning, and calls run the Python guards."""
    real = host_guard.functions()
    blind = host_guard.HostGuardFunctions(real.arm, lambda record, outer: True, real.mechanism)
    monkeypatch.setattr(host_guard, "functions", lambda: blind)
    monkeypatch.setattr(guards, "_FUNCTIONS", [])
    with pytest.warns(RuntimeWarning, match="did not notice an attribute set, an in-place weight write"):
        assert guards.host_guard_mechanism() is None
    model = _optimized()
    with torch.inference_mode():
        model(IMAGE)
        model(IMAGE)
    assert _entry(model).host is None


def test_turned_off_the_python_guards_run_each_call(monkeypatch):
    monkeypatch.setenv("FPN_FAST_HOST_GUARD", "0")
    monkeypatch.setattr(guards, "_FUNCTIONS", [])
    assert guards.host_guard_mechanism() is None
    model = _optimized()
    with torch.inference_mode():
        model(IMAGE)
        model(IMAGE)
        model.body.conv1.weight.mul_(2)
        got = model(IMAGE)
        expected = model._run_as_written(IMAGE)
    assert _entry(model).host is None
    _assert_same(got, expected)
