"""setup.py's search for the CUTLASS/CuTe headers that the CUDA kernels include (no CUDA needed)."""
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
