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

import torch
import torch.distributed as dist
from torch import Tensor, nn


def _all_reduce(t: Tensor, group) -> Tensor:
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t, op=dist.ReduceOp.SUM, group=group if group is not None else dist.group.WORLD)


class SyncBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span every rank of `process_group` (default: WORLD)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1, affine: bool = True,
                 track_running_stats: bool = True, process_group: Optional[object] = None, device=None,
                 dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group

    def _synchronised(self) -> bool:
        return self.training and dist.is_available() and dist.is_initialized()

    def forward(self, z: Tensor) -> Tensor:
        if not self._synchronised():
            return super().forward(z)
        if z.dim() != 4:
            raise ValueError(f"SyncBatchNorm2d expects a 4-D input [N, C, H, W], got shape {tuple(z.shape)}")
        acc = torch.float64 if z.dtype == torch.float64 else torch.float32
        zf = z.to(acc)
        channels = z.shape[1]
        count = torch.full((1,), z.numel() // max(channels, 1), dtype=acc, device=z.device)
        # Two passes (mean, then centred squares) avoid the cancellation of E[z²] − E[z]².
        sums = _all_reduce(torch.cat([zf.sum(dim=(0, 2, 3)), count]), self.process_group)
        total = sums[channels]
        if total.item() <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(total.item())} "
                             f"across all ranks")
        mean = sums[:channels] / total
        centred = zf - mean.view(1, -1, 1, 1)
        var = _all_reduce(centred.square().sum(dim=(0, 2, 3)), self.process_group) / total
        if self.track_running_stats:
            self._update_running_stats(mean.detach(), var.detach(), total.item())
        y = centred * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        if self.affine:
            y = y * self.weight.to(acc).view(1, -1, 1, 1) + self.bias.to(acc).view(1, -1, 1, 1)
        return y.to(z.dtype)

    @torch.no_grad()
    def _update_running_stats(self, mean: Tensor, var: Tensor, count: float) -> None:
        """As nn.BatchNorm2d: momentum (None: cumulative average) and the unbiased variance."""
        self.num_batches_tracked.add_(1)
        factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        self.running_mean.mul_(1 - factor).add_(mean.to(self.running_mean.dtype), alpha=factor)
        unbiased = var * (count / (count - 1))
        self.running_var.mul_(1 - factor).add_(unbiased.to(self.running_var.dtype), alpha=factor)


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
