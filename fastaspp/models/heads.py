"""Segmentation heads: DeepLabHead (ASPP), FCNHead (auxiliary) and CascadeHead (the paper's block5+).

DeepLabHead and FCNHead have torchvision's indices (so its state_dict); with fused=True their
3x3 Conv → BN → ReLU runs on fastaspp's op (called from forward, the children stay torch
modules) and the ASPP is fastaspp.nn.ASPP; fused=False is plain PyTorch (the ASPP is
fastaspp.models.plain_aspp.PlainASPP).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import Tensor, nn

from fastaspp.models._fuse import conv_bn_act
from fastaspp.models.plain_aspp import PlainASPP
from fastaspp.models.resnet import Bottleneck, FusedBottleneck, init_weights, make_units
from fastaspp.nn.aspp import ASPP


class DeepLabHead(nn.Sequential):
    """0: ASPP(in_channels, atrous_rates, 256), 1: Conv2d 3x3 (256→256), 2: BN, 3: ReLU, 4: Conv2d 1x1 → classes."""

    def __init__(self, in_channels: int, num_classes: int, atrous_rates: Sequence[int] = (12, 24, 36),
                 fused: bool = True) -> None:
        aspp = ASPP if fused else PlainASPP
        super().__init__(
            aspp(in_channels, tuple(atrous_rates), 256),
            nn.Conv2d(256, 256, 3, padding=1, bias=False),
            nn.BatchNorm2d(256),
            nn.ReLU(),
            nn.Conv2d(256, num_classes, 1),
        )
        self.fused = fused

    def forward(self, x: Tensor) -> Tensor:
        if not self.fused:
            return super().forward(x)
        return self[4](conv_bn_act(self[1], self[2], self[0](x), relu=True))


class FCNHead(nn.Sequential):
    """torchvision's aux head: 0: Conv2d 3x3 (in→in/4), 1: BN, 2: ReLU, 3: Dropout(0.1), 4: Conv2d 1x1 → channels."""

    def __init__(self, in_channels: int, channels: int, fused: bool = True) -> None:
        inter = in_channels // 4
        super().__init__(
            nn.Conv2d(in_channels, inter, 3, padding=1, bias=False),
            nn.BatchNorm2d(inter),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Conv2d(inter, channels, 1),
        )
        self.fused = fused

    def forward(self, x: Tensor) -> Tensor:
        if not self.fused:
            return super().forward(x)
        return self[4](self[3](conv_bn_act(self[0], self[1], x, relu=True)))


class CascadeHead(nn.Sequential):
    """The paper's cascaded model (Sec. 3.2): block5 … block(4+k) after layer4, then logits.

    Design (chosen here; the paper gives the blocks, not the classifier):
      * block(4+j), j = 1..k: a copy of layer4's design: 3 Bottleneck units, 512 → 2048 channels,
        stride 1 (the output stride stays that of layer4), no downsample (2048 in and out);
      * its rate doubles per block: block rate = layer4's rate × 2^j (layer4's rate is 2 at
        output stride 16, 4 at 8), and unit i's dilation = block rate × multi_grid[i];
      * logits: one 1x1 Conv2d (2048 → num_classes, with bias), no BN, no dropout.
    Keys: block5.0.conv1.weight … block5.2.bn3.*, block6.* …, logits.weight, logits.bias.
    With fused=True every unit's 3x3 conv → BN → ReLU runs on fastaspp's op.
    """

    def __init__(self, num_classes: int, blocks: int = 3, layer4_rate: int = 2,
                 multi_grid: Sequence[int] = (1, 1, 1), in_channels: int = 2048, fused: bool = True) -> None:
        unit = FusedBottleneck if fused else Bottleneck
        planes = in_channels // unit.expansion
        layers: OrderedDict[str, nn.Module] = OrderedDict()
        for j in range(1, blocks + 1):
            rate = layer4_rate * 2 ** j
            layers[f"block{4 + j}"] = make_units(unit, in_channels, planes, [rate * r for r in multi_grid])
        super().__init__(layers)
        init_weights(self)
        self.add_module("logits", nn.Conv2d(in_channels, num_classes, 1))
        self.rates = tuple(layer4_rate * 2 ** j for j in range(1, blocks + 1))
