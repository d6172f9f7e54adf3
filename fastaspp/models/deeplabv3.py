"""DeepLabV3 (Chen et al., arXiv 1706.05587) with torchvision's interface, module tree and state_dict.

The builders take torchvision's arguments (num_classes, aux_loss, weights, weights_backbone;
weights are local files only, nothing is ever downloaded) plus the paper's options that
torchvision lacks: output_stride, multi_grid, head="cascade", atrous_rates. fused=True (the
default) runs the atrous convs on fastaspp's ops; fused=False is plain PyTorch with the same
state_dict (`plain.load_state_dict(fused.state_dict(), strict=True)` works both ways).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch.nn.functional as F
from torch import Tensor, nn

from fastaspp.models._utils import IntermediateLayerGetter
from fastaspp.models._weights import PathLike, load_state, load_weights, read_state_dict
from fastaspp.models.heads import CascadeHead, DeepLabHead, FCNHead
from fastaspp.models.mobilenetv3 import mobilenet_v3_large
from fastaspp.models.resnet import resnet

OUTPUT_STRIDES = (8, 16)
HEADS = ("aspp", "cascade")


class DeepLabV3(nn.Module):
    """backbone (returns {"out": features[, "aux": features]}) → classifier [, aux_classifier],
    each output upsampled bilinearly (align_corners=False) to the input size: {"out"[, "aux"]}."""

    def __init__(self, backbone: nn.Module, classifier: nn.Module, aux_classifier: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        self.aux_classifier = aux_classifier

    def forward(self, x: Tensor) -> Dict[str, Tensor]:
        size = x.shape[-2:]
        features = self.backbone(x)
        result: Dict[str, Tensor] = OrderedDict()
        result["out"] = F.interpolate(self.classifier(features["out"]), size=size, mode="bilinear",
                                      align_corners=False)
        if self.aux_classifier is not None:
            result["aux"] = F.interpolate(self.aux_classifier(features["aux"]), size=size, mode="bilinear",
                                          align_corners=False)
        return result


# ---------------------------------------------------------------- argument checks
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_common(num_classes, aux_loss, output_stride, atrous_rates, fused) -> None:
    if num_classes is not None and not (_is_int(num_classes) and num_classes >= 1):
        raise ValueError(f"num_classes must be an int >= 1 (or None: 21, or the weights file's), got {num_classes!r}")
    if aux_loss is not None and not isinstance(aux_loss, bool):
        raise ValueError(f"aux_loss must be True, False or None, got {aux_loss!r}")
    if output_stride not in OUTPUT_STRIDES or not _is_int(output_stride):
        raise ValueError(f"output_stride must be one of {OUTPUT_STRIDES}, got {output_stride!r}")
    if atrous_rates is not None:
        rates = tuple(atrous_rates) if isinstance(atrous_rates, (list, tuple)) else None
        if not rates or len(rates) > 4 or not all(_is_int(r) and r >= 1 for r in rates):
            raise ValueError(f"atrous_rates must be a list or tuple of 1 to 4 ints >= 1, got {atrous_rates!r}")
    if not isinstance(fused, bool):
        raise ValueError(f"fused must be True or False, got {fused!r}")


def _check_resnet_options(head, cascade_blocks, multi_grid, atrous_rates) -> None:
    if head not in HEADS:
        raise ValueError(f"head must be one of {HEADS}, got {head!r}")
    if head == "aspp" and cascade_blocks is not None:
        raise ValueError(f"cascade_blocks applies to head='cascade' only, got cascade_blocks={cascade_blocks!r} "
                         f"with head='aspp'")
    if head == "cascade":
        if atrous_rates is not None:
            raise ValueError(f"atrous_rates applies to head='aspp' only, got atrous_rates={atrous_rates!r} "
                             f"with head='cascade'")
        if cascade_blocks is not None and not (_is_int(cascade_blocks) and cascade_blocks >= 1):
            raise ValueError(f"cascade_blocks must be an int >= 1 (block5 … block(4+k)), got {cascade_blocks!r}")
    if multi_grid is not None:
        grid = tuple(multi_grid) if isinstance(multi_grid, (list, tuple)) else None
        if grid is None or len(grid) != 3 or not all(_is_int(r) and r >= 1 for r in grid):
            raise ValueError(f"multi_grid must be 3 ints >= 1 (one unit rate per unit of layer4), "
                             f"got {multi_grid!r}")


def _scaled_rates(base: Tuple[int, ...], base_stride: int, output_stride: int) -> Tuple[int, ...]:
    """ASPP rates for output_stride, from the rates at base_stride: the same field of view in pixels."""
    return tuple(r * base_stride // output_stride for r in base)


def _from_weights(weights: Optional[PathLike], num_classes: Optional[int], aux_loss: Optional[bool],
                  logits_key: str) -> Tuple[Optional[Mapping[str, Tensor]], int, bool]:
    """(state, num_classes, aux_loss): unset num_classes/aux_loss follow the weights file, else 21/False."""
    state = None if weights is None else read_state_dict(weights, "weights")
    if num_classes is None:
        num_classes = 21
        if state is not None and logits_key in state:
            num_classes = state[logits_key].shape[0]
    if aux_loss is None:
        aux_loss = state is not None and any(k.startswith("aux_classifier.") for k in state)
    return state, num_classes, aux_loss


def _finish(model: DeepLabV3, state, weights) -> DeepLabV3:
    if state is not None:
        load_state(model, state, f"weights file {str(weights)!r}")
    return model


# ---------------------------------------------------------------- ResNet models
def _deeplabv3_resnet(arch: str, weights, num_classes, aux_loss, weights_backbone, output_stride, multi_grid,
                      head, cascade_blocks, atrous_rates, fused) -> DeepLabV3:
    _check_common(num_classes, aux_loss, output_stride, atrous_rates, fused)
    _check_resnet_options(head, cascade_blocks, multi_grid, atrous_rates)
    logits_key = "classifier.4.weight" if head == "aspp" else "classifier.logits.weight"
    state, num_classes, aux_loss = _from_weights(weights, num_classes, aux_loss, logits_key)

    # Output stride 8: layer3 and layer4 dilated (rates 2, 4); 16: layer4 only (rate 2).
    dilate = [False, output_stride == 8, True]
    backbone = resnet(arch, fused, replace_stride_with_dilation=dilate,
                      multi_grid=None if multi_grid is None else tuple(multi_grid))
    if state is None:  # a whole-model checkpoint overrides the backbone's (as torchvision)
        load_weights(backbone, weights_backbone, "weights_backbone")
    return_layers = {"layer4": "out", **({"layer3": "aux"} if aux_loss else {})}
    backbone = IntermediateLayerGetter(backbone, return_layers)

    layer4_rate = {8: 4, 16: 2}[output_stride]  # layer4's dilation
    if head == "aspp":
        rates = tuple(atrous_rates) if atrous_rates is not None else _scaled_rates((6, 12, 18), 16, output_stride)
        classifier: nn.Module = DeepLabHead(2048, num_classes, rates, fused)
    else:
        classifier = CascadeHead(num_classes, 3 if cascade_blocks is None else cascade_blocks, layer4_rate,
                                 (1, 1, 1) if multi_grid is None else tuple(multi_grid), fused=fused)
    aux_classifier = FCNHead(1024, num_classes, fused) if aux_loss else None
    return _finish(DeepLabV3(backbone, classifier, aux_classifier), state, weights)


_RESNET_DOC = """Constructs DeepLabV3 with a ResNet-{depth} backbone (torchvision's, by default).

    Args (torchvision's):
        weights: local path of a whole-model state_dict, or None. Unset num_classes and aux_loss
            follow the file (its classifier's classes, whether it has aux_classifier keys);
            weights_backbone is then ignored. Nothing is ever downloaded.
        progress: accepted for torchvision compatibility; unused (no downloads).
        num_classes: classes including background (default 21).
        aux_loss: add the FCN auxiliary head on layer3 (output "aux"); default False.
        weights_backbone: local path of a ResNet-{depth} ImageNet state_dict (with fc), or None.
    Args (the paper's options):
        output_stride: 8 (default, torchvision's: layer3 and layer4 dilated, rates 2 and 4) or 16
            (layer4 dilated, rate 2).
        multi_grid: None (torchvision: layer4's first unit keeps the previous rate) or (r1, r2, r3):
            unit i of layer4 gets rate × r_i (OS16 with (1, 2, 4): 2, 4, 8; OS8: 4, 8, 16), and so
            does every cascade block.
        head: "aspp" (DeepLabHead) or "cascade" (CascadeHead: block5 … block(4+k), rates doubling
            per block, then a 1x1 logits conv; see fastaspp.models.heads.CascadeHead).
        cascade_blocks: k for head="cascade" (default 3: block5 … block7).
        atrous_rates: ASPP rates; default (6, 12, 18) × 16 / output_stride ((12, 24, 36) at OS8).
        fused: run every 3x3 conv + BN + ReLU of the bottlenecks and heads, and the ASPP, on
            fastaspp's ops (default); False: plain PyTorch, same state_dict.
    Returns a DeepLabV3 whose forward gives {{"out": logits[, "aux": logits]}} at the input size.
    """


def deeplabv3_resnet50(*, weights: Optional[PathLike] = None, progress: bool = True,
                       num_classes: Optional[int] = None, aux_loss: Optional[bool] = None,
                       weights_backbone: Optional[PathLike] = None, output_stride: int = 8,
                       multi_grid: Optional[Sequence[int]] = None, head: str = "aspp",
                       cascade_blocks: Optional[int] = None, atrous_rates: Optional[Sequence[int]] = None,
                       fused: bool = True) -> DeepLabV3:
    return _deeplabv3_resnet("resnet50", weights, num_classes, aux_loss, weights_backbone, output_stride,
                             multi_grid, head, cascade_blocks, atrous_rates, fused)


def deeplabv3_resnet101(*, weights: Optional[PathLike] = None, progress: bool = True,
                        num_classes: Optional[int] = None, aux_loss: Optional[bool] = None,
                        weights_backbone: Optional[PathLike] = None, output_stride: int = 8,
                        multi_grid: Optional[Sequence[int]] = None, head: str = "aspp",
                        cascade_blocks: Optional[int] = None, atrous_rates: Optional[Sequence[int]] = None,
                        fused: bool = True) -> DeepLabV3:
    return _deeplabv3_resnet("resnet101", weights, num_classes, aux_loss, weights_backbone, output_stride,
                             multi_grid, head, cascade_blocks, atrous_rates, fused)


deeplabv3_resnet50.__doc__ = _RESNET_DOC.format(depth=50)
deeplabv3_resnet101.__doc__ = _RESNET_DOC.format(depth=101)


# ---------------------------------------------------------------- MobileNetV3 model
def deeplabv3_mobilenet_v3_large(*, weights: Optional[PathLike] = None, progress: bool = True,
                                 num_classes: Optional[int] = None, aux_loss: Optional[bool] = None,
                                 weights_backbone: Optional[PathLike] = None, output_stride: int = 16,
                                 atrous_rates: Optional[Sequence[int]] = None, fused: bool = True) -> DeepLabV3:
    """Constructs DeepLabV3 with a MobileNetV3-Large backbone (torchvision's, by default).

    weights, progress, num_classes, aux_loss, weights_backbone (a MobileNetV3-Large ImageNet
    state_dict) and fused: as deeplabv3_resnet50. The backbone is `features` up to its last
    1x1 conv (960 channels, "out"); the aux head reads C2 (features.4, 40 channels, OS8).
    output_stride: 16 (default, torchvision's dilated=True: the C4 stage dilated, rate 2) or 8
    (the C3 stage dilated too, rates 2 and 4). atrous_rates: default (12, 24, 36) × 16 /
    output_stride (torchvision's (12, 24, 36) at OS16). Multi-grid and the cascade head are
    ResNet options. fused=True fuses the ASPP and the head's 3x3 Conv-BN-ReLU; the backbone
    stays torch ops (depthwise convs, groups > 1, are not supported by fastaspp's op).
    """
    _check_common(num_classes, aux_loss, output_stride, atrous_rates, fused)
    state, num_classes, aux_loss = _from_weights(weights, num_classes, aux_loss, "classifier.4.weight")
    net = mobilenet_v3_large(output_stride)
    if state is None:
        load_weights(net, weights_backbone, "weights_backbone")
    features = net.features
    # Stage starts (C1..C4, strided or dilated) plus the first and last layers: C0 … C5.
    stages = [0] + [i for i, b in enumerate(features) if getattr(b, "_is_cn", False)] + [len(features) - 1]
    out_pos, aux_pos = stages[-1], stages[-4]
    return_layers = {str(out_pos): "out", **({str(aux_pos): "aux"} if aux_loss else {})}
    backbone = IntermediateLayerGetter(features, return_layers)
    rates = tuple(atrous_rates) if atrous_rates is not None else _scaled_rates((12, 24, 36), 16, output_stride)
    classifier = DeepLabHead(features[out_pos].out_channels, num_classes, rates, fused)
    aux_classifier = FCNHead(features[aux_pos].out_channels, num_classes, fused) if aux_loss else None
    return _finish(DeepLabV3(backbone, classifier, aux_classifier), state, weights)
