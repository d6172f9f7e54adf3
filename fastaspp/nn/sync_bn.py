"""SyncBN for fastaspp modules, on CPU (gloo) as well as GPU (nccl).

torch.nn.SyncBatchNorm refuses CPU tensors, so fastaspp has its own: SyncBatchNorm2d is an
nn.BatchNorm2d (same parameters, buffers and state_dict, so eval-time BN folding is
unchanged) whose training forward all-reduces the per-channel batch statistics over the
process group. The all-reduces are autograd-aware (torch.distributed.nn), so the backward
all-reduces the gradient sums exactly as SyncBN's backward does. The result equals
nn.BatchNorm2d over the union of every rank's batch.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from fastaspp.ops.batch_norm import distributed, sync_batch_norm


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span every rank of `process_group` (default: WORLD)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Optional[object] = None, device=None,
                 dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _synchronised(self) -> bool:
        return self.training and distributed()

    def forward(self, z: Tensor) -> Tensor:
        if not self._synchronised():
            return super().forward(z)
        factor = 0.0
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        return sync_batch_norm(z, self.weight, self.bias, self.running_mean if self.track_running_stats else None,
                               self.running_var if self.track_running_stats else None, factor, self.eps,
                               self.process_group)


def convert_sync_batchnorm(module: nn.Module, process_group: Optional[object] = None) -> nn.Module:
    """Replaces every BatchNorm2d in `module` (fastaspp's modules included) by SyncBatchNorm2d.

    Parameters are shared and buffers copied, so state_dict keys and values are unchanged.
    Returns the converted module (the root itself is replaced when it is a BatchNorm2d).
    """
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, SyncBatchNorm2d):
        sync = SyncBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                               module.track_running_stats, process_group)
        if module.affine:
            sync.weight, sync.bias = module.weight, module.bias
        if module.track_running_stats:
            sync.running_mean, sync.running_var = module.running_mean, module.running_var
            sync.num_batches_tracked = module.num_batches_tracked
        sync.train(module.training)
        return sync
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child, process_group))
    return module
