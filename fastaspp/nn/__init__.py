"""Drop-in modules backed by fastaspp's fused ops."""
from fastaspp.nn.aspp import ASPP
from fastaspp.nn.atrous_conv import AtrousConv2d, ConvBNReLU

__all__ = ["ASPP", "AtrousConv2d", "ConvBNReLU"]
