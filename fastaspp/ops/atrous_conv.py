"""fastaspp.ops.atrous_conv2d: conv + folded BN + ReLU in one kernel.

    y = act((conv2d(x, weight, stride, padding, dilation) + bias) * scale + shift)

per output channel. Layers, each paying only for what it adds (a small call's budget is that of
eager PyTorch's conv + affine + relu, docs/design.md §13):
  * atrous_conv2d(): checks arguments once (errors name the argument), resolves the backend, then
    runs the call one of three ways (fastaspp.ops._library.route): the backend kernel directly when no autograd is
    needed; when it is (eager training), the cpu kernel op with its C++ autograd, or an
    autograd.Function around the cuda and triton kernels; the torch op under torch.compile, export,
    dispatch modes or tensor subclasses. The eager calls of the C++ kernels go through
    fastaspp._C.atrous_conv2d_forward, which checks the arguments in C++ (csrc/eager_calls.cpp).
  * torch.ops.fastaspp.atrous_conv2d (+ _grad_input, _grad_weight): the torch ops, defined with
    torch.library (schema, fake impl, autograd) for compile, export and opcheck; the backend is
    an argument, so a compiled graph records which one ran.
  * per-backend kernels: torch.ops.fastaspp._atrous_conv2d_* (C++, cpu/cuda; the cpu backend also
    has the whole backward in one call, _atrous_conv2d_backward, which the forward's C++ autograd
    runs on CPU tensors) and fastaspp.kernels.atrous_conv (Triton).

Backward (docs/design.md §7): with g = grad masked by the saved output (ReLU),
dx = conv_transpose(g*scale, weight), dW = scale * wgrad(x, g), dshift = Σg,
dbias = scale*Σg and dscale = Σ g*(z+bias) = <W, wgrad(x, g)> + bias*Σg, so the
pre-activation z is never stored. The eager Function and the op's autograd share it.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from fastaspp import _ext
from fastaspp._backend import eager_backend, resolve_backend
from fastaspp.geometry import conv_out_size
from fastaspp.ops._autocast import autocast_dtype, cast
from fastaspp.ops._first_order import first_order_only
from fastaspp.ops._checks import IntPair, check_backend, check_like, check_tensor, pair
from fastaspp._rules import accumulator_dtype, result_format
from fastaspp.ops._library import (LIB, Route, StaticArgs, kernel_or_op, op_for_transform, refuse_forward_ad, route,
                                   register_vmap_by_loop, runs_kernels, transform_active, vmap_into_images)


# ---------------------------------------------------------------- argument checks (the one layer)
def check_atrous_conv2d_args(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                             shift: Optional[Tensor], stride: List[int], padding: List[int],
                             dilation: List[int]) -> None:
    """Raises the error that names the first bad argument. Each attribute is read once: this runs on
    every call, and a small call's whole budget is a few µs of Python. The eager calls of the C++
    kernels run the same checks in C++ (csrc/eager_calls.cpp, kept equal by
    tests/test_atrous_conv_errors.py, which runs every case both ways)."""
    check_tensor(x, "x", 4)
    check_tensor(weight, "weight", 4)
    check_like(weight, "weight", x)
    n, c, h, w = x.shape
    c_out, c_in, kh, kw = weight.shape
    if c_in != c:
        raise ValueError(f"weight expects {c_in} input channels (weight.shape[1]) but x has {c} "
                         f"(x.shape[1]); groups other than 1 are not supported")
    if not (c_out and c_in and kh and kw):
        raise ValueError(f"weight must have non-zero C_out, C_in, KH and KW, got shape {tuple(weight.shape)}")
    for name, t in (("bias", bias), ("scale", scale), ("shift", shift)):
        if t is not None:
            check_tensor(t, name, 1)
            check_like(t, name, x)
            if t.shape[0] != c_out:
                raise ValueError(f"{name} must have length C_out={c_out}, got {t.shape[0]}")
    if stride[0] < 1 or stride[1] < 1:
        raise ValueError(f"stride must be >= 1, got {tuple(stride)}")
    if dilation[0] < 1 or dilation[1] < 1:
        raise ValueError(f"dilation must be >= 1, got {tuple(dilation)}")
    if padding[0] < 0 or padding[1] < 0:
        raise ValueError(f"padding must be >= 0, got {tuple(padding)}")
    out_h = conv_out_size(h, kh, stride[0], padding[0], dilation[0])
    out_w = conv_out_size(w, kw, stride[1], padding[1], dilation[1])
    if out_h < 1 or out_w < 1:
        raise ValueError(f"output size {out_h}x{out_w} is too small: x is {h}x{w}, kernel {kh}x{kw}, "
                         f"stride {tuple(stride)}, padding {tuple(padding)}, dilation {tuple(dilation)}")


# ---------------------------------------------------------------- backend kernels
def _triton_kernels():
    from fastaspp.kernels import atrous_conv as triton_atrous_conv

    return triton_atrous_conv


def _out_shape(x: Tensor, weight: Tensor, stride, padding, dilation) -> List[int]:
    return [x.shape[0], weight.shape[0]] + [
        conv_out_size(x.shape[2 + i], weight.shape[2 + i], stride[i], padding[i], dilation[i]) for i in range(2)]


def _triton_forward(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                    shift: Optional[Tensor], stride, padding, dilation, relu: bool) -> Tensor:
    """The Triton kernel reads (scale, shift); a bias folds into the shift, in the accumulator dtype."""
    if bias is not None:
        acc = accumulator_dtype(x.dtype)
        shift_acc = bias.to(acc) * scale.to(acc) if scale is not None else bias.to(acc)
        shift = shift_acc + shift.to(acc) if shift is not None else shift_acc
    return _triton_kernels().atrous_conv2d_forward(x, weight, scale, shift, stride, padding, dilation, relu)


def _forward_kernel(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                    shift: Optional[Tensor], stride: List[int], padding: List[int], dilation: List[int], relu: bool,
                    backend: str) -> Tensor:
    """The backend's forward; y in x's suggested memory format."""
    if backend == "triton":
        return _triton_forward(x, weight, bias, scale, shift, stride, padding, dilation, relu)
    return torch.ops.fastaspp._atrous_conv2d_forward.default(x, weight, bias, scale, shift, stride, padding,
                                                             dilation, relu)


def _grad_input_kernel(grad: Tensor, weight: Tensor, input_size, stride, padding, dilation, backend: str) -> Tensor:
    if backend == "triton":
        return _triton_kernels().atrous_conv2d_grad_input(grad, weight, input_size, stride, padding, dilation)
    return torch.ops.fastaspp._atrous_conv2d_grad_input.default(grad, weight, input_size, stride, padding, dilation)


def _grad_weight_kernel(x: Tensor, grad: Tensor, weight_size, stride, padding, dilation, backend: str) -> Tensor:
    if backend == "triton":
        return _triton_kernels().atrous_conv2d_grad_weight(x, grad, weight_size, stride, padding, dilation)
    return torch.ops.fastaspp._atrous_conv2d_grad_weight.default(x, grad, weight_size, stride, padding, dilation)


# ---------------------------------------------------------------- backward (one formula, two registrations)
def conv_affine_backward(grad: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor],
                         out: Optional[Tensor], relu: bool, stride: List[int], padding: List[int],
                         dilation: List[int], backend: str, needs: Sequence[bool]) -> tuple:
    """Gradients (x, weight, bias, scale, shift) of y = act((conv(x, weight) + bias) * scale + shift);
    None where `needs` says no. The ReLU mask comes from the saved output `out`. The cpu backend
    computes all of them in one C++ call (but under a torch.func transform, where vmap folds the
    input gradient's samples into one call of the composed form); the others compose their
    grad_input / grad_weight kernels (through the torch ops when traced or under a transform:
    fastaspp.ops._library.route)."""
    if backend == "cpu" and not transform_active():
        return torch.ops.fastaspp._atrous_conv2d_backward.default(
            grad, x, weight, bias, scale, out if relu else None, stride, padding, dilation, [bool(n) for n in needs])
    need_x, need_w, need_bias, need_scale, need_shift = needs
    c_out = weight.shape[0]
    g = grad.masked_fill(out <= 0, 0) if relu else grad
    g = g.contiguous(memory_format=result_format(x))
    acc = accumulator_dtype(x.dtype)

    dx = dw = dbias = dscale = dshift = None
    grad_sum = g.sum(dim=(0, 2, 3), dtype=acc)
    if need_w or need_scale:
        args = (x, g, list(weight.shape), stride, padding, dilation, backend)
        dw_raw = (_grad_weight_kernel(*args).contiguous() if runs_kernels(g)
                  else torch.ops.fastaspp.atrous_conv2d_grad_weight(*args))
        if need_w:
            dw = dw_raw if scale is None else (dw_raw.to(acc) * scale.to(acc).view(-1, 1, 1, 1)).to(weight.dtype)
        if need_scale:
            dscale = (dw_raw.to(acc) * weight.to(acc)).sum(dim=(1, 2, 3))
            if bias is not None:
                dscale = dscale + bias.to(acc) * grad_sum
            dscale = dscale.to(scale.dtype)
    if need_x:
        g_scaled = g if scale is None else (g * scale.view(1, c_out, 1, 1)).contiguous(
            memory_format=result_format(x))
        args = (g_scaled, weight, list(x.shape), stride, padding, dilation, backend)
        dx = (_grad_input_kernel(*args) if runs_kernels(g_scaled)
              else torch.ops.fastaspp.atrous_conv2d_grad_input(*args))
        # g's layout can be ambiguous (1x1 maps) where x's is not: dx follows x.
        dx = dx.contiguous(memory_format=result_format(x))
    if need_bias:
        dbias = (grad_sum if scale is None else grad_sum * scale.to(acc)).to(bias.dtype)
    if need_shift:
        dshift = grad_sum.to(x.dtype)
    return dx, dw, dbias, dscale, dshift


def _save(ctx, x, weight, bias, scale, output, stride, padding, dilation, relu, backend) -> None:
    ctx.save_for_backward(x, weight, bias, scale, output if relu else None)
    ctx.conv = (list(stride), list(padding), list(dilation))
    ctx.relu = relu
    ctx.backend = backend


@first_order_only("atrous_conv2d", "eager torch.nn.functional.conv2d")
def _backward(ctx, grad: Tensor):
    x, weight, bias, scale, out = ctx.saved_tensors
    grads = conv_affine_backward(grad, x, weight, bias, scale, out, ctx.relu, *ctx.conv, ctx.backend,
                                 ctx.needs_input_grad[:5])
    return (*grads, None, None, None, None, None)  # the op's five non-tensor inputs (the Function's three)


def conv_affine_jvp(x: Tensor, weight: Tensor, bias: Optional[Tensor], scale: Optional[Tensor], out: Tensor,
                    tangents: Sequence[Optional[Tensor]], relu: bool, stride: List[int], padding: List[int],
                    dilation: List[int], backend: str) -> Tensor:
    """Tangent of y = act((conv(x, weight) + bias) * scale + shift) for tangents (tx, tw, tbias,
    tscale, tshift), any of them None: the conv is bilinear, so
    ty = mask * ((conv(tx, w) + conv(x, tw) + tbias) * scale + (conv(x, w) + bias) * tscale + tshift),
    the convs on the backend's kernel and the ReLU's mask from the output. Runs only under forward-mode
    AD, so always through the torch op (its tensors may be functorch's)."""
    tx, tw, tbias, tscale, tshift = tangents
    geometry = (stride, padding, dilation, False, backend)
    conv = _forward_op
    acc = accumulator_dtype(x.dtype)
    c = (1, -1, 1, 1)
    t = None
    for a, b in ((tx, weight), (x, tw)):
        if b is not None and a is not None:
            term = conv(a, b, None, None, None, *geometry).to(acc)
            t = term if t is None else t + term
    if tbias is not None:
        t = tbias.to(acc).view(c) if t is None else t + tbias.to(acc).view(c)
    if t is not None and scale is not None:
        t = t * scale.to(acc).view(c)
    if tscale is not None:
        pre = conv(x, weight, bias, None, None, *geometry).to(acc)
        t = pre * tscale.to(acc).view(c) if t is None else t + pre * tscale.to(acc).view(c)
    if tshift is not None:
        t = tshift.to(acc).view(c) if t is None else t + tshift.to(acc).view(c)
    t = torch.zeros_like(out, dtype=acc) if t is None else t.expand(out.shape)
    if relu:
        t = t.masked_fill(out <= 0, 0)
    return t.to(out.dtype).contiguous(memory_format=result_format(x))


class _AtrousConv2dFunction(torch.autograd.Function):
    """Eager autograd around the cuda and triton kernels: what torch.ops.fastaspp.atrous_conv2d's
    autograd does, without the op dispatch (a large part of a small training call's host time). The
    cpu backend's kernel op has the same autograd in C++, which costs less again; under torch.func's
    transforms and forward-mode AD every backend runs here (Route.TRANSFORM: functorch needs the
    separate setup_context, and jvp gives the tangent)."""

    generate_vmap_rule = True  # vmap (jacrev, jacfwd) runs forward, backward and jvp on batched tensors

    @staticmethod
    def forward(x, weight, bias, scale, shift, geometry, relu, backend):
        return kernel_or_op(_forward_kernel, torch.ops.fastaspp.atrous_conv2d, x, weight, bias, scale, shift,
                            *geometry, relu, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, weight, bias, scale, _shift, geometry, relu, backend = inputs
        _save(ctx, x, weight, bias, scale, output, *geometry, relu, backend)
        ctx.save_for_forward(x, weight, bias, scale, output)

    backward = staticmethod(_backward)

    @staticmethod
    def jvp(ctx, *tangents):
        x, weight, bias, scale, out = ctx.saved_tensors
        return conv_affine_jvp(x, weight, bias, scale, out, tangents[:5], ctx.relu, *ctx.conv, ctx.backend)


# ---------------------------------------------------------------- the torch ops
LIB.define("atrous_conv2d(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? shift, int[] stride, "
           "int[] padding, int[] dilation, bool relu, str backend) -> Tensor")
LIB.define("atrous_conv2d_grad_input(Tensor grad, Tensor weight, int[] input_size, int[] stride, int[] padding, "
           "int[] dilation, str backend) -> Tensor")
LIB.define("atrous_conv2d_grad_weight(Tensor x, Tensor grad, int[] weight_size, int[] stride, int[] padding, "
           "int[] dilation, str backend) -> Tensor")


def _forward_op(x, weight, bias, scale, shift, stride, padding, dilation, relu, backend):
    """_forward_kernel through the torch op, for tensors a kernel cannot read directly (runs_kernels)."""
    with op_for_transform():
        return torch.ops.fastaspp.atrous_conv2d(x, weight, bias, scale, shift, stride, padding, dilation, relu,
                                                backend)


def _op_forward(x, weight, bias, scale, shift, stride, padding, dilation, relu, backend):
    refuse_forward_ad("atrous_conv2d")
    check_backend(backend, x)
    return _forward_kernel(x, weight, bias, scale, shift, list(stride), list(padding), list(dilation), relu, backend)


def _op_grad_input(grad, weight, input_size, stride, padding, dilation, backend):
    check_backend(backend, grad)
    dx = _grad_input_kernel(grad, weight, list(input_size), list(stride), list(padding), list(dilation), backend)
    return dx.contiguous(memory_format=result_format(grad))


def _op_grad_weight(x, grad, weight_size, stride, padding, dilation, backend):
    check_backend(backend, x)
    return _grad_weight_kernel(x, grad, list(weight_size), list(stride), list(padding), list(dilation),
                               backend).contiguous()


LIB.impl("atrous_conv2d", _op_forward, "CompositeExplicitAutograd")
LIB.impl("atrous_conv2d_grad_input", _op_grad_input, "CompositeExplicitAutograd")
LIB.impl("atrous_conv2d_grad_weight", _op_grad_weight, "CompositeExplicitAutograd")
torch.library.register_vmap("fastaspp::atrous_conv2d", lambda info, in_dims, *args: vmap_into_images(
    torch.ops.fastaspp.atrous_conv2d.default, info, in_dims, args), lib=LIB)
torch.library.register_vmap("fastaspp::atrous_conv2d_grad_input", lambda info, in_dims, *args: vmap_into_images(
    torch.ops.fastaspp.atrous_conv2d_grad_input.default, info, in_dims, args, size_at=2), lib=LIB)
register_vmap_by_loop("atrous_conv2d_grad_weight")  # per-sample weight gradients: one call per sample


def _conv_fake(x, weight, stride, padding, dilation):
    return x.new_empty(_out_shape(x, weight, stride, padding, dilation)).contiguous(
        memory_format=result_format(x))


@torch.library.register_fake("fastaspp::atrous_conv2d", lib=LIB)
def _(x, weight, bias, scale, shift, stride, padding, dilation, relu, backend):
    refuse_forward_ad("atrous_conv2d")
    return _conv_fake(x, weight, stride, padding, dilation)


@torch.library.register_fake("fastaspp::atrous_conv2d_grad_input", lib=LIB)
def _(grad, weight, input_size, stride, padding, dilation, backend):
    return grad.new_empty(list(input_size)).contiguous(memory_format=result_format(grad))


@torch.library.register_fake("fastaspp::atrous_conv2d_grad_weight", lib=LIB)
def _(x, grad, weight_size, stride, padding, dilation, backend):
    return x.new_empty(list(weight_size))


def _setup_context(ctx, inputs, output):
    x, weight, bias, scale, _shift, *conv = inputs
    _save(ctx, x, weight, bias, scale, output, *conv)


torch.library.register_autograd("fastaspp::atrous_conv2d", _backward, setup_context=_setup_context, lib=LIB)


# ---------------------------------------------------------------- fake impls of the C++ kernels
if _ext.loaded():
    @torch.library.register_fake("fastaspp::_atrous_conv2d_forward", lib=LIB)
    def _(x, weight, bias, scale, shift, stride, padding, dilation, relu):
        return _conv_fake(x, weight, stride, padding, dilation)

    @torch.library.register_fake("fastaspp::_atrous_conv2d_grad_input", lib=LIB)
    def _(grad, weight, input_size, stride, padding, dilation):
        return grad.new_empty(list(input_size)).contiguous(memory_format=result_format(grad))

    @torch.library.register_fake("fastaspp::_atrous_conv2d_grad_weight", lib=LIB)
    def _(x, grad, weight_size, stride, padding, dilation):
        return x.new_empty(list(weight_size))

    @torch.library.register_fake("fastaspp::_atrous_conv2d_backward", lib=LIB)
    def _(grad, x, weight, bias, scale, out, stride, padding, dilation, output_mask):
        like = (x.new_empty(x.shape).contiguous(memory_format=result_format(x)), torch.empty_like(weight),
                bias.new_empty(bias.shape) if bias is not None else None,
                scale.new_empty(scale.shape) if scale is not None else None, x.new_empty(weight.shape[0]))
        return tuple(t if need else None for t, need in zip(like, output_mask))


# ---------------------------------------------------------------- public entry point
def atrous_conv2d(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None, stride: IntPair = 1,
                  padding: IntPair = 0, dilation: IntPair = 1, *, scale: Optional[Tensor] = None,
                  shift: Optional[Tensor] = None, relu: bool = False) -> Tensor:
    """act((conv2d(x, weight, stride, padding, dilation) + bias) * scale + shift), per output channel.

    x: [N, C_in, H, W] (NCHW or channels_last; the output keeps x's memory format).
    weight: [C_out, C_in, KH, KW]; bias, scale, shift: [C_out] or None (scale None = 1,
    shift None = 0); relu applies ReLU. Dead taps (reading only padding) are skipped. Under
    autocast, the operands are cast to the autocast dtype, as for torch's conv2d.
    The backend comes from fastaspp.backend()/set_backend(); "auto" runs CUDA tensors on triton
    and CPU tensors on cpu. Eager calls run the backend kernels directly (with an autograd.Function
    when a gradient is needed); under torch.compile, export, dispatch modes or tensor subclasses the
    call is torch.ops.fastaspp.atrous_conv2d.
    """
    stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
    if isinstance(x, Tensor):
        dtype = autocast_dtype(x)
        if dtype is not None:
            x, weight, bias, scale, shift = (cast(t, dtype) for t in (x, weight, bias, scale, shift))
    if relu is not True and relu is not False:
        raise TypeError(f"relu must be a bool, got {relu!r}")
    how = route(x, weight, bias, scale, shift)  # anything but plain tensors goes to the torch op
    if how is Route.KERNEL or how is Route.FUNCTION:
        try:
            backend = eager_backend(x)
        except RuntimeError:
            check_atrous_conv2d_args(x, weight, bias, scale, shift, stride, padding, dilation)  # reported first
            raise
        if backend != "triton" and (how is Route.KERNEL or backend == "cpu"):
            # C++: check_atrous_conv2d_args's checks, then the kernel op (csrc/eager_calls.cpp), on cpu
            # with its C++ autograd when a gradient is needed (csrc/cpu/atrous_conv_autograd.cpp).
            return _ext._C.atrous_conv2d_forward(x, weight, bias, scale, shift, stride, padding, dilation, relu)
    check_atrous_conv2d_args(x, weight, bias, scale, shift, stride, padding, dilation)
    backend = resolve_backend(x.device)
    if how is Route.KERNEL:
        return _forward_kernel(x, weight, bias, scale, shift, stride, padding, dilation, relu, backend)
    if how is Route.FUNCTION or how is Route.TRANSFORM:
        return _AtrousConv2dFunction.apply(x, weight, bias, scale, shift, StaticArgs((stride, padding, dilation)),
                                           relu, backend)
    return torch.ops.fastaspp.atrous_conv2d(x, weight, bias, scale, shift, stride, padding, dilation, relu, backend)
