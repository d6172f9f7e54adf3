"""PlainASPP: the ASPP of the models built with fused=False, on plain PyTorch modules only.

torchvision's module tree and state_dict, the same as fastaspp.nn.ASPP's, so that plain and fused
models load each other's weights; fastaspp.convert turns it into fastaspp.nn.ASPP. It is a
production module: the tests' ground truth is fastaspp.reference.ASPP, which this must match.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from fastaspp.nn.aspp import ASPPPooling


def _conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, rate: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel_size, padding=rate if kernel_size > 1 else 0,
                                   dilation=rate, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())


class PlainASPP(nn.Module):
    """DeepLabV3's ASPP with torchvision's layout: convs.0 (1x1 Conv → BN → ReLU), convs.1 … convs.R
    (3x3 atrous, padding = dilation = rate), convs.R+1 (ASPPPooling), concatenated, then project
    (1x1 Conv → BN → ReLU → Dropout(0.5))."""

    def __init__(self, in_channels: int, atrous_rates: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        branches = [_conv_bn_relu(in_channels, out_channels, 1)]
        branches += [_conv_bn_relu(in_channels, out_channels, 3, r) for r in atrous_rates]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(), nn.Dropout(0.5))

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))
