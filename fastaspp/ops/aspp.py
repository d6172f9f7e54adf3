"""Eval-mode ASPP as fused ops (DESIGN.md §2).

  * torch.ops.fastaspp.aspp_branches: every conv branch (the 1x1 and the 3x3 atrous ones)
    with BN folded and ReLU, written into ONE NHWC buffer [N, (1+R)*C, H, W]: no concat.
    Per-device kernels: torch.ops.fastaspp._aspp_branches_forward (C++ cpu/cuda) and
    fastaspp.kernels.aspp (Triton, every branch in one launch). The cpu kernel also shares the
    centre tap, and runs a 3x3 branch as Winograd over its rate's sub-grids where that needs
    at most 80% of the live products and the weights' transforms can be kept (csrc/cpu/winograd.h).
  * aspp_eval(): branches, then the projection as one GEMM whose per-image bias carries
    the pooling branch (constant over pixels, so its slice of the concat never exists),
    with the projection's BN folded and ReLU.

aspp_branches is differentiable (each branch's gradients come from the atrous-conv backward
kernels). Training ASPPs use fastaspp.ops.aspp_train instead (BN statistics from the epilogues).
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._prims_common import suggest_memory_format

from fastaspp import _ext
from fastaspp._backend import resolve_backend
from fastaspp.ops._autocast import autocast_dtype, cast
from fastaspp.ops.atrous_conv import _check_backend, _check_like, _check_tensor, conv_affine_backward


def _triton_aspp():
    from fastaspp.kernels import aspp as triton_aspp

    return triton_aspp


def _branches_shape(x: Tensor, weights: Sequence[Tensor]) -> List[int]:
    return [x.shape[0], len(weights) * weights[0].shape[0], x.shape[2], x.shape[3]]


@torch.library.custom_op("fastaspp::aspp_branches", mutates_args=())
def _aspp_branches_op(x: Tensor, weights: List[Tensor], rates: List[int], scale: Tensor, shift: Tensor,
                      relu: bool, backend: str) -> Tensor:
    _check_backend(backend, x)
    if backend == "triton":
        return _triton_aspp().aspp_branches_forward(x, list(weights), list(rates), scale, shift, relu)
    return torch.ops.fastaspp._aspp_branches_forward.default(x, list(weights), list(rates), scale, shift, relu)


@_aspp_branches_op.register_fake
def _(x, weights, rates, scale, shift, relu, backend):
    return x.new_empty(_branches_shape(x, weights)).contiguous(memory_format=torch.channels_last)


def _branch_geometry(rates: Sequence[int], i: int) -> tuple:
    """(stride, padding, dilation) of branch i: the 1x1 branch, then 3x3 at padding = dilation = rate."""
    r = rates[i - 1] if i else 0
    return [1, 1], [r, r], [max(r, 1)] * 2


def _setup_branches(ctx, inputs, output):
    x, weights, rates, scale, shift, relu, backend = inputs
    ctx.save_for_backward(x, scale, output if relu else None, *weights)
    ctx.rates, ctx.relu, ctx.backend = list(rates), relu, backend


@torch.library.custom_op("fastaspp::aspp_branches_grad_input", mutates_args=())
def _branches_grad_input_op(grad: Tensor, weights: List[Tensor], rates: List[int], input_size: List[int],
                            backend: str) -> Tensor:
    """d/dx of sum(grad · branches(x)) with scale 1, shift 0, no ReLU: [N, Cin, H, W], channels_last.
    triton: one launch over every branch and tap, one accumulator; cpu/cuda: the atrous-conv input
    gradient of each branch, added up."""
    _check_backend(backend, grad)
    if backend == "triton":
        return _triton_aspp().aspp_branches_grad_input(grad, list(weights), list(rates), input_size)
    c = weights[0].shape[0]
    dx = None
    for i, w in enumerate(weights):
        g = grad[:, i * c:(i + 1) * c].contiguous(memory_format=torch.channels_last)
        part = torch.ops.fastaspp._atrous_conv2d_grad_input.default(g, w, list(input_size), *_branch_geometry(rates, i))
        dx = part if dx is None else dx.add_(part)
    return dx.contiguous(memory_format=torch.channels_last)


@_branches_grad_input_op.register_fake
def _(grad, weights, rates, input_size, backend):
    return grad.new_empty(list(input_size)).contiguous(memory_format=torch.channels_last)


def branches_backward(g: Tensor, x: Tensor, weights: Sequence[Tensor], rates: Sequence[int], scale, backend: str,
                      needs: Sequence[bool]) -> tuple:
    """(dx, [dw_i], dscale, dshift) of sum(g · (conv_i(x)·scale_i + shift_i)) over the branches, g the
    gradient of the whole buffer with any ReLU mask already applied; scale None means 1. dx comes
    from aspp_branches_grad_input (one launch on triton), each branch's weight and scale gradients
    from the atrous-conv backward."""
    need_x, need_w, need_scale, need_shift = needs
    c = weights[0].shape[0]
    dx = None
    if need_x:
        g_scaled = g if scale is None else g * scale.view(1, -1, 1, 1)
        dx = torch.ops.fastaspp.aspp_branches_grad_input(g_scaled, list(weights), list(rates), list(x.shape), backend)
        dx = dx.contiguous(memory_format=suggest_memory_format(x))
    dws, dscales, dshifts = [], [], []
    if need_w or need_scale or need_shift:
        for i, w in enumerate(weights):
            part = slice(i * c, (i + 1) * c)
            _, gw, _, gs, gt = conv_affine_backward(
                g[:, part], x, w, None, None if scale is None else scale[part], None, False,
                *_branch_geometry(rates, i), backend, (False, need_w, False, need_scale, need_shift))
            dws.append(gw)
            dscales.append(gs)
            dshifts.append(gt)
    return (dx, dws if need_w else None, torch.cat(dscales) if need_scale else None,
            torch.cat(dshifts) if need_shift else None)


def _branches_backward(ctx, grad: Tensor):
    x, scale, out, *weights = ctx.saved_tensors
    need_x, need_w, _, need_scale, need_shift = ctx.needs_input_grad[:5]
    g = grad.masked_fill(out <= 0, 0) if ctx.relu else grad
    dx, dws, dscale, dshift = branches_backward(g, x, weights, ctx.rates, scale, ctx.backend,
                                                (need_x, need_w, need_scale, need_shift))
    return dx, dws, None, dscale, dshift, None, None


_aspp_branches_op.register_autograd(_branches_backward, setup_context=_setup_branches)


if _ext.loaded():
    @torch.library.register_fake("fastaspp::_aspp_branches_forward")
    def _(x, weights, rates, scale, shift, relu):
        return x.new_empty(_branches_shape(x, weights)).contiguous(memory_format=torch.channels_last)


def check_aspp_args(x: Tensor, weights: Sequence[Tensor], rates: Sequence[int]) -> None:
    _check_tensor(x, "x", 4)
    if len(weights) != len(rates) + 1:
        raise ValueError(f"weights must hold {len(rates) + 1} tensors (the 1x1 branch, then one per rate), "
                         f"got {len(weights)}")
    c = weights[0].shape[0] if weights[0].dim() == 4 else -1
    for i, w in enumerate(weights):
        _check_tensor(w, f"weights[{i}]", 4)
        _check_like(w, f"weights[{i}]", x)
        k = 1 if i == 0 else 3
        if tuple(w.shape) != (c, x.shape[1], k, k):
            raise ValueError(f"weights[{i}] must have shape {(c, x.shape[1], k, k)} for x with {x.shape[1]} "
                             f"channels, got {tuple(w.shape)}")
    for r in rates:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"atrous rates must be ints >= 1, got {tuple(rates)}")


def aspp_branches(x: Tensor, weights: Sequence[Tensor], rates: Sequence[int], scale: Tensor,
                  shift: Tensor, relu: bool = True) -> Tensor:
    """act(conv_i(x) * scale_i + shift_i) for every conv branch, in one NHWC buffer [N, (1+R)*C, H, W].

    weights[0]: the 1x1 branch [C, Cin, 1, 1]; weights[i]: [C, Cin, 3, 3] at dilation = padding =
    rates[i-1]. scale, shift: [(1+R)*C], branch after branch. act = ReLU when relu. Differentiable
    in x, weights, scale and shift.
    """
    if isinstance(x, Tensor) and isinstance(weights, (list, tuple)):
        dtype = autocast_dtype(x)  # custom ops are not cast by autocast itself: cast like conv2d
        x, scale, shift = cast(x, dtype), cast(scale, dtype), cast(shift, dtype)
        weights = [cast(w, dtype) if isinstance(w, Tensor) else w for w in weights]
    check_aspp_args(x, weights, rates)
    total = len(weights) * weights[0].shape[0]
    for name, t in (("scale", scale), ("shift", shift)):
        _check_tensor(t, name, 1)
        _check_like(t, name, x)
        if t.shape[0] != total:
            raise ValueError(f"{name} must have length (1+R)*C={total}, got {t.shape[0]}")
    backend = resolve_backend(x.device)
    if not isinstance(relu, bool):
        raise TypeError(f"relu must be a bool, got {relu!r}")
    return torch.ops.fastaspp.aspp_branches(x, list(weights), [int(r) for r in rates], scale, shift, relu,
                                            backend)


def aspp_eval(x: Tensor, weights: Sequence[Tensor], rates: Sequence[int], scale: Tensor, shift: Tensor,
              pool_weight: Tensor, pool_scale: Tensor, pool_shift: Tensor, proj_weight: Tensor,
              proj_scale: Tensor, proj_shift: Tensor) -> Tensor:
    """The whole eval-mode ASPP with every BN folded into (scale, shift) pairs.

    pool_weight [C, Cin, 1, 1]: the image-pooling branch; proj_weight [Cout, (2+R)*C, 1, 1]:
    the projection over (branches..., pooling). Returns relu(projection) in x's dtype, NHWC storage.
    """
    branches = aspp_branches(x, weights, rates, scale, shift)  # [N, B*C, H, W], NHWC storage
    n, bc, h, w = branches.shape
    c = weights[0].shape[0]
    proj = proj_weight.flatten(1)  # [Cout, (B+1)*C]
    if proj.shape[1] != bc + c:
        raise ValueError(f"proj_weight must have {bc + c} input channels, got {proj.shape[1]}")
    # Pooling branch: one C-vector per image, folded into the projection as a per-image bias.
    pooled = x.mean(dim=(2, 3), dtype=torch.float32 if x.dtype != torch.float64 else torch.float64)
    pool = F.relu(pooled @ pool_weight.flatten(1).t().to(pooled) * pool_scale.to(pooled) + pool_shift.to(pooled))
    image_bias = (pool @ proj[:, bc:].t().to(pooled)) * proj_scale.to(pooled) + proj_shift.to(pooled)  # [N, Cout]
    main = (proj[:, :bc].t() * proj_scale.view(1, -1)).to(x.dtype)  # [B*C, Cout], BN scale folded
    pixels = branches.permute(0, 2, 3, 1).reshape(n, h * w, bc)
    y = torch.baddbmm(image_bias.to(x.dtype).unsqueeze(1), pixels, main.expand(n, bc, main.shape[1]))
    return y.relu_().view(n, h, w, -1).permute(0, 3, 1, 2)
