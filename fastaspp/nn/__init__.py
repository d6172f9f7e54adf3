"""Drop-in modules backed by fastaspp's fused ops."""
from fastaspp.nn.aspp import ASPP, ASPPPooling
from fastaspp.nn.atrous_conv import AtrousConv2d, ConvBNReLU
from fastaspp.nn.sync_bn import SyncBatchNorm2d, convert_sync_batchnorm

__all__ = ["ASPP", "ASPPPooling", "AtrousConv2d", "ConvBNReLU", "SyncBatchNorm2d", "convert_sync_batchnorm"]
