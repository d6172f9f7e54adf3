"""Drop-in modules backed by fastaspp's fused ops."""
from fastaspp.nn.atrous_conv import AtrousConv2d, ConvBNReLU

__all__ = ["AtrousConv2d", "ConvBNReLU"]
