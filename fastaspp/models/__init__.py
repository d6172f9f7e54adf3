"""DeepLabV3 models: torchvision's interface and state_dict, the paper's options, fastaspp's fused ops.

    model = fastaspp.models.deeplabv3_resnet50(num_classes=21, aux_loss=True, weights="ckpt.pth")
    model(x)["out"]

See fastaspp.models.deeplabv3 for the options (output_stride, multi_grid, head="cascade",
atrous_rates, fused) and fastaspp.convert for turning an existing torchvision model into a fused one.
"""
from fastaspp.models._utils import IntermediateLayerGetter
from fastaspp.models.deeplabv3 import (DeepLabV3, deeplabv3_mobilenet_v3_large, deeplabv3_resnet50,
                                       deeplabv3_resnet101)
from fastaspp.models.heads import CascadeHead, DeepLabHead, FCNHead
from fastaspp.models.plain_aspp import PlainASPP

__all__ = ["DeepLabV3", "DeepLabHead", "FCNHead", "CascadeHead", "PlainASPP", "IntermediateLayerGetter",
           "deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large"]
