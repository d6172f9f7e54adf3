"""Batch norm synchronised across ranks, and the training BN's scale from batch statistics gathered
elsewhere (batch_norm_centre_scale: the conv epilogues of fastaspp.ops.aspp_train).

sync_batch_norm is the training batch norm whose statistics span every rank; its
all-reduces are autograd-aware (torch.distributed.nn), so backward all-reduces the gradient
sums as SyncBatchNorm's does, and it runs on CPU tensors (gloo), which torch.nn.SyncBatchNorm
refuses.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from fastaspp._rules import accumulator_dtype


def _all_reduce(t: Tensor, group) -> Tensor:
    from torch.distributed.nn.functional import all_reduce

    return all_reduce(t, op=dist.ReduceOp.SUM, group=group if group is not None else dist.group.WORLD)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def sync_batch_norm(z: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
                    running_var: Optional[Tensor], factor: float, eps: float, process_group=None) -> Tensor:
    """Training-mode batch norm of z [N, C, H, W] with statistics over every rank of process_group:
    this rank's (mean, var) combined across ranks by batch_norm_centre_scale.

    Running statistics, when given, move by `factor` as nn.BatchNorm2d's do (unbiased variance).
    """
    if z.dim() != 4:
        raise ValueError(f"z must be a 4-D tensor [N, C, H, W], got shape {tuple(z.shape)}")
    acc = accumulator_dtype(z.dtype)
    zf = z.to(acc)
    count = z.numel() // max(z.shape[1], 1)
    if count:
        var, mean = torch.var_mean(zf, dim=(0, 2, 3), unbiased=False)
    else:  # an empty batch on this rank adds nothing (var_mean would give NaN)
        mean = var = zf.new_zeros(z.shape[1])
    centre, scale = batch_norm_centre_scale(mean, var, count, weight, running_mean, running_var, factor=factor,
                                            eps=eps, synchronise=True, process_group=process_group)
    y = (zf - centre.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1)
    if bias is not None:
        y = y + bias.to(acc).view(1, -1, 1, 1)
    return y.to(z.dtype)


def batch_norm_centre_scale(mean: Tensor, var: Tensor, count: int, weight: Optional[Tensor],
                            running_mean: Optional[Tensor], running_var: Optional[Tensor], *, factor: float,
                            eps: float, synchronise: bool = False, process_group=None) -> Tuple[Tensor, Tensor]:
    """(centre, scale) of a training batch norm, y = (z − centre)·scale + bias: centre is the batch
    mean (across ranks when synchronised) and scale = weight/σ (1/σ without weight), from z's batch
    statistics. (The centred form keeps the backward free of
    the cancellation in Σ g·z − mean·Σ g.)

    mean, var: this rank's per-channel batch mean and biased variance over `count` values each
    (as the conv epilogues gather them). With synchronise and torch.distributed initialised they
    are first combined over process_group (SyncBatchNorm): (Σz, count) all-reduced for the
    global mean, then each rank's M2 about it, count·(var + (mean − global mean)²). The
    all-reduces are autograd-aware, so gradients reach every rank's statistics. Running
    statistics, when given, move in place by factor with the unbiased variance, as
    nn.BatchNorm2d's. Differentiable in mean, var and weight.
    """
    acc = mean.dtype
    where = ""
    if synchronise and distributed():
        local = torch.full((1,), float(count), dtype=acc, device=mean.device)
        sums = _all_reduce(torch.cat([mean * count, local]), process_group)
        total = sums[-1]
        global_mean = sums[:-1] / total
        var = _all_reduce(count * (var + (mean - global_mean).square()), process_group) / total
        mean, count, where = global_mean, int(total.item()), " across all ranks"
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {count}{where}")
    if running_mean is not None:
        with torch.no_grad():
            running_mean.mul_(1 - factor).add_(mean.to(running_mean.dtype), alpha=factor)
            running_var.mul_(1 - factor).add_((var * (count / (count - 1))).to(running_var.dtype), alpha=factor)
    scale = torch.rsqrt(var + eps)
    return mean, scale if weight is None else weight.to(acc) * scale
