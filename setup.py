"""Build fastaspp's C++/CUDA op library fastaspp._C (with ninja); the package's metadata is in pyproject.toml.

The C++ CPU kernels are always built. The CUDA kernels are built when torch has
CUDA and nvcc is found; FASTASPP_WITH_CUDA=1 or =0 forces either way. The build
prints which it did. Install with --no-build-isolation so the build uses the
torch already installed (an isolated build would fetch another torch).

The CUDA kernels include CUTLASS/CuTe headers: from FASTASPP_CUTLASS_INCLUDE, else from the
installed nvidia-cutlass package (CUTLASS_REQUIREMENT; its headers are all the build needs, so
`pip install --no-deps` is enough). .ci/run imports cutlass_include() from here for its nvcc check.

On Linux the C++ compiler must link libstdc++ as a shared library, as torch does (check_shared_libstdcxx).
"""
import glob
import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig

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


CUTLASS_REQUIREMENT = "nvidia-cutlass==4.2.0.0"


def cutlass_include() -> str:
    """The include directory holding cute/ and cutlass/ (see the module docstring)."""
    def has_cute(path):
        return os.path.isfile(os.path.join(path, "cute", "tensor.hpp"))

    forced = os.environ.get("FASTASPP_CUTLASS_INCLUDE")
    if forced:
        if not has_cute(forced):
            raise SystemExit(f"FASTASPP_CUTLASS_INCLUDE={forced!r} holds no cute/tensor.hpp")
        return forced
    spec = importlib.util.find_spec("cutlass_library")  # locates the package without importing it
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        if has_cute(os.path.join(root, "source", "include")):
            return os.path.join(root, "source", "include")
    raise SystemExit(f"fastaspp: the CUDA kernels need CUTLASS's headers: pip install --no-deps "
                     f"'{CUTLASS_REQUIREMENT}', or set FASTASPP_CUTLASS_INCLUDE to a CUTLASS include "
                     f"directory (FASTASPP_WITH_CUDA=0 builds without CUDA)")


def check_shared_libstdcxx(cxx=None) -> None:
    """Stops the build where the C++ compiler would link libstdc++ statically into _C (it finds no
    libstdc++.so, only libstdc++.a). _C would then carry its own copy beside the shared one torch
    loads, the two would share the locale's data but not its code, and formatting a number into an
    error message crashed (a segfault in std::ostream::_M_insert<long>: seen with a CUDA image's
    /opt/gcc/bin/g++, whose search path holds only the static library)."""
    if not sys.platform.startswith("linux"):
        return
    cxx = cxx or os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    try:
        found = subprocess.run([*shlex.split(cxx), "-print-file-name=libstdc++.so"], capture_output=True,
                               text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return  # no such compiler: the build itself reports that
    if not os.path.isabs(found):
        raise SystemExit(f"fastaspp: the C++ compiler {cxx!r} finds no libstdc++.so, so it would link libstdc++ "
                         f"statically into fastaspp._C beside torch's shared one, which crashes; set CXX and CC to "
                         f"a compiler that links it shared (say CXX=/usr/bin/g++ CC=/usr/bin/gcc)")


def extension():
    def rel(pattern):
        return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))

    check_shared_libstdcxx()
    sources = rel("csrc/*.cpp") + rel("csrc/common/*.cpp") + rel("csrc/cpu/*.cpp")
    # at::parallel_for is an OpenMP pragma in torch's headers: without -fopenmp it runs serially.
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    link = ["-fopenmp"]
    if want_cuda():
        sources += rel("csrc/cuda/*.cpp") + rel("csrc/cuda/*.cu")
        nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr", "-lineinfo"]
        cutlass = cutlass_include()
        print(f"fastaspp: CUTLASS headers from {cutlass}")
        return CUDAExtension(
            "fastaspp._C",
            sources,
            include_dirs=[cutlass],
            define_macros=[("FASTASPP_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    return CppExtension("fastaspp._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)


if __name__ == "__main__":  # as pip's build backend runs it; .ci/run imports cutlass_include()
    setup(
        ext_modules=[extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )
