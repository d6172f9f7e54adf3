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


class ASPPPooling(nn.Sequential):
    """Image pooling branch: global average → 1x1 conv → BN → ReLU → back to the map size."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        for module in self:
            x = module(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """DeepLabV3's ASPP in torchvision's module layout (convs.0 … convs.R+1, project.0 … project.3):
    a 1x1 branch, one 3x3 atrous branch per rate and image pooling, each conv → BN → ReLU,
    concatenated, then a 1x1 projection → BN → ReLU → Dropout(0.5)."""

    def __init__(self, in_channels: int, atrous_rates: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        branches = [conv_bn_relu(in_channels, out_channels, 1)]
        branches += [conv_bn_relu(in_channels, out_channels, 3, padding=r, dilation=r) for r in atrous_rates]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(), nn.Dropout(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))
