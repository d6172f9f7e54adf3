"""The argument checks every fastaspp op shares: one layer, in the Python entry points (the kernels
below assert invariants only). Each reads an attribute once: it runs on every call, and a small
call's whole budget is a few µs of Python (docs/design.md §13)."""
from __future__ import annotations

from typing import List, Sequence, Union

import torch
from torch import Tensor

from fastaspp._backend import resolve_backend

# The common first: a membership test is a scan.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
IntPair = Union[int, Sequence[int]]


def pair(value: IntPair, name: str) -> List[int]:
    if type(value) is int:
        return [value, value]
    if isinstance(value, (list, tuple)) and len(value) == 2:
        first, second = value
        if type(first) is int and type(second) is int:
            return [first, second]
    raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")


def check_tensor(t: Tensor, name: str, dim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dim:
        shape = "[N, C, H, W]" if dim == 4 else "[C_out]"
        raise ValueError(f"{name} must be a {dim}-D tensor {shape}, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def check_like(t: Tensor, name: str, x: Tensor) -> None:
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")


def check_backend(backend: str, t: Tensor) -> None:
    """For calls of the torch ops themselves, whose backend argument nothing else has checked."""
    resolved = resolve_backend(t.device, backend)
    if backend == "auto" or resolved != backend:
        raise ValueError(f"backend must be a concrete backend name, got {backend!r}")
    if backend == "triton":
        from fastaspp.kernels import launch as triton_launch

        if t.dtype not in triton_launch.SUPPORTED_DTYPES:
            raise TypeError(f"fastaspp backend 'triton' does not support {t.dtype}; "
                            f"supported: {triton_launch.SUPPORTED_DTYPES}")
