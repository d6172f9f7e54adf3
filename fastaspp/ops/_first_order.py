"""Backwards that are differentiable once: their gradients refuse a second backward.

The fused ops' backwards call kernels that autograd cannot see through (Triton, the C++ ops), so
under create_graph=True their gradients would carry no graph, or one that misses every term through
those kernels, and second derivatives would come out silently incomplete. `first_order_only` runs
such a backward without recording it and, when a graph is being built, gives its gradients a node
that raises on the second backward, naming the op: what the cpu conv's C++ node does
(csrc/cpu/atrous_conv_autograd.cpp). torch's once_differentiable is not enough here: it only
looks at the incoming gradients, while these gradients also depend on the saved inputs.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import Tensor
from torch._C._functorch import peek_interpreter_stack


class _SecondBackwardRefused(torch.autograd.Function):
    """Identity on the first `count` tensors (the gradients), whose own backward raises; the rest
    are anchors: what the gradients depend on, so that the node is recorded wherever they are."""

    generate_vmap_rule = True  # functorch's jacrev runs backwards under vmap

    @staticmethod
    def forward(message: str, count: int, *tensors: Tensor):
        return tuple(g.view_as(g) for g in tensors[:count])

    @staticmethod
    def setup_context(ctx, inputs, output):  # a separate setup_context: what torch.func's transforms need
        ctx.message = inputs[0]

    @staticmethod
    def backward(ctx, *unused):
        raise RuntimeError(ctx.message)

    @staticmethod
    def jvp(ctx, *unused):  # forward mode over the backward (torch.func.jacfwd of a gradient, hessian)
        raise RuntimeError(ctx.message)


def first_order_only(op: str, instead: str) -> Callable:
    """Decorates a backward(ctx, *grad_outputs) of `op` (an autograd.Function's or a torch.library
    registration's, whose ctx carries the backend) so that it is differentiable once (see above);
    the error names `instead`, what computes higher-order gradients."""

    def decorate(backward: Callable) -> Callable:
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            if not torch.is_grad_enabled():  # the usual backward: nothing is recorded
                return backward(ctx, *grad_outputs)
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            flat = [g for g in _leaves(grads) if g is not None]
            if not flat:
                return grads
            message = (f"fastaspp: {op} on the {ctx.backend} backend has no double backward (a gradient of its "
                       f"gradients); use {instead} for higher-order gradients")
            if peek_interpreter_stack() is None:
                # The node needs inputs that require grad to be recorded; the gradients are fresh tensors.
                refused = _SecondBackwardRefused.apply(message, len(flat), *(g.detach().requires_grad_() for g in flat))
            else:
                # Under torch.func (whose transforms refuse requires_grad_), a gradient of these gradients
                # is taken with respect to the transform's inputs: anchored on the saved tensors and the
                # incoming gradients, the node is on every path from them.
                anchors = [t for t in (*ctx.saved_tensors, *grad_outputs) if isinstance(t, Tensor)]
                refused = _SecondBackwardRefused.apply(message, len(flat), *flat, *anchors)
            swap = dict(zip(map(id, flat), refused))
            return _replace(grads, swap)

        return wrapper

    return decorate


def _leaves(grads):
    for g in grads:
        if isinstance(g, (list, tuple)):  # a Tensor[] argument's gradients (torch.library autograd)
            yield from g
        else:
            yield g


def _replace(grads, swap):
    return tuple(type(g)(swap.get(id(t), t) for t in g) if isinstance(g, (list, tuple)) else swap.get(id(g), g)
                 for g in grads)
