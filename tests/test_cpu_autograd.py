"""The cpu backend's C++ autograd (csrc/cpu/atrous_conv_autograd.cpp): fastaspp.ops.atrous_conv2d in
eager training records a C++ node around the kernel op, or torch's own conv node where the cpu
rule runs torch's conv both ways and there is no epilogue to fuse.

The gradients of every case (test_atrous_conv.py covers the shapes) come through this node; here the
parts that are its own: which gradients a call asks for when optional arguments are absent or
frozen, the double backward it refuses, and the route to torch's node.

Tolerances (tests/_cases.py, rule 2): fp64 results within gamma_n of the magnitude, the gradients
of the reference on absolute values (a bound on every term's size, ReLU mask or not), n the
longest chain: the pixel sum, the dot product and the epilogue.
"""
import itertools

import pytest
import torch
import torch.nn.functional as F

import fastaspp
from fastaspp import reference

from _cases import CONV_EPILOGUE, ConvCase, absolute, assert_within

CASE = ConvCase(2, 3, 4, 6, 5, dilation=2)
GEOMETRY = dict(padding=2, dilation=2)
NAMES = ("x", "weight", "bias", "scale", "shift")


def make_inputs(case, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(case.n, case.c_in, case.h, case.w, generator=gen, dtype=dtype)
    w = torch.randn(case.c_out, case.c_in, case.k, case.k, generator=gen, dtype=dtype)
    b, s, t = (torch.randn(case.c_out, generator=gen, dtype=dtype) for _ in range(3))
    return [x, w, b, s + 2.0, t]


def node_name(out):
    """The name of out's autograd node: torch's class name (ConvolutionBackward0), or a C++ Function's
    demangled type (...CppNode<fastaspp::...::AtrousConv2dCpu>)."""
    return out.grad_fn.name() if out.grad_fn is not None else "None"


# Every presence of the optional arguments, and which of the given ones take a gradient.
PRESENCE = list(itertools.product([False, True], repeat=3))


@pytest.mark.parametrize("present", PRESENCE, ids=lambda p: "".join("bst"[i] if on else "-" for i, on in enumerate(p)))
@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
def test_each_requested_gradient_matches_the_reference(present, relu):
    """Every subset of the given tensors takes a gradient in turn: the node returns exactly those,
    each within the bound, and None for the rest (needs_input_grad counts only given tensors, so an
    absent bias must not shift the scale's place)."""
    inputs = make_inputs(CASE)
    given = [True, True, *present]
    for requested in itertools.product([False, True], repeat=5):
        if not any(requested) or any(r and not g for r, g in zip(requested, given)):
            continue
        args = [t.clone().requires_grad_(r) if g else None for t, g, r in zip(inputs, given, requested)]
        out = fastaspp.ops.atrous_conv2d(args[0], args[1], args[2], scale=args[3], shift=args[4], relu=relu,
                                         **GEOMETRY)
        assert "AtrousConv2dCpu" in node_name(out) or not (relu or present[1] or present[2])
        g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
        wanted = [t for t in args if t is not None and t.requires_grad]
        grads = torch.autograd.grad(out, wanted, g)

        ref_args = [None if t is None else t.detach().clone().requires_grad_(t.requires_grad) for t in args]
        ref = reference.atrous_conv2d(ref_args[0], ref_args[1], ref_args[2], scale=ref_args[3], shift=ref_args[4],
                                      relu=relu, **GEOMETRY)
        exact = torch.autograd.grad(ref, [t for t in ref_args if t is not None and t.requires_grad], g)
        abs_args = [None if t is None else absolute(t).requires_grad_(t.requires_grad) for t in args]
        magnitude_out = reference.atrous_conv2d(abs_args[0], abs_args[1], abs_args[2], scale=abs_args[3],
                                                shift=abs_args[4], **GEOMETRY)
        magnitude = torch.autograd.grad(magnitude_out, [t for t in abs_args if t is not None and t.requires_grad],
                                        g.abs())
        depth = CASE.n * CASE.h * CASE.w + CASE.c_in * CASE.k * CASE.k + CONV_EPILOGUE
        names = [n for n, t in zip(NAMES, args) if t is not None and t.requires_grad]
        for name, actual, want, size in zip(names, grads, exact, magnitude):
            assert_within(actual, want, size, depth, torch.float64, f"d{name} {requested}")


def test_frozen_arguments_get_no_gradient():
    x, w, b, s, t = make_inputs(CASE)
    s.requires_grad_()
    out = fastaspp.ops.atrous_conv2d(x, w, b, scale=s, shift=t, relu=True, **GEOMETRY)
    out.sum().backward()
    assert s.grad is not None and all(v.grad is None for v in (x, w, b, t))


def test_double_backward_raises():
    """A gradient of its gradients would miss the terms through this conv: the second backward
    raises, naming the op, rather than returning them silently incomplete."""
    x, w = (t.requires_grad_() for t in make_inputs(CASE)[:2])
    out = fastaspp.ops.atrous_conv2d(x, w, **GEOMETRY)
    (dw,) = torch.autograd.grad(out.square().sum(), [w], create_graph=True)
    assert dw.requires_grad
    with pytest.raises(RuntimeError, match="atrous_conv2d on the cpu backend has no double backward"):
        torch.autograd.grad(dw.sum(), [x])


def test_no_node_without_a_gradient():
    x, w = make_inputs(CASE)[:2]
    assert fastaspp.ops.atrous_conv2d(x, w, **GEOMETRY).grad_fn is None
    w.requires_grad_()
    with torch.no_grad():
        assert fastaspp.ops.atrous_conv2d(x, w, **GEOMETRY).grad_fn is None


# (c, size, rate, torch's node): fp32 3x3 convs at batch 1 on each side of the rule (the cases of
# test_cpu_conv_paths.py's DIRECT_RANGE_CASES): the loops, torch's conv, and oneDNN, whose folded
# form needs a kept weight, so a weight taking a gradient runs torch's conv.
ROUTE_CASES = [(8, 9, 1, False), (32, 17, 1, True), (64, 17, 6, True)]


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("c,size,rate,torch_node", ROUTE_CASES, ids=str)
def test_plain_conv_in_training_is_torch_conv_where_the_rule_runs_it(c, size, rate, torch_node, bias):
    """Where the rule runs torch's conv forward and backward, a bare conv (a bias at most) in training
    records torch's node: outputs and gradients equal to F.conv2d's, bit for bit. With a ReLU there is
    an epilogue to fuse, and the call keeps fastaspp's node; the loops' shapes keep it too."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, c, size, size, generator=gen).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, c, 3, 3, generator=gen) / (9 * c) ** 0.5
    b = torch.randn(c, generator=gen) if bias else None
    g = torch.randn(1, c, size, size, generator=gen)
    params = [t.requires_grad_() for t in (x, w, b) if t is not None]

    out = fastaspp.ops.atrous_conv2d(x, w, b, padding=rate, dilation=rate)
    assert (node_name(out) == "ConvolutionBackward0") == torch_node
    if torch_node:
        eager = F.conv2d(x, w, b, padding=rate, dilation=rate)
        assert torch.equal(out, eager)
        for mine, theirs in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(eager, params, g)):
            assert torch.equal(mine, theirs)
    fused = fastaspp.ops.atrous_conv2d(x, w, b, padding=rate, dilation=rate, relu=True)
    assert "AtrousConv2dCpu" in node_name(fused)


def test_kernel_op_passes_opcheck_with_gradients():
    """The kernel op with its C++ autograd (torch.library.opcheck: schema, fake impl, autograd
    registration) on inputs that take a gradient."""
    x, w, b, s, t = (v.float().requires_grad_() for v in make_inputs(CASE))
    geometry = ([1, 1], [2, 2], [2, 2])
    torch.library.opcheck(torch.ops.fastaspp._atrous_conv2d_forward.default, (x, w, b, s, t, *geometry, True))
    torch.library.opcheck(torch.ops.fastaspp._atrous_conv2d_forward.default,
                          (x, w, None, None, None, *geometry, False))


def test_eager_binding_calls_the_kernel_op():
    """fastaspp._C.atrous_conv2d_forward, the eager routes' call of the kernel op, gives the op's
    result bit for bit, with or without a gradient to record, and names a bad argument."""
    x, w, b, s, t = (v.float() for v in make_inputs(CASE))
    geometry = ([1, 1], [2, 2], [2, 2])
    binding = fastaspp._ext._C.atrous_conv2d_forward
    expected = torch.ops.fastaspp._atrous_conv2d_forward.default(x, w, b, s, t, *geometry, True)
    assert torch.equal(binding(x, w, b, s, t, *geometry, True), expected)
    w.requires_grad_()
    out = binding(x, w, None, s, None, *geometry, False)
    assert "AtrousConv2dCpu" in node_name(out)
    with pytest.raises(TypeError, match="weight must be a tensor"):
        binding(x, "w", None, None, None, *geometry, False)
    with pytest.raises(TypeError, match="stride must be a list of two ints"):
        binding(x, w, None, None, None, [1], [2, 2], [2, 2], False)
    with pytest.raises(TypeError, match="dilation must be a list of two ints"):
        binding(x, w, None, None, None, [1, 1], [2, 2], [2.0, 2], False)
