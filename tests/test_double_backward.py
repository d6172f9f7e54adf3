"""Every fused op's backward is differentiable once: under create_graph=True its gradients are the
usual ones, and a second backward through them raises, naming the op and the backend, on every
backend and both routes (the eager kernels and the torch op). Before, the triton and cuda eager
routes and every op route returned second derivatives that silently missed the terms through the
kernels (checked to fail that way with the decorator removed). Second derivatives under torch.func:
tests/test_func_transforms.py."""
import pytest
import torch

import fastaspp
from fastaspp.ops import affine_relu_project, aspp_branches, aspp_branches_stats, atrous_conv2d

from conftest import device_for


class _PassThrough(torch.overrides.TorchFunctionMode):
    """Any torch-function mode sends a call to the torch op (fastaspp.ops._library.route)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.fixture
def backend(each_backend):
    return each_backend


@pytest.fixture(params=["eager", "op-route"])
def calls(request):
    if request.param == "eager":
        yield lambda f, *args, **kwargs: f(*args, **kwargs)
    else:
        def through_op(f, *args, **kwargs):
            with _PassThrough():
                return f(*args, **kwargs)
        yield through_op


def _leaves(device, *shapes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(s, generator=gen, dtype=torch.float64) + 0.5).to(device).requires_grad_() for s in shapes]


def _assert_refused(run, inputs, op, backend):
    """run() -> the op's output: its first-order gradients under create_graph equal the plain ones,
    and differentiating them again raises."""
    plain = torch.autograd.grad(run().square().sum(), inputs)
    again = torch.autograd.grad(run().square().sum(), inputs, create_graph=True)
    for p, a in zip(plain, again):
        torch.testing.assert_close(a, p, rtol=0, atol=0)
        assert a.requires_grad
    penalty = sum(g.square().sum() for g in again) + sum(t.sum() for t in inputs)  # mixed with a plain term
    with pytest.raises(RuntimeError, match=f"{op} on the {backend} backend has no double backward"):
        penalty.backward()


def test_atrous_conv2d(backend, calls):
    device = device_for(backend)
    x, w, scale = _leaves(device, (1, 3, 6, 5), (4, 3, 3, 3), (4,))
    run = lambda: calls(atrous_conv2d, x, w, None, 1, 2, 2, scale=scale, relu=True)  # noqa: E731
    _assert_refused(run, [x, w, scale], "atrous_conv2d", backend)


def test_aspp_branches(backend, calls):
    device = device_for(backend)
    x, w1, w3, scale, shift = _leaves(device, (1, 3, 5, 5), (2, 3, 1, 1), (2, 3, 3, 3), (4,), (4,))
    x_last = x.contiguous(memory_format=torch.channels_last)
    run = lambda: calls(aspp_branches, x_last, [w1, w3], [2], scale, shift)  # noqa: E731
    _assert_refused(run, [x, w1, w3, scale], "aspp_branches", backend)


def test_aspp_branches_stats(backend, calls):
    device = device_for(backend)
    x, w1, w3 = _leaves(device, (2, 3, 5, 5), (2, 3, 1, 1), (2, 3, 3, 3))
    x_last = x.contiguous(memory_format=torch.channels_last)

    def run():
        z, mean, var = calls(aspp_branches_stats, x_last, [w1, w3], [2])
        return z.sum() + mean.sum() + var.sum()

    _assert_refused(run, [x, w1, w3], "aspp_branches_stats", backend)


def test_affine_relu_project(backend, calls):
    device = device_for(backend)
    z, centre, scale, shift, weight, bias = _leaves(device, (2, 4, 3, 3), (4,), (4,), (4,), (3, 4), (2, 3))
    z_last = z.contiguous(memory_format=torch.channels_last)

    def run():
        y, mean, var = calls(affine_relu_project, z_last, centre - 1, scale, shift - 1, weight, bias)
        return y.sum() + mean.sum() + var.sum()

    _assert_refused(run, [z, centre, scale, weight], "affine_relu_project", backend)


def test_aspp_module_training(backend):
    """The training ASPP as a user meets it: a gradient penalty through it raises."""
    device = device_for(backend)
    torch.manual_seed(0)
    aspp = fastaspp.nn.ASPP(3, [2], out_channels=2).double().to(device).train()
    (x,) = _leaves(device, (2, 3, 5, 5))
    (dx,) = torch.autograd.grad(aspp(x).square().sum(), [x], create_graph=True)
    with pytest.raises(RuntimeError, match="has no double backward"):
        dx.square().sum().backward()
