"""fpn_fast.ops: the dispatch table and the backend choice (fpn_fast.ops.dispatch), the declared
rounding of every route (selection.ROUNDING), and that every op has an OpTester and every
registered op is opchecked. Each op's own tests subclass the OpTester (tests/ops/op_tester.py):
test_upsample_add.py, test_stride2_pool.py, test_layout.py, test_conv.py, test_lateral.py."""
import importlib
import threading
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import fpn_fast.ops as ops
from fpn_fast.ops import _extension, _triton, dispatch, pool, reference, selection, top_down
from tests._cases import BACKENDS, require
from tests.ops.op_tester import OpTester

OPS = ("upsample_add", "stride2_pool", "conv2d_act", "conv2d_nchw", "lateral_upsample_add", "to_nchw")
IMPLEMENTATIONS = {"extension", "triton", "onednn", "nnpack", "winograd", "cudnn_relu", "triton_gemm", "triton_conv",
                   "torch"}


@pytest.fixture
def unavailable(monkeypatch):
    """unavailable(implementation, device_type, reason): make the lazy probe answer `reason`."""
    def make(implementation, device_type, reason):
        monkeypatch.setitem(dispatch._PROBED, (implementation, device_type), reason)
    return make


# ----------------------------------------------------------------------------- the table

def test_every_row_names_every_backend_and_ends_in_torch():
    assert set(dispatch.TABLE) == {(op, device) for op in OPS for device in ("cpu", "cuda")}
    for key, row in dispatch.TABLE.items():
        assert set(row) == set(ops.BACKENDS), key
        for backend, implementations in row.items():
            assert implementations and implementations[-1] == "torch", (key, backend)
            assert set(implementations) <= IMPLEMENTATIONS, (key, backend)
            assert len(set(implementations)) == len(implementations), (key, backend)
        assert row["torch"] == ("torch",), key


@pytest.mark.parametrize("op,device,backend,expected", [
    # The pool level is a strided copy: only Triton has a kernel; "extension" means ATen's copy.
    ("stride2_pool", "cpu", "extension", ("torch",)),
    ("stride2_pool", "cuda", "extension", ("torch",)),
    ("stride2_pool", "cuda", "auto", ("triton", "torch")),
    # On CPU the inference convolution of the "extension" backend is NNPACK's Winograd where it
    # applies (wide 3x3 convs, extension-called), else oneDNN's fused one.
    ("conv2d_act", "cpu", "extension", ("winograd", "nnpack", "onednn", "torch")),
    ("conv2d_nchw", "cpu", "auto", ("winograd", "nnpack", "onednn", "torch")),
    ("conv2d_nchw", "cpu", "triton", ("torch",)),
    # On CUDA measured: the Triton implicit GEMM writing NCHW, or conv2d_act's route then to_nchw.
    ("conv2d_nchw", "cuda", "auto", ("triton_conv", "torch")),
    ("conv2d_act", "cuda", "auto", ("triton", "triton_gemm", "triton_conv", "cudnn_relu", "torch")),
    ("conv2d_act", "cuda", "extension", ("torch",)),
    ("to_nchw", "cpu", "triton", ("torch",)),
    ("to_nchw", "cpu", "auto", ("extension", "torch")),
    ("upsample_add", "cpu", "auto", ("extension", "torch")),
    ("upsample_add", "cuda", "auto", ("extension", "triton", "torch")),
    ("upsample_add", "cpu", "triton", ("triton", "torch")),
    ("lateral_upsample_add", "cuda", "auto", ("triton", "torch")),
])
def test_named_backend_meaning_per_op(op, device, backend, expected):
    assert dispatch.TABLE[(op, device)][backend] == expected


def test_extension_named_for_the_pool_level_runs_atens_strided_copy(monkeypatch):
    require("extension", "cpu")
    calls = []
    for module, name in ((reference, "torch"), (pool._triton, "triton")):
        original = module.stride2_pool
        monkeypatch.setattr(module, "stride2_pool", lambda x, _f=original, _n=name: calls.append(_n) or _f(x))
    x = torch.randn(2, 3, 7, 11)
    with ops.use_backend("extension"):
        assert dispatch.resolve("stride2_pool", "cpu") == "torch"
        assert torch.equal(ops.stride2_pool(x), F.max_pool2d(x, 1, 2, 0))
    assert calls == ["torch"]


def test_resolve_skips_what_cannot_run_or_is_not_exact(unavailable):
    require("extension", "cpu")
    assert dispatch.resolve("upsample_add", "cpu") == "extension"
    assert dispatch.resolve("upsample_add", "cpu", supports=lambda impl: impl != "extension") == "torch"
    unavailable("extension", "cpu", "not built (test)")
    assert dispatch.resolve("upsample_add", "cpu") == "torch"  # "auto" moves on
    assert dispatch.resolve("no_such_op", "cpu") == "torch"


def test_available_backends_reports_every_backend_and_device():
    backends = ops.available_backends()
    assert set(backends) == set(BACKENDS)
    for reasons in backends.values():
        assert set(reasons) == {"cpu", "cuda"}
        assert all(r is None or (isinstance(r, str) and r) for r in reasons.values())
    assert backends["torch"] == {"cpu": None, "cuda": None}
    assert backends["extension"]["cpu"] == _extension.unavailable_reason("cpu")
    assert backends["triton"]["cpu"] == _triton.unavailable_reason("cpu")


# ----------------------------------------------------------------------------- naming a backend

def test_unknown_backend_name_is_a_value_error():
    for choose in (ops.set_backend, ops.use_backend):
        with pytest.raises(ValueError, match="unknown fpn_fast backend 'cudnn'"):
            with choose("cudnn"):
                pass
    assert ops.get_backend() == "auto"


def test_naming_a_backend_that_runs_nowhere_says_why(unavailable):
    unavailable("extension", "cpu", "not built (cpu test reason)")
    unavailable("extension", "cuda", "no GPU (cuda test reason)")
    for choose in (ops.set_backend, ops.use_backend):
        with pytest.raises(ops.BackendUnavailableError, match=r"'extension' is not available: "
                           r"cpu: not built \(cpu test reason\); cuda: no GPU \(cuda test reason\)"):
            with choose("extension"):
                pass
    assert ops.get_backend() == "auto"


def test_a_named_backend_is_used_or_refused_never_replaced(unavailable):
    """Named, it runs where it can and raises BackendUnavailableError (naming the op, the device
    and why) where it cannot: no silent fallback to another backend."""
    unavailable("extension", "cpu", "not built (test reason)")
    unavailable("extension", "cuda", None)
    lateral, top = torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)
    with ops.use_backend("extension"):
        for call in (lambda: ops.upsample_add(lateral, top), lambda: ops.stride2_pool(lateral),
                     lambda: dispatch.resolve("to_nchw", "cpu")):
            with pytest.raises(ops.BackendUnavailableError, match=r"backend 'extension' cannot run \w+ on cpu "
                               r"tensors: not built \(test reason\)"):
                call()
    assert isinstance(ops.BackendUnavailableError("x"), RuntimeError)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_naming_a_backend_for_cuda_tensors_without_a_gpu_says_why():
    for backend in ("extension", "triton"):
        reason = ops.available_backends()[backend]["cuda"]
        assert reason
        if ops.available_backends()[backend]["cpu"] is not None:
            continue
        with ops.use_backend(backend):
            with pytest.raises(ops.BackendUnavailableError, match=f"cannot run upsample_add on cuda tensors: "
                                                                  f"{reason[:20]}"):
                dispatch.resolve("upsample_add", "cuda")
    with ops.use_backend("torch"):
        assert dispatch.resolve("upsample_add", "cuda") == "torch"


def test_use_backend_restores_previous_even_on_error_and_nests():
    ops.set_backend("torch")
    with pytest.raises(RuntimeError, match="boom"):
        with ops.use_backend("auto"):
            assert ops.get_backend() == "auto"
            with ops.use_backend("torch"):
                assert ops.get_backend() == "torch"
            assert ops.get_backend() == "auto"
            raise RuntimeError("boom")
    assert ops.get_backend() == "torch"


def test_use_backend_is_per_thread(monkeypatch):
    """Two threads inside use_backend("torch") / use_backend(<a kernel backend>), interleaved:
    each runs its own backend (counted), and the process default is unchanged after."""
    kernel_backend = "extension" if ops.available_backends()["extension"]["cpu"] is None else "triton"
    require(kernel_backend, "cpu")
    module = {"extension": top_down._extension, "triton": top_down._triton}[kernel_backend]
    lateral, top = torch.randn(1, 2, 5, 7), torch.randn(1, 2, 3, 4)
    expected = reference.upsample_add(lateral, top)
    calls = {"torch": [], kernel_backend: []}
    for name, mod in (("torch", reference), (kernel_backend, module)):
        original = mod.upsample_add
        monkeypatch.setattr(mod, "upsample_add", lambda *a, _f=original, _n=name: calls[_n].append(
            threading.current_thread().name) or _f(*a))
    barrier = threading.Barrier(2, timeout=60)
    seen, errors = {}, []

    def run(backend):
        try:
            with ops.use_backend(backend):
                barrier.wait()  # both threads are inside their own use_backend
                for _ in range(3):
                    assert torch.equal(ops.upsample_add(lateral, top), expected)
                    seen.setdefault(backend, set()).add(ops.get_backend())
                barrier.wait()
            barrier.wait()  # both have left their blocks
            seen.setdefault(backend + " after", set()).add(ops.get_backend())
        except BaseException as exc:  # reported below, not lost in the thread
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(b,), name=b) for b in ("torch", kernel_backend)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert calls == {"torch": ["torch"] * 3, kernel_backend: [kernel_backend] * 3}
    assert seen == {"torch": {"torch"}, kernel_backend: {kernel_backend},
                    "torch after": {"auto"}, kernel_backend + " after": {"auto"}}
    assert ops.get_backend() == "auto" and dispatch._default == "auto"


# ----------------------------------------------------------------------------- environment, import

def test_bad_env_var_is_a_value_error_naming_the_variable(run_python):
    result = run_python("import fpn_fast", env={"FPN_FAST_BACKEND": "nonsense"})
    assert result.returncode != 0
    assert "ValueError: the environment variable FPN_FAST_BACKEND='nonsense' names no fpn_fast backend" \
        in result.stderr, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_triton_on_cpu_without_the_interpreter_is_refused_naming_it(run_python):
    """FPN_FAST_BACKEND is read at import without probing anything; the backend is checked where
    it runs (and by set_backend at once)."""
    result = run_python("""
        import torch
        import fpn_fast.ops as ops
        print(ops.get_backend())
        for call in (lambda: ops.upsample_add(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 2, 2)),
                     lambda: ops.set_backend("triton")):
            try:
                call()
            except ops.BackendUnavailableError as e:
                print("REFUSED:", e)
            else:
                print("ACCEPTED")
    """, env={"FPN_FAST_BACKEND": "triton"}, unset=["TRITON_INTERPRET"])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "triton", lines
    assert len(lines) == 3 and all(line.startswith("REFUSED:") and "TRITON_INTERPRET" in line
                                   for line in lines[1:]), lines


def test_import_runs_no_convolution_and_no_cuda_query(run_python):
    """Nor does reading FPN_FAST_BACKEND (it sets the process default), nor building an FPN."""
    result = run_python("""
        import torch
        import torch.nn.functional as F

        def loud(name):
            def refuse(*args, **kwargs):
                raise AssertionError(f"import fpn_fast called {name}")
            return refuse

        for module, name in ((torch.cuda, "is_available"), (torch.cuda, "device_count"), (torch.cuda, "init"),
                             (torch.cuda, "_lazy_init"), (torch.cuda, "get_device_capability"),
                             (torch._C, "_cuda_getDeviceCount"), (F, "conv2d"), (torch, "conv2d"),
                             (torch, "convolution"), (torch.backends.mkldnn, "is_available")):
            setattr(module, name, loud(f"{module.__name__}.{name}"))

        class LoudNamespace:
            def __getattr__(self, name):
                raise AssertionError(f"import fpn_fast used torch.ops.mkldnn.{name}")
        torch.ops.mkldnn = LoudNamespace()

        import fpn_fast
        import fpn_fast.ops
        model = fpn_fast.FeaturePyramidNetwork([8, 16], 8)  # building a module probes nothing either
        print("imported", fpn_fast.ops.get_backend())
    """, env={"FPN_FAST_BACKEND": "extension"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "imported extension", result.stdout


# ----------------------------------------------------------------------------- rounding, op testers

def test_rounding_declares_every_route_and_nothing_else():
    """selection.ROUNDING says how every implementation the dispatch rows name rounds (the
    OpTester holds each to it); any other entry is an op without rows, whose one route is "torch"."""
    named = {(op, implementation) for (op, _), row in dispatch.TABLE.items()
             for implementations in row.values() for implementation in implementations}
    assert named <= set(selection.ROUNDING), sorted(named - set(selection.ROUNDING))
    ops_with_rows = {op for op, _ in dispatch.TABLE}
    for op, implementation in set(selection.ROUNDING) - named:
        assert op not in ops_with_rows and implementation == "torch", (op, implementation)
    for rounding in selection.ROUNDING.values():
        assert rounding.sums >= 0 and rounding.roundings >= 0


def _op_testers():
    """Every OpTester subclass of the op test modules (imported by name: pytest imports the files
    it collects under other names)."""
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        module = importlib.import_module(f"tests.ops.{path.stem}")
        yield from (obj for obj in vars(module).values()
                    if isinstance(obj, type) and issubclass(obj, OpTester) and obj is not OpTester)


# Registered ops no OpTester opchecks, and why.
NOT_OPCHECKED = {
    "fpn_fast::winograd_conv_3x3": "returns whether its output is finite, a value no fake kernel can give; runs only "
                                   "outside graph capture (the Winograd routes refuse capture): test_winograd.py",
    "fpn_fast::nnpack_conv_3x3_packed": "as winograd_conv_3x3: test_cpu_inference_paths.py",
    "fpn_fast::nnpack_pack_3x3": "NNPACK's opaque kernel transforms, made once per weight outside any graph",
    "fpn_fast::_nnpack_unavailable_reason": "a probe, no tensors",
    "fpn_fast::_upsample_add_index_probe": "a test hook of the index math, no tensors: test_extension.py",
    "fpn_fast::_nearest_window_starts": "a test hook of the index math, no tensors: test_extension.py",
    # Measured-only routes of conv2d_act's CUDA row (triton_gemm, triton_conv), which no
    # unmeasured OpTester sample reaches: opchecked beside their kernels.
    "fpn_fast_triton::conv1x1_act": "opchecked in test_triton_conv_epilogue.py (a measured-only route)",
    "fpn_fast_triton::conv2d_act": "opchecked in test_triton_conv_epilogue.py (a measured-only route)",
    "fpn_fast_triton::conv2d_nchw": "opchecked in test_triton_conv_epilogue.py (a measured-only route)",
    **{f"fpn_fast::_cpu_pool_{name}": "the CPU buffer pool's control, no tensors: test_cpu_inference_paths.py"
       for name in ("enter", "exit", "set_limit", "release", "stats")},
}


def test_every_op_has_an_op_tester_and_every_registered_op_is_opchecked():
    testers = list(_op_testers())
    assert {op for op, _ in dispatch.TABLE} <= {tester.op for tester in testers}
    opchecked = {name for tester in testers for names in tester.registered.values() for name in names}
    registered = {name for name in torch._C._dispatch_get_all_op_names()
                  if name.split("::")[0] in ("fpn_fast", "fpn_fast_triton")}
    assert not opchecked - registered, sorted(opchecked - registered)  # declared, but no such op
    assert registered - opchecked == set(NOT_OPCHECKED) & registered, \
        f"registered, neither opchecked by an OpTester nor in NOT_OPCHECKED: {sorted(registered - opchecked - set(NOT_OPCHECKED))}"
