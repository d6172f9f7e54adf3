"""Build fastaspp's C++/CUDA op library fastaspp._C (with ninja); the package's metadata is in pyproject.toml.

The C++ CPU kernels are always built. The CUDA kernels are built when torch has
CUDA and nvcc is found; FASTASPP_WITH_CUDA=1 or =0 forces either way. The build
prints which it did. Install with --no-build-isolation so the build uses the
torch already installed (an isolated build would fetch another torch).
"""
import glob
import os
import shutil

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def want_cuda() -> bool:
    forced = os.environ.get("FASTASPP_WITH_CUDA")
    if forced not in (None, "", "0", "1"):
        raise SystemExit(f"FASTASPP_WITH_CUDA must be 0 or 1, got {forced!r}")
    if forced == "0":
        print("fastaspp: building without CUDA (FASTASPP_WITH_CUDA=0)")
        return False
    has_nvcc = CUDA_HOME is not None or shutil.which("nvcc") is not None
    if forced == "1":
        if torch.version.cuda is None:
            raise SystemExit("FASTASPP_WITH_CUDA=1 but this torch has no CUDA")
        print("fastaspp: building with CUDA (FASTASPP_WITH_CUDA=1)")
        return True
    if torch.version.cuda is not None and has_nvcc:
        print(f"fastaspp: building with CUDA (torch CUDA {torch.version.cuda}, nvcc found)")
        return True
    reason = "torch has no CUDA" if torch.version.cuda is None else "nvcc not found"
    print(f"fastaspp: building without CUDA ({reason})")
    return False


def extension():
    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    sources = rel("csrc/*.cpp") + rel("csrc/common/*.cpp") + rel("csrc/cpu/*.cpp")
    # at::parallel_for is an OpenMP pragma in torch's headers: without -fopenmp it runs serially.
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    link = ["-fopenmp"]
    if want_cuda():
        sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        return CUDAExtension(
            "fastaspp._C",
            sources,
            define_macros=[("FASTASPP_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    return CppExtension("fastaspp._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
