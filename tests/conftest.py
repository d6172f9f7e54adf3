"""Test setup: Triton runs interpreted on CPU tensors when there is no GPU.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at
collection time. On a GPU machine tests run on CUDA tensors for the GPU
backends (triton, cuda) and on CPU tensors for the cpu backend.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastaspp  # noqa: E402

ON_GPU = torch.cuda.is_available()

if ON_GPU:
    # The fp32 references run through cuDNN and cuBLAS; cuDNN convolutions default to TF32, which
    # would make the reference, not the fused op, the inexact side (seen on an H100: errors of
    # 1e-4..1e-3 identical for the triton and cuda backends).
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False


def device_for(backend: str) -> torch.device:
    """The device whose tensors a backend runs in this test session."""
    if backend == "cpu":
        return torch.device("cpu")
    return torch.device("cuda") if ON_GPU else torch.device("cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long cases; CI skips them (-m 'not slow'), the GPU run includes them")


def pytest_collection_modifyitems(config, items):
    """Interpreted Triton is slow: outside INTERPRETER_CASES its cases are marked slow (GPU runs them all)."""
    if ON_GPU:
        return
    from _cases import INTERPRETER_CASES
    from test_aspp import ASPP_INTERPRETER_CASES

    subset = {"case": INTERPRETER_CASES, "aspp_case": ASPP_INTERPRETER_CASES}
    for item in items:
        params = getattr(item, "callspec", None) and item.callspec.params
        if not params or params.get("backend") != "triton":
            continue
        if any(name in params and params[name] not in cases for name, cases in subset.items()):
            item.add_marker(pytest.mark.slow)


# The cpu backend runs three times: "cpu" with its own choice of path (the small test shapes mostly
# run its direct loops), "cpu-gemm" with every call forced onto the live-tap GEMMs
# (FASTASPP_CPU_DIRECT_MAX_MACS=-1, FASTASPP_CPU_ONEDNN=0), and "cpu-onednn" with every fp32
# forward and single-conv backward on oneDNN, plus the fused epilogue (FASTASPP_CPU_ONEDNN=1; other
# dtypes take the GEMMs). Both switch Winograd off, whose error bound is its own
# (tests/test_cpu_winograd.py, tests/test_cpu_conv_paths.py). Each yields the backend name "cpu".
_FORCED = {"FASTASPP_CPU_DIRECT_MAX_MACS": "-1", "FASTASPP_CPU_WINOGRAD": "0"}
CPU_PATHS = {"gemm": {**_FORCED, "FASTASPP_CPU_ONEDNN": "0"}, "onednn": {**_FORCED, "FASTASPP_CPU_ONEDNN": "1"}}
BACKEND_PARAMS = ("cpu", "cpu-gemm", "cpu-onednn") + tuple(b for b in fastaspp.BACKENDS if b != "cpu")


@pytest.fixture(params=BACKEND_PARAMS)
def backend(request, monkeypatch):
    """Each backend usable here; the others are reported as skipped with the reason."""
    name, _, path = request.param.partition("-")
    # Why a backend is missing is private (users get it in the error of a call); a skip reports it.
    reason = fastaspp._backend.unavailable_reason(name)
    if reason is not None:
        pytest.skip(f"backend {name} unavailable: {reason}")
    for variable, value in CPU_PATHS.get(path, {}).items():
        monkeypatch.setenv(variable, value)
    with fastaspp.backend(name):
        yield name


@pytest.fixture(params=fastaspp.BACKENDS)
def each_backend(request):
    """Each backend usable here, once (the cpu backend on its own choice of path); skipped with the
    reason where unusable. For tests of what sits above the kernels (autograd, torch.func)."""
    reason = fastaspp._backend.unavailable_reason(request.param)
    if reason is not None:
        pytest.skip(f"backend {request.param} unavailable: {reason}")
    with fastaspp.backend(request.param):
        yield request.param
