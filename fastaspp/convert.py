"""fastaspp.convert: swap a model's ASPP and Conv2d → BatchNorm2d → ReLU runs for fastaspp's fused modules.

What is converted (recognised by structure, state_dict keys and outputs unchanged; the converted
modules share the original parameters and buffers, nothing is copied):
  * ASPP: a module whose class is named "ASPP" (torchvision's), or fastaspp.models.PlainASPP (the
    ASPP of fastaspp's models built with fused=False), with `convs` (ModuleList: a 1x1 Conv-BN-ReLU,
    one 3x3 Conv-BN-ReLU per rate with padding = dilation = rate, and an image-pooling Sequential of
    AdaptiveAvgPool2d, 1x1 Conv, BN, ReLU) and `project` (1x1 Conv, BN, ReLU, Dropout), all convs
    bias-free → fastaspp.nn.ASPP.
  * ResNet blocks: a module whose class is named "Bottleneck" (conv1..3, bn1..3, relu, downsample)
    or "BasicBlock" (conv1, bn1, relu, conv2, bn2, downsample) → fastaspp.models.resnet's
    FusedBottleneck (3x3 conv2 → bn2 → relu fused) or FusedBasicBlock (conv1 → bn1 → relu and
    conv2 → bn2 fused), the same attributes.
  * fastaspp's own DeepLabHead / FCNHead built with fused=False: switched to fused=True.
  * nn.Sequential containers (classes that keep nn.Sequential's forward): one that is exactly
    [Conv2d, BatchNorm2d, ReLU] → fastaspp.nn.ConvBNReLU; one that holds such runs among other
    modules (torchvision's DeepLabHead, FCNHead) → FusedSequential, same children and indices,
    whose forward runs each run as one fused op.
A conv is fusable when it is a plain nn.Conv2d with groups 1, zero padding and symmetric padding
('same' with an even total is refused), its BN a BatchNorm2d over its channels, its activation
nn.ReLU; modules with forward hooks, or subclasses with their own forward, are left alone.
Everything else (depthwise convs, Hardswish, pooling, …) is left as it is.
"""
from __future__ import annotations

import copy

import torch
from torch import nn

from fastaspp.models._fuse import (
    FusedSequential,
    fusable_runs,
    is_fusable_bn,
    is_fusable_conv,
    is_plain_relu,
)
from fastaspp.models.heads import DeepLabHead, FCNHead
from fastaspp.models.plain_aspp import PlainASPP
from fastaspp.models.resnet import FusedBasicBlock, FusedBottleneck
from fastaspp.nn.aspp import ASPP
from fastaspp.nn.atrous_conv import ConvBNReLU

__all__ = ["convert"]


def convert(model: nn.Module, inplace: bool = False) -> nn.Module:
    """`model` with its ASPPs, ResNet blocks and Conv-BN-ReLU runs on fastaspp's fused modules.

    inplace=False (default) converts a deep copy and leaves `model` untouched. The result has the
    same state_dict keys and, up to float rounding, the same outputs in eval and in training.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    return _convert(model)


def _convert(module: nn.Module) -> nn.Module:
    replaced = _replacement(module)
    if replaced is not None:
        module = replaced
    if isinstance(module, ASPP):
        return module  # already fused throughout
    for name, child in list(module.named_children()):
        new = _convert(child)
        if new is not child:
            setattr(module, name, new)
    if isinstance(module, FusedSequential):
        module.find_runs()  # children may have changed
    return module


def _replacement(module: nn.Module):
    """The fused module that takes `module`'s place, or None."""
    if isinstance(module, (DeepLabHead, FCNHead)):
        module.fused = True  # fastaspp's own heads (built with fused=False): same children, fused forward
        return None
    name = type(module).__name__
    if (name == "ASPP" or isinstance(module, PlainASPP)) and not isinstance(module, ASPP):
        return _aspp(module)
    if name == "Bottleneck" and type(module) is not FusedBottleneck:
        return _block(module, FusedBottleneck, ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3", "relu"), "conv2")
    if name == "BasicBlock" and type(module) is not FusedBasicBlock:
        return _block(module, FusedBasicBlock, ("conv1", "bn1", "relu", "conv2", "bn2"), "conv1", "conv2")
    if isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward \
            and not isinstance(module, (ConvBNReLU, FusedSequential)):
        children = list(module)
        runs = fusable_runs(children)
        if runs == [0] and len(children) == 3:
            fused = ConvBNReLU.from_modules(children[0], children[1])
            fused.train(module.training)
            _copy_plain_attributes(module, fused)
            return fused
        if runs:
            fused = FusedSequential.from_sequential(module)
            _copy_plain_attributes(module, fused)
            return fused
    return None


def _copy_plain_attributes(src: nn.Module, dst: nn.Module) -> None:
    """Public non-module attributes (e.g. torchvision's Conv2dNormActivation.out_channels)."""
    for key, value in vars(src).items():
        if not key.startswith("_") and key != "training" and not hasattr(dst, key):
            setattr(dst, key, value)


def _block(module: nn.Module, cls: type, attributes: tuple, *fused_convs: str):
    """A `cls` instance holding module's attributes (children shared), when its fused convs are fusable."""
    if not all(hasattr(module, a) for a in attributes) or not is_plain_relu(module.relu):
        return None
    for conv_name in fused_convs:
        conv, bn = getattr(module, conv_name), getattr(module, "bn" + conv_name[-1])
        if not (is_fusable_conv(conv) and is_fusable_bn(bn, conv)):
            return None
    if module._forward_hooks or module._forward_pre_hooks:
        return None
    new = cls.__new__(cls)
    new.__dict__.update(vars(module))  # children, parameters, buffers, flags: the block's own state
    for registry in ("_modules", "_parameters", "_buffers"):
        new.__dict__[registry] = dict(vars(module)[registry])
    if "downsample" not in new._modules and not hasattr(new, "downsample"):
        new.downsample = None
    return new


def _is_conv_bn_relu(seq: nn.Module, kernel: int) -> bool:
    if not isinstance(seq, nn.Sequential) or len(seq) != 3:
        return False
    conv, bn, relu = seq
    return (is_fusable_conv(conv) and conv.kernel_size == (kernel, kernel) and conv.bias is None
            and conv.stride == (1, 1) and is_fusable_bn(bn, conv) and is_plain_relu(relu))


def _aspp(module: nn.Module):
    """fastaspp.nn.ASPP holding a torchvision-style ASPP's modules, or None when the structure differs."""
    convs, project = getattr(module, "convs", None), getattr(module, "project", None)
    if not isinstance(convs, nn.ModuleList) or not isinstance(project, nn.Sequential) or not 3 <= len(convs) <= 6:
        return None
    if not _is_conv_bn_relu(convs[0], 1):
        return None
    rates = []
    for branch in convs[1:-1]:
        if not _is_conv_bn_relu(branch, 3):
            return None
        conv = branch[0]
        rate = conv.dilation[0]
        if conv.dilation != (rate, rate) or conv.padding != (rate, rate):
            return None
        rates.append(rate)
    pool = convs[-1]
    if not (isinstance(pool, nn.Sequential) and len(pool) == 4 and isinstance(pool[0], nn.AdaptiveAvgPool2d)
            and pool[0].output_size in (1, (1, 1))
            and isinstance(pool[1], nn.Conv2d) and pool[1].kernel_size == (1, 1) and pool[1].bias is None
            and isinstance(pool[2], nn.BatchNorm2d) and is_plain_relu(pool[3])):
        return None
    if not (len(project) == 4 and isinstance(project[0], nn.Conv2d) and project[0].bias is None
            and isinstance(project[1], nn.BatchNorm2d) and is_plain_relu(project[2])
            and isinstance(project[3], nn.Dropout)):
        return None
    in_channels, out_channels = convs[0][0].in_channels, convs[0][0].out_channels
    # Built on the meta device (nothing allocated), then given the original modules.
    with torch.device("meta"):
        new = ASPP(in_channels, rates, out_channels)
    new.convs = nn.ModuleList([ConvBNReLU.from_modules(b[0], b[1]) for b in convs[:-1]] + [pool])
    new.project = project
    new.train(module.training)
    if list(new.state_dict()) != list(module.state_dict()):
        return None
    return new
