"""Fused Conv2d → BatchNorm2d (→ ReLU) on fastaspp's op, for modules that keep their torch children.

The models keep torchvision's attributes (plain nn.Conv2d / nn.BatchNorm2d / nn.ReLU, so the
state_dict is torchvision's) and call `conv_bn_act` (fastaspp.nn.atrous_conv, the block that
ConvBNReLU runs too) in their forward instead of the children.
"""
from __future__ import annotations

from typing import List

from torch import Tensor, nn

from fastaspp.nn.atrous_conv import _check_fusable, conv_bn_act

__all__ = ["conv_bn_act", "FusedSequential", "fusable_runs"]


def _plain_forward(module: nn.Module, base: type) -> bool:
    """Whether `module`'s class runs `base`'s forward (a subclass with its own forward may do anything)."""
    return type(module).forward is base.forward and not module._forward_hooks and not module._forward_pre_hooks


def is_fusable_conv(conv: nn.Module) -> bool:
    """An nn.Conv2d that fastaspp's op can run: groups 1, zero padding, symmetric padding, plain forward."""
    if not isinstance(conv, nn.Conv2d) or not _plain_forward(conv, nn.Conv2d):
        return False
    if type(conv)._conv_forward is not nn.Conv2d._conv_forward:
        return False
    try:
        _check_fusable(conv)
    except ValueError:
        return False
    return True


def is_fusable_bn(bn: nn.Module, conv: nn.Conv2d) -> bool:
    """A BatchNorm2d over conv's output channels whose forward is BatchNorm2d's (or fastaspp's SyncBatchNorm2d)."""
    from fastaspp.nn.sync_bn import SyncBatchNorm2d

    plain = _plain_forward(bn, nn.BatchNorm2d) or (type(bn) is SyncBatchNorm2d and not bn._forward_hooks
                                                   and not bn._forward_pre_hooks)
    return isinstance(bn, nn.BatchNorm2d) and plain and bn.num_features == conv.out_channels


def is_plain_relu(relu: nn.Module) -> bool:
    return isinstance(relu, nn.ReLU) and _plain_forward(relu, nn.ReLU)


def fusable_runs(modules: List[nn.Module]) -> List[int]:
    """Start indices of non-overlapping Conv2d → BatchNorm2d → ReLU runs that conv_bn_act can run."""
    runs, i = [], 0
    while i + 2 < len(modules):
        conv, bn, relu = modules[i:i + 3]
        if is_fusable_conv(conv) and is_fusable_bn(bn, conv) and is_plain_relu(relu):
            runs.append(i)
            i += 3
        else:
            i += 1
    return runs


class FusedSequential(nn.Sequential):
    """nn.Sequential (same children, indices and state_dict) whose Conv2d → BatchNorm2d → ReLU runs
    go through conv_bn_act. The runs are found once, at construction (refresh with `find_runs`)."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.find_runs()

    def find_runs(self) -> None:
        self._fused_runs = tuple(fusable_runs(list(self)))

    @classmethod
    def from_sequential(cls, seq: nn.Sequential) -> FusedSequential:
        """A FusedSequential holding seq's children (shared, not copied) under the same names."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        for name, child in seq.named_children():
            new.add_module(name, child)
        new.train(seq.training)
        new.find_runs()
        return new

    def forward(self, x: Tensor) -> Tensor:
        modules = list(self)
        i = 0
        while i < len(modules):
            if i in self._fused_runs:
                x = conv_bn_act(modules[i], modules[i + 1], x, relu=True)
                i += 3
            else:
                x = modules[i](x)
                i += 1
        return x
