"""Backend discovery and selection."""
import pytest
import torch

import fastaspp


def test_cpu_always_available():
    assert "cpu" in fastaspp.backends()
    assert set(fastaspp.backends()) <= set(fastaspp.BACKENDS)


def test_auto_resolution():
    assert fastaspp.get_backend() == "auto"
    assert fastaspp.resolve_backend(torch.device("cpu")) == "cpu"
    if "triton" in fastaspp.backends() and torch.cuda.is_available():
        assert fastaspp.resolve_backend(torch.device("cuda")) == "triton"


def test_context_manager_restores_previous():
    with fastaspp.backend("cpu"):
        assert fastaspp.get_backend() == "cpu"
        with pytest.raises(ValueError):
            with fastaspp.backend("nope"):
                pass
        assert fastaspp.get_backend() == "cpu"
    assert fastaspp.get_backend() == "auto"


def test_set_backend():
    try:
        fastaspp.set_backend("cpu")
        assert fastaspp.get_backend() == "cpu"
    finally:
        fastaspp.set_backend("auto")


def test_unknown_backend():
    with pytest.raises(ValueError, match=r"backend must be one of .* got 'cudnn'"):
        fastaspp.set_backend("cudnn")


def test_triton_on_cpu_needs_interpreter(monkeypatch):
    if "triton" not in fastaspp.backends() or torch.cuda.is_available():
        pytest.skip("needs triton installed and no GPU")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1"):
        fastaspp.resolve_backend(torch.device("cpu"), "triton")


def test_cuda_backend_reason():
    # The private reason behind the public backends() list: the two must agree.
    reason = fastaspp._backend.unavailable_reason("cuda")
    assert (reason is None) == ("cuda" in fastaspp.backends())
    if not torch.cuda.is_available():
        assert reason


def test_eager_backend_answers_as_resolve_backend():
    """The eager routes' shortcut (fastaspp._backend.eager_backend) gives resolve_backend's answer, and
    its error where there is none: CPU tensors, the backend set by name, and a device type it does
    not key (meta)."""
    from fastaspp._backend import eager_backend

    x = torch.randn(2)
    for name in ("auto", "cpu"):
        with fastaspp.backend(name):
            assert eager_backend(x) == fastaspp.resolve_backend(x.device) == "cpu"
    with pytest.raises(RuntimeError, match=r"backend 'cpu' runs CPU tensors only, got a tensor on meta"):
        eager_backend(torch.randn(2, device="meta"))
