"""Training-mode ASPP ops (docs/design.md §6): BN statistics from the conv epilogues, the branch BN's
normalize + ReLU in the prologue of the projection GEMM.

  * torch.ops.fastaspp.aspp_branches_stats(x, weights, rates) -> (z, mean, var): the raw conv
    branches into one NHWC buffer z [N, (1+R)*C, H, W] plus their per-channel batch mean and
    biased variance (fp32; fp64 for fp64 input), accumulated by the epilogues from the unrounded
    accumulators (per-patch count, sum and centred sum of squares, merged in a fixed order with
    Chan et al.'s formula: no E[z²] − E[z]² cancellation, no atomics, bit-reproducible).
  * torch.ops.fastaspp.affine_relu_project(z, centre, scale, shift, weight, image_bias)
    -> (y, mean, var): y = weight · relu((z − centre)·scale + shift) + image_bias[n], the
    normalised 1024-channel activation built tile by tile as the GEMM reads z (never stored),
    and y's batch statistics from the epilogue, for the projection's own BN.

Between the two, batch_norm_centre_scale (fastaspp.ops.batch_norm) turns (mean, var) into the BN's
centre and scale (γ/σ), all-reduced across ranks for SyncBN, and moves the running statistics.
The BN stays in its centred form (z − mean)·scale + β rather than z·scale + (β − mean·scale):
the backward then sums dpre·(z − mean), not dpre·z − mean·Σdpre, which loses the gradient of the
scale to cancellation when |mean| ≫ σ.

Both ops are differentiable in every tensor input and in their (mean, var) outputs; backward is
torch ops plus the atrous-conv backward kernels of the chosen backend (the 1x1 projection's are
plain GEMMs; on cpu the projection's whole backward is one kernel call, a fixed cost that small
inputs notice). Every backend computes the statistics in the epilogue and the affine + ReLU in the
prologue: cpu and cuda in C++/CUDA kernels (csrc/cpu/aspp_train.cpp; csrc/cuda/aspp_cuda.cpp and
aspp_project_cuda.cpp, whose per-patch planes are merged as triton's are), triton in kernels/aspp.py.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import Tensor

from fastaspp import _ext
from fastaspp._backend import resolve_backend
from fastaspp.ops._autocast import autocast_dtype, cast
from fastaspp._rules import accumulator_dtype
from fastaspp.ops._library import (LIB, Route, StaticArgs, kernel_or_op, refuse_forward_ad,
                                   register_vmap_by_loop, route)
from fastaspp.ops.aspp import (_branches_shape, _triton_aspp, any_needed, branches_backward, branches_tangents,
                              check_aspp_args)
from fastaspp.ops._first_order import first_order_only
from fastaspp.ops._checks import check_backend, check_like, check_tensor

Stats = Tuple[Tensor, Tensor, Tensor]


def _stats_grad(grad: Tensor, out: Tensor, mean: Tensor, grad_mean: Tensor, grad_var: Tensor) -> Tensor:
    """The gradient reaching `out` from out itself and from its batch (mean, var) outputs, in fp32/64:
    d mean / d out = 1/M, d var / d out = 2 (out − mean) / M, M = N·H·W."""
    count = out.shape[0] * out.shape[2] * out.shape[3]
    acc = accumulator_dtype(out.dtype)
    g = grad.to(acc) if grad is not None else torch.zeros(out.shape, dtype=acc, device=out.device)
    if grad_mean is not None:
        g = g + (grad_mean.to(acc) / count).view(1, -1, 1, 1)
    if grad_var is not None:
        g = g + (grad_var.to(acc) * (2 / count)).view(1, -1, 1, 1) * (out.to(acc) - mean.view(1, -1, 1, 1))
    return g


def _stats_tangents(out: Tensor, mean: Tensor, tangent: Tensor) -> Stats:
    """(t_out, t_mean, t_var): forward-mode AD through out's batch statistics, from out's tangent
    (accumulator dtype): mean' = avg(out'), var' = 2·avg((out − mean)(out' − mean'))."""
    dims = (0, 2, 3)
    t_mean = tangent.mean(dim=dims)
    t_var = 2 * ((out.to(tangent.dtype) - mean.view(1, -1, 1, 1)) * (tangent - t_mean.view(1, -1, 1, 1))).mean(dim=dims)
    return tangent.to(out.dtype).contiguous(memory_format=torch.channels_last), t_mean, t_var


# ---------------------------------------------------------------- backend kernels
def _branches_stats_kernel(x: Tensor, weights: List[Tensor], rates: List[int], backend: str) -> Stats:
    if backend == "triton":
        return _triton_aspp().aspp_branches_stats_forward(x, weights, rates)
    return torch.ops.fastaspp._aspp_branches_stats_forward.default(x, weights, rates)  # cpu, cuda


def _project_kernel(z: Tensor, centre: Tensor, scale: Tensor, shift: Tensor, weight: Tensor, image_bias: Tensor,
                    backend: str) -> Stats:
    args = (z, centre, scale, shift, weight, image_bias)
    if backend == "triton":
        return _triton_aspp().affine_relu_project_forward(*args)
    return torch.ops.fastaspp._affine_relu_project_forward.default(*args)  # cpu, cuda


def _stats_fakes(t: Tensor, out_shape: List[int], channels: int) -> Stats:
    out = t.new_empty(out_shape).contiguous(memory_format=torch.channels_last)
    acc = accumulator_dtype(t.dtype)
    return out, t.new_empty(channels, dtype=acc), t.new_empty(channels, dtype=acc)


# ---------------------------------------------------------------- backward (one formula each, two registrations)
def _save_branches_stats(ctx, x, weights, rates, output, backend) -> None:
    z, mean, _ = output
    ctx.save_for_backward(x, z, mean, *weights)
    ctx.rates, ctx.backend = list(rates), backend


def _branches_stats_grads(ctx, grad_z, grad_mean, grad_var, need_x: bool, need_w: bool) -> tuple:
    x, z, mean, *weights = ctx.saved_tensors
    g = _stats_grad(grad_z, z, mean, grad_mean, grad_var).to(x.dtype)
    dx, dws, _, _ = branches_backward(g.contiguous(memory_format=torch.channels_last), x, weights, ctx.rates, None,
                                      ctx.backend, (need_x, need_w, False, False))
    return dx, dws


@first_order_only("aspp_branches_stats", "the eager torch modules (fastaspp.reference.ASPP)")
def _branches_stats_backward(ctx, grad_z, grad_mean, grad_var):
    need_x, need_w = ctx.needs_input_grad[:2]
    dx, dws = _branches_stats_grads(ctx, grad_z, grad_mean, grad_var, need_x, any_needed(need_w))
    return dx, dws, None, None


def _save_project(ctx, z, centre, scale, shift, weight, output, backend) -> None:
    y, mean, _ = output
    ctx.save_for_backward(z, centre, scale, shift, weight, y, mean)
    ctx.backend = backend


@first_order_only("affine_relu_project", "the eager torch modules (fastaspp.reference.ASPP)")
def _project_backward(ctx, grad_y, grad_mean, grad_var):
    """With pre = (z − centre)·scale + shift and u = relu(pre), recomputed here rather than saved:
    dW = Gᵀu, d image_bias = Σ_pixels G, dpre = (G W) ⊙ [pre > 0], dz = dpre·scale,
    dcentre = −Σ dpre·scale, dscale = Σ dpre·(z − centre), dshift = Σ dpre. The cpu backend runs
    the formula as one kernel call (_affine_relu_project_backward); the others as torch ops."""
    z, centre, scale, shift, weight, y, mean = ctx.saved_tensors
    g = _stats_grad(grad_y, y, mean, grad_mean, grad_var)
    if ctx.backend == "cpu":
        return (*torch.ops.fastaspp._affine_relu_project_backward.default(g, z, centre, scale, shift, weight), None)
    acc = accumulator_dtype(z.dtype)
    n, k, h, w = z.shape
    g = g.permute(0, 2, 3, 1).reshape(-1, weight.shape[0])
    centred = z.permute(0, 2, 3, 1).reshape(-1, k).to(acc) - centre.to(acc)  # rows: free for channels_last z
    pre = centred * scale.to(acc) + shift.to(acc)
    dpre = (g @ weight.to(acc)).mul_(pre > 0)
    dweight = (g.t() @ pre.relu_()).to(weight.dtype)
    dbias = g.view(n, h * w, -1).sum(1).to(z.dtype)
    dz = (dpre * scale.to(acc)).view(n, h, w, k).permute(0, 3, 1, 2).to(z.dtype)
    dshift = dpre.sum(0)
    dcentre = (-dshift * scale.to(acc)).to(centre.dtype)
    dscale = (dpre * centred).sum(0).to(scale.dtype)
    return dz, dcentre, dscale, dshift.to(shift.dtype), dweight, dbias, None


class _BranchesStatsFunction(torch.autograd.Function):
    """Eager autograd around the kernels: aspp_branches_stats's autograd without the op dispatch
    (the weights last, one argument each: autograd sees no tensor in a list). Also the route under
    torch.func's transforms and forward-mode AD (as for atrous_conv2d)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, rates, backend, *weights):
        return kernel_or_op(_branches_stats_kernel, torch.ops.fastaspp.aspp_branches_stats, x, list(weights),
                            list(rates), backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, rates, backend, *weights = inputs
        ctx.set_materialize_grads(False)
        _save_branches_stats(ctx, x, weights, rates, output, backend)
        ctx.save_for_forward(x, output[0], output[1], *weights)

    @staticmethod
    def jvp(ctx, tx, _rates, _backend, *tws):
        x, z, mean, *weights = ctx.saved_tensors
        parts = branches_tangents(x, weights, ctx.rates, None, z, tx, tws, None, None, False, ctx.backend)
        return _stats_tangents(z, mean, torch.cat(parts, dim=1).to(mean.dtype))

    @staticmethod
    @first_order_only("aspp_branches_stats", "the eager torch modules (fastaspp.reference.ASPP)")
    def backward(ctx, grad_z, grad_mean, grad_var):
        need_w = any(ctx.needs_input_grad[3:])
        dx, dws = _branches_stats_grads(ctx, grad_z, grad_mean, grad_var, ctx.needs_input_grad[0], need_w)
        return (dx, None, None, *(dws if need_w else [None] * (len(ctx.rates) + 1)))


class _ProjectFunction(torch.autograd.Function):
    """Eager autograd around the kernels: affine_relu_project's autograd without the op dispatch.
    Also the route under torch.func's transforms and forward-mode AD (as for atrous_conv2d)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z, centre, scale, shift, weight, image_bias, backend):
        return kernel_or_op(_project_kernel, torch.ops.fastaspp.affine_relu_project, z, centre, scale, shift, weight,
                            image_bias, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.set_materialize_grads(False)
        _save_project(ctx, *inputs[:5], output, inputs[6])
        ctx.save_for_forward(*inputs[:5], output[0], output[1])

    backward = staticmethod(_project_backward)

    @staticmethod
    def jvp(ctx, tz, tcentre, tscale, tshift, tweight, tbias, _backend):
        """With pre = (z − centre)·scale + shift and u = relu(pre):
        y' = W'·u + W·(pre' ⊙ [pre > 0]) + image_bias', pre' = (z' − centre')·scale + (z − centre)·scale' + shift'."""
        z, centre, scale, shift, weight, y, mean = ctx.saved_tensors
        acc = mean.dtype
        n, k, h, w = z.shape
        rows = lambda t: t.permute(0, 2, 3, 1).reshape(-1, t.shape[1]).to(acc)  # noqa: E731 (free for NHWC)
        centred = rows(z) - centre.to(acc)
        pre = centred * scale.to(acc) + shift.to(acc)
        t_pre = torch.zeros_like(pre)
        if tz is not None:
            t_pre = t_pre + rows(tz) * scale.to(acc)
        if tcentre is not None:
            t_pre = t_pre - tcentre.to(acc) * scale.to(acc)
        if tscale is not None:
            t_pre = t_pre + centred * tscale.to(acc)
        if tshift is not None:
            t_pre = t_pre + tshift.to(acc)
        t_y = t_pre.mul_(pre > 0) @ weight.to(acc).t()
        if tweight is not None:
            t_y = t_y + pre.relu() @ tweight.to(acc).t()
        t_y = t_y.view(n, h * w, -1)
        if tbias is not None:
            t_y = t_y + tbias.to(acc).unsqueeze(1)
        return _stats_tangents(y, mean, t_y.view(n, h, w, -1).permute(0, 3, 1, 2))


# ---------------------------------------------------------------- the torch ops
LIB.define("aspp_branches_stats(Tensor x, Tensor[] weights, int[] rates, str backend) -> (Tensor, Tensor, Tensor)")
LIB.define("affine_relu_project(Tensor z, Tensor centre, Tensor scale, Tensor shift, Tensor weight, "
           "Tensor image_bias, str backend) -> (Tensor, Tensor, Tensor)")


def _op_branches_stats(x, weights, rates, backend):
    refuse_forward_ad("aspp_branches_stats")
    check_backend(backend, x)
    return _branches_stats_kernel(x, list(weights), list(rates), backend)


def _op_project(z, centre, scale, shift, weight, image_bias, backend):
    refuse_forward_ad("affine_relu_project")
    check_backend(backend, z)
    return _project_kernel(z, centre, scale, shift, weight, image_bias, backend)


LIB.impl("aspp_branches_stats", _op_branches_stats, "CompositeExplicitAutograd")
register_vmap_by_loop("aspp_branches_stats")
LIB.impl("affine_relu_project", _op_project, "CompositeExplicitAutograd")


@torch.library.register_fake("fastaspp::aspp_branches_stats", lib=LIB)
def _(x, weights, rates, backend):
    refuse_forward_ad("aspp_branches_stats")
    shape = _branches_shape(x, weights)
    return _stats_fakes(x, shape, shape[1])


@torch.library.register_fake("fastaspp::affine_relu_project", lib=LIB)
def _(z, centre, scale, shift, weight, image_bias, backend):
    refuse_forward_ad("affine_relu_project")
    return _stats_fakes(z, [z.shape[0], weight.shape[0], z.shape[2], z.shape[3]], weight.shape[0])


def _setup_branches_stats(ctx, inputs, output):
    x, weights, rates, backend = inputs
    _save_branches_stats(ctx, x, weights, rates, output, backend)


def _setup_project(ctx, inputs, output):
    _save_project(ctx, *inputs[:5], output, inputs[6])


torch.library.register_autograd("fastaspp::aspp_branches_stats", _branches_stats_backward,
                                setup_context=_setup_branches_stats, lib=LIB)
torch.library.register_autograd("fastaspp::affine_relu_project", _project_backward, setup_context=_setup_project,
                                lib=LIB)


if _ext.loaded():
    @torch.library.register_fake("fastaspp::_aspp_branches_stats_forward", lib=LIB)
    def _(x, weights, rates):
        shape = _branches_shape(x, weights)
        return _stats_fakes(x, shape, shape[1])

    @torch.library.register_fake("fastaspp::_affine_relu_project_forward", lib=LIB)
    def _(z, centre, scale, shift, weight, image_bias):
        return _stats_fakes(z, [z.shape[0], weight.shape[0], z.shape[2], z.shape[3]], weight.shape[0])

    @torch.library.register_fake("fastaspp::_affine_relu_project_backward", lib=LIB)
    def _(g, z, centre, scale, shift, weight):
        dz = z.new_empty(z.shape).contiguous(memory_format=torch.channels_last)
        return (dz, torch.empty_like(centre), torch.empty_like(scale), torch.empty_like(shift),
                torch.empty_like(weight), z.new_empty(z.shape[0], weight.shape[0]))


# ---------------------------------------------------------------- public entry points
def aspp_branches_stats(x: Tensor, weights: Sequence[Tensor], rates: Sequence[int]) -> Stats:
    """(z, mean, var): the ASPP conv branches without BN, in one NHWC buffer [N, (1+R)*C, H, W], and
    their batch statistics [(1+R)*C] (fp32; fp64 for fp64 x). weights as for aspp_branches."""
    if isinstance(x, Tensor) and isinstance(weights, (list, tuple)):
        dtype = autocast_dtype(x)
        if dtype is not None:
            x = cast(x, dtype)
            weights = [cast(w, dtype) if isinstance(w, Tensor) else w for w in weights]
    check_aspp_args(x, weights, rates)
    weights, rates, backend = list(weights), [int(r) for r in rates], resolve_backend(x.device)
    how = route(x, *weights)
    if how is Route.KERNEL:
        return _branches_stats_kernel(x, weights, rates, backend)
    if how is Route.FUNCTION or how is Route.TRANSFORM:
        return _BranchesStatsFunction.apply(x, StaticArgs(rates), backend, *weights)
    return torch.ops.fastaspp.aspp_branches_stats(x, weights, rates, backend)


def affine_relu_project(z: Tensor, centre: Tensor, scale: Tensor, shift: Tensor, weight: Tensor,
                        image_bias: Tensor) -> Stats:
    """(y, mean, var) with y = weight · relu((z − centre)·scale + shift) + image_bias per image (a
    1x1 convolution whose input gets a per-channel BN and ReLU as it is read), and y's batch
    statistics [Cout] (fp32; fp64 for fp64 z).

    z [N, K, H, W]; centre, scale, shift [K] (a training BN: batch mean, γ/σ, β); weight [Cout, K]
    (or [Cout, K, 1, 1]); image_bias [N, Cout];
    all of z's dtype and device (under autocast they are cast like conv2d's operands).
    """
    if isinstance(z, Tensor) and autocast_dtype(z) is not None:
        dtype = autocast_dtype(z)
        z, centre, scale, shift, weight, image_bias = (cast(t, dtype) if isinstance(t, Tensor) else t
                                                       for t in (z, centre, scale, shift, weight, image_bias))
    check_tensor(z, "z", 4)
    if isinstance(weight, Tensor) and weight.dim() == 4 and weight.shape[2:] == (1, 1):
        weight = weight.flatten(1)
    n, k = z.shape[:2]
    named = (("centre", centre), ("scale", scale), ("shift", shift), ("weight", weight), ("image_bias", image_bias))
    for name, t in named:
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_like(t, name, z)
    cout = weight.shape[0] if weight.dim() == 2 else -1
    for (name, t), shape in zip(named, [(k,)] * 3 + [(cout, k), (n, cout)]):
        if tuple(t.shape) != shape:
            want = "[Cout, K]" if name == "weight" else str(list(shape))
            raise ValueError(f"{name} must have shape {want} for z of shape {tuple(z.shape)}, got {tuple(t.shape)}")
    args = (z, centre, scale, shift, weight, image_bias, resolve_backend(z.device))
    how = route(*args[:6])
    if how is Route.KERNEL:
        return _project_kernel(*args)
    if how is Route.FUNCTION or how is Route.TRANSFORM:
        return _ProjectFunction.apply(*args)
    return torch.ops.fastaspp.affine_relu_project(*args)
