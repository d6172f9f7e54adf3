"""fastaspp.nn.ASPP: torchvision's ASPP (same constructor, module tree and state_dict) on fused ops."""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor, nn

from fastaspp.nn.atrous_conv import ConvBNReLU
from fastaspp.ops.aspp import aspp_eval
from fastaspp.ops.atrous_conv import atrous_conv2d
from fastaspp.reference import ASPPPooling


class ASPP(nn.Module):
    """DeepLabV3's ASPP with torchvision's layout: convs.0 (1x1), convs.1 … convs.R (3x3 atrous),
    convs.R+1 (image pooling), project (1x1 → BN → ReLU → Dropout(0.5)).

    Inference (eval, no autograd needed): one fused path, fastaspp.ops.aspp_eval: every
    branch into one buffer (no concat), the pooling branch as a per-image bias of the
    projection, all BN folded (folded parameters cached until a parameter or buffer changes).
    Training, or eval with autograd: the branches run as fused conv ops with nn.BatchNorm2d
    (batch statistics and running-stat updates exactly as PyTorch's), then the projection.
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
        self._folded: Optional[tuple] = None
        self._folded_key: Optional[tuple] = None

    def _check_input(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a 4-D tensor [N, C, H, W], got "
                             f"{tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
        expected = self.convs[0][0].in_channels
        if x.shape[1] != expected:
            raise ValueError(f"x has {x.shape[1]} channels but this ASPP expects in_channels={expected}")

    def _needs_autograd(self) -> bool:
        return torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())

    def forward(self, x: Tensor) -> Tensor:
        self._check_input(x)
        if self.training or self._needs_autograd() or x.requires_grad:
            return self._forward_per_branch(x)
        return self._forward_fused(x)

    def _forward_per_branch(self, x: Tensor) -> Tensor:
        feats = torch.cat([branch(x) for branch in self.convs], dim=1)
        conv, bn, relu, dropout = self.project
        return dropout(relu(bn(atrous_conv2d(feats, conv.weight))))

    # -- inference ------------------------------------------------------------------------
    def _state_key(self, x: Tensor) -> tuple:
        tensors = list(self.parameters()) + list(self.buffers())
        return (x.dtype, x.device) + tuple((t.data_ptr(), t._version) for t in tensors)

    def folded_parameters(self, dtype: torch.dtype) -> tuple:
        """(weights, scale, shift, pool_weight, pool_scale, pool_shift, proj_weight, proj_scale, proj_shift)."""
        conv_branches = self.convs[:-1]
        scales, shifts = zip(*(ConvBNReLU.fold(b[1]) for b in conv_branches))
        pool = self.convs[-1]
        pool_scale, pool_shift = ConvBNReLU.fold(pool[2])
        proj_scale, proj_shift = ConvBNReLU.fold(self.project[1])
        cast = lambda t: t.to(dtype)
        return ([cast(b[0].weight) for b in conv_branches], cast(torch.cat(scales)), cast(torch.cat(shifts)),
                cast(pool[1].weight), pool_scale, pool_shift, cast(self.project[0].weight), proj_scale, proj_shift)

    def _forward_fused(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            folded = self.folded_parameters(x.dtype)
        else:
            key = self._state_key(x)
            if key != self._folded_key:
                self._folded, self._folded_key = self.folded_parameters(x.dtype), key
            folded = self._folded
        weights, scale, shift, *rest = folded
        y = aspp_eval(x, weights, self.atrous_rates, scale, shift, *rest)
        return y if x.is_contiguous(memory_format=torch.channels_last) else y.contiguous()
