"""Build entry point for fpn_fast and its C++/CUDA extension ``fpn_fast._C``.

The extension is compiled against the torch that is already installed, so use
``pip install --no-build-isolation .`` (or ``-e .``).

Environment:
  FPN_FAST_CUDA=1  build the CUDA kernels or fail loudly; =0 skip them;
                   unset: build them when a CUDA toolkit is found.
  TORCH_CUDA_ARCH_LIST  honoured; defaults to "8.0;9.0".
  MAX_JOBS         parallel compile jobs (ninja).
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils import cpp_extension
except ImportError:  # pip's isolated build env has no torch
    sys.exit(
        "fpn_fast builds its C++/CUDA extension against your installed torch.\n"
        "torch was not importable here, most likely because pip built in an isolated\n"
        "environment. Install torch first, then run:\n"
        "    pip install --no-build-isolation .\n"
    )

ROOT = os.path.dirname(os.path.abspath(__file__))


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


setup(
    name="fpn_fast",
    version="0.1.0",
    description="Drop-in ResNet-FPN backbone for torchvision detection models with fused FPN kernels",
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
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["fpn-fast=fpn_fast.__main__:main"]},
    zip_safe=False,
)
