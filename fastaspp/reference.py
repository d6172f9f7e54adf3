"""Plain PyTorch implementations: the ground truth of every test and the baseline of every benchmark."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IntPair = Union[int, Sequence[int]]


def atrous_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1,
                  padding: IntPair = 0, dilation: IntPair = 1, *, scale: Optional[Tensor] = None,
                  shift: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """act(conv2d(x, weight, bias, stride, padding, dilation) * scale + shift), unfused."""
    y = F.conv2d(x, weight, bias, stride, padding, dilation)
    if scale is not None:
        y = y * scale.view(1, -1, 1, 1)
    if shift is not None:
        y = y + shift.view(1, -1, 1, 1)
    return F.relu(y) if relu else y


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1, padding: int = 0,
                 dilation: int = 1, bias: bool = False) -> nn.Sequential:
    """The module fastaspp.nn.ConvBNReLU replaces: Conv2d → BatchNorm2d → ReLU."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
                  bias=bias),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )
