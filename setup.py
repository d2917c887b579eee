"""Build entry point for fpn_fast and its C++/CUDA extension ``fpn_fast._C``.

The extension is compiled against the torch that is already installed, so use
``pip install --no-build-isolation .`` (or ``-e .``, or an sdist in place of ``.``; docs/install.md).

Environment:
  FPN_FAST_CUDA=1  build the CUDA kernels or fail loudly; =0 skip them;
                   unset: build them when a CUDA toolkit is found.
  TORCH_CUDA_ARCH_LIST  honoured; defaults to "8.0;9.0".
  MAX_JOBS         parallel compile jobs (ninja).
  FPN_FAST_DEBUG_INFO=1  keep the C++ debug information (-g) that Python's own flags ask for;
                   by default it is left out (-g0), which shortens the build and shrinks the
                   library several times.

Beside the built library, fpn_fast/_C_build.json records the torch it was built against;
fpn_fast reads it before loading the library (fpn_fast/ops/_extension.py).
"""
import glob
import json
import os
import re
import shutil
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pip's isolated build env has no torch
    sys.exit("fpn_fast builds its C++/CUDA extension against the torch you have installed, and torch is not "
             "importable here (pip's isolated build environment): install torch, then run "
             "pip install --no-build-isolation . (or the sdist's path in place of .)")

ROOT = os.path.dirname(os.path.abspath(__file__))
# Written beside the built library: what it was built against (read by fpn_fast/ops/_extension.py).
BUILD_RECORD = "_C_build.json"


def _version():
    """The version, kept in one place: fpn_fast/__init__.py's ``__version__``."""
    with open(os.path.join(ROOT, "fpn_fast", "__init__.py")) as f:
        match = re.search(r'^__version__ = "([^"]+)"$', f.read(), re.M)
    if match is None:
        sys.exit("fpn_fast/__init__.py has no line __version__ = \"...\"")
    return match.group(1)


def _find_cuda_home():
    """CUDA_HOME if set, else the toolkit that owns the nvcc on PATH (resolving
    symlinks: a /usr/local/bin/nvcc link must not make /usr/local the home)."""
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    for candidate in (shutil.which("nvcc"), "/usr/local/cuda/bin/nvcc"):
        if candidate and os.path.exists(candidate):
            home = os.path.dirname(os.path.dirname(os.path.realpath(candidate)))
            if os.path.exists(os.path.join(home, "include", "cuda_runtime.h")):
                return home
    return None


def _want_cuda():
    flag = os.environ.get("FPN_FAST_CUDA", "").strip()
    home = _find_cuda_home()
    if flag == "0":
        return False, None
    if torch.version.cuda is None:
        if flag == "1":
            sys.exit("FPN_FAST_CUDA=1 but the installed torch is a CPU-only build.")
        return False, None
    if home is None:
        if flag == "1":
            sys.exit("FPN_FAST_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME.")
        return False, None
    return True, home


def _sources():
    """The extension's sources under csrc/, sorted: (CPU sources, CUDA-only sources).

    CUDA-only: every .cu, and every file in a directory named cuda/ (e.g. csrc/ops/cuda/,
    whose .cpp files include the CUDA headers); everything else is compiled in every build.
    """
    found = sorted(
        path for ext in ("cpp", "cu") for path in glob.glob(os.path.join("csrc", "**", "*." + ext), recursive=True))
    cuda = [p for p in found if p.endswith(".cu") or "cuda" in p.split(os.sep)[:-1]]
    return [p for p in found if p not in cuda], cuda


def _extensions():
    with_cuda, cuda_home = _want_cuda()
    sources, cuda_sources = _sources()
    include_dirs = [os.path.join(ROOT, "csrc")]
    # torch picks the C++ standard its headers need (C++20 for torch >= 2.10).
    # -fopenmp: at::parallel_for is a header template that only runs in parallel where the
    # including file is compiled with OpenMP (without it the CPU kernels ran on one thread);
    # the SONAME libgomp.so.1 resolves to the OpenMP runtime torch has already loaded.
    cxx_flags = ["-O3", "-fno-math-errno", "-fopenmp"]
    # Python's compiler flags carry -g; these come after them, so -g0 wins.
    if os.environ.get("FPN_FAST_DEBUG_INFO", "").strip() != "1":
        cxx_flags.append("-g0")
    extra = {"cxx": cxx_flags}
    link = ["-fopenmp"]
    if not with_cuda:
        return [cpp_extension.CppExtension("fpn_fast._C", sources, include_dirs=include_dirs,
                                           extra_compile_args=extra, extra_link_args=link)]
    # torch infers CUDA_HOME from nvcc's directory without resolving links;
    # pin it before cpp_extension reads it for include and library paths.
    os.environ["CUDA_HOME"] = cuda_home
    cpp_extension.CUDA_HOME = cuda_home
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # torch's CUDA headers include cusparse.h / cublas_v2.h, which pip-installed
    # CUDA wheels ship under nvidia/cu13/include rather than the toolkit.
    for site in sys.path:
        for sub in ("cu13", "cu12"):
            inc = os.path.join(site, "nvidia", sub, "include")
            if os.path.exists(os.path.join(inc, "cusparse.h")) and inc not in include_dirs:
                include_dirs.append(inc)
    sources += cuda_sources
    extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    return [cpp_extension.CUDAExtension("fpn_fast._C", sources, include_dirs=include_dirs,
                                        extra_compile_args=extra, extra_link_args=link,
                                        define_macros=[("FPN_FAST_WITH_CUDA", "1")])]


def _build_record(ext) -> dict:
    """What ``ext`` is built against; a library whose record differs from this is rebuilt."""
    cuda = any(source.endswith(".cu") for source in ext.sources)
    return {"torch": str(torch.__version__), "torch_cuda": torch.version.cuda, "cuda_kernels": cuda,
            "cuda_arch_list": os.environ.get("TORCH_CUDA_ARCH_LIST") if cuda else None}


def _read_record(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


class BuildExtension(cpp_extension.BuildExtension):
    """torch's BuildExtension, plus the build record (``fpn_fast/_C_build.json``) beside each built
    library: in the wheel, in the build folder and, for in-place and editable builds, in the source
    tree. A library already built whose record names another torch (or another CUDA choice) is
    rebuilt, also where setuptools would keep it (without ninja: its sources did not change).

    Editable installs (``make install``) compile in build/temp.<platform>, as every other build
    does, instead of a new temporary folder each time: ninja then recompiles only the sources
    (or flags, or torch headers) that changed."""

    def finalize_options(self):
        super().finalize_options()
        if self.editable_mode:
            default = type(self.get_finalized_command("build"))(self.distribution)
            default.ensure_finalized()
            self.build_temp = default.build_temp

    def _record_path(self, ext, inplace: bool) -> str:
        package = self.get_ext_fullname(ext.name).rpartition(".")[0]
        if inplace:
            folder = self.get_finalized_command("build_py").get_package_dir(package)
        else:
            folder = os.path.join(self.build_lib, *package.split("."))
        return os.path.join(folder, BUILD_RECORD)

    def build_extension(self, ext):
        record, path = _build_record(ext), self._record_path(ext, inplace=False)
        force = self.force
        self.force = force or _read_record(path) != record
        try:
            super().build_extension(ext)
        finally:
            self.force = force
        with open(path, "w") as f:
            json.dump(record, f, indent=1)

    def copy_extensions_to_source(self):
        super().copy_extensions_to_source()
        for ext in self.extensions:
            self.copy_file(self._record_path(ext, inplace=False), self._record_path(ext, inplace=True),
                           level=self.verbose)

    def get_outputs(self):
        outputs = super().get_outputs()  # in place: get_output_mapping's keys, records included
        if not self.inplace:
            outputs += [self._record_path(ext, inplace=False) for ext in self.extensions]
        return outputs

    def get_output_mapping(self):
        mapping = super().get_output_mapping()  # in place (editable installs): build file -> source tree
        if self.inplace:
            for ext in self.extensions:
                mapping[self._record_path(ext, inplace=False)] = self._record_path(ext, inplace=True)
        return mapping


with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
    README = f.read()

setup(
    name="fpn_fast",
    version=_version(),
    description="Drop-in ResNet-FPN backbone for torchvision detection models with fused FPN kernels",
    long_description=README,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["fpn_fast", "fpn_fast.*"]),
    python_requires=">=3.9",
    # The tested range: CI runs torch 2.11.0 (requirements-oldest.txt) and the pinned 2.14.1.
    install_requires=["torch>=2.11,<2.15"],
    extras_require={
        "plot": ["matplotlib"], "triton": ["triton"],
        # python -m fpn_fast (the main job, fpn_fast.demo): detectors, bundled photos, decoding, progress, report
        "demo": ["torchvision", "scikit-image>=0.26", "pillow>=9.1", "tqdm>=4.60", "matplotlib"],
        "onnx": ["onnx>=1.17", "onnxscript>=0.3", "onnxruntime>=1.20"],
        "test": ["torchvision", "pytest", "pytest-benchmark"],
    },
    ext_modules=_extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["fpn-fast=fpn_fast.__main__:main"]},
    zip_safe=False,
)
