"""Backend choice: which implementation runs fastaspp's ops.

Backends: "cpu" (C++ kernels, CPU tensors), "cuda" (C++/CUDA kernels, CUDA
tensors), "triton" (Triton kernels: CUDA tensors, or CPU tensors when
TRITON_INTERPRET=1). "auto", the default, resolves per call: CUDA tensors go to
"triton", CPU tensors to "cpu". resolve_backend() tells what a call would use.
A backend that cannot run a call raises and says why; nothing falls back.

The choice is a plain module global (not a ContextVar) so torch.compile can
trace and guard on it.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator

import torch

from fastaspp import _ext

BACKENDS = ("cpu", "triton", "cuda")
_current = "auto"


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"triton is not installed ({exc}); pip install triton"
    return None


def unavailable_reason(name: str) -> str | None:
    """Why backend `name` cannot run here, or None when it can."""
    if name == "cpu":
        return None if _ext.loaded() else _ext.load_error()
    if name == "cuda":
        if not _ext.loaded():
            return _ext.load_error()
        if not _ext.with_cuda():
            return "fastaspp was built without CUDA (rebuild with torch+CUDA and nvcc, or FASTASPP_WITH_CUDA=1)"
        if not torch.cuda.is_available():
            return "no CUDA GPU is available"
        return None
    if name == "triton":
        err = _triton_import_error()
        if err:
            return err
        if not torch.cuda.is_available() and not triton_interpret():
            return "triton needs a CUDA GPU, or TRITON_INTERPRET=1 (set before import) for CPU tensors"
        return None
    raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {name!r}")


def backends() -> list[str]:
    """The backends usable on this machine."""
    return [name for name in BACKENDS if unavailable_reason(name) is None]


def _check_name(name: str) -> None:
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or 'auto', got {name!r}")


def set_backend(name: str) -> None:
    """Choose the backend for subsequent calls ("auto", "cpu", "triton" or "cuda")."""
    global _current
    _check_name(name)
    if name != "auto":
        reason = unavailable_reason(name)
        if reason:
            raise RuntimeError(f"fastaspp backend {name!r} is unavailable: {reason}")
    _current = name


def get_backend() -> str:
    return _current


@contextlib.contextmanager
def backend(name: str) -> Iterator[None]:
    """with fastaspp.backend("triton"): ... runs the block on that backend."""
    global _current
    previous = _current
    set_backend(name)
    try:
        yield
    finally:
        _current = previous


# Successful resolutions by (name, device type): what a backend can run does not change within a
# process, so a call pays one dict look-up (docs/design.md §13). Failures are not kept: they raise anew;
# nor is triton on CPU tensors, which follows TRITON_INTERPRET (the interpreter: tests only).
_RESOLVED: dict = {}


def resolve_backend(device: torch.device, name: str | None = None) -> str:
    """The concrete backend a call on tensors of `device` uses, or an error saying why none can."""
    name = _current if name is None else name
    if not isinstance(name, str) or torch.compiler.is_compiling():  # traced: no dict to guard on
        return _resolve(device, name)
    key = (name, device.type)
    resolved = _RESOLVED.get(key)
    if resolved is None:
        resolved = _resolve(device, name)
        if not (resolved == "triton" and device.type == "cpu"):
            _RESOLVED[key] = resolved
    return resolved


def eager_backend(x: torch.Tensor) -> str:
    """resolve_backend(x.device) for a call known not to be traced (fastaspp.ops._library.route gave
    an eager route): the same answer, without the compile check and the device object that a call's
    budget pays for with cold caches in a training step (docs/design.md §13)."""
    key = (_current, "cpu") if x.is_cpu else (_current, "cuda") if x.is_cuda else None
    resolved = _RESOLVED.get(key) if key is not None else None
    return resolved if resolved is not None else resolve_backend(x.device)


def _resolve(device: torch.device, name: str) -> str:
    _check_name(name)
    if name == "auto":
        name = "triton" if device.type == "cuda" else "cpu"
    reason = unavailable_reason(name)
    if reason:
        raise RuntimeError(f"fastaspp backend {name!r} is unavailable: {reason}")
    if name == "cpu" and device.type != "cpu":
        raise RuntimeError(f"fastaspp backend 'cpu' runs CPU tensors only, got a tensor on {device}")
    if name == "cuda" and device.type != "cuda":
        raise RuntimeError(f"fastaspp backend 'cuda' runs CUDA tensors only, got a tensor on {device}")
    if name == "triton" and device.type == "cpu" and not triton_interpret():
        raise RuntimeError("fastaspp backend 'triton' runs CPU tensors only under TRITON_INTERPRET=1")
    if name == "triton" and device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"fastaspp backend 'triton' cannot run tensors on {device}")
    return name
