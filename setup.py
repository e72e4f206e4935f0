"""Build script for hpd_fast.

One extension, ``hpd_fast._C``: the C++ CPU kernels always, the CUDA kernels when torch was built
with CUDA and a CUDA toolkit is found. Environment switches:

    HPD_FAST_NO_CPP=1      build no C++ at all (pure Python; the ops fall back to Triton/reference)
    HPD_FAST_NO_CUDA=1     skip the CUDA sources even where they could be built
    HPD_FAST_FORCE_CUDA=1  build the CUDA sources (fail loudly if that is impossible)
    TORCH_CUDA_ARCH_LIST   CUDA architectures (torch's own switch), e.g. "9.0"
    MAX_JOBS               parallel compile jobs (torch's own switch)

The extension targets the stable Python ABI and does not use pybind11: it only registers
operators with torch.library, so ``import hpd_fast._C`` is all Python needs.
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _nvidia_wheel_includes() -> list[str]:
    """Header folders shipped by the nvidia-* wheels of a pip-installed CUDA torch."""
    dirs = []
    for base in sys.path:
        dirs += glob.glob(os.path.join(base, "nvidia", "*", "include"))
    return sorted({d for d in dirs if os.path.isdir(d)})


def _extensions():
    if _flag("HPD_FAST_NO_CPP"):
        print("hpd_fast build: no C++ extension (HPD_FAST_NO_CPP=1); ops use Triton/reference")
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        print(
            "hpd_fast build: no C++ extension (torch is not importable in the build environment;"
            " install with `pip install --no-build-isolation -e .`)"
        )
        return [], {}

    cpu_sources = ["csrc/hpd_fast.cpp", *sorted(glob.glob("csrc/cpu/*.cpp"))]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu"))

    have_toolkit = cpp_extension.CUDA_HOME is not None and os.path.exists(
        os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")
    )
    if _flag("HPD_FAST_NO_CUDA"):
        use_cuda, why = False, "HPD_FAST_NO_CUDA=1"
    elif _flag("HPD_FAST_FORCE_CUDA"):
        if torch.version.cuda is None:
            raise RuntimeError("HPD_FAST_FORCE_CUDA=1 but this torch has no CUDA support")
        if not have_toolkit:
            raise RuntimeError("HPD_FAST_FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME")
        use_cuda, why = True, "HPD_FAST_FORCE_CUDA=1"
    elif torch.version.cuda is None:
        use_cuda, why = False, f"torch {torch.__version__} is a CPU build"
    elif not have_toolkit:
        use_cuda, why = False, "no CUDA toolkit found (set CUDA_HOME)"
    else:
        use_cuda = True
        why = f"torch CUDA {torch.version.cuda}, toolkit at {cpp_extension.CUDA_HOME}"

    cxx = ["-O3", "-fopenmp", "-DPy_LIMITED_API=0x030a0000"]
    # -fmad=false: no contracted multiply-adds, so per-element formulas round as on the CPU
    # (csrc/hpd_common.h, docs/gpu.md); IEEE division and sqrt are nvcc's default.
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo", "-fmad=false"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    sources = list(cpu_sources)
    if use_cuda:
        sources += cuda_sources
        include_dirs += _nvidia_wheel_includes()
        ext_cls = cpp_extension.CUDAExtension
        cxx.append("-DHPD_FAST_WITH_CUDA")
        nvcc.append("-DHPD_FAST_WITH_CUDA")
        arch = os.environ.get("TORCH_CUDA_ARCH_LIST", "(torch default arch list)")
        print(f"hpd_fast build: C++ CPU + CUDA kernels ({why}; TORCH_CUDA_ARCH_LIST={arch})")
    else:
        ext_cls = cpp_extension.CppExtension
        print(f"hpd_fast build: C++ CPU kernels only, no CUDA ({why})")

    ext = ext_cls(
        "hpd_fast._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx, "nvcc": nvcc} if use_cuda else {"cxx": cxx},
        py_limited_api=True,
    )
    build_ext = cpp_extension.BuildExtension.with_options(use_ninja=True)
    return [ext], {"build_ext": build_ext}


ext_modules, cmdclass = _extensions()

setup(
    # Every package under hpd_fast/ (sub-packages are found, never listed by hand), plus the
    # Triton kernels, which live in kernels/ at the top level and install as hpd_fast.kernels.
    packages=[*find_packages(include=["hpd_fast", "hpd_fast.*"]), "hpd_fast.kernels"],
    package_dir={"hpd_fast.kernels": "kernels"},
    package_data={"hpd_fast.generators": ["weights/*.safetensors", "weights/*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
