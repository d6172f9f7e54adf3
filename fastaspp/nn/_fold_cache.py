"""A memo for a module's folded (eval) parameters, so BN folding runs once rather than every call."""
from __future__ import annotations

import itertools
from typing import Callable, Optional

import torch
from torch import Tensor, nn


def needs_autograd(module: nn.Module) -> bool:
    """Whether autograd would record a computation from module's parameters right now."""
    return torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())


class FoldCache:
    """Holds what `compute()` returned until the module's parameters or buffers change.

    The key is every parameter's and buffer's (data_ptr, _version) plus the input's dtype and
    device: in-place updates (optimizer steps, load_state_dict, running-stat updates) bump
    _version, reassignment changes data_ptr. The memo is bypassed under torch.compile (the graph
    folds the few [C]-sized ops itself) and whenever autograd would record the fold (a kept value
    would carry one call's graph into the next backward). Kept values are computed outside
    inference mode, so that they are ordinary tensors with version counters (the Triton backend
    keeps its re-laid-out weights by them).
    """

    def __init__(self) -> None:
        self.key: Optional[tuple] = None
        self.value = None

    def get(self, module: nn.Module, x: Tensor, compute: Callable[[], object]):
        if torch.compiler.is_compiling() or needs_autograd(module):
            return compute()
        tensors = itertools.chain(module.parameters(), module.buffers())
        key = (x.dtype, x.device) + tuple((t.data_ptr(), t._version) for t in tensors)
        if key != self.key:
            with torch.inference_mode(False), torch.no_grad():
                self.value = compute()
            self.key = key
        return self.value
