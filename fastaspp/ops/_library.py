"""What every fastaspp op module shares: the torch.library fragment its ops are defined in, and the
rule that routes an eager call past the op dispatch.

The C++ extension defines the library (TORCH_LIBRARY(fastaspp)) with the per-backend kernels;
the Python ops are added to it here with Library.define + impl + register_fake +
register_autograd, the cheapest registration that keeps opcheck, torch.compile(fullgraph=True)
and torch.export working.
"""
from __future__ import annotations

import enum
from typing import Optional

import torch
from torch import Tensor

from fastaspp import _ext  # noqa: F401  (loads fastaspp._C: TORCH_LIBRARY(fastaspp) comes first)

LIB = torch.library.Library("fastaspp", "FRAGMENT")


class Route(enum.Enum):
    KERNEL = "kernel"  # no autograd needed: the backend kernel, called directly
    FUNCTION = "function"  # eager autograd: the kernels' own (the cpu kernel op's C++ autograd), or the op's
    # autograd.Function twin around them (cuda, triton)
    OP = "op"  # the torch op: compiling, exporting, a dispatch or function mode, tensor subclasses


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def route(*tensors: Optional[Tensor]) -> Route:
    """How an eager call on these tensors runs. The op dispatch costs a small call tens of µs of host
    time (docs/design.md §13), so plain eager calls skip it; anything that must see the op (tracing,
    fake or functional tensors, modes) goes through it."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled()):
        return Route.OP
    grad = torch.is_grad_enabled()
    needs_grad = False
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN_TENSOR_TYPES:
            return Route.OP
        needs_grad = needs_grad or (grad and t.requires_grad)
    return Route.FUNCTION if needs_grad else Route.KERNEL
