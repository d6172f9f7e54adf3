"""Eval-mode ASPP as fused ops (docs/design.md §3-§5).

  * torch.ops.fastaspp.aspp_branches: every conv branch (the 1x1 and the 3x3 atrous ones)
    with BN folded and ReLU, written into ONE NHWC buffer [N, (1+R)*C, H, W]: no concat.
    Per-device kernels: torch.ops.fastaspp._aspp_branches_forward (C++ cpu/cuda) and
    fastaspp.kernels.aspp (Triton, every branch in one launch). The cpu kernel also shares the
    centre tap, runs a 3x3 branch as Winograd over its rate's sub-grids where that needs at most
    80% of the live products and the weights' transforms can be kept (csrc/cpu/winograd.h), and
    runs branches with little work by direct loops (csrc/cpu/direct_conv.h).
  * aspp_eval(): branches, then the projection as one GEMM whose per-image bias carries
    the pooling branch (constant over pixels, so its slice of the concat never exists),
    with the projection's BN folded and ReLU. fold_aspp_eval() prepares its weights once (a
    module keeps them per weight version); aspp_eval_folded() runs on them.

aspp_branches is differentiable (each branch's gradients come from the atrous-conv backward
kernels). Training ASPPs use fastaspp.ops.aspp_train instead (BN statistics from the epilogues).
Eager calls skip the op dispatch as fastaspp.ops.atrous_conv2d's do (fastaspp.ops._library.route).
"""
from __future__ import annotations

from typing import List, NamedTuple, Sequence

import torch
from torch import Tensor

from fastaspp import _ext
from fastaspp._backend import resolve_backend
from fastaspp.ops._autocast import autocast_dtype, cast
from fastaspp._rules import accumulator_dtype, result_format
from fastaspp.ops._library import (LIB, Route, StaticArgs, kernel_or_op, refuse_forward_ad,
                                   register_vmap_by_loop, route, runs_kernels, transform_active)
from fastaspp.ops._first_order import first_order_only
from fastaspp.ops._checks import check_backend, check_like, check_tensor
from fastaspp.ops.atrous_conv import conv_affine_backward, conv_affine_jvp


def _triton_aspp():
    from fastaspp.kernels import aspp as triton_aspp

    return triton_aspp


def _branches_shape(x: Tensor, weights: Sequence[Tensor]) -> List[int]:
    return [x.shape[0], len(weights) * weights[0].shape[0], x.shape[2], x.shape[3]]


def _branch_geometry(rates: Sequence[int], i: int) -> tuple:
    """(stride, padding, dilation) of branch i: the 1x1 branch, then 3x3 at padding = dilation = rate."""
    r = rates[i - 1] if i else 0
    return [1, 1], [r, r], [max(r, 1)] * 2


# ---------------------------------------------------------------- backend kernels
def _branches_kernel(x: Tensor, weights: List[Tensor], rates: List[int], scale: Tensor, shift: Tensor, relu: bool,
                     backend: str) -> Tensor:
    if backend == "triton":
        return _triton_aspp().aspp_branches_forward(x, weights, rates, scale, shift, relu)
    return torch.ops.fastaspp._aspp_branches_forward.default(x, weights, rates, scale, shift, relu)


def _grad_input_kernel(grad: Tensor, weights: List[Tensor], rates: List[int], input_size: List[int],
                       backend: str) -> Tensor:
    """d/dx of sum(grad · branches(x)) with scale 1, shift 0, no ReLU: [N, Cin, H, W], channels_last.
    triton and cuda: one launch over every branch and tap, one accumulator; cpu (when the one-call
    backward does not apply): the atrous-conv input gradient of each branch, added up."""
    if backend == "triton":
        return _triton_aspp().aspp_branches_grad_input(grad, weights, rates, input_size)
    if backend == "cuda":
        return torch.ops.fastaspp._aspp_branches_grad_input.default(grad, weights, rates, list(input_size))
    c = weights[0].shape[0]
    dx = None
    for i, w in enumerate(weights):
        g = grad[:, i * c:(i + 1) * c].contiguous(memory_format=torch.channels_last)
        part = torch.ops.fastaspp._atrous_conv2d_grad_input.default(g, w, list(input_size), *_branch_geometry(rates, i))
        dx = part if dx is None else dx.add_(part)
    return dx.contiguous(memory_format=torch.channels_last)


# ---------------------------------------------------------------- backward (one formula, two registrations)
def branches_backward(g: Tensor, x: Tensor, weights: Sequence[Tensor], rates: Sequence[int], scale, backend: str,
                      needs: Sequence[bool]) -> tuple:
    """(dx, [dw_i], dscale, dshift) of sum(g · (conv_i(x)·scale_i + shift_i)) over the branches, g the
    gradient of the whole buffer with any ReLU mask already applied; scale None means 1. dx comes
    from the branches' input-gradient kernel (one launch on triton), each branch's weight and scale
    gradients from the atrous-conv backward; on cpu, when no scale or shift gradient is asked for,
    one call computes all of them (_aspp_branches_backward)."""
    need_x, need_w, need_scale, need_shift = needs
    # One C++ call for dx and every dW; not under a torch.func transform (a Tensor[] op has no vmap fallback).
    if backend == "cpu" and not (need_scale or need_shift) and not transform_active():
        g_scaled = g if scale is None else g * scale.view(1, -1, 1, 1)
        dx, dws = torch.ops.fastaspp._aspp_branches_backward.default(g_scaled, x, list(weights), list(rates),
                                                                     [bool(need_x), bool(need_w)])
        return dx, (list(dws) if need_w else None), None, None
    c = weights[0].shape[0]
    dx = None
    if need_x:
        g_scaled = g if scale is None else g * scale.view(1, -1, 1, 1)
        args = (g_scaled, list(weights), list(rates), list(x.shape), backend)
        dx = (_grad_input_kernel(*args) if runs_kernels(g_scaled)
              else torch.ops.fastaspp.aspp_branches_grad_input(*args))
        dx = dx.contiguous(memory_format=result_format(x))
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


def branches_tangents(x: Tensor, weights: Sequence[Tensor], rates: Sequence[int], scale, out: Tensor, tx, tws,
                      tscale, tshift, relu: bool, backend: str) -> List[Tensor]:
    """Each branch's tangent (forward-mode AD) of act(conv_i(x)·scale_i + shift_i), from the tangents
    of x, the weights (tws: one per branch, any None), scale and shift (conv_affine_jvp); scale None
    means 1 and then tscale is None."""
    c = weights[0].shape[0]
    parts = []
    for i, w in enumerate(weights):
        part = slice(i * c, (i + 1) * c)
        tangents = (tx, tws[i], None, None if tscale is None else tscale[part],
                    None if tshift is None else tshift[part])
        parts.append(conv_affine_jvp(x, w, None, None if scale is None else scale[part], out[:, part], tangents, relu,
                                     *_branch_geometry(rates, i), backend))
    return parts


def _save(ctx, x, weights, rates, scale, output, relu, backend) -> None:
    ctx.save_for_backward(x, scale, output if relu else None, *weights)
    ctx.rates, ctx.relu, ctx.backend = list(rates), relu, backend


def _grads(ctx, grad: Tensor, need_x: bool, need_w: bool, need_scale: bool, need_shift: bool) -> tuple:
    x, scale, out, *weights = ctx.saved_tensors
    g = grad.masked_fill(out <= 0, 0) if ctx.relu else grad
    return branches_backward(g, x, weights, ctx.rates, scale, ctx.backend, (need_x, need_w, need_scale, need_shift))


def any_needed(need) -> bool:
    """needs_input_grad of a Tensor[] argument is one flag per tensor (torch.library autograd)."""
    return any(need) if isinstance(need, (list, tuple)) else bool(need)


@first_order_only("aspp_branches", "the eager torch modules (fastaspp.reference.ASPP)")
def _branches_backward(ctx, grad: Tensor):
    need_x, need_w, _, need_scale, need_shift = ctx.needs_input_grad[:5]
    dx, dws, dscale, dshift = _grads(ctx, grad, need_x, any_needed(need_w), need_scale, need_shift)
    return dx, dws, None, dscale, dshift, None, None


class _AsppBranchesFunction(torch.autograd.Function):
    """Eager autograd around the branch kernels: torch.ops.fastaspp.aspp_branches's autograd without
    the op dispatch. The weights come last, one argument each (autograd sees no tensor in a list).
    Also the route under torch.func's transforms and forward-mode AD (as for atrous_conv2d)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, scale, shift, rates, relu, backend, *weights):
        return kernel_or_op(_branches_kernel, torch.ops.fastaspp.aspp_branches, x, list(weights), list(rates), scale,
                            shift, relu, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, scale, shift, rates, relu, backend, *weights = inputs
        _save(ctx, x, weights, rates, scale, output, relu, backend)
        ctx.save_for_forward(x, scale, output, *weights)

    @staticmethod
    def jvp(ctx, tx, tscale, tshift, _rates, _relu, _backend, *tws):
        x, scale, out, *weights = ctx.saved_tensors
        parts = branches_tangents(x, weights, ctx.rates, scale, out, tx, tws, tscale, tshift, ctx.relu, ctx.backend)
        return torch.cat(parts, dim=1).contiguous(memory_format=torch.channels_last)

    @staticmethod
    @first_order_only("aspp_branches", "the eager torch modules (fastaspp.reference.ASPP)")
    def backward(ctx, grad):
        need_x, need_scale, need_shift = ctx.needs_input_grad[:3]
        need_w = any(ctx.needs_input_grad[6:])
        dx, dws, dscale, dshift = _grads(ctx, grad, need_x, need_w, need_scale, need_shift)
        return (dx, dscale, dshift, None, None, None, *(dws if need_w else [None] * (len(ctx.rates) + 1)))


# ---------------------------------------------------------------- the torch ops
LIB.define("aspp_branches(Tensor x, Tensor[] weights, int[] rates, Tensor scale, Tensor shift, bool relu, "
           "str backend) -> Tensor")
LIB.define("aspp_branches_grad_input(Tensor grad, Tensor[] weights, int[] rates, int[] input_size, str backend) "
           "-> Tensor")


def _op_branches(x, weights, rates, scale, shift, relu, backend):
    refuse_forward_ad("aspp_branches")
    check_backend(backend, x)
    return _branches_kernel(x, list(weights), list(rates), scale, shift, relu, backend)


def _op_grad_input(grad, weights, rates, input_size, backend):
    check_backend(backend, grad)
    return _grad_input_kernel(grad, list(weights), list(rates), list(input_size), backend)


LIB.impl("aspp_branches", _op_branches, "CompositeExplicitAutograd")
LIB.impl("aspp_branches_grad_input", _op_grad_input, "CompositeExplicitAutograd")
register_vmap_by_loop("aspp_branches")
register_vmap_by_loop("aspp_branches_grad_input")


@torch.library.register_fake("fastaspp::aspp_branches", lib=LIB)
def _(x, weights, rates, scale, shift, relu, backend):
    refuse_forward_ad("aspp_branches")
    return x.new_empty(_branches_shape(x, weights)).contiguous(memory_format=torch.channels_last)


@torch.library.register_fake("fastaspp::aspp_branches_grad_input", lib=LIB)
def _(grad, weights, rates, input_size, backend):
    return grad.new_empty(list(input_size)).contiguous(memory_format=torch.channels_last)


def _setup_branches(ctx, inputs, output):
    x, weights, rates, scale, shift, relu, backend = inputs
    _save(ctx, x, weights, rates, scale, output, relu, backend)


torch.library.register_autograd("fastaspp::aspp_branches", _branches_backward, setup_context=_setup_branches,
                                lib=LIB)


if _ext.loaded():
    @torch.library.register_fake("fastaspp::_aspp_branches_forward", lib=LIB)
    def _(x, weights, rates, scale, shift, relu):
        return x.new_empty(_branches_shape(x, weights)).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("fastaspp::_aspp_branches_grad_input", lib=LIB)
    def _(grad, weights, rates, input_size):
        return grad.new_empty(list(input_size)).contiguous(memory_format=torch.channels_last)

    @torch.library.register_fake("fastaspp::_aspp_branches_backward", lib=LIB)
    def _(grad, x, weights, rates, output_mask):
        dx = x.new_empty(x.shape).contiguous(memory_format=result_format(x)) if output_mask[0] else None
        return dx, [torch.empty_like(w) for w in weights] if output_mask[1] else []


# ---------------------------------------------------------------- public entry points
def check_aspp_args(x: Tensor, weights: Sequence[Tensor], rates: Sequence[int]) -> None:
    check_tensor(x, "x", 4)
    if len(weights) != len(rates) + 1:
        raise ValueError(f"weights must hold {len(rates) + 1} tensors (the 1x1 branch, then one per rate), "
                         f"got {len(weights)}")
    c = weights[0].shape[0] if isinstance(weights[0], Tensor) and weights[0].dim() == 4 else -1
    cin = x.shape[1]
    for i, w in enumerate(weights):
        check_tensor(w, f"weights[{i}]", 4)
        check_like(w, f"weights[{i}]", x)
        k = 1 if i == 0 else 3
        if tuple(w.shape) != (c, cin, k, k):
            raise ValueError(f"weights[{i}] must have shape {(c, cin, k, k)} for x with {cin} "
                             f"channels, got {tuple(w.shape)}")
    for r in rates:
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"atrous rates must be ints >= 1, got {tuple(rates)}")


def _check_affine(x: Tensor, scale: Tensor, shift: Tensor, total: int) -> None:
    for name, t in (("scale", scale), ("shift", shift)):
        check_tensor(t, name, 1)
        check_like(t, name, x)
        if t.shape[0] != total:
            raise ValueError(f"{name} must have length (1+R)*C={total}, got {t.shape[0]}")


def _run_branches(x: Tensor, weights: List[Tensor], rates: List[int], scale: Tensor, shift: Tensor, relu: bool,
                  backend: str) -> Tensor:
    """The branches by the route of fastaspp.ops._library (arguments already checked)."""
    how = route(x, scale, shift, *weights)
    if how is Route.KERNEL:
        return _branches_kernel(x, weights, rates, scale, shift, relu, backend)
    if how is Route.FUNCTION or how is Route.TRANSFORM:
        return _AsppBranchesFunction.apply(x, scale, shift, StaticArgs(rates), relu, backend, *weights)
    return torch.ops.fastaspp.aspp_branches(x, weights, rates, scale, shift, relu, backend)


def aspp_branches(x: Tensor, weights: Sequence[Tensor], rates: Sequence[int], scale: Tensor,
                  shift: Tensor, relu: bool = True) -> Tensor:
    """act(conv_i(x) * scale_i + shift_i) for every conv branch, in one NHWC buffer [N, (1+R)*C, H, W].

    weights[0]: the 1x1 branch [C, Cin, 1, 1]; weights[i]: [C, Cin, 3, 3] at dilation = padding =
    rates[i-1]. scale, shift: [(1+R)*C], branch after branch. act = ReLU when relu. Differentiable
    in x, weights, scale and shift.
    """
    if isinstance(x, Tensor) and isinstance(weights, (list, tuple)):
        dtype = autocast_dtype(x)  # custom ops are not cast by autocast itself: cast like conv2d
        if dtype is not None:
            x, scale, shift = cast(x, dtype), cast(scale, dtype), cast(shift, dtype)
            weights = [cast(w, dtype) if isinstance(w, Tensor) else w for w in weights]
    check_aspp_args(x, weights, rates)
    _check_affine(x, scale, shift, len(weights) * weights[0].shape[0])
    if relu is not True and relu is not False:
        raise TypeError(f"relu must be a bool, got {relu!r}")
    return _run_branches(x, list(weights), [int(r) for r in rates], scale, shift, relu, resolve_backend(x.device))


class AsppEvalWeights(NamedTuple):
    """An eval ASPP's weights prepared once (fold_aspp_eval), for aspp_eval_folded."""
    weights: List[Tensor]  # the conv branches, x's dtype
    scale: Tensor  # [(1+R)*C]: the branch BNs' scales, x's dtype
    shift: Tensor  # [(1+R)*C]
    pool: Tensor  # [Cin, C]: the pooling conv with its BN scale folded, accumulator dtype
    pool_shift: Tensor  # [C], accumulator dtype
    project: Tensor  # [(1+R)*C, Cout]: the projection over the branches, its BN scale folded, x's dtype
    project_pool: Tensor  # [C, Cout]: the projection's pooling slice, BN scale folded, accumulator dtype
    project_shift: Tensor  # [Cout], accumulator dtype


def fold_aspp_eval(x: Tensor, weights: Sequence[Tensor], rates: Sequence[int], scale: Tensor, shift: Tensor,
                   pool_weight: Tensor, pool_scale: Tensor, pool_shift: Tensor, proj_weight: Tensor,
                   proj_scale: Tensor, proj_shift: Tensor) -> AsppEvalWeights:
    """Checks aspp_eval's arguments for inputs like x (its dtype, device and channels) and prepares
    its weights: what a module computes once per weight version, not per call."""
    check_aspp_args(x, weights, rates)
    total = len(weights) * weights[0].shape[0]
    _check_affine(x, scale, shift, total)
    c = weights[0].shape[0]
    proj = proj_weight.flatten(1)  # [Cout, (B+1)*C]
    if proj.shape[1] != total + c:
        raise ValueError(f"proj_weight must have {total + c} input channels, got {proj.shape[1]}")
    acc = accumulator_dtype(x.dtype)
    folded = (proj.t().to(acc) * proj_scale.to(acc).view(1, -1))  # [(B+1)*C, Cout]
    return AsppEvalWeights(list(weights), scale, shift,
                           pool_weight.flatten(1).t().to(acc) * pool_scale.to(acc).view(1, -1), pool_shift.to(acc),
                           folded[:total].to(x.dtype).contiguous(), folded[total:].contiguous(), proj_shift.to(acc))


def aspp_eval_folded(x: Tensor, rates: Sequence[int], w: AsppEvalWeights) -> Tensor:
    """aspp_eval on weights from fold_aspp_eval for inputs like x (nothing is checked again).
    Returns relu(projection) in x's dtype, NHWC storage."""
    branches = _run_branches(x, w.weights, list(rates), w.scale, w.shift, True, resolve_backend(x.device))
    n, bc, h, wd = branches.shape
    # Pooling branch: one C-vector per image, folded into the projection as a per-image bias.
    pooled = x.mean(dim=(2, 3), dtype=w.pool.dtype)
    image_bias = torch.addmm(w.project_shift, torch.addmm(w.pool_shift, pooled, w.pool).relu_(), w.project_pool)
    pixels = branches.permute(0, 2, 3, 1).reshape(n, h * wd, bc)
    y = torch.baddbmm(image_bias.to(x.dtype).unsqueeze(1), pixels, w.project.expand(n, bc, w.project.shape[1]))
    return y.relu_().view(n, h, wd, -1).permute(0, 3, 1, 2)


def aspp_eval(x: Tensor, weights: Sequence[Tensor], rates: Sequence[int], scale: Tensor, shift: Tensor,
              pool_weight: Tensor, pool_scale: Tensor, pool_shift: Tensor, proj_weight: Tensor,
              proj_scale: Tensor, proj_shift: Tensor) -> Tensor:
    """The whole eval-mode ASPP with every BN folded into (scale, shift) pairs.

    pool_weight [C, Cin, 1, 1]: the image-pooling branch; proj_weight [Cout, (2+R)*C, 1, 1]:
    the projection over (branches..., pooling). Returns relu(projection) in x's dtype, NHWC storage.
    """
    folded = fold_aspp_eval(x, weights, rates, scale, shift, pool_weight, pool_scale, pool_shift, proj_weight,
                            proj_scale, proj_shift)
    return aspp_eval_folded(x, rates, folded)
