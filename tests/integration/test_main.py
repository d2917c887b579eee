"""`python -m fpn_fast --model backbone` (the backbone alone, per backend) end to end, at a small size.
The detector job has its tests in test_main_detector.py."""
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest

LEVELS = {"0": (32, 40), "1": (16, 20), "2": (8, 10), "3": (4, 5), "pool": (2, 3)}  # for 128x160
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def run_main(*args, timeout=300):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # tests/conftest.py sets it; the job must see a plain environment
    env.pop("FPN_FAST_BACKEND", None)
    return subprocess.run([sys.executable, "-m", "fpn_fast", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def main_in_process(capsys, *args):
    """``fpn_fast.__main__.main(args)`` in this process (no interpreter start: the error cases,
    one of which each test also runs through ``run_main``): a CompletedProcess-like result."""
    from fpn_fast.__main__ import main
    capsys.readouterr()
    try:
        code = main(list(args))
    except SystemExit as exit:
        code = exit.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["fpn_fast", *args], code, out, err)


def run_main_or_in_process(capsys, in_subprocess: bool, *args, timeout=120):
    return run_main(*args, timeout=timeout) if in_subprocess else main_in_process(capsys, *args)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("main")
    args = ["--model", "backbone", "--size", "128x160", "--batch", "1", "--repeats", "2", "--warmup", "1",
            "--device", "cpu", "--json", str(tmp / "out.json")]
    if HAS_MATPLOTLIB:
        args += ["--report", str(tmp / "out.png")]
    proc = run_main(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp / "out.json") as f:
        return proc, json.load(f), tmp


def test_prints_backends_pyramid_diffs_and_table(small_run):
    proc, _, _ = small_run
    out = proc.stdout
    for heading in ("Backends", "Pyramid", "Largest difference", "Timings", "runtime"):
        assert heading in out
    assert "1 x 256 x 32 x 40" in out and "1 x 256 x 2 x 3" in out
    assert "triton     unavailable:" in out  # never timed through the CPU interpreter
    for row in ("neck      fpn_fast torch", "backbone  fpn_fast torch"):
        assert row in out
    assert "[fpn-fast]" in proc.stderr and "[fpn-fast]" not in out  # progress goes to stderr


def test_json_structure(small_run):
    _, result, _ = small_run
    assert set(result) >= {"machine", "config", "backends", "pyramid", "diffs", "timings", "speedups", "runtime_s"}
    assert result["mode"] == "backbone"
    assert result["machine"]["versions"]["torch"]
    assert result["backends"]["torch"]["available"] is True
    assert result["backends"]["triton"]["available"] is False and result["backends"]["triton"]["reason"]
    assert list(result["pyramid"]) == list(LEVELS)
    for level, (h, w) in LEVELS.items():
        assert result["pyramid"][level] == [1, 256, h, w]
    available = [name for name in ("torch", "extension") if result["backends"][name]["available"]]
    assert list(result["diffs"]) == available
    for name, diff in result["diffs"].items():
        # float32 rounding only (the extension path runs its convolutions in channels_last and
        # the lateral conv as a matmul): judged relative to the output's scale
        assert 0 <= diff["vs_reference"]["rel"] < 1e-5, (name, diff)
        if result["torchvision"]:
            assert 0 <= diff["vs_torchvision"]["rel"] < 1e-4, (name, diff)
    for part in ("neck", "backbone"):
        rows = result["timings"][part]
        assert [f"fpn_fast {name}" for name in available] == [k for k in rows if k.startswith("fpn_fast")]
        for t in rows.values():
            assert 0 < t["min"] <= t["median"] <= t["max"] and t["runs"] == 2
        assert all(s > 0 for s in result["speedups"][part].values())
        assert result["speedups"][part][result["speedup_baseline"]] == pytest.approx(1.0)


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="matplotlib is not installed")
def test_plot_writes_png(small_run):
    _, _, tmp = small_run
    with open(tmp / "out.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args", [["--size", "banana"], ["--dtype", "float64"], ["--bogus"]])
def test_bad_flag_is_a_clean_usage_error(args, capsys):
    proc = run_main_or_in_process(capsys, args == ["--bogus"], *args)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and "Traceback" not in proc.stderr


def test_unavailable_backend_is_a_clean_error():
    proc = run_main("--model", "backbone", "--device", "cpu", "--backend", "triton", "--size", "64x64", timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("fpn-fast: error: backend 'triton' cannot run") and proc.stderr.count("\n") == 1


@pytest.mark.parametrize("args", [["--model", "backbone", "--images", "x.png"], ["--size", "64x64"],
                                  ["--backend", "all"], ["--json", "/no/such/folder/out.json"]])
def test_option_of_the_other_job_is_a_usage_error(args, capsys):
    proc = run_main_or_in_process(capsys, args == ["--size", "64x64"], *args)
    assert proc.returncode == 2
    assert "usage:" in proc.stderr and "Traceback" not in proc.stderr


def _main_without(run_python, block):
    """``python -m fpn_fast --model backbone`` in a process where the modules ``block`` are missing."""
    return run_python("""
        import runpy, sys
        sys.argv = ["fpn_fast", "--model", "backbone", "--size", "64x64", "--device", "cpu"]
        runpy.run_module("fpn_fast", run_name="__main__", alter_sys=True)
    """, unset=("TRITON_INTERPRET", "FPN_FAST_BACKEND"), block=block, timeout=120)


def test_missing_demo_extra_is_a_clean_error(run_python):
    proc = _main_without(run_python, ["tqdm"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith("fpn-fast: error: no module named 'tqdm'") and proc.stderr.count("\n") == 1
    assert 'pip install "fpn_fast[demo]"' in proc.stderr


def test_missing_module_of_fpn_fast_itself_is_not_blamed_on_the_extra(run_python):
    proc = _main_without(run_python, ["fpn_fast.demo.report"])
    assert proc.returncode == 1
    assert "Traceback" in proc.stderr and "ModuleNotFoundError" in proc.stderr and "fpn_fast.demo.report" in proc.stderr
    assert "fpn_fast[demo]" not in proc.stderr


def test_demo_extra_holds_the_modules_the_command_line_needs():
    from fpn_fast.__main__ import DEMO_EXTRA_MODULES

    with open(os.path.join(os.path.dirname(__file__), os.pardir, os.pardir, "setup.py")) as f:
        extra = re.search(r'"demo":\s*\[([^\]]*)\]', f.read())
    assert extra, "setup.py has no 'demo' extra"
    distributions = [re.match(r'\s*"([A-Za-z0-9_.-]+)', spec).group(1).lower() for spec in extra.group(1).split(",")
                     if spec.strip()]
    import_names = {"scikit-image": "skimage", "pillow": "PIL"}
    assert sorted(import_names.get(d, d) for d in distributions) == sorted(DEMO_EXTRA_MODULES)


# The main job's own packages (the "demo" extra) that the core must not pull in; torch itself
# imports tqdm (torch.hub), so the core is checked with them missing as well as by what it adds.
_DEMO_ONLY = ("tqdm", "skimage", "matplotlib")


def test_core_never_imports_the_main_job(run_python):
    proc = run_python("""
        import json, sys
        import torch
        try:
            import torchvision  # optional for the core: what it imports is not the core's
        except ImportError:
            pass
        before = set(sys.modules)
        import fpn_fast
        added = sorted(set(sys.modules) - before)
        print("MODULES " + json.dumps(added))
    """, unset=("FPN_FAST_BACKEND",))
    assert proc.returncode == 0, proc.stderr[-3000:]
    added = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("MODULES "))[8:])
    assert "fpn_fast" in added
    assert [m for m in added if m == "fpn_fast.demo" or m.startswith("fpn_fast.demo.")] == []
    assert [m for m in added if m.partition(".")[0] in _DEMO_ONLY] == []


def test_core_imports_without_the_demo_extra(run_python):
    proc = run_python("""
        import sys
        import fpn_fast
        model = fpn_fast.resnet50_fpn_backbone(weights=None)
        print("DEMO " + str(sorted(m for m in sys.modules if m.startswith("fpn_fast.demo"))))
    """, unset=("FPN_FAST_BACKEND",), block=_DEMO_ONLY)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "DEMO []" in proc.stdout


SMALL = ["--model", "backbone", "--size", "64x96", "--batch", "1", "--repeats", "1", "--warmup", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def optimized_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("optimize") / "out.json"
    proc = run_main(*SMALL, "--optimize", "--json", str(path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(path) as f:
        return proc, json.load(f)


def test_optimize_adds_a_checked_and_timed_variant(optimized_run):
    proc, result = optimized_run
    assert result["config"]["optimize"] is True and result["config"]["compile"] is False
    diff = result["diffs"]["optimized"]
    for against in ("vs_reference", "vs_torchvision"):
        # norms folded in float64 and summed in another order: float32 rounding, per level
        assert 0 < diff[against]["level_rel"] < 1e-4, diff
        assert diff[against]["rel"] <= diff[against]["level_rel"]
    assert result["parity"] == {"bound": 1e-4, "applies": True,
                                "within": {"vs_reference": True, "vs_torchvision": True}}
    for part in ("neck", "backbone"):
        assert "fpn_fast optimized" in result["timings"][part]
        assert result["speedups"][part]["fpn_fast optimized"] > 0
        assert f"{part:<9} fpn_fast optimized" in proc.stdout
    assert result["optimized_first_call_s"] > 0
    assert result["compile_s"] is None and result["speedups_vs_compiled"] is None
    assert "optimized within 0.0001 of each level's largest value" in proc.stdout
    assert "vs reference yes" in proc.stdout and "vs torchvision yes" in proc.stdout


def test_optimize_outside_the_parity_bound_fails_the_job(monkeypatch, capsys):
    """A wrong fold must not pass as a timing: shift one output conv's bias of the optimized copy."""
    import fpn_fast
    from fpn_fast.demo import cli

    real = fpn_fast.optimize_for_inference

    def broken(model):
        optimized = real(model)
        optimized.fpn.layer_blocks[0].bias.data += 1.0
        return optimized
    monkeypatch.setattr(fpn_fast, "optimize_for_inference", broken)
    assert cli.main(SMALL + ["--backend", "torch", "--optimize"]) == 1
    out = capsys.readouterr().out
    assert "FAILED fpn_fast optimized: outside the float32 parity bound" in out
    assert "vs reference NO" in out
    assert "backbone  fpn_fast optimized" in out  # still timed: the report says which numbers to distrust


def test_parity_bound_applies_to_ieee_float32_only(monkeypatch):
    import torch
    from fpn_fast.demo.parity import parity_applies

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert parity_applies(torch.float32, cpu)
    assert not parity_applies(torch.bfloat16, cpu) and not parity_applies(torch.float16, cuda)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)  # torch's default: TF32 convolutions
    assert not parity_applies(torch.float32, cuda)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert parity_applies(torch.float32, cuda)


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile recording its arguments and tracing with dynamo's eager backend: the wiring of
    --compile without an inductor max-autotune compile (about a minute per model on this CPU)."""
    import torch

    calls, real = [], torch.compile

    def fake(model, **kwargs):
        calls.append((type(model).__name__, kwargs))
        return real(model, backend="eager", dynamic=kwargs["dynamic"])
    monkeypatch.setattr(torch, "compile", fake)
    yield calls
    torch._dynamo.reset()


def test_compile_adds_torchvision_max_autotune(eager_compile, capsys, tmp_path):
    from fpn_fast.demo import cli

    assert cli.main(SMALL + ["--backend", "torch", "--compile", "--json", str(tmp_path / "out.json")]) == 0
    assert eager_compile == [("BackboneWithFPN", {"mode": "max-autotune", "dynamic": False}),
                             ("FeaturePyramidNetwork", {"mode": "max-autotune", "dynamic": False})]
    with open(tmp_path / "out.json") as f:
        result = json.load(f)
    assert list(result["compile_s"]) == ["backbone", "neck"] and all(s > 0 for s in result["compile_s"].values())
    assert result["diffs"]["max-autotune"]["vs_torchvision"]["rel"] < 1e-6  # the same ops, traced
    for part in ("neck", "backbone"):
        assert list(result["timings"][part]) == ["torchvision eager", "torchvision max-autotune", "fpn_fast torch"]
        assert result["speedups_vs_compiled"][part]["torchvision max-autotune"] == pytest.approx(1.0)
    out = capsys.readouterr().out
    assert "torchvision max-autotune: compile (first call) backbone" in out
    assert "vs max-autotune" in out and "backbone  torchvision max-autotune" in out
