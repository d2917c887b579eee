"""The version kept in one place; ``python -m fpn_fast --version`` / ``--help`` in any installation;
and a compiled extension that does not fit the running torch: named in one line, once, and fpn_fast
runs its PyTorch implementations instead. The installs themselves (sdist, wheel, checkout,
editable, each into a fresh venv) are ``make test-install`` (tests/integration/install_check.py).

The mismatch tests build nothing: they run a copy of the package whose build record (the
``_C_build.json`` setup.py writes beside the library) names another torch, or whose library cannot
be loaded (a file that is no library: the loader's error stands in for the undefined symbol of a
library built for another torch)."""
import importlib.machinery
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fpn_fast
from fpn_fast.ops import _extension

REPO_ROOT = Path(__file__).resolve().parents[2]

HAS_DEMO_EXTRA = all(importlib.util.find_spec(m) is not None for m in ("torchvision", "skimage", "PIL", "tqdm"))


def test_version_is_kept_in_one_place():
    init = (REPO_ROOT / "fpn_fast" / "__init__.py").read_text()
    assert re.findall(r'^__version__ = "([^"]+)"$', init, re.M) == [fpn_fast.__version__]
    setup = (REPO_ROOT / "setup.py").read_text()
    assert "version=_version()" in setup and not re.search(r'version\s*=\s*["\']', setup)
    # What setuptools writes into the package metadata.
    proc = subprocess.run([sys.executable, "setup.py", "--version"], cwd=REPO_ROOT, capture_output=True, text=True,
                          env=dict(os.environ, FPN_FAST_CUDA="0"), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == fpn_fast.__version__


def _main(*args, cwd=REPO_ROOT):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FPN_FAST_BACKEND")}
    return subprocess.run([sys.executable, "-m", "fpn_fast", *args], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


def test_version_names_the_torch_the_extension_was_built_against():
    proc = _main("--version")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr[-2000:]
    assert proc.stdout.count("\n") == 1
    assert proc.stdout.startswith(f"fpn_fast {fpn_fast.__version__} (torch {torch.__version__}; ")
    reason = _extension.unavailable_reason("cpu")
    if reason is None:
        # The extension the test command built: its record names this torch.
        assert _extension.build_record() is not None, "the loaded extension has no build record: rebuild it"
        assert f"extension built against torch {torch.__version__}, " in proc.stdout
    else:
        assert f"extension not used: {reason}" in proc.stdout


def test_help_without_the_demo_extra(run_python):
    proc = run_python("""
        import runpy, sys
        sys.argv = ["fpn_fast", "--help"]
        runpy.run_module("fpn_fast", run_name="__main__", alter_sys=True)
    """, unset=("TRITON_INTERPRET", "FPN_FAST_BACKEND"), block=["tqdm"], timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("usage: fpn-fast") and "no module named 'tqdm'" in proc.stdout
    assert 'pip install "fpn_fast[demo]"' in proc.stdout and "--version" in proc.stdout
    assert "Traceback" not in proc.stderr


@pytest.mark.skipif(not HAS_DEMO_EXTRA, reason="the demo extra is not installed")
def test_help_with_the_demo_extra_is_the_jobs():
    proc = _main("--help")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--model" in proc.stdout and "--images" in proc.stdout and "fpn_fast[demo]" not in proc.stdout


# ---- an extension that does not fit the running torch -----------------------------------------

LIBRARY = "_C" + importlib.machinery.EXTENSION_SUFFIXES[0]


def _package_copy(tmp_path, record, library=b"not a shared library\n"):
    """A copy of the fpn_fast package under tmp_path with the given build record (None: none) and
    library file (None: none)."""
    dest = tmp_path / "fpn_fast"
    shutil.copytree(REPO_ROOT / "fpn_fast", dest,
                    ignore=shutil.ignore_patterns("__pycache__", "_C.*", _extension.BUILD_RECORD))
    if library is not None:
        (dest / LIBRARY).write_bytes(library)
    if record is not None:
        (dest / _extension.BUILD_RECORD).write_text(json.dumps(record))
    return tmp_path


# Imports the copy, then shows what runs: the op under auto against the reference, the named
# backend, library_path, and python -m fpn_fast --version. An editable install's finder (the test
# venv's own fpn_fast) would map fpn_fast._C to its library: the copy is imported without it.
_USE_COPY = """
    import runpy, sys
    sys.path.insert(0, {root!r})
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    import torch
    import fpn_fast
    assert fpn_fast.__file__.startswith({root!r}), fpn_fast.__file__
    from fpn_fast import ops
    from fpn_fast.ops import reference
    print("LOADED", "fpn_fast._C" in sys.modules)
    lateral, top, bias = torch.randn(2, 3, 9, 14), torch.randn(2, 3, 5, 7), torch.randn(3)
    print("AUTO_EQUAL", torch.equal(ops.upsample_add(lateral, top, bias), reference.upsample_add(lateral, top, bias)))
    try:
        ops.set_backend("extension")
    except ops.BackendUnavailableError as err:
        print("NAMED", str(err).replace("\\n", " "))
    try:
        fpn_fast.library_path()
    except RuntimeError as err:
        print("LIBRARY_PATH", err)
    sys.argv = ["fpn_fast", "--version"]
    runpy.run_module("fpn_fast", run_name="__main__")
"""


def _run_copy(run_python, root):
    proc = run_python(_USE_COPY.format(root=str(root)), unset=("TRITON_INTERPRET", "FPN_FAST_BACKEND"), timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.startswith(
        ("LOADED", "AUTO_EQUAL", "NAMED", "LIBRARY_PATH", "fpn_fast ")))
    warned = [line for line in proc.stderr.splitlines() if "ExtensionMismatchWarning" in line]
    return proc, lines, warned


def _assert_falls_back_with_one_line(proc, lines, warned, message):
    # One warning, one line, pointing at the importing code (here the -c program), no traceback.
    assert len(warned) == 1 and warned[0].startswith("<string>:"), proc.stderr
    assert warned[0].endswith(f"ExtensionMismatchWarning: {message}")
    assert "Traceback" not in proc.stderr
    assert lines["LOADED"] == "False" and lines["AUTO_EQUAL"] == "True"
    assert message in lines["NAMED"] and lines["LIBRARY_PATH"] == message
    assert lines["fpn_fast"].endswith(f"extension not used: {message})")


def test_extension_built_for_another_torch_is_not_loaded(run_python, tmp_path):
    root = _package_copy(tmp_path, {"torch": "2.11.0", "torch_cuda": "12.8", "cuda_kernels": False,
                                    "cuda_arch_list": None})
    proc, lines, warned = _run_copy(run_python, root)
    message = _extension.mismatch_message("2.11.0", str(torch.__version__))
    assert message.startswith(f"fpn_fast's compiled extension was built for torch 2.11.0, but torch "
                              f"{torch.__version__} is running; fpn_fast runs its PyTorch implementations instead; "
                              "rebuild it against the running torch: pip install --no-build-isolation ")
    # The record is read before the library: the file (no library at all) was never loaded.
    _assert_falls_back_with_one_line(proc, lines, warned, message)


@pytest.mark.parametrize("record", [None, "running"], ids=["no-record", "record-of-this-torch"])
def test_extension_that_fails_to_load_is_named_in_one_line(run_python, tmp_path, record):
    running = str(torch.__version__)
    root = _package_copy(tmp_path, None if record is None else {"torch": running, "torch_cuda": None,
                                                               "cuda_kernels": False, "cuda_arch_list": None})
    proc, lines, warned = _run_copy(run_python, root)
    assert len(warned) == 1, proc.stderr
    message = warned[0].partition("ExtensionMismatchWarning: ")[2]
    built = f"torch {running}" if record else "an unrecorded torch (it has no build record)"
    assert message.startswith(f"fpn_fast's compiled extension (built for {built}) failed to load under torch "
                              f"{running}: ")
    assert LIBRARY in message  # the loader's own error, on the same line
    assert message.endswith("(in a checkout: pip install --no-build-isolation -e .)")
    _assert_falls_back_with_one_line(proc, lines, warned, message)


def test_undefined_symbol_message_is_one_line():
    error = ("/venv/lib/python3.11/site-packages/fpn_fast/_C.cpython-311-x86_64-linux-gnu.so: undefined symbol: "
             "_ZN3c106detail14torchCheckFailEPKcS2_jRKNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEE")
    message = _extension.mismatch_message("2.13.0", "2.14.1", error + "\n")
    assert "\n" not in message
    assert message.startswith("fpn_fast's compiled extension (built for torch 2.13.0) failed to load under torch "
                              "2.14.1: /venv/lib/")
    assert "undefined symbol: _ZN3c106detail14torchCheckFail" in message
    assert "pip install --no-build-isolation --no-deps --force-reinstall --no-cache-dir" in message


def test_no_library_runs_without_a_warning(run_python, tmp_path):
    root = _package_copy(tmp_path, None, library=None)
    proc, lines, warned = _run_copy(run_python, root)
    assert warned == [] and "Traceback" not in proc.stderr
    assert lines["LOADED"] == "False" and lines["AUTO_EQUAL"] == "True"
    assert "fpn_fast._C is not built" in lines["NAMED"]


@pytest.mark.skipif(_extension.unavailable_reason("cpu") is not None, reason="the extension is not built")
def test_library_without_a_record_is_loaded_without_a_warning(run_python, tmp_path):
    """A library built before fpn_fast recorded its torch (no record), that loads: used, as before."""
    root = _package_copy(tmp_path, None, library=open(_extension.library_path(), "rb").read())
    proc, lines, warned = _run_copy(run_python, root)
    assert warned == [] and "Traceback" not in proc.stderr
    assert lines["LOADED"] == "True" and lines["AUTO_EQUAL"] == "True"
    assert "NAMED" not in lines and "LIBRARY_PATH" not in lines
    assert lines["fpn_fast"].endswith("extension loaded, built before fpn_fast recorded its torch)")
