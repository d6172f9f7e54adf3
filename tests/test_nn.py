"""fastaspp.nn layers against the PyTorch modules they replace."""
import pytest
import torch
from torch import nn

import fastaspp
from fastaspp import reference

from conftest import device_for


@pytest.mark.parametrize("kwargs", [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=2, dilation=2),
    dict(in_channels=3, out_channels=5, kernel_size=3, padding="same", dilation=3, bias=False),
    dict(in_channels=3, out_channels=5, kernel_size=1, stride=2),
    dict(in_channels=5, out_channels=2, kernel_size=(3, 5), padding=(1, 4), dilation=(1, 2)),
    dict(in_channels=2, out_channels=3, kernel_size=3, padding="valid"),
])
def test_atrous_conv2d_matches_conv2d(backend, kwargs):
    torch.manual_seed(0)
    device = device_for(backend)
    ref = nn.Conv2d(**kwargs).to(device)
    mine = fastaspp.nn.AtrousConv2d(**kwargs).to(device)
    assert mine.state_dict().keys() == ref.state_dict().keys()
    mine.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, kwargs["in_channels"], 9, 10, device=device, requires_grad=True)
    out, expected = mine(x), ref(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *mine.parameters()], g)
    want = torch.autograd.grad(expected, [x, *ref.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("kwargs,message", [
    (dict(groups=2), "groups must be 1"),
    (dict(padding_mode="reflect", padding=1), "padding_mode must be 'zeros'"),
    (dict(kernel_size=2, padding="same"), "asymmetric padding"),
])
def test_atrous_conv2d_rejects_unsupported(kwargs, message):
    args = dict(in_channels=4, out_channels=4, kernel_size=3) | kwargs
    with pytest.raises(ValueError, match=message):
        fastaspp.nn.AtrousConv2d(**args)


def _pair(c_in=4, c_out=6, dilation=2, stride=1, bias=False, device="cpu"):
    torch.manual_seed(0)
    ref = reference.conv_bn_relu(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=bias)
    with torch.no_grad():
        ref[1].running_mean.uniform_(-0.5, 0.5)
        ref[1].running_var.uniform_(0.5, 2.0)
        ref[1].weight.uniform_(0.5, 1.5)
        ref[1].bias.uniform_(-0.5, 0.5)
    mine = fastaspp.nn.ConvBNReLU(c_in, c_out, 3, stride=stride, padding=dilation, dilation=dilation, bias=bias)
    assert list(mine.state_dict().keys()) == list(ref.state_dict().keys()) == [
        "0.weight", *(["0.bias"] if bias else []), "1.weight", "1.bias", "1.running_mean", "1.running_var",
        "1.num_batches_tracked"]
    mine.load_state_dict(ref.state_dict(), strict=True)
    return ref.to(device), mine.to(device)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_conv_bn_relu_eval_is_one_fused_op(backend, bias, stride):
    device = device_for(backend)
    ref, mine = _pair(bias=bias, stride=stride, device=device)
    ref.eval()
    mine.eval()
    x = torch.randn(2, 4, 11, 9, device=device).to(memory_format=torch.channels_last).requires_grad_()
    out = mine(x)
    expected = ref(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
    assert out.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *mine.parameters()], g)
    want = torch.autograd.grad(expected, [x, *ref.parameters()], g)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    # Eval runs the conv, the folded BN and the ReLU as a single op call.
    calls = []
    with torch.no_grad(), _Recorder(calls):
        mine(x.detach())
    assert [c for c in calls if "fastaspp" in c] == ["fastaspp.atrous_conv2d.default"]
    assert not [c for c in calls if "batch_norm" in c or "relu" in c]


def test_eager_calls_skip_the_op_dispatch(backend, monkeypatch):
    """Plain eager calls run the backend kernels directly, with and without autograd (same results,
    bitwise, as through torch.ops.fastaspp.atrous_conv2d); a dispatch mode (as under tracing) sees
    the op."""
    device = device_for(backend)
    ref, mine = _pair(bias=True, stride=1, device=device)
    mine.eval()
    x = torch.randn(2, 4, 11, 9, device=device).to(memory_format=torch.channels_last).requires_grad_()
    calls = []
    with _Recorder(calls):
        through_op = mine(x)
    assert "fastaspp.atrous_conv2d.default" in calls
    (grad_op,) = torch.autograd.grad(through_op.sum(), [x])

    def refuse(*args, **kwargs):
        raise AssertionError("torch.ops.fastaspp.atrous_conv2d called")

    monkeypatch.setattr(torch.ops.fastaspp, "atrous_conv2d", refuse)
    with torch.no_grad():
        assert torch.equal(mine(x), through_op.detach())
    direct = mine(x)  # autograd needed: the eager autograd.Function, not the op
    assert direct.requires_grad and torch.equal(direct, through_op)
    (grad_direct,) = torch.autograd.grad(direct.sum(), [x])
    assert torch.equal(grad_direct, grad_op)


def test_conv_bn_relu_fold_is_memoised_and_refreshed():
    _, mine = _pair(bias=False, stride=1, device=torch.device("cpu"))
    mine.eval()
    x = torch.randn(1, 4, 7, 7)
    with torch.no_grad():
        first = mine(x)
        folded = mine._fold_cache.value
        mine(x)
        assert mine._fold_cache.value is folded  # nothing changed: not refolded
        mine[1].running_var.mul_(4.0)  # an in-place buffer update must refresh the fold
        after = mine(x)
    expected = torch.relu(mine[1](mine[0](x)))
    assert mine._fold_cache.value is not folded
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(after, first)


def test_conv_bn_relu_eval_backward_twice():
    """An eval module whose parameters train (fine-tuning with frozen statistics): each call folds
    afresh, so a second backward does not run into the first call's freed graph."""
    ref, mine = _pair(bias=False, stride=1, device=torch.device("cpu"))
    ref.eval()
    mine.eval()
    x = torch.randn(2, 4, 7, 7)
    for _ in range(2):
        grads = torch.autograd.grad(mine(x).sum(), list(mine.parameters()))
        expected = torch.autograd.grad(torch.relu(ref(x)).sum(), list(ref.parameters()))
        for a, b in zip(grads, expected):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert mine._fold_cache.stamp is None


def test_conv_bn_relu_fold_under_inference_mode_is_an_ordinary_tensor():
    _, mine = _pair(bias=False, stride=1, device=torch.device("cpu"))
    mine.eval()
    with torch.inference_mode():
        mine(torch.randn(1, 4, 7, 7))
    assert not any(t.is_inference() for t in mine._fold_cache.value if t is not None)


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the aten/fastaspp ops a block dispatches."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("momentum", [0.1, None])
def test_conv_bn_relu_training_matches_batchnorm(backend, momentum):
    device = device_for(backend)
    ref, mine = _pair(bias=True, device=device)
    ref[1].momentum = mine[1].momentum = momentum
    ref.train()
    mine.train()
    for step in range(3):
        x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(step)).to(device).requires_grad_()
        out, expected = mine(x), ref(x)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-4)
        g = torch.randn_like(out)
        got = torch.autograd.grad(out, [x, *mine.parameters()], g)
        want = torch.autograd.grad(expected, [x, *ref.parameters()], g)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(mine.state_dict()[key], value, atol=1e-6, rtol=1e-5, msg=key)
    assert mine[1].num_batches_tracked.item() == 3
