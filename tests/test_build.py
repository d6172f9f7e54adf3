"""setup.py's search for the CUTLASS/CuTe headers that the CUDA kernels include, its compiler check, and
.ci/check_ptxas.py's reading of ptxas reports (no CUDA needed)."""
import importlib.util
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load_setup():
    spec = importlib.util.spec_from_file_location("fastaspp_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines the helpers, runs no build
    return module


def test_cutlass_include_takes_the_directory_given(tmp_path, monkeypatch):
    (tmp_path / "cute").mkdir()
    (tmp_path / "cute" / "tensor.hpp").write_text("")
    monkeypatch.setenv("FASTASPP_CUTLASS_INCLUDE", str(tmp_path))
    assert load_setup().cutlass_include() == str(tmp_path)


def test_cutlass_include_rejects_a_directory_without_cute(tmp_path, monkeypatch):
    monkeypatch.setenv("FASTASPP_CUTLASS_INCLUDE", str(tmp_path))
    with pytest.raises(SystemExit, match="holds no cute/tensor.hpp"):
        load_setup().cutlass_include()


def test_cutlass_include_names_the_package_when_none_is_found(monkeypatch):
    monkeypatch.delenv("FASTASPP_CUTLASS_INCLUDE", raising=False)
    setup = load_setup()
    monkeypatch.setattr(setup.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SystemExit, match=f"pip install --no-deps '{setup.CUTLASS_REQUIREMENT}'"):
        setup.cutlass_include()


def _compiler(tmp_path, prints):
    """A stand-in C++ compiler that answers -print-file-name=libstdc++.so with `prints`."""
    script = tmp_path / "fake-g++"
    script.write_text(f"#!/bin/sh\necho '{prints}'\n")
    script.chmod(0o755)
    return str(script)


@pytest.mark.skipif(not __import__("sys").platform.startswith("linux"), reason="a Linux toolchain check")
def test_a_compiler_without_a_shared_libstdcxx_stops_the_build(tmp_path):
    setup = load_setup()
    setup.check_shared_libstdcxx(_compiler(tmp_path, "/usr/lib/gcc/x86_64-linux-gnu/13/libstdc++.so"))
    with pytest.raises(SystemExit, match="finds no libstdc\\+\\+.so.*CXX=/usr/bin/g\\+\\+"):
        setup.check_shared_libstdcxx(_compiler(tmp_path, "libstdc++.so"))
    setup.check_shared_libstdcxx()  # this machine's compiler, which built the installed extension


def _ptxas_entry(name, arch, registers, spill_bytes=0):
    """What `nvcc -Xptxas -v` prints for one kernel image."""
    return (f"ptxas info    : Compiling entry function '{name}' for '{arch}'\n"
            f"ptxas info    : Function properties for {name}\n"
            f"    0 bytes stack frame, {spill_bytes} bytes spill stores, {spill_bytes} bytes spill loads\n"
            f"ptxas info    : Used {registers} registers, used 2 barriers\n")


def _check_ptxas(text):
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(ROOT / ".ci" / "check_ptxas.py")], input=text, capture_output=True,
                          text=True)


TMA_WIDE = "_ZN8fastaspp11atrous_cuda15conv_tma_kernelI6__halfLb1ENS0_13Sm90TmaConfigIS2_Li2EEEEEvNS0_12TmaConvBatchE"
TMA_NARROW = TMA_WIDE.replace("_Li2E", "_Li1E")
CUTE = "_ZN8fastaspp11atrous_cuda16conv_cute_kernelI6__halfLb0ENS0_10Sm90ConfigIS2_EEEEvNS0_9ConvBatchE"


def test_check_ptxas_passes_unspilled_cute_kernels_and_tma_kernels_at_their_cap():
    """.ci/check_ptxas.py: the TMA kernels' sm_90a images at the registers their setmaxnreg split needs
    (168 wide, 128 narrow; their sm_80 images are a stub and may use any), no spills."""
    text = "".join([_ptxas_entry(CUTE, "sm_90a", 168), _ptxas_entry(TMA_WIDE, "sm_90a", 168),
                    _ptxas_entry(TMA_NARROW, "sm_90a", 128), _ptxas_entry(TMA_WIDE, "sm_80", 4)])
    done = _check_ptxas(text)
    assert done.returncode == 0 and "4 CuTe kernel images, none spills" in done.stdout, done.stderr


@pytest.mark.parametrize("entry, complaint", [
    (_ptxas_entry(TMA_WIDE, "sm_90a", 160), "uses 160 registers, not the 168"),
    (_ptxas_entry(TMA_NARROW, "sm_90a", 120), "uses 120 registers, not the 128"),
    (_ptxas_entry(TMA_WIDE.replace("_Li2E", "_Li3E"), "sm_90a", 168), "unknown TMA config"),
    (_ptxas_entry(CUTE, "sm_90a", 168, spill_bytes=8), "spills"),
])
def test_check_ptxas_fails_on_spills_and_on_tma_kernels_below_their_cap(entry, complaint):
    done = _check_ptxas(_ptxas_entry(CUTE, "sm_80", 96) + entry)
    assert done.returncode != 0 and complaint in done.stderr, (done.stdout, done.stderr)
