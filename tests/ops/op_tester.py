"""``OpTester``: the one base class every fpn_fast op's tests subclass (as torchvision's
``RoIOpTester`` is for its RoI ops). A subclass declares the op; the base class turns the
declaration into parametrised tests, so every op is held to the same checks:

========================  ================================================  ========================
test                      checks                                            parametrised over
========================  ================================================  ========================
test_forward              values within the implementation's declared       device x backend x
                          rounding (``selection.ROUNDING``: 0 = the same    dtype x layout
                          bits), shape, dtype, output memory format, inputs
                          untouched (in place: the result written through
                          the argument, nothing around a view touched)
test_backward             the gradients, as the forward (autograd ops)      device x backend x
                                                                            dtype x layout
test_gradcheck            ``torch.autograd.gradcheck`` in float64           device x backend x layout
test_refuses_grad         an input that requires grad is refused under      device x backend
                          grad mode and accepted under no_grad (ops
                          without autograd)
test_non_finite           NaN, +inf, -inf land where the reference puts     device x backend x dtype
                          them; finite values within the rounding
test_opcheck              ``torch.library.opcheck`` of every registered     device x implementation
                          op the subclass declares, on its samples
test_compile              ``torch.compile(fullgraph=True, backend=          device x backend
                          "aot_eager")`` of a function calling the op
test_compile_inductor     the default (inductor) backend, on a GPU          cuda
test_script               ``torch.jit.script`` of a function calling the    device
                          op's TorchScript form
test_export               ``torch.export`` of a module calling the op, and   device x backend
                          the program through ``fpn_fast.decompositions()``:
                          ATen ops only (known gaps: expected failures)
test_routes_reached       the samples reach every implementation the op's   device
                          dispatch rows name (or the subclass says why not)
========================  ================================================  ========================

Bounds come from the op's declared rounding: ``selection.ROUNDING[(op, implementation)]`` for the
implementation a sample resolves to (``OpTester.implementation``); checks that cannot know which
implementation ran (compile, export, script, non-finite values) use the op's contract, the
loosest rounding among the implementations the backend's row names. CUDA cases carry the `cuda`
marker (the `device` fixture of tests/conftest.py); a backend that cannot run on the device
skips, saying why (test_extension.py and test_triton.py fail loudly when one that should run
does not). The Triton interpreter (CPU tensors) runs only the samples marked ``interpreter``.
"""
import contextlib
import dataclasses
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import pytest
import torch

import fpn_fast
from fpn_fast import ops
from fpn_fast.ops import dispatch, selection
from fpn_fast.ops.reference import memory_format_of
from tests._cases import BACKENDS, DTYPES, laid_out, require


@dataclasses.dataclass
class Sample:
    """One call of the op: fresh random inputs.

    args, kwargs: the call (tensors, None, and plain values).
    name: says what the sample is, in failure messages.
    interpreter: also run it under the Triton interpreter (which pays per program: a
        representative subset runs there).
    without: implementations turned off for this call (their dispatch probe answers "off"), so
        that it reaches a route further down the op's row.
    """
    args: tuple
    kwargs: Dict[str, Any] = dataclasses.field(default_factory=dict)
    name: str = ""
    interpreter: bool = True
    without: Tuple[str, ...] = ()

    def tensors(self) -> List[torch.Tensor]:
        return [t for t in (*self.args, *self.kwargs.values()) if isinstance(t, torch.Tensor)]

    def replaced(self, tensors: Sequence[torch.Tensor]) -> "Sample":
        """This call with its tensors (in ``tensors()`` order) replaced."""
        it = iter(tensors)
        args = tuple(next(it) if isinstance(a, torch.Tensor) else a for a in self.args)
        kwargs = {k: next(it) if isinstance(v, torch.Tensor) else v for k, v in self.kwargs.items()}
        return dataclasses.replace(self, args=args, kwargs=kwargs)

    @contextlib.contextmanager
    def routes(self, device: str) -> Iterator[None]:
        """The dispatch probes of ``without`` answer "off" on ``device`` while the block runs."""
        keys = [(implementation, device) for implementation in self.without]
        saved = {key: dispatch._PROBED[key] for key in keys if key in dispatch._PROBED}
        dispatch._PROBED.update({key: f"turned off for the sample {self.name!r}" for key in keys})
        try:
            yield
        finally:
            for key in keys:
                dispatch._PROBED.pop(key, None)
            dispatch._PROBED.update(saved)


def leaves(sample: Sample) -> Sample:
    """The sample with its floating tensors detached into leaves that require grad (views stay views)."""
    return sample.replaced([t.detach().requires_grad_() if t.is_floating_point() else t for t in sample.tensors()])


def grad_like(out: torch.Tensor, layout: str) -> torch.Tensor:
    """A random incoming gradient for ``out``: a strided view for the "sliced" layout, else in
    out's memory format."""
    grad = torch.randn(out.shape, device=out.device).to(out.dtype)
    return laid_out(grad, "sliced" if layout == "sliced" and out.dim() == 4 else
                    "channels_last" if memory_format_of(out) == torch.channels_last else "contiguous")


def assert_within(out: torch.Tensor, expected: torch.Tensor, rounding: selection.Rounding, what: str) -> None:
    """out equals expected within ``rounding`` (NaN, +inf and -inf where expected has them; the
    finite values within the bound of the largest finite expected magnitude)."""
    assert isinstance(out, torch.Tensor), f"{what}: got {type(out).__name__}"
    assert out.shape == expected.shape and out.dtype == expected.dtype, \
        f"{what}: {tuple(out.shape)} {out.dtype}, expected {tuple(expected.shape)} {expected.dtype}"
    assert out.device == expected.device, f"{what}: on {out.device}, expected {expected.device}"
    if rounding.bit_exact and torch.equal(out, expected):  # the common case, in one op (no NaN)
        return
    finite = torch.isfinite(expected)
    if not finite.all() or not torch.isfinite(out).all():
        for mask in (torch.isnan, torch.isposinf, torch.isneginf):
            assert torch.equal(mask(out), mask(expected)), f"{what}: {mask.__name__} differs from the reference's"
    if rounding.bit_exact:
        assert torch.equal(out[finite], expected[finite]), f"{what}: not the reference's bits"
        return
    if not finite.any():
        return
    got, want = out[finite].double(), expected[finite].double()
    bound = rounding.bound(torch.finfo(out.dtype).eps, out.dtype == torch.float64) * want.abs().max().item()
    err = (got - want).abs().max().item()
    assert err <= bound, f"{what}: off by {err:.3g} > {bound:.3g} ({rounding})"


def assert_memory_format(out: torch.Tensor, memory_format: torch.memory_format, what: str) -> None:
    assert out.numel() == 0 or out.is_contiguous(memory_format=memory_format), \
        f"{what}: strides {out.stride()} are not {memory_format}"


def _overload(qualname: str) -> torch._ops.OpOverload:
    namespace, name = qualname.split("::")
    return getattr(getattr(torch.ops, namespace), name).default


class OpTester:
    """Subclass it once per public op (``class TestUpsampleAdd(OpTester)``) and declare:

    op: the op's name in ``dispatch.TABLE`` and ``selection.ROUNDING``.
    function: the public function. reference: the pure-PyTorch reference, same signature (out of
        place, also for an in-place op).
    samples(device, dtype, layout): fresh random inputs (never zeros): odd sizes, non-2x ratios,
        1x1 maps, batch 0 where the op allows; the first ``quick`` are the representative ones
        the costly checks (opcheck, gradcheck, compile, export, script) run.
    backends, dtypes, layouts: what it runs on (devices: conftest's ``device``, both).
    differentiable: it has autograd (else inputs that need grad must be refused).
    mutates: index of the argument written in place, or None.
    registered: {implementation: qualnames of its registered ops} for opcheck; ``opcheck_calls``
        maps a sample to their arguments.
    script_form: the op's TorchScript form wrapped in a function torch.jit.script compiles, or
        None with ``no_script_form`` saying why.
    unreached: {implementation: why no sample reaches it} (test_routes_reached).

    Op-specific tests go in the subclass; those taking ``backend`` and ``device`` run with that
    backend in use (skipping where it cannot run), like the base class's.
    """
    op: str
    function: Callable
    reference: Callable
    backends: Tuple[str, ...] = BACKENDS
    dtypes: Tuple[torch.dtype, ...] = DTYPES
    layouts: Tuple[str, ...] = ("contiguous", "channels_last")
    differentiable: bool = False
    mutates: Optional[int] = None
    registered: Dict[str, Tuple[str, ...]] = {}
    script_form: Optional[Callable] = None
    no_script_form: str = ""
    unreached: Dict[str, str] = {}
    # Inputs (argument positions) the non-finite test writes NaN and +-inf into.
    non_finite_inputs: Tuple[int, ...] = (0,)
    quick = 4
    opchecked = 2  # samples per layout opcheck runs (float32; the first one also in float16)
    # {backend: why} programs exported with it are known not to decompose to ATen (export_gap)
    export_gaps: Dict[str, str] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name in ("function", "reference", "script_form"):  # plain functions, not methods
            if callable(cls.__dict__.get(name)) and not isinstance(cls.__dict__[name], staticmethod):
                setattr(cls, name, staticmethod(cls.__dict__[name]))
        # Tests that do not apply to the op are not collected at all (rather than skipped).
        applies = {"test_backward": cls.differentiable, "test_gradcheck": cls.differentiable,
                   "test_refuses_grad": not cls.differentiable, "test_opcheck": bool(cls.registered)}
        for name, applicable in applies.items():
            if not applicable:
                setattr(cls, name, None)
            elif getattr(cls, name) is None:  # turned off in a parent tester
                setattr(cls, name, getattr(OpTester, name))

    # ---------------------------------------------------------------- what a subclass may override

    def samples(self, device: str, dtype: torch.dtype, layout: str) -> List[Sample]:
        raise NotImplementedError

    def implementation(self, sample: Sample, device: str) -> str:
        """The implementation the op resolves to for this call, under the backend in use."""
        return dispatch.resolve(self.op, device)

    def output_format(self, sample: Sample) -> torch.memory_format:
        """The memory format the op's output must have: by default its first tensor's."""
        return memory_format_of(sample.tensors()[0])

    def expected(self, sample: Sample, implementation: str):
        """What the implementation must return for the sample: by default the reference's output."""
        return self.reference(*sample.args, **sample.kwargs)

    def reference_grads(self, sample: Sample, grad: torch.Tensor, backend: str, device: str) -> List[Optional[torch.Tensor]]:
        """The gradients the op must give for each tensor of ``sample`` (None: not floating):
        by default the reference's autograd."""
        ref = leaves(sample.replaced([t.detach().clone() for t in sample.tensors()]))
        self.reference(*ref.args, **ref.kwargs).backward(grad)
        return [t.grad if t.is_floating_point() else None for t in ref.tensors()]

    def export_gap(self, backend: str, sample: Sample) -> Optional[str]:
        """Why the program exported for this call is known not to decompose to ATen, or None."""
        return self.export_gaps.get(backend)

    def opcheck_calls(self, implementation: str, sample: Sample) -> List[Tuple[str, tuple]]:
        """(qualname, arguments) for opcheck: by default each registered op called with the
        sample's arguments (leaves that require grad for an autograd op)."""
        call = leaves(sample) if self.differentiable else sample
        return [(name, call.args) for name in self.registered[implementation]]

    # ---------------------------------------------------------------- parametrisation

    def pytest_generate_tests(self, metafunc):
        already = {name.strip() for marker in metafunc.definition.iter_markers("parametrize")
                   for name in (marker.args[0].split(",") if isinstance(marker.args[0], str) else marker.args[0])}
        params = {
            "backend": list(self.backends),
            "dtype": [pytest.param(d, id=str(d).replace("torch.", "")) for d in self.dtypes],
            "layout": list(self.layouts),
            "implementation": sorted(self.registered),
        }
        for name, values in params.items():
            if name in metafunc.fixturenames and name not in already:
                metafunc.parametrize(name, values)

    @pytest.fixture(autouse=True)
    def _in_use(self, request, monkeypatch):
        """The test's backend in use (skipping where it cannot run on the device), and IEEE
        float32 on CUDA: the declared bounds are TF32-free (``selection.Rounding``)."""
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the reference convs; lateral's GEMM follows
        params = request.node.callspec.params if hasattr(request.node, "callspec") else {}
        if "backend" not in params:
            yield
            return
        device = params["device"]  # a test taking backend takes device
        require(params["backend"], device)
        with ops.use_backend(params["backend"]):
            yield

    # ---------------------------------------------------------------- helpers

    def _samples(self, device: str, dtype: torch.dtype, layout: str, backend: str = "") -> List[Sample]:
        samples = self.samples(device, dtype, layout)
        if backend == "triton" and device == "cpu":
            samples = [s for s in samples if s.interpreter]
        return samples

    def rounding(self, implementation: str) -> selection.Rounding:
        key = (self.op, implementation)
        assert key in selection.ROUNDING, f"declare how {implementation} rounds {self.op} in selection.ROUNDING"
        return selection.ROUNDING[key]

    def contract(self, device: str, backend: str) -> selection.Rounding:
        """The loosest rounding among the implementations the backend may run for the op: what
        any call of it honours, whichever route it takes (compiled, exported, scripted...)."""
        row = dispatch.TABLE.get((self.op, device))
        roundings = [self.rounding(i) for i in (row[backend] if row is not None else ("torch",))]
        return selection.Rounding(max(r.sums for r in roundings), max(r.roundings for r in roundings))

    def _fresh(self, sample: Sample) -> Sample:
        """The sample itself, or for an in-place op a copy to write into."""
        return sample if self.mutates is None else sample.replaced([t.clone() for t in sample.tensors()])

    def _call(self, sample: Sample, device: str):
        with sample.routes(device):
            return self.function(*sample.args, **sample.kwargs)

    # ---------------------------------------------------------------- the tests

    def test_forward(self, device, backend, dtype, layout):
        for sample in self._samples(device, dtype, layout, backend):
            with sample.routes(device):
                implementation = self.implementation(sample, device)
            what = f"{sample.name} via {implementation}"
            expected = self.expected(sample, implementation)
            before = [t.clone() for t in sample.tensors()]
            target = sample.args[self.mutates] if self.mutates is not None else None
            around = None if target is None or target._base is None else target._base.clone()
            out = self._call(sample, device)
            for i, (t, t0) in enumerate(zip(sample.tensors(), before)):
                assert t is target or torch.equal(t, t0), f"{what}: input {i} was changed"
            if target is not None:
                assert out is target, f"{what}: the in-place op did not return its argument"
                if around is not None:  # a view: written through, everything outside it as it was
                    around.as_strided(target.shape, target.stride(), target.storage_offset()).copy_(expected)
                    assert torch.equal(target._base, around), f"{what}: wrote outside the view"
            assert_within(out, expected, self.rounding(implementation), what)
            if target is None:
                assert_memory_format(out, self.output_format(sample), what)

    def test_backward(self, device, backend, dtype, layout):
        for sample in self._samples(device, dtype, layout, backend):
            with sample.routes(device):
                implementation = self.implementation(sample, device)
            call = leaves(sample)
            out = self._call(call, device)
            grad = grad_like(out, layout)
            expected = self.reference_grads(sample, grad, backend, device)
            out.backward(grad)
            for i, (t, want) in enumerate(zip(call.tensors(), expected)):
                if want is None:
                    continue
                what = f"{sample.name} via {implementation}: gradient of input {i}"
                assert_within(t.grad, want, self.rounding(implementation), what)
                assert_memory_format(t.grad, memory_format_of(want), what)

    def test_gradcheck(self, device, backend, layout):
        samples = [s for s in self._samples(device, torch.float64, layout, backend)
                   if 0 < max(t.numel() for t in s.tensors()) <= 2048][:self.quick]
        assert samples, "no sample small enough for gradcheck"
        for sample in samples:
            call = leaves(sample)

            def function(*tensors, _call=call):
                return self._call(_call.replaced(tensors), device)

            assert torch.autograd.gradcheck(function, tuple(call.tensors()), fast_mode=True), sample.name

    def test_refuses_grad(self, device, backend):
        sample = self._samples(device, torch.float32, self.layouts[0], backend)[0]
        floating = [i for i, t in enumerate(sample.tensors()) if t.is_floating_point()]
        for i in floating:
            call = sample.replaced([t.clone().requires_grad_(j == i) for j, t in enumerate(sample.tensors())])
            before = [t.detach().clone() for t in call.tensors()]
            with pytest.raises(RuntimeError, match="no gradient|inference only"):
                self._call(call, device)
            assert all(torch.equal(t.detach(), t0) for t, t0 in zip(call.tensors(), before)), \
                f"{sample.name}: refused, but an input was changed"
            for mode in (torch.no_grad, torch.inference_mode):  # module parameters require grad
                with mode():
                    self._call(call, device)

    def test_non_finite(self, device, backend, dtype):
        samples = [s for s in self._samples(device, dtype, self.layouts[0], backend)
                   if all(isinstance(s.args[i], torch.Tensor) and s.args[i].numel() >= 3
                          for i in self.non_finite_inputs)][:self.quick]
        assert samples, "no sample to write NaN and inf into"
        for sample in samples:
            for i in self.non_finite_inputs:  # at three distinct random places of each
                t = sample.args[i]
                places = torch.unravel_index(torch.randperm(t.numel())[:3], t.shape)
                for k, value in enumerate((float("nan"), float("inf"), float("-inf"))):
                    t[tuple(int(p[k]) for p in places)] = value
            with sample.routes(device):
                implementation = self.implementation(sample, device)
            expected = self.expected(sample, implementation)
            out = self._call(sample, device)
            assert_within(out, expected, self.contract(device, backend), f"{sample.name} via {implementation}")

    def test_opcheck(self, device, implementation):
        reason = dispatch.unavailable_reason(implementation, device)
        if reason is not None:
            pytest.skip(f"{implementation} cannot run on {device}: {reason}")
        checked = set()
        samples = [s for layout in self.layouts[:2] for s in self.samples(device, torch.float32, layout)[:self.opchecked]]
        samples.append(self.samples(device, torch.float16, self.layouts[0])[0])
        for sample in samples:
            for qualname, args in self.opcheck_calls(implementation, sample):
                torch.library.opcheck(_overload(qualname), args)
                checked.add(qualname)
        assert checked == set(self.registered[implementation]), checked

    def _quick(self, device, backend="", layouts=None) -> List[Sample]:
        """float32 samples for the costly checks: the first quick / 2 of each of the first two layouts."""
        return [s for layout in (layouts or self.layouts[:2])
                for s in self._samples(device, torch.float32, layout, backend)[:self.quick // 2]]

    def _traced(self, device, backend) -> List[Sample]:
        """The fewer samples compile traces (each a compilation): the quick ones of the first
        layout and the first of the second."""
        first, *second = [self._samples(device, torch.float32, layout, backend) for layout in self.layouts[:2]]
        return first[:self.quick // 2] + [s[0] for s in second]

    def test_compile(self, device, backend):
        torch._dynamo.reset()
        try:
            for sample in self._traced(device, backend):
                expected = self.reference(*sample.args, **sample.kwargs)
                compiled = torch.compile(lambda args, kwargs: self.function(*args, **kwargs), fullgraph=True,
                                         backend="aot_eager", dynamic=False)
                call = leaves(sample) if self.differentiable else self._fresh(sample)
                with sample.routes(device):
                    out = compiled(call.args, call.kwargs)
                assert_within(out.detach(), expected, self.contract(device, backend), f"compiled, {sample.name}")
                if self.differentiable and out.numel():
                    grad = grad_like(out, "contiguous")
                    got = torch.autograd.grad(out, [t for t in call.tensors() if t.requires_grad], grad,
                                              allow_unused=True)
                    eager = leaves(sample)
                    want = torch.autograd.grad(self._call(eager, device), [t for t in eager.tensors() if t.requires_grad],
                                               grad, allow_unused=True)
                    for g, w in zip(got, want):
                        if w is not None:
                            assert_within(g, w, self.contract(device, backend), f"compiled backward, {sample.name}")
        finally:
            torch._dynamo.reset()

    @pytest.mark.cuda
    def test_compile_inductor(self):
        """On a GPU the Triton ops are triton_ops: inductor sees (and may fuse around) their kernels."""
        torch._dynamo.reset()
        try:
            sample = self._quick("cuda", layouts=self.layouts[:1])[0]
            compiled = torch.compile(lambda args, kwargs: self.function(*args, **kwargs), fullgraph=True)
            with torch.no_grad():
                out = compiled(sample.args, sample.kwargs)
            expected = self.reference(*sample.args, **sample.kwargs)
            assert_within(out, expected, self.contract("cuda", "auto"), f"inductor, {sample.name}")
        finally:
            torch._dynamo.reset()

    def test_script(self, device):
        if self.script_form is None:
            pytest.skip(f"{self.op} has no TorchScript form: {self.no_script_form}")
        scripted = torch.jit.script(self.script_form)
        for sample in self._quick(device):
            expected = self.reference(*sample.args, **sample.kwargs)
            if self.differentiable:
                call, eager = leaves(sample), leaves(sample)
                out = scripted(*call.args, **call.kwargs)
                grad = grad_like(out, "contiguous")
                out.backward(grad)
                self.function(*eager.args, **eager.kwargs).backward(grad)
                for t, e in zip(call.tensors(), eager.tensors()):
                    if e.grad is not None:
                        assert_within(t.grad, e.grad, self.contract(device, "auto"), f"scripted backward, {sample.name}")
                out = out.detach()
            else:
                call = self._fresh(sample)
                out = scripted(*call.args, **call.kwargs)
            assert_within(out, expected, self.contract(device, "auto"), f"scripted, {sample.name}")

    def _exported(self, sample: Sample, device: str):
        function = self.function

        class Step(torch.nn.Module):
            def forward(self, *args, **kwargs):
                return function(*args, **kwargs)

        call = self._fresh(sample)
        with sample.routes(device), torch.no_grad():
            return torch.export.export(Step(), call.args, call.kwargs)

    def test_export(self, device, backend):
        """``torch.export`` of a module calling the op gives a program that computes the op; and
        ``fpn_fast.decompositions()`` makes it a program of ATen ops, which runs without fpn_fast.
        A decomposition the subclass declares a known gap (``export_gap``) must fail, the others
        pass; the test then reports the gaps as an expected failure (xfail), and fails once one
        closes."""
        failed, gaps = {}, {}
        for sample in self._samples(device, torch.float32, self.layouts[0], backend)[:self.quick // 2]:
            expected = self.reference(*sample.args, **sample.kwargs)
            program = self._exported(sample, device)
            out = program.module()(*self._fresh(sample).args, **sample.kwargs)
            assert_within(out, expected, self.contract(device, backend), f"exported, {sample.name}")
            gap = self.export_gap(backend, sample)
            if gap is not None:
                gaps[sample.name] = gap
            try:
                program = program.run_decompositions(fpn_fast.decompositions())
                left = [str(node.target) for node in program.graph.nodes if node.op == "call_function"
                        and "fpn_fast" in str(node.target) + str(node.args[:1])]
                assert not left, f"{sample.name}: not decomposed: {left}"
                out = program.module()(*sample.args, **sample.kwargs)
                assert_within(out, expected, self.contract(device, backend), f"decomposed, {sample.name}")
            except Exception as error:  # compared with the declared gaps below
                failed[sample.name] = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        unexpected = {name: why for name, why in failed.items() if name not in gaps}
        assert not unexpected, f"not decomposed: {unexpected}"
        closed = sorted(set(gaps) - set(failed))
        assert not closed, f"declared gaps that now decompose (drop them from export_gap): {closed}"
        if gaps:
            pytest.xfail("the exported programs run; not decomposed: " + "; ".join(sorted(set(gaps.values()))))

    def test_routes_reached(self, device):
        """Every implementation the op's rows name on this device and that runs here is reached by
        some sample, for some backend (so test_forward held it to its rounding)."""
        row = dispatch.TABLE.get((self.op, device), {"torch": ("torch",)})
        runnable = {i for backend in self.backends for i in row.get(backend, ())
                    if dispatch.unavailable_reason(i, device) is None}
        reached = set()
        for backend in self.backends:
            if ops.available_backends()[backend][device] is not None:
                continue
            with ops.use_backend(backend):
                for dtype in self.dtypes:
                    for layout in self.layouts:
                        for sample in self._samples(device, dtype, layout, backend):
                            with sample.routes(device):
                                reached.add(self.implementation(sample, device))
        missing = runnable - reached - set(self.unreached)
        assert not missing, f"no sample reaches {sorted(missing)} (add one, or say why in `unreached`)"
