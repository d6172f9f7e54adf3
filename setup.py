"""Build fastaspp and its C++/CUDA op library fastaspp._C (with ninja).

The C++ CPU kernels are always built. The CUDA kernels are built when torch has
CUDA and nvcc is found; FASTASPP_WITH_CUDA=1 or =0 forces either way. The build
prints which it did. Install with --no-build-isolation so the build uses the
torch already installed (an isolated build would fetch another torch).
"""
import glob
import os
import shutil

from setuptools import setup

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension, CUDA_HOME

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
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))
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
    name="fastaspp",
    version="0.1.0",
    description="Fused atrous convolution and ASPP kernels for DeepLabV3 (Triton, CUDA, C++)",
    packages=["fastaspp", "fastaspp.ops", "fastaspp.nn", "fastaspp.kernels", "fastaspp.models", "fastaspp.data",
              "fastaspp.bench"],
    package_dir={"fastaspp.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "matplotlib", "pillow", "tqdm"],
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["pytest", "pytest-benchmark", "triton>=3.0", "ninja"],
    },
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    entry_points={"console_scripts": ["fastaspp = fastaspp.cli:main"]},
)
