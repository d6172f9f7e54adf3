"""fastaspp's ops. Each is also a torch op: torch.ops.fastaspp.<name>."""
from fastaspp.ops.aspp import aspp_branches, aspp_eval
from fastaspp.ops.atrous_conv import atrous_conv2d
from fastaspp.ops.batch_norm import concat_bn_relu, sync_batch_norm

__all__ = ["atrous_conv2d", "aspp_branches", "aspp_eval", "concat_bn_relu", "sync_batch_norm"]
