"""The install checks (``make test-install``): fpn_fast installed the four ways users install it,
each into a fresh venv, then used from there.

1. sdist: ``pip install --no-build-isolation --no-index fpn_fast-<v>.tar.gz`` (offline), the sdist
   made from a copy of the checkout (``git ls-files``) with build outputs planted in it, which it
   must leave out; pip builds a wheel from it, in a venv that never saw the checkout.
2. wheel: that wheel (pip keeps it in its cache and logs where) installed into another fresh venv
   where no compiler can run (CC, CXX false): one build of the extension for checks 1 and 2.
3. checkout: ``pip install --no-build-isolation <checkout>``; plain ``pip install <checkout>`` must
   stop with setup.py's one-line message.
4. editable: ``pip install --no-build-isolation -e <checkout>``, as ``make install`` does.

After each: ``import fpn_fast`` (no ExtensionMismatchWarning), ``fpn_fast.__version__`` equal to the
installed metadata's version, the extension's ``upsample_add`` on CPU equal to the reference, and
``python -m fpn_fast --help`` / ``--version`` (the venvs have no demo extra), all with ``python -I``
(only the venv's own site-packages on the path) from a folder outside the checkout.

A fresh venv is ``python -m venv --without-pip`` plus a ``.pth`` file that puts one folder on its
path: ``torch-site``, torch and its dependencies (setuptools among them) as hard links of the files
the running venv's pip installed from the pinned wheels (each distribution's RECORD, file by file).
Where pip builds, the venv also gets wheel and ninja, linked the same way. The same install
without unpacking 5 GB per venv, and torch at one path for every build, so the checkout's two
builds (3, 4) share ninja's objects. pip is the running venv's (``pip --python``). The extension
is built with its CPU kernels only (FPN_FAST_CUDA=0 unless set), to keep the checks to minutes:
twice from scratch (the sdist's, in pip's temporary folder; the checkout's), the editable build
then links only; the checkout copy keeps its build folder between runs, so ninja recompiles only
what changed there. Prints one line per check and a closing "N passed, N failed"; exit status 1
when a check failed.
"""
import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from importlib import metadata
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
BUILD_TOOLS = ("wheel", "ninja")
# Build outputs planted in the checkout copy before the sdist is made: none may reach the sdist.
PLANTED = ("fpn_fast/_C.cpython-311-x86_64-linux-gnu.so", "fpn_fast/_C_build.json",
           "fpn_fast/__pycache__/backbone.cpython-311.pyc", "csrc/ops/upsample_add.o", "csrc/build.ninja",
           ".venv/bin/python", "build/planted/fpn_fast/_C.cpython-311-x86_64-linux-gnu.so")

# Run in each venv after the install (python -I, from outside the checkout).
USE = r"""
import importlib.metadata, json, sys, warnings
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import torch
    import fpn_fast
from fpn_fast.ops import _extension, reference, upsample_add, use_backend
mismatch = [str(w.message) for w in caught if w.category is _extension.ExtensionMismatchWarning]
assert not mismatch, mismatch
assert _extension.unavailable_reason("cpu") is None, _extension.unavailable_reason("cpu")
record = _extension.build_record()
assert record is not None and record["torch"] == torch.__version__, (record, torch.__version__)
version = importlib.metadata.version("fpn_fast")
assert fpn_fast.__version__ == version, (fpn_fast.__version__, version)
g = torch.Generator().manual_seed(0)
lateral, top, bias = (torch.randn(2, 5, 13, 21, generator=g), torch.randn(2, 5, 7, 11, generator=g),
                      torch.randn(5, generator=g))
with use_backend("extension"):
    out = upsample_add(lateral, top, bias)
assert torch.equal(out, reference.upsample_add(lateral, top, bias)), "extension differs from the reference"
print("USE " + json.dumps({"fpn_fast": fpn_fast.__file__, "torch": torch.__file__, "version": version,
                           "record": record}))
"""


class Checks:
    def __init__(self):
        self.passed, self.failed, self.started = 0, 0, time.monotonic()

    def record(self, name: str, ok: bool, seconds: float, detail: str = "") -> bool:
        self.passed += ok
        self.failed += not ok
        print(f"install check {'PASSED' if ok else 'FAILED'} {name} ({seconds:.1f} s){': ' + detail if detail else ''}",
              flush=True)
        return ok


def run(cmd: List[str], cwd: Path, env: Optional[Dict[str, str]] = None, log: Optional[Path] = None,
        timeout: float = 1800) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if log is not None:
        log.write_text(f"$ {' '.join(map(str, cmd))}\n[exit {proc.returncode}]\n{proc.stdout}\n{proc.stderr}")
    return proc


def tail(proc: subprocess.CompletedProcess, lines: int = 25) -> str:
    return "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-lines:])


# ---- fresh venvs ----------------------------------------------------------------------------

def closure(names: Iterable[str]) -> List[metadata.Distribution]:
    """The installed distributions ``names`` and everything they require, extras included
    (torch requires ``cuda-toolkit[cublas,cudart,...]``), markers evaluated here."""
    seen: Dict[str, metadata.Distribution] = {}
    extras_done: Dict[str, set] = {}
    todo = [(name, frozenset()) for name in names]
    while todo:
        name, extras = todo.pop()
        key = re.sub(r"[-_.]+", "-", name).lower()
        if key in seen and extras <= extras_done[key]:
            continue
        dist = seen.setdefault(key, metadata.distribution(key))
        extras_done[key] = extras_done.get(key, set()) | set(extras)
        for spec in dist.requires or []:
            req = Requirement(spec)
            if req.marker is None or any(req.marker.evaluate({"extra": extra}) for extra in ("", *extras)):
                todo.append((req.name, frozenset(req.extras)))
    return list(seen.values())


def link_distributions(dists: Iterable[metadata.Distribution], site: Path, bin_dir: Optional[Path] = None) -> int:
    """Hard-link every file of ``dists`` into ``site`` where pip put it in this venv's site-packages
    (symlinks where hard links cannot be made); executables pip put in this venv's bin/ go to
    ``bin_dir`` (console scripts, which name this venv's python, are left out). Returns the number
    of files."""
    count = 0
    for dist in dists:
        for file in dist.files or []:
            source = Path(dist.locate_file(file))
            target = Path(os.path.normpath(site / file))
            if not source.is_file():
                continue
            if not target.is_relative_to(site):
                if bin_dir is None or source.parent.name != "bin" or source.read_bytes()[:2] == b"#!":
                    continue
                target = bin_dir / source.name
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(source, target)
            except FileExistsError:
                continue
            except OSError:
                os.symlink(source, target)
            count += 1
    return count


def torch_site(work: Path) -> Path:
    """A folder holding torch and what it requires, as this venv's pip installed them."""
    site = work / "torch-site"
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    link_distributions(closure(("torch",)), site)
    return site


def fresh_venv(path: Path, torch_folder: Path, build_tools: bool) -> Path:
    """A new venv (no pip) whose site-packages has a .pth file naming ``torch_folder`` and, with
    ``build_tools``, pip's build tools (wheel, ninja; setuptools comes with torch)."""
    shutil.rmtree(path, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    site = path / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
    (site / "torch-site.pth").write_text(f"{torch_folder}\n")
    if build_tools:
        have = {d.metadata["Name"].lower() for d in closure(("torch",))}
        link_distributions([d for d in closure(BUILD_TOOLS) if d.metadata["Name"].lower() not in have], site,
                           path / "bin")
    return path / "bin" / "python"


def pip(python: Path, *args: str) -> List[str]:
    return [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check", *args]


def clean_env(venv_python: Optional[Path] = None, **extra: str) -> Dict[str, str]:
    """This environment less what would point a child at the checkout or this venv."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV", "TRITON_INTERPRET", "FPN_FAST_BACKEND", "PYTHONHOME")}
    path = [p for p in env.get("PATH", "").split(os.pathsep) if Path(sys.executable).parent != Path(p)]
    if venv_python is not None:
        path.insert(0, str(venv_python.parent))
    env["PATH"] = os.pathsep.join(path)
    env.setdefault("FPN_FAST_CUDA", "0")
    env.update(extra)
    return env


# ---- the checks ------------------------------------------------------------------------------

def use_in(checks: Checks, name: str, python: Path, cwd: Path, logs: Path, expect_under: Optional[Path] = None):
    """import, version, one op against its reference; then python -m fpn_fast --help / --version."""
    env = clean_env()
    start = time.monotonic()
    proc = run([python, "-I", "-c", USE], cwd, env, logs / f"{name}-use.log")
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("USE ")), None)
    facts = json.loads(line[4:]) if line else {}
    venv = python.parent.parent
    where = Path(facts.get("fpn_fast", "/"))
    ok = (proc.returncode == 0 and bool(facts) and Path(facts["torch"]).is_relative_to(venv.parent / "torch-site")
          and where.is_relative_to(expect_under or venv))
    checks.record(f"{name}: import fpn_fast, __version__, upsample_add (extension) == reference", ok,
                  time.monotonic() - start, f"{where}, {facts.get('record')}" if ok else tail(proc))
    start = time.monotonic()
    helped = run([python, "-I", "-m", "fpn_fast", "--help"], cwd, env, logs / f"{name}-help.log")
    version = run([python, "-I", "-m", "fpn_fast", "--version"], cwd, env, logs / f"{name}-version.log")
    want = f"fpn_fast {facts.get('version')} (torch "
    ok = (helped.returncode == 0 and "usage: fpn-fast" in helped.stdout and "fpn_fast[demo]" in helped.stdout
          and version.returncode == 0 and version.stdout.startswith(want) and "extension built against torch" in
          version.stdout and version.stdout.count("\n") == 1
          # torch itself may warn (no numpy in these venvs); fpn_fast must not
          and not any(bad in helped.stderr + version.stderr
                      for bad in ("Traceback", "ExtensionMismatchWarning", "fpn-fast: error")))
    checks.record(f"{name}: python -m fpn_fast --help, --version", ok, time.monotonic() - start,
                  version.stdout.strip() if ok else tail(helped) + "\n" + tail(version))


def not_importable(checks: Checks, name: str, python: Path, cwd: Path) -> bool:
    """The fresh venv finds torch and no fpn_fast (records a failure only)."""
    probe = "import importlib.util as u; print(u.find_spec('torch') is not None, u.find_spec('fpn_fast') is None)"
    proc = run([python, "-I", "-c", probe], cwd, clean_env())
    ok = proc.returncode == 0 and proc.stdout.split() == ["True", "True"]
    return ok or checks.record(f"{name}: fresh venv has torch and no fpn_fast", ok, 0.0, tail(proc))


def copy_checkout(dest: Path) -> None:
    """The checkout's files (tracked and untracked, not ignored), as test-oldest copies them;
    ``dest``'s build/ folder (ninja's objects) stays, and files keep their times."""
    dest.mkdir(parents=True, exist_ok=True)
    for entry in dest.iterdir():
        if entry.name != "build":
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout
    subprocess.run(["tar", "--null", "--ignore-failed-read", "-T", "-", "-cf", str(dest.parent / "checkout.tar")],
                   cwd=ROOT, input=files, check=True, capture_output=True)
    subprocess.run(["tar", "-xf", str(dest.parent / "checkout.tar"), "-C", str(dest)], check=True)
    (dest.parent / "checkout.tar").unlink()


def check_sdist_contents(sdist: Path, listed: List[str]) -> List[str]:
    """Problems with the sdist's file list: a file the build needs missing, or anything else in it."""
    with tarfile.open(sdist) as tar:
        names = {m.name.partition("/")[2] for m in tar.getmembers() if m.isfile()}
    needed = {f for f in listed
              if f.startswith(("csrc/", "docs/")) or (f.startswith("fpn_fast/") and f.endswith(".py"))}
    needed |= {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md", "PKG-INFO"}
    allowed = needed | {"setup.cfg"} | {n for n in names if n.startswith("fpn_fast.egg-info/")}
    problems = [f"missing: {f}" for f in sorted(needed - names)]
    problems += [f"should not be there: {f}" for f in sorted(names - allowed)]
    return problems


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "build" / "install-check")
    work = parser.parse_args().work.resolve()
    checks = Checks()
    logs, dist, wheels = work / "logs", work / "dist", work / "wheels"
    for folder in (logs, dist, wheels, work / "pip-cache"):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    # Every pip and python of the checks runs from here: outside the checkout and its copy.
    outside = Path(tempfile.mkdtemp(prefix="fpn_fast-install-check-"))
    try:
        return run_checks(checks, work, logs, dist, wheels, outside)
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def run_checks(checks: Checks, work: Path, logs: Path, dist: Path, wheels: Path, outside: Path) -> int:
    checkout = work / "checkout"
    version = re.search(r'^__version__ = "([^"]+)"$', (ROOT / "fpn_fast" / "__init__.py").read_text(), re.M).group(1)
    print(f"install checks in {work}: fpn_fast {version}, FPN_FAST_CUDA={clean_env()['FPN_FAST_CUDA']}, "
          f"MAX_JOBS={os.environ.get('MAX_JOBS', '(ninja default)')}", flush=True)

    # The sdist, from a copy of the checkout holding build outputs it must leave out.
    start = time.monotonic()
    copy_checkout(checkout)
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                            capture_output=True, text=True).stdout.splitlines()
    for name in PLANTED:
        (checkout / name).parent.mkdir(parents=True, exist_ok=True)
        (checkout / name).write_text("planted by install_check.py\n")
    proc = run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", dist], checkout, clean_env(),
               logs / "sdist.log")
    for name in PLANTED:
        (checkout / name).unlink()
    shutil.rmtree(checkout / ".venv")
    shutil.rmtree(checkout / "fpn_fast.egg-info", ignore_errors=True)
    sdists = sorted(dist.glob("fpn_fast-*.tar.gz"))
    problems = check_sdist_contents(sdists[0], listed) if proc.returncode == 0 and sdists else [tail(proc)]
    if not checks.record("sdist from a copy of the checkout: every source and header, no build output", not problems,
                         time.monotonic() - start, f"{sdists[0].name}" if not problems else "\n".join(problems)):
        return finish(checks)
    sdist = sdists[0]

    # 1. The sdist, offline, in a venv that never saw the checkout: the one build for 1 and 2.
    start = time.monotonic()
    torch_folder = torch_site(work)
    python = fresh_venv(work / "venv-sdist", torch_folder, build_tools=True)
    if not not_importable(checks, "sdist", python, outside):
        return finish(checks)
    proc = run(pip(python, "install", "--no-build-isolation", "--no-index", "--cache-dir", work / "pip-cache", sdist),
               outside, clean_env(python), logs / "sdist-install.log")
    # pip keeps the wheel it built in its cache and says where: the wheel of check 2.
    created = re.search(r"Created wheel for fpn_fast: filename=(\S+)", proc.stdout)
    stored = re.search(r"Stored in directory: (\S+)", proc.stdout)
    if created and stored and (Path(stored.group(1)) / created.group(1)).is_file():
        shutil.copy2(Path(stored.group(1)) / created.group(1), wheels)
    built = sorted(wheels.glob("fpn_fast-*.whl"))
    if not checks.record("sdist: pip install --no-build-isolation --no-index <sdist> builds its wheel (fresh venv)",
                         proc.returncode == 0 and len(built) == 1, time.monotonic() - start,
                         built[0].name if proc.returncode == 0 and built else tail(proc)):
        return finish(checks)
    use_in(checks, "sdist", python, outside, logs)

    # 2. The wheel, where no compiler runs.
    start = time.monotonic()
    python = fresh_venv(work / "venv-wheel", torch_folder, build_tools=False)
    not_importable(checks, "wheel", python, outside)
    with zipfile.ZipFile(built[0]) as whl:
        record = json.loads(whl.read("fpn_fast/_C_build.json"))
        meta = whl.read(f"fpn_fast-{version}.dist-info/METADATA").decode()
    proc = run(pip(python, "install", "--no-index", "--only-binary", ":all:", built[0]), outside,
               clean_env(python, CC="false", CXX="false"), logs / "wheel-install.log")
    ok = (proc.returncode == 0 and f"Version: {version}\n" in meta and "Requires-Dist: torch<2.15,>=2.11" in meta
          and record["cuda_kernels"] is (clean_env()["FPN_FAST_CUDA"] == "1"))
    if checks.record("wheel: pip install <wheel> with CC=CXX=false; METADATA version, torch range, build record",
                     ok, time.monotonic() - start, f"built against torch {record['torch']}" if ok else tail(proc)):
        use_in(checks, "wheel", python, outside, logs)

    # 3. The checkout: plain pip install stops with setup.py's message; --no-build-isolation builds.
    start = time.monotonic()
    python = fresh_venv(work / "venv-checkout", torch_folder, build_tools=True)
    not_importable(checks, "checkout", python, outside)
    proc = run(pip(python, "install", checkout), outside, clean_env(python), logs / "checkout-isolated.log")
    ok = proc.returncode != 0 and "pip install --no-build-isolation" in proc.stdout + proc.stderr
    checks.record("checkout: plain pip install <checkout> stops with setup.py's one-line message", ok,
                  time.monotonic() - start, "" if ok else tail(proc))
    start = time.monotonic()
    proc = run(pip(python, "install", "--no-build-isolation", "--no-index", checkout), outside, clean_env(python),
               logs / "checkout-install.log")
    if checks.record("checkout: pip install --no-build-isolation --no-index <checkout>", proc.returncode == 0,
                     time.monotonic() - start, "" if proc.returncode == 0 else tail(proc)):
        use_in(checks, "checkout", python, outside, logs)

    # 4. Editable, as make install does.
    start = time.monotonic()
    # A fresh venv at the checkout check's path: its include folder is on the compiler's command
    # line, which then matches, so ninja finds the checkout build's objects up to date.
    python = fresh_venv(work / "venv-checkout", torch_folder, build_tools=True)
    not_importable(checks, "editable", python, outside)
    proc = run(pip(python, "install", "--no-build-isolation", "--no-index", "--no-deps", "-e", checkout), outside,
               clean_env(python), logs / "editable-install.log")
    ok = proc.returncode == 0 and (checkout / "fpn_fast" / "_C_build.json").is_file()
    if checks.record("editable: pip install --no-build-isolation -e <checkout> (record beside the in-place library)",
                     ok, time.monotonic() - start, "" if ok else tail(proc)):
        use_in(checks, "editable", python, outside, logs, expect_under=checkout)
    return finish(checks)


def finish(checks: Checks) -> int:
    cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"install checks took {time.monotonic() - checks.started:.0f} s "
          f"({cpu.ru_utime + cpu.ru_stime:.0f} s of CPU in child processes)")
    print(f"install: {checks.passed} passed, {checks.failed} failed", flush=True)
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
