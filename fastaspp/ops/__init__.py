"""fastaspp's ops. Each is also a torch op: torch.ops.fastaspp.<name>."""
from fastaspp.ops.atrous_conv import atrous_conv2d

__all__ = ["atrous_conv2d"]
