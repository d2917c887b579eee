"""The Triton backend's registrations as a GPU machine makes them (TRITON_INTERPRET unset: the
``triton_op`` path) against the interpreter's (this process): same ops, same schemas, same fake
kernels, same refusal of inputs that need grad. The test suite otherwise imports fpn_fast only
with TRITON_INTERPRET=1 on CPU machines, which takes the other path; torch 2.11 once refused the
GPU path's registrations at import (issue 19). opcheck of each op (schema, fake kernel, autograd
registration) on its samples is the OpTester's (test_upsample_add.py, test_stride2_pool.py,
test_conv.py, test_lateral.py).
"""
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fpn_fast.ops import _triton
from tests._cases import require

# Every op of the namespace: the differentiable ones (triton_op on a GPU) and the inference-only
# ones (define_inference_op on both paths).
OPS = ("upsample_add", "upsample_add_", "upsample_add_backward_top", "stride2_pool", "stride2_pool_backward",
       "bias_act_", "lateral_upsample_add")
INFERENCE_ONLY = ("upsample_add_", "bias_act_", "lateral_upsample_add")

# Runs here and in the child: one JSON line describing the registrations.
_DESCRIBE = r'''
import json
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
import fpn_fast  # the import itself was what failed on torch 2.11
from fpn_fast.ops import _triton
from fpn_fast.ops.conv import _triton_epilogue
from fpn_fast.ops.lateral import _triton as _triton_lateral

ns = torch.ops.fpn_fast_triton
OPS = %(ops)r
INFERENCE_ONLY = %(inference_only)r


def samples(make):
    cl = torch.channels_last
    lateral = make(2, 3, 7, 11).contiguous(memory_format=cl)
    top = make(2, 3, 4, 6)
    return {
        "upsample_add": (lateral, top, make(3)),
        "upsample_add_": (lateral, top, None),
        "upsample_add_backward_top": (make(2, 3, 7, 11), [2, 3, 4, 6], True),
        "stride2_pool": (lateral,),
        "stride2_pool_backward": (make(2, 3, 4, 6), [2, 3, 7, 11], False),
        "bias_act_": (lateral, make(3), None, True),
        "lateral_upsample_add": (make(2, 5, 7, 11).contiguous(memory_format=cl), make(3, 5, 1, 1), make(3), top),
    }


def meta(result):
    if result is None:
        return None
    return [list(result.shape), list(result.stride()), str(result.dtype)]


report = {"as_triton_op": _triton._AS_TRITON_OP, "schemas": {}, "fake": {}, "refused": {}, "version_bumped": {}}
for name in OPS:
    report["schemas"][name] = str(getattr(ns, name).default._schema)
with FakeTensorMode() as mode:
    for name, args in samples(lambda *size: torch.randn(*size)).items():
        report["fake"][name] = meta(getattr(ns, name)(*args))
for name, args in samples(lambda *size: torch.randn(*size)).items():
    if name not in INFERENCE_ONLY:
        continue
    needs_grad = [a.clone().requires_grad_() if isinstance(a, torch.Tensor) and i > 0 else a
                  for i, a in enumerate(args)]
    try:
        getattr(ns, name)(*needs_grad)
    except RuntimeError as e:
        report["refused"][name] = "has no gradient" in str(e)
    else:
        report["refused"][name] = False
# An in-place op bumps the version counter of what it writes, as ATen's do; checked without
# running a kernel (the Autograd kernel bumps it after the one below it ran): the kernel below
# is the fake one here.
with FakeTensorMode():
    for name in ("upsample_add_", "bias_act_"):
        args = samples(lambda *size: torch.randn(*size))[name]
        written = args[0]
        before = written._version
        getattr(ns, name)(*args)
        report["version_bumped"][name] = written._version > before
print("REPORT " + json.dumps(report, sort_keys=True))
''' % dict(ops=OPS, inference_only=INFERENCE_ONLY)


def _report(stdout: str) -> dict:
    lines = [line for line in stdout.splitlines() if line.startswith("REPORT ")]
    assert len(lines) == 1, stdout
    return json.loads(lines[0][len("REPORT "):])


@pytest.fixture(scope="module")
def interpreter_report(run_python):
    require("triton", "cpu")
    result = run_python(_DESCRIBE, env={"TRITON_INTERPRET": "1"})
    assert result.returncode == 0, result.stderr
    return _report(result.stdout)


@pytest.fixture(scope="module")
def gpu_path_report(run_python):
    """The registrations with TRITON_INTERPRET unset, as on a GPU machine (no GPU needed to
    register or to run fake kernels)."""
    if _triton.triton is None:
        pytest.fail("triton is a dev requirement: " + str(_triton.unavailable_reason("cpu")))
    result = run_python(_DESCRIBE, unset=["TRITON_INTERPRET"])
    assert result.returncode == 0, result.stderr
    return _report(result.stdout)


def test_paths_differ_as_intended(interpreter_report, gpu_path_report):
    assert interpreter_report["as_triton_op"] is False
    assert gpu_path_report["as_triton_op"] is hasattr(torch.library, "triton_op")


def test_same_ops_and_schemas(interpreter_report, gpu_path_report):
    assert gpu_path_report["schemas"] == interpreter_report["schemas"]
    assert set(gpu_path_report["schemas"]) == set(OPS)


def test_same_fake_kernels(interpreter_report, gpu_path_report):
    """Shape, strides (channels_last kept) and dtype of every op's fake output."""
    assert gpu_path_report["fake"] == interpreter_report["fake"]
    assert gpu_path_report["fake"]["upsample_add"] == [[2, 3, 7, 11], [231, 1, 33, 3], "torch.float32"]
    assert gpu_path_report["fake"]["upsample_add_"] is None


def test_inference_only_ops_refuse_grad_on_both_paths(interpreter_report, gpu_path_report):
    for report in (interpreter_report, gpu_path_report):
        assert report["refused"] == {name: True for name in INFERENCE_ONLY}, report["refused"]


def test_in_place_ops_bump_the_version_counter(interpreter_report, gpu_path_report):
    for report in (interpreter_report, gpu_path_report):
        assert report["version_bumped"] == {"upsample_add_": True, "bias_act_": True}, report


def test_in_place_op_bumps_the_version_of_a_real_tensor():
    """With a real kernel (the interpreter here): a tensor saved for another op's backward and
    then written by upsample_add_ makes that backward raise, as after an ATen in-place op."""
    require("triton", "cpu")
    weight = torch.randn(1, 2, 1, 1, requires_grad=True)
    lateral = torch.randn(1, 2, 5, 5)
    product = lateral * weight  # saves lateral for weight's gradient
    version = lateral._version
    torch.ops.fpn_fast_triton.upsample_add_(lateral, torch.randn(1, 2, 3, 3), None)
    assert lateral._version == version + 1
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        product.sum().backward()
