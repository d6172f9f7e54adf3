"""ResNet backbones with torchvision's module tree and state_dict, plus the paper's multi-grid.

Bottleneck / BasicBlock are torchvision's blocks. FusedBottleneck / FusedBasicBlock are the
same blocks (same attributes, so the same state_dict) whose 3x3 Conv → BN (→ ReLU) run on
fastaspp's op (see fastaspp.models._fuse.conv_bn_act); their 1x1 convs, the stem (7x7 conv,
BN, ReLU, max-pool) and the residual add stay torch ops.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Type, Union

from torch import Tensor, nn

from fastaspp.models._fuse import conv_bn_act, is_fusable_bn, is_fusable_conv


def conv3x3(in_planes: int, out_planes: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """Two 3x3 convs (stride on the first) and a residual; torchvision's (dilation 1 only)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 dilation: int = 1, norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        if dilation > 1:
            raise ValueError(f"BasicBlock supports dilation 1 only (as torchvision's), got dilation={dilation}")
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + identity)


class FusedBasicBlock(BasicBlock):
    """BasicBlock with conv1 → bn1 → relu and conv2 → bn2 on fastaspp's op."""

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = conv_bn_act(self.conv2, self.bn2, conv_bn_act(self.conv1, self.bn1, x, relu=True), relu=False)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """1x1 → 3x3 (stride, dilation) → 1x1 (x4 channels), each with BN, and a residual; torchvision's."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 dilation: int = 1, norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = norm_layer(planes)
        self.conv2 = conv3x3(planes, planes, stride, dilation)
        self.bn2 = norm_layer(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def _middle(self, out: Tensor) -> Tensor:
        return self.relu(self.bn2(self.conv2(out)))

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn3(self.conv3(self._middle(out)))
        out += identity
        return self.relu(out)


class FusedBottleneck(Bottleneck):
    """Bottleneck with the 3x3 conv2 → bn2 → relu on fastaspp's op (one op in eval, BN folded).

    In eval on CPU tensors the 1x1 convs with their BN (conv1 → bn1 → relu, conv3 → bn3, and the
    downsample's conv → BN) run on the op too: the cpu backend runs them on oneDNN with the BN folded
    into the weight (docs/design.md §8), which saves each BN's pass over the activations and its
    output allocation. In training they stay torch modules, whose oneDNN backward the cpu backend
    would not beat on 1x1 convs, and on GPU tensors too, until a GPU run has measured the GPU
    backends' 1x1 convs against cuDNN's.
    """

    def _middle(self, out: Tensor) -> Tensor:
        return conv_bn_act(self.conv2, self.bn2, out, relu=True)

    def forward(self, x: Tensor) -> Tensor:
        if self.training or x.device.type != "cpu":
            return super().forward(x)
        identity = x if self.downsample is None else self._shortcut(x)
        out = conv_bn_act(self.conv1, self.bn1, x, relu=True)
        out = conv_bn_act(self.conv3, self.bn3, self._middle(out), relu=False)
        out += identity
        return self.relu(out)

    def _shortcut(self, x: Tensor) -> Tensor:
        down = self.downsample
        if type(down) is nn.Sequential and len(down) == 2:
            conv, bn = down
            if is_fusable_conv(conv) and is_fusable_bn(bn, conv):
                return conv_bn_act(conv, bn, x, relu=False)
        return down(x)


Block = Union[Type[BasicBlock], Type[Bottleneck]]


def make_units(block: Block, inplanes: int, planes: int, dilations: Sequence[int], stride: int = 1) -> nn.Sequential:
    """len(dilations) units of `block`; the first gets `stride` and, when the channels or the stride
    change, torchvision's downsample (1x1 conv with the stride, BN)."""
    downsample = None
    if stride != 1 or inplanes != planes * block.expansion:
        downsample = nn.Sequential(conv1x1(inplanes, planes * block.expansion, stride),
                                   nn.BatchNorm2d(planes * block.expansion))
    units: List[nn.Module] = [block(inplanes, planes, stride, downsample, dilations[0])]
    units += [block(planes * block.expansion, planes, dilation=d) for d in dilations[1:]]
    return nn.Sequential(*units)


class ResNet(nn.Module):
    """torchvision's ResNet (stem, layer1..layer4, avgpool, fc) for `block` and `layers`.

    replace_stride_with_dilation[i] turns layer{i+2}'s stride 2 into dilation, as torchvision:
    the layer's rate doubles, and its first unit keeps the previous rate (torchvision's rule).
    multi_grid=(r1, r2, r3) (the paper's Multi-Grid) sets unit i of layer4 to rate × r_i,
    every unit included (layer4's rate: 1, or 2 and 4 when dilated at output stride 16 and 8).
    """

    def __init__(self, block: Block, layers: Sequence[int], num_classes: int = 1000,
                 replace_stride_with_dilation: Sequence[bool] = (False, False, False),
                 multi_grid: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        if len(replace_stride_with_dilation) != 3:
            raise ValueError(f"replace_stride_with_dilation must hold 3 bools, got {replace_stride_with_dilation}")
        if multi_grid is not None and len(multi_grid) != layers[3]:
            raise ValueError(f"multi_grid must hold one rate per unit of layer4 ({layers[3]}), got {tuple(multi_grid)}")
        self.inplanes, self.dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], 2, replace_stride_with_dilation[0])
        self.layer3 = self._make_layer(block, 256, layers[2], 2, replace_stride_with_dilation[1])
        self.layer4 = self._make_layer(block, 512, layers[3], 2, replace_stride_with_dilation[2], multi_grid)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        init_weights(self)

    def _make_layer(self, block: Block, planes: int, blocks: int, stride: int = 1, dilate: bool = False,
                    multi_grid: Optional[Sequence[int]] = None) -> nn.Sequential:
        previous = self.dilation
        if dilate:
            self.dilation *= stride
            stride = 1
        if multi_grid is None:
            dilations = [previous] + [self.dilation] * (blocks - 1)
        else:
            dilations = [self.dilation * r for r in multi_grid]
        layer = make_units(block, self.inplanes, planes, dilations, stride)
        self.inplanes = planes * block.expansion
        return layer

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


def init_weights(module: nn.Module) -> None:
    """torchvision's ResNet init: Kaiming-normal (fan_out) convs, BN weight 1 and bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


LAYERS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}


def resnet(arch: str, fused: bool = True, **kwargs) -> ResNet:
    """ResNet-50 or -101 (`arch`) with Bottleneck units, fused or plain."""
    return ResNet(FusedBottleneck if fused else Bottleneck, LAYERS[arch], **kwargs)
