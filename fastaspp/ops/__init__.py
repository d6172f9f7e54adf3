"""fastaspp's ops. Each is also a torch op: torch.ops.fastaspp.<name>."""
from fastaspp.ops.aspp import aspp_branches, aspp_eval
from fastaspp.ops.aspp_train import affine_relu_project, aspp_branches_stats
from fastaspp.ops.atrous_conv import atrous_conv2d
from fastaspp.ops.batch_norm import batch_norm_centre_scale, sync_batch_norm

__all__ = ["atrous_conv2d", "aspp_branches", "aspp_eval", "aspp_branches_stats", "affine_relu_project",
           "batch_norm_centre_scale", "sync_batch_norm"]
