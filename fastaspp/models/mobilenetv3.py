"""MobileNetV3-Large with torchvision's module tree and state_dict (BN eps 0.001, momentum 0.01).

Not fused: its convs are 1x1 or depthwise (groups = channels, which fastaspp's op does not
support: groups must be 1) and most activations are Hardswish. The DeepLabV3 head on top of it
(ASPP and the 3x3 Conv-BN-ReLU) is fused.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, List, NamedTuple, Optional

import torch
from torch import Tensor, nn

norm_layer = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)


def make_divisible(v: float, divisor: int = 8) -> int:
    """Nearest multiple of `divisor` (at least `divisor`), never more than 10% below v (the TF rule)."""
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


class Conv2dNormActivation(nn.Sequential):
    """Conv2d (padding (k-1)//2·dilation, no bias) → BN → activation (None: none), as torchvision's."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, stride: int = 1,
                 groups: int = 1, dilation: int = 1,
                 activation_layer: Optional[Callable[..., nn.Module]] = nn.ReLU) -> None:
        layers: List[nn.Module] = [
            nn.Conv2d(in_channels, out_channels, kernel_size, stride, (kernel_size - 1) // 2 * dilation,
                      dilation=dilation, groups=groups, bias=False),
            norm_layer(out_channels)]
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_channels


class SqueezeExcitation(nn.Module):
    """x · hardsigmoid(fc2(relu(fc1(avgpool(x))))): torchvision's SE with MobileNetV3's gate."""

    def __init__(self, input_channels: int, squeeze_channels: int) -> None:
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = nn.ReLU()
        self.scale_activation = nn.Hardsigmoid()

    def forward(self, x: Tensor) -> Tensor:
        scale = self.fc2(self.activation(self.fc1(self.avgpool(x))))
        return self.scale_activation(scale) * x


class BlockConfig(NamedTuple):
    input_channels: int
    kernel: int
    expanded_channels: int
    out_channels: int
    use_se: bool
    use_hs: bool  # Hardswish, else ReLU
    stride: int
    dilation: int = 1


class InvertedResidual(nn.Module):
    """Expand (1x1, skipped when no expansion) → depthwise k x k → SE (optional) → project (1x1)."""

    def __init__(self, cnf: BlockConfig) -> None:
        super().__init__()
        self.use_res_connect = cnf.stride == 1 and cnf.input_channels == cnf.out_channels
        act = nn.Hardswish if cnf.use_hs else nn.ReLU
        layers: List[nn.Module] = []
        if cnf.expanded_channels != cnf.input_channels:
            layers.append(Conv2dNormActivation(cnf.input_channels, cnf.expanded_channels, 1, activation_layer=act))
        # A dilated block keeps the resolution: its stride becomes dilation (torchvision's rule).
        stride = 1 if cnf.dilation > 1 else cnf.stride
        layers.append(Conv2dNormActivation(cnf.expanded_channels, cnf.expanded_channels, cnf.kernel, stride,
                                           groups=cnf.expanded_channels, dilation=cnf.dilation,
                                           activation_layer=act))
        if cnf.use_se:
            layers.append(SqueezeExcitation(cnf.expanded_channels, make_divisible(cnf.expanded_channels // 4)))
        layers.append(Conv2dNormActivation(cnf.expanded_channels, cnf.out_channels, 1, activation_layer=None))
        self.block = nn.Sequential(*layers)
        self.out_channels = cnf.out_channels
        self._is_cn = cnf.stride > 1  # starts a stage (C1..C4), dilated or not

    def forward(self, x: Tensor) -> Tensor:
        out = self.block(x)
        if self.use_res_connect:
            out += x
        return out


# MobileNetV3-Large (paper Table 1): in, kernel, expanded, out, SE, Hardswish, stride.
_LARGE = [
    (16, 3, 16, 16, False, False, 1),
    (16, 3, 64, 24, False, False, 2),  # C1
    (24, 3, 72, 24, False, False, 1),
    (24, 5, 72, 40, True, False, 2),  # C2
    (40, 5, 120, 40, True, False, 1),
    (40, 5, 120, 40, True, False, 1),
    (40, 3, 240, 80, False, True, 2),  # C3
    (80, 3, 200, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 184, 80, False, True, 1),
    (80, 3, 480, 112, True, True, 1),
    (112, 3, 672, 112, True, True, 1),
    (112, 5, 672, 160, True, True, 2),  # C4
    (160, 5, 960, 160, True, True, 1),
    (160, 5, 960, 160, True, True, 1),
]


def large_config(output_stride: int = 32) -> List[BlockConfig]:
    """The block configs; stages that would go past `output_stride` are dilated instead (rate x2 per
    stage, every block of the stage, as torchvision's dilated=True, which is output_stride=16)."""
    configs, current, dilation = [], 2, 1  # the stem has stride 2
    for row in _LARGE:
        if row[6] == 2:
            if current >= output_stride:
                dilation *= 2
            else:
                current *= 2
        configs.append(BlockConfig(*row, dilation=dilation))
    return configs


class MobileNetV3(nn.Module):
    """torchvision's MobileNetV3: features (stem, blocks, last 1x1 conv), avgpool, classifier."""

    def __init__(self, configs: List[BlockConfig], last_channel: int = 1280, num_classes: int = 1000,
                 dropout: float = 0.2) -> None:
        super().__init__()
        layers: List[nn.Module] = [
            Conv2dNormActivation(3, configs[0].input_channels, 3, stride=2, activation_layer=nn.Hardswish)]
        layers += [InvertedResidual(cnf) for cnf in configs]
        last_in = configs[-1].out_channels
        layers.append(Conv2dNormActivation(last_in, 6 * last_in, 1, activation_layer=nn.Hardswish))
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Linear(6 * last_in, last_channel), nn.Hardswish(inplace=True),
                                        nn.Dropout(p=dropout, inplace=True), nn.Linear(last_channel, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.avgpool(self.features(x)), 1))


def mobilenet_v3_large(output_stride: int = 32) -> MobileNetV3:
    return MobileNetV3(large_config(output_stride))
