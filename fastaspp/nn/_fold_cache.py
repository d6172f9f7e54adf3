"""A memo for a module's folded (eval) parameters: BN folding and weight preparation run once per
parameter version rather than every call (docs/design.md §12).

A kept value is valid while every tensor it came from is the same object with the same
fastaspp._rules.version_stamp (storage and version counter); that module states the rule the
backends' caches follow too. The memo is dropped when the module trains (the
train/eval switch), bypassed under torch.compile (the graph folds the few [C]-sized ops itself)
and whenever autograd or a torch.func transform would record the fold (a kept value would carry
one call's graph into the next backward, or drop the transform's gradients). Kept values are
computed outside inference mode, so that they are ordinary tensors with version counters (the
backends keep their re-laid-out weights by them).
"""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional

import torch
from torch import Tensor, nn

from fastaspp._rules import version_stamp
from fastaspp.ops._library import transform_active


def state_tensors(module: nn.Module, out: Optional[List[Tensor]] = None) -> List[Tensor]:
    """module's parameters and buffers, from its submodules' own dicts: much cheaper than
    parameters() + buffers() (no name building, no de-duplication set), which a per-call check needs."""
    out = [] if out is None else out
    for t in module._parameters.values():
        if t is not None:
            out.append(t)
    for t in module._buffers.values():
        if t is not None:
            out.append(t)
    for child in module._modules.values():
        if child is not None:
            state_tensors(child, out)
    return out


def records_autograd(tensors: Iterable[Optional[Tensor]]) -> bool:
    """Whether autograd would record a computation from these tensors right now, or a torch.func
    transform or forward-mode AD is active: their tensors look plain to Python, and a kept (detached)
    fold of them would drop their gradients, tangents or batch dimension."""
    return transform_active() or (torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors))


class FoldCache:
    """Holds what `compute()` returned until one of its source tensors changes (the rule above)."""

    def __init__(self) -> None:
        self.stamp: Optional[List] = None
        self.value = None

    def clear(self) -> None:
        self.stamp = self.value = None

    def _valid(self, tensors: List[Optional[Tensor]], context: tuple) -> bool:
        stamp = self.stamp
        if stamp is None or stamp[0] != context or len(stamp) != len(tensors) + 1:
            return False
        for t, (kept, version, data) in zip(tensors, stamp[1:]):
            # The stamp holds the tensors themselves, so no other tensor can reuse their identity.
            # version_stamp, unrolled: this runs for every tensor of a module on every call.
            if t is not kept or (t is not None and (t._version != version or t.data_ptr() != data)):
                return False
        return True

    def get(self, tensors: List[Optional[Tensor]], context: tuple, compute: Callable[[], object]):
        """compute()'s value for these source tensors; `context` (hashable: the input's dtype and
        device, hyper-parameters such as a BN's eps) must match as well. Under torch.compile the
        value is computed afresh (the graph holds the fold); callers bypass the memo when autograd
        records the fold (records_autograd)."""
        if torch.compiler.is_compiling():
            return compute()
        if not self._valid(tensors, context):
            stamp = [context] + [(t, *version_stamp(t)) if t is not None else (None, 0, 0) for t in tensors]
            with torch.inference_mode(False), torch.no_grad():
                self.value = compute()
            self.stamp = stamp
        return self.value
