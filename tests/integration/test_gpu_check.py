"""The GPU check's own plan (benchmarks/gpu_check.sh), checked on CPU: a budget its required steps
cannot fit fails before anything runs, and the summary check refuses a summary that does not open
with the headline table. (``make gpu-check-dry`` runs the whole script at tiny sizes.)"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import summarize  # noqa: E402  (benchmarks/ is not a package)


def test_plan_over_budget_fails_before_any_step(tmp_path):
    env = dict(os.environ, GPU_CHECK_DRY="1", T_TOTAL="300", OUT=str(tmp_path), PYTHON=sys.executable)
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "exceed T_TOTAL=300 s" in result.stdout
    assert "=== [" in result.stdout and "environment" not in result.stdout  # nothing else ran
    assert not (tmp_path / "headline.json").exists()


def _summary(rows, columns=("b2-tf32", "b2-bf16"), title=summarize.HEADLINE_TITLE):
    lines = ["gpu_check (dry run: 1) at abc, 10 s", f"{title} (cpu, torch 2.14, dry run: True)",
             "median ms per call", " " * 28 + "".join(f"{c:>18}" for c in columns)]
    lines += [f"{name:<28}" + "".join(f"{value:>18}" for value in values) for name, values in rows.items()]
    return "\n".join(lines) + "\n"


FULL = {name: ("3.10", "2.50") for name in summarize.HEADLINE_ROWS}


@pytest.mark.parametrize("case", ["complete", "row missing", "no bf16 column", "failed row", "not first"])
def test_check_headline(tmp_path, case, capsys):
    rows, columns, title = dict(FULL), ("b2-tf32", "b2-bf16"), summarize.HEADLINE_TITLE
    if case == "row missing":
        del rows["compile reduce-overhead"]
    elif case == "no bf16 column":
        columns = ("b2-tf32", "b1-tf32")
    elif case == "failed row":
        rows["fpn_fast optimized"] = ("3.00", "FAILED")
    elif case == "not first":
        title = "## first_call"
    path = tmp_path / "summary.txt"
    path.write_text(_summary(rows, columns, title))
    assert summarize.check_headline(str(path)) == (0 if case == "complete" else 1)
    printed = capsys.readouterr().out
    assert ("FAILED" in printed) == (case != "complete")


def test_benchmark_harness_imports_without_tqdm():
    """The benchmarks import fpn_fast.demo as a library; without tqdm (the demo extra's progress
    bars) only the progress bar itself fails, naming the package."""
    code = "\n".join([
        "import sys",
        "sys.modules['tqdm'] = None  # import tqdm now raises ImportError",
        "from fpn_fast.demo import build_models",
        "from fpn_fast.demo.timing import progress",
        "try:",
        "    progress(1, 'x')",
        "except ImportError as error:",
        "    print('refused:', error)",
    ])
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "refused:" in result.stdout and "tqdm" in result.stdout
