"""What every fastaspp op module shares: the torch.library fragment its ops are defined in, and the
rule that routes an eager call past the op dispatch.

The C++ extension defines the library (TORCH_LIBRARY(fastaspp)) with the per-backend kernels;
the Python ops are added to it here with Library.define + impl + register_fake +
register_autograd, the cheapest registration that keeps opcheck, torch.compile(fullgraph=True)
and torch.export working.
"""
from __future__ import annotations

import contextlib
import enum
import threading
from typing import Callable, Iterator, Optional

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor
from torch._C._functorch import peek_interpreter_stack

from fastaspp import _ext  # noqa: F401  (loads fastaspp._C: TORCH_LIBRARY(fastaspp) comes first)

LIB = torch.library.Library("fastaspp", "FRAGMENT")


class Route(enum.Enum):
    KERNEL = "kernel"  # no autograd needed: the backend kernel, called directly
    FUNCTION = "function"  # eager autograd: the kernels' own (the cpu kernel op's C++ autograd), or the op's
    # autograd.Function twin around them (cuda, triton)
    OP = "op"  # the torch op: compiling, exporting, a dispatch or function mode, tensor subclasses
    TRANSFORM = "transform"  # a torch.func transform (grad, vjp, jvp, vmap, ...) or forward-mode AD: the
    # op's autograd.Function on every backend (transform_active)


_PLAIN_TENSOR_TYPES = (Tensor, torch.nn.Parameter)


class StaticArgs(tuple):
    """List arguments of an autograd.Function (stride, rates, ...) held as one pytree leaf: under
    vmap inside jvp, functorch flattens the Function's inputs into one in_dim per list element but
    gives each list one tangent, and the two no longer line up (torch 2.13). A tuple subclass is a
    leaf to torch.utils._pytree, and unpacks as a tuple."""

    __slots__ = ()


def route(*tensors: Optional[Tensor]) -> Route:
    """How an eager call on these tensors runs. The op dispatch costs a small call tens of µs of host
    time (docs/design.md §13), so plain eager calls skip it; anything that must see the op (tracing,
    fake or functional tensors, modes) goes through it."""
    if torch.compiler.is_compiling():
        return Route.OP
    if peek_interpreter_stack() is not None or forward_ad._current_level >= 0:  # transform_active, inlined
        return Route.TRANSFORM
    if torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled():
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


def transform_active() -> bool:
    """Whether a torch.func transform or forward-mode AD is active: the TRANSFORM route.

    functorch wraps tensors in C++, so they are plain Tensors to Python and the type check in route
    cannot see them. torch.library's ops have no forward-mode formula (a dual input's tangent would
    be dropped without a word) and functorch refuses their autograd (no separate setup_context), as
    it refuses C++ autograd nodes; so under a transform every call goes to its op's
    autograd.Function, which has both, a jvp and a generated vmap rule. Inside it the kernels run
    through the torch ops (op_for_transform), which functorch unwraps or runs once per sample."""
    return peek_interpreter_stack() is not None or forward_ad._current_level >= 0


@contextlib.contextmanager
def op_for_transform() -> Iterator[None]:
    """Marks the torch-op calls an op's autograd.Function makes under a transform, the only ones
    refuse_forward_ad lets run while forward-mode AD is active."""
    depth = getattr(_own_calls, "depth", 0)
    _own_calls.depth = depth + 1
    try:
        yield
    finally:
        _own_calls.depth = depth


def kernel_or_op(kernel: Callable, op: Callable, *args):
    """What an op's autograd.Function runs in forward: kernel(*args) on the eager route's plain
    tensors; under a transform (functorch's wrapped or batched tensors, which a kernel cannot read)
    the torch op with the same arguments, which functorch unwraps or runs once per sample."""
    if not transform_active():
        return kernel(*args)
    with op_for_transform():
        return op(*args)


def refuse_forward_ad(op: str) -> None:
    """Raises when torch op `op` is called from outside fastaspp's Functions under forward-mode AD:
    like every torch.library op it has no forward-mode formula, so its inputs' tangents would be
    dropped without an error. The Python entry points compute them, but not inside torch.compile,
    which sends every call to the op (its fake impl runs this check while tracing)."""
    if forward_ad._current_level >= 0 and not getattr(_own_calls, "depth", 0):
        raise RuntimeError(f"fastaspp: torch.ops.fastaspp.{op} has no forward-mode AD (a torch.library op drops "
                           f"its inputs' tangents); under jvp, jacfwd or forward_ad call fastaspp.ops.{op}, "
                           f"which computes them, outside torch.compile")


_own_calls = threading.local()


def runs_kernels(*tensors: Optional[Tensor]) -> bool:
    """Whether a backend kernel may be called directly on these tensors (an eager route), rather
    than through its torch op: the Triton kernels read raw pointers, which functorch's wrapped and
    batched tensors do not have, and tracing must see the op."""
    how = route(*tensors)
    return how is Route.KERNEL or how is Route.FUNCTION


def register_vmap_by_loop(name: str) -> None:
    """vmap of torch op fastaspp::<name> as a loop over the batch, one call per sample, outputs
    stacked at dim 0: torch's own fallback does this (with a warning asking for a batching rule),
    but not for an op with a Tensor[] argument (the ASPP ops' weights), which it refuses."""
    op = getattr(torch.ops.fastaspp, name).default
    torch.library.register_vmap(f"fastaspp::{name}", lambda info, in_dims, *args: vmap_loop(op, info, in_dims, args),
                                lib=LIB)


def vmap_loop(op, info, in_dims, args):
    """A vmap rule's result computed one sample at a time: (outputs stacked at dim 0, their out_dims)."""
    outs = [op(*(_sample(a, d, i) for a, d in zip(args, in_dims))) for i in range(info.batch_size)]
    if isinstance(outs[0], (tuple, list)):
        return tuple(torch.stack(parts) for parts in zip(*outs)), (0,) * len(outs[0])
    return torch.stack(outs), 0


def vmap_into_images(op, info, in_dims, args, size_at=None):
    """A vmap rule for a conv op whose first argument alone is batched: the vmapped dim becomes more
    images, [B, N, ...] -> [B·N, ...], so one kernel call serves the whole batch (per-sample
    gradients: the forward and the input gradient); `size_at` indexes a [N, C, H, W] size argument
    to scale. Anything else batched (the weights: per-sample weight gradients) loops."""
    if in_dims[0] is None or any(map(_batched, in_dims[1:])):
        return vmap_loop(op, info, in_dims, args)
    first = args[0].movedim(in_dims[0], 0)
    batch, images = first.shape[:2]
    rest = list(args[1:])
    if size_at is not None:
        size = list(rest[size_at - 1])
        rest[size_at - 1] = [batch * size[0], *size[1:]]
    out = op(first.reshape(batch * images, *first.shape[2:]), *rest)
    return out.reshape(batch, images, *out.shape[1:]), 0


def _batched(dim) -> bool:
    """Whether an argument's in_dim says it is batched (a list argument has one entry per element)."""
    return any(d is not None for d in dim) if isinstance(dim, (list, tuple)) else dim is not None


def _sample(arg, dim, i: int):
    """Sample i of a vmapped argument (dim None: not batched; a list's dims come one per tensor)."""
    if dim is None:
        return arg
    if isinstance(arg, (list, tuple)):
        return [a if d is None else a.select(d, i) for a, d in zip(arg, dim)]
    return arg.select(dim, i)
