"""The CuTe conv kernel's shared-memory layouts and thread mappings (csrc/cuda/conv_sm80.cuh),
checked on the host: tests/cuda_host/sm80_layouts.cu is compiled with nvcc against the CUTLASS
headers setup.py finds and run here, no GPU needed. It checks that both swizzled layouts are
bijective with every 16-byte cp.async chunk contiguous and aligned, and that each of the 64 x 128
accumulators of a CTA belongs to exactly one of its 128 threads."""
import importlib.util
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def cutlass_include():
    spec = importlib.util.spec_from_file_location("fastaspp_setup", ROOT / "setup.py")
    setup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup)
    try:
        return setup.cutlass_include()
    except SystemExit as e:  # the message says how to install the headers (.ci/run does)
        pytest.skip(str(e))


def test_sm80_kernel_layouts_and_thread_mappings(tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    include = cutlass_include()
    exe = tmp_path / "sm80_layouts"
    subprocess.run([nvcc, "-std=c++17", "--expt-relaxed-constexpr", f"-I{include}", "-arch=sm_80",
                    str(ROOT / "tests" / "cuda_host" / "sm80_layouts.cu"), "-o", str(exe)], check=True)
    run = subprocess.run([str(exe)], capture_output=True, text=True)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout
