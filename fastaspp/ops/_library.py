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
import torch.autograd.forward_ad as forward_ad
from torch import Tensor
from torch._C._functorch import TransformType, peek_interpreter_stack

from fastaspp import _ext  # noqa: F401  (loads fastaspp._C: TORCH_LIBRARY(fastaspp) comes first)

LIB = torch.library.Library("fastaspp", "FRAGMENT")


class Route(enum.Enum):
    KERNEL = "kernel"  # no autograd needed: the backend kernel, called directly
    FUNCTION = "function"  # eager autograd: the kernels' own (the cpu kernel op's C++ autograd), or the op's
    # autograd.Function twin around them (cuda, triton)
    OP = "op"  # the torch op: compiling, exporting, a dispatch or function mode, tensor subclasses, vmap
    TRANSFORM = "transform"  # torch.func's grad, vjp, jvp (and the transforms built on them) or
    # forward-mode AD: the op's autograd.Function on every backend (its own setup_context and jvp)


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


def route(*tensors: Optional[Tensor]) -> Route:
    """How an eager call on these tensors runs. The op dispatch costs a small call tens of µs of host
    time (docs/design.md §13), so plain eager calls skip it; anything that must see the op (tracing,
    fake or functional tensors, modes) goes through it."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0
            or torch._C._is_torch_function_mode_enabled()):
        return Route.OP
    if peek_interpreter_stack() is not None or forward_ad._current_level >= 0:  # transform_route, inlined
        return transform_route()
    grad = torch.is_grad_enabled()
    needs_grad = False
    for t in tensors:
        if t is None:
            continue
        if type(t) not in _PLAIN_TENSOR_TYPES:
            return Route.OP
        needs_grad = needs_grad or (grad and t.requires_grad)
    return Route.FUNCTION if needs_grad else Route.KERNEL


def transform_route() -> Optional[Route]:
    """The route under a torch.func transform or forward-mode AD, else None (two cheap global reads).

    Their tensors are plain Tensors to Python (functorch wraps them in C++), so the type check above
    cannot see them. torch.library's ops have no forward-mode formula (their tangents would be
    dropped without a word) and functorch refuses their autograd, so these calls go to each op's
    autograd.Function, whose separate setup_context functorch needs and whose jvp computes the
    tangent. vmap alone (the innermost transform) goes to the torch op,
    which torch runs once per sample (its batching fallback)."""
    top = peek_interpreter_stack()
    if top is not None:
        return Route.OP if top.key() == TransformType.Vmap else Route.TRANSFORM
    return Route.TRANSFORM if forward_ad._current_level >= 0 else None


def transform_active() -> bool:
    """Whether a torch.func transform or forward-mode AD is active (transform_route gives a route)."""
    return peek_interpreter_stack() is not None or forward_ad._current_level >= 0


def runs_kernels(*tensors: Optional[Tensor]) -> bool:
    """Whether a backend kernel may be called directly on these tensors (an eager route), rather
    than through its torch op: the Triton kernels read raw pointers, which functorch's wrapped and
    batched tensors do not have, and tracing must see the op."""
    how = route(*tensors)
    return how is Route.KERNEL or how is Route.FUNCTION
