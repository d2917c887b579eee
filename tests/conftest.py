"""Shared test set-up: the Triton interpreter switch, the device list, the `cuda` marker, a fresh
seed and backend per test, and the one helper for tests that need a fresh Python process."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, Iterable, Optional

import pytest
import torch

# The Triton kernels run on CPU tensors only through the interpreter, which must be
# switched on before triton (and so fpn_fast.ops) is imported. With a GPU the kernels
# are compiled for real and the CPU-tensor Triton tests are skipped.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent

# The one device list: every device-parametrised test takes the `device` fixture below.
# CUDA cases carry the `cuda` marker and skip without a GPU (pytest_collection_modifyitems).
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    return request.param


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_restore_backend():
    import fpn_fast.ops as ops

    torch.manual_seed(0)
    previous = ops.get_backend()
    yield
    ops.set_backend(previous)


def _run_python(code: str, env: Optional[Dict[str, str]] = None, unset: Iterable[str] = (),
                timeout: float = 300, block: Iterable[str] = ()) -> subprocess.CompletedProcess:
    """Run ``code`` (dedented) in a fresh ``python -c`` from the repository root; returns the
    CompletedProcess (text stdout/stderr) and never raises on a non-zero exit, so a crash or a
    signal in the child fails the calling test, not the run.

    Args:
        code: the program.
        env: variables to set on top of this process's environment.
        unset: variables to remove (e.g. TRITON_INTERPRET, which this conftest sets).
        timeout: seconds before subprocess.TimeoutExpired.
        block: modules the child cannot import (ModuleNotFoundError, as if not installed), e.g.
            ``("torchvision",)``; a name blocks its submodules too.
    """
    child_env = dict(os.environ, **(env or {}))
    for name in unset:
        child_env.pop(name, None)
    child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), child_env.get("PYTHONPATH")]))
    program = textwrap.dedent(code)
    if block:
        # None in sys.modules: importing the name (or a module inside it) raises
        # ModuleNotFoundError and importlib.util.find_spec returns None, as when not installed.
        program = f"import sys\nsys.modules.update(dict.fromkeys({tuple(block)!r}))\n" + program
    return subprocess.run([sys.executable, "-c", program], cwd=REPO_ROOT, env=child_env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def run_python():
    """The one way tests start a fresh process (crash isolation, environment read at import,
    optional packages missing): ``run_python(code, env=None, unset=(), timeout=300, block=())
    -> subprocess.CompletedProcess``."""
    return _run_python


# fpn_fast.ops is imported only now, after TRITON_INTERPRET is set above.
import fpn_fast.ops as ops  # noqa: E402


@pytest.fixture(params=sorted(ops.available_backends()))
def backend(request):
    """Each fpn_fast.ops backend that can run on CPU here (the others skip, saying why)."""
    reason = ops.available_backends()[request.param]["cpu"]
    if reason is not None:
        pytest.skip(f"backend {request.param!r} cannot run on cpu: {reason}")
    with ops.use_backend(request.param):
        yield request.param
