"""fastaspp.nn.ASPP: torchvision's ASPP (same constructor, module tree and state_dict) on fused ops;
fastaspp.nn.ASPPPooling: its image-pooling branch (also the one of fastaspp.models' plain ASPP)."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastaspp.nn._fold_cache import FoldCache, records_autograd, state_tensors
from fastaspp.nn.atrous_conv import ConvBNReLU, fold_bn
from fastaspp.nn.sync_bn import SyncBatchNorm2d
from fastaspp.ops._library import transform_active
from fastaspp.ops.aspp import aspp_eval_folded, fold_aspp_eval
from fastaspp.ops.aspp_train import affine_relu_project, aspp_branches_stats
from fastaspp.ops.atrous_conv import atrous_conv2d
from fastaspp.ops.batch_norm import batch_norm_centre_scale


class ASPPPooling(nn.Sequential):
    """torchvision's image-pooling branch (same children, so the same state_dict keys): global average
    → 1x1 conv → BN → ReLU, then back to x's size (bilinear, align_corners=False). Run as is on the
    per-branch paths; the fused paths read its children (the pooled vector becomes a projection bias)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_channels, out_channels, 1, bias=False),
                         nn.BatchNorm2d(out_channels), nn.ReLU())

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[-2:]
        for module in self:
            x = module(x)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """DeepLabV3's ASPP with torchvision's layout: convs.0 (1x1), convs.1 … convs.R (3x3 atrous),
    convs.R+1 (image pooling), project (1x1 → BN → ReLU → Dropout(0.5)).

    Inference (eval, no autograd needed): one fused path, fastaspp.ops.aspp_eval: every
    branch into one buffer (no concat), the pooling branch as a per-image bias of the
    projection, all BN folded (folded parameters cached until a parameter or buffer changes).
    Training (docs/design.md §6): the conv branches into one buffer with their BN batch statistics
    from the conv epilogues (fastaspp.ops.aspp_branches_stats), the BN scale from them (running
    statistics moved exactly as each branch's nn.BatchNorm2d would; synchronised across ranks
    after convert_sync_batchnorm), then the projection with that normalize + ReLU in its GEMM
    prologue, the pooling branch as a per-image bias and the projection BN's statistics from its
    epilogue (fastaspp.ops.affine_relu_project); all differentiable. When the branch BNs differ
    in kind, eps or momentum, or use momentum=None, training runs branch by branch instead (each
    a fused conv op and its own BatchNorm2d); a projection BN of that kind runs as its own module
    on the projection output. Eval with autograd runs branch by branch too, each a fused conv op
    with its BN folded.
    """

    def __init__(self, in_channels: int, atrous_rates: Sequence[int], out_channels: int = 256) -> None:
        super().__init__()
        rates = tuple(atrous_rates)
        if not 1 <= len(rates) <= 4:
            raise ValueError(f"atrous_rates must hold 1 to 4 rates, got {rates}")
        if not all(isinstance(r, int) and not isinstance(r, bool) and r >= 1 for r in rates):
            raise ValueError(f"atrous_rates must be ints >= 1, got {rates}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(f"in_channels and out_channels must be >= 1, got {in_channels} and {out_channels}")
        branches: List[nn.Module] = [ConvBNReLU(in_channels, out_channels, 1)]
        branches += [ConvBNReLU(in_channels, out_channels, 3, padding=r, dilation=r) for r in rates]
        branches.append(ASPPPooling(in_channels, out_channels))
        self.convs = nn.ModuleList(branches)
        self.project = nn.Sequential(
            nn.Conv2d(len(self.convs) * out_channels, out_channels, 1, bias=False),
            nn.BatchNorm2d(out_channels), nn.ReLU(), nn.Dropout(0.5))
        self.atrous_rates = rates
        self._fold_cache = FoldCache()

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a 4-D tensor [N, C, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        expected = self.convs[0][0].in_channels
        if x.shape[1] != expected:
            raise ValueError(f"x has {x.shape[1]} channels but this ASPP expects in_channels={expected}")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.training:
            self._fold_cache.clear()  # the train/eval switch drops the kept fold
            # Under torch.func's transforms the BNs run as modules: the fused path moves the running
            # statistics in place from the batch's, which functorch refuses for its wrapped tensors.
            fused = self._branch_bns_shareable() and not transform_active()
            return self._forward_train(x) if fused else self._forward_per_branch(x)
        state = state_tensors(self)
        if records_autograd(state) or (torch.is_grad_enabled() and x.requires_grad):
            return self._forward_per_branch(x)
        return self._forward_fused(x, state)

    def _conv_branches(self) -> List[nn.Module]:
        """convs.0 … convs.R: the conv branches (a list: slicing the ModuleList would build a module)."""
        return list(self.convs)[:-1]

    # -- training -------------------------------------------------------------------------
    def _branch_bns(self) -> List[nn.BatchNorm2d]:
        return [branch[1] for branch in self._conv_branches()]

    @staticmethod
    def _shareable(bn: nn.Module) -> bool:
        """Whether a BN can run from fused statistics: a training, affine BatchNorm2d (or fastaspp's
        SyncBatchNorm2d) with running statistics and a fixed momentum (momentum=None would read
        num_batches_tracked, a tensor; this test reads none, so it is compile-safe)."""
        return (type(bn) in (nn.BatchNorm2d, SyncBatchNorm2d) and bn.training and bn.affine
                and bn.track_running_stats and bn.momentum is not None)

    def _branch_bns_shareable(self) -> bool:
        """Whether every branch BN can be one normalisation over the branches' buffer."""
        bns = self._branch_bns()
        first = bns[0]
        return all(self._shareable(b) and type(b) is type(first) and b.eps == first.eps
                   and b.momentum == first.momentum
                   and getattr(b, "process_group", None) is getattr(first, "process_group", None) for b in bns)

    def _forward_train(self, x: Tensor) -> Tensor:
        """docs/design.md §6: branch statistics from the conv epilogues, the branch BN's normalize + ReLU
        in the projection's prologue (the normalised concat is never stored), the projection BN's
        statistics from its epilogue."""
        bns = self._branch_bns()
        c = bns[0].num_features
        weights = [branch[0].weight for branch in self._conv_branches()]
        total = len(weights) * c
        count = x.shape[0] * x.shape[2] * x.shape[3]
        z, mean, var = aspp_branches_stats(x, weights, self.atrous_rates)
        running_mean = torch.cat([b.running_mean for b in bns])
        running_var = torch.cat([b.running_var for b in bns])
        centre, scale = self._batch_norm_centre_scale(bns[0], mean, var, count, torch.cat([b.weight for b in bns]),
                                                      running_mean, running_var)
        shift = torch.cat([b.bias for b in bns])
        with torch.no_grad():
            for i, bn in enumerate(bns):
                bn.running_mean.copy_(running_mean[i * c:(i + 1) * c])
                bn.running_var.copy_(running_var[i * c:(i + 1) * c])
                bn.num_batches_tracked.add_(1)
        # Image pooling: one C-vector per image, applied through the projection as a bias.
        pool = self.convs[-1]
        pooled = pool[3](pool[2](pool[1](pool[0](x)))).flatten(1)  # [N, C]
        conv, bn, relu, dropout = self.project
        # One split, not two slices: its backward is one cat, theirs two zero-filled copies and an add.
        branch_weight, pool_weight = conv.weight.flatten(1).split([total, conv.weight.shape[1] - total], dim=1)
        image_bias = pooled @ pool_weight.t()  # [N, Cout]
        as_z = lambda t: t if t.dtype == z.dtype else t.to(z.dtype)  # noqa: E731
        y, proj_mean, proj_var = affine_relu_project(
            z, *(as_z(t) for t in (centre, scale, shift, branch_weight, image_bias)))
        if self._shareable(bn):
            proj_centre, proj_scale = self._batch_norm_centre_scale(bn, proj_mean, proj_var, count, bn.weight,
                                                                    bn.running_mean, bn.running_var)
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
            acc = proj_scale.dtype
            y_acc = y if y.dtype == acc else y.to(acc)
            out = relu(torch.addcmul(bn.bias.to(acc).view(1, -1, 1, 1), y_acc - proj_centre.view(1, -1, 1, 1),
                                     proj_scale.view(1, -1, 1, 1)))
            out = out if out.dtype == y.dtype else out.to(y.dtype)
        else:  # a projection BN of another kind: its own module, on the stored y
            out = relu(bn(y))
        # The dropout mask follows memory order: the same layout draws the same mask for the same seed.
        return dropout(out.contiguous(memory_format=self._reference_layout()))

    @staticmethod
    def _batch_norm_centre_scale(bn: nn.BatchNorm2d, mean: Tensor, var: Tensor, count: int, weight: Tensor,
                                 running_mean: Tensor, running_var: Tensor) -> tuple:
        return batch_norm_centre_scale(mean, var, count, weight, running_mean, running_var, factor=bn.momentum,
                                       eps=bn.eps, synchronise=isinstance(bn, SyncBatchNorm2d),
                                       process_group=getattr(bn, "process_group", None))

    def _reference_layout(self) -> torch.memory_format:
        """The memory format of torchvision's projection output, so that dropout (drawn in memory
        order) draws the same mask. Measured on CPU over NCHW and channels_last modules and inputs: it
        is channels_last exactly when the atrous branches' weights are (module.to(channels_last))."""
        weight = self.convs[1][0].weight
        weight_cl = weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
        return torch.channels_last if weight_cl else torch.contiguous_format

    def _forward_per_branch(self, x: Tensor) -> Tensor:
        feats = torch.cat([branch(x) for branch in self.convs], dim=1)
        conv, bn, relu, dropout = self.project
        return dropout(relu(bn(atrous_conv2d(feats, conv.weight))))

    # -- inference ------------------------------------------------------------------------
    def folded_parameters(self, x: Tensor):
        """The eval weights prepared for inputs like x (fastaspp.ops.aspp.fold_aspp_eval): BN folded, the
        projection's scale folded into its weight. Detached (they are kept in a FoldCache, computed
        without autograd), so that backends keep their re-laid-out or transformed copies of them."""
        dtype = x.dtype
        conv_branches = self._conv_branches()
        scales, shifts = zip(*(fold_bn(b[1]) for b in conv_branches))
        pool = self.convs[-1]
        cast = lambda t: t.detach().to(dtype)  # noqa: E731
        return fold_aspp_eval(x, [cast(b[0].weight) for b in conv_branches], self.atrous_rates,
                              cast(torch.cat(scales)), cast(torch.cat(shifts)), pool[1].weight.detach(),
                              *fold_bn(pool[2]), self.project[0].weight.detach(), *fold_bn(self.project[1]))

    def _forward_fused(self, x: Tensor, state: List[Tensor]) -> Tensor:
        folded = self._fold_cache.get(state, (x.dtype, x.device, tuple(m.eps for m in self._all_bns())),
                                      lambda: self.folded_parameters(x))
        y = aspp_eval_folded(x, self.atrous_rates, folded)
        return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()

    def _all_bns(self) -> List[nn.BatchNorm2d]:
        return [*self._branch_bns(), self.convs[-1][2], self.project[1]]
