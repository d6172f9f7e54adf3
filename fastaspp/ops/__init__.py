"""fastaspp's ops. Each is also a torch op: torch.ops.fastaspp.<name>."""
from fastaspp.ops.aspp import aspp_branches, aspp_eval
from fastaspp.ops.atrous_conv import atrous_conv2d

__all__ = ["atrous_conv2d", "aspp_branches", "aspp_eval"]
