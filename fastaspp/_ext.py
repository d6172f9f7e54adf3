"""Loads the compiled op library fastaspp._C and says what it was built with."""
from __future__ import annotations

import torch  # noqa: F401  (loads libtorch/libc10, which _C links against)

_load_error: Exception | None = None
try:
    from fastaspp import _C  # noqa: F401  (importing registers the C++ ops)
except ImportError as exc:  # reported by backends()/backend(), not swallowed
    _C = None
    _load_error = exc


def loaded() -> bool:
    return _C is not None


def load_error() -> str:
    return f"fastaspp._C failed to import ({_load_error}); reinstall with `pip install --no-build-isolation -e .`"


def with_cuda() -> bool:
    return _C is not None and bool(_C.WITH_CUDA)
