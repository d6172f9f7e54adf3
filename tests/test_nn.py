"""fastaspp.nn layers against the PyTorch modules they replace.

Tolerances (tests/_cases.py): eval against the plain module in fp64 on the same values, within rule
2's bound (magnitude_model; n = Cin*KH*KW products, the bias, the BN fold and the epilogue; the
gradients add their sums over pixels and the transposed conv), with every ReLU input of the exact
run farther from 0 than that bound, so that the masks agree; training (batch statistics) within
3x plain PyTorch's own fp32 error against fp64 (rule 3). Checked to fail, in a scratch run, with
the fused module's running variance off by 2e-3, its BN eps 1e-4 for 1e-5, or its conv weight off
by 1e-4 (every test that reads them).
"""
import copy

import pytest
import torch
from torch import nn

import fastaspp
from fastaspp import reference

from _cases import BN_FOLD, CONV_EPILOGUE, absolute, assert_as_accurate_as_plain, assert_masks_unambiguous, \
    assert_relu_margin, assert_within, frozen_statistics, magnitude_model, recording_relu_inputs, relative_bound
from conftest import device_for


def _grads(module, x, out, g):
    return torch.autograd.grad(out, [x, *module.parameters()], g)


def assert_eval_close(mine, ref, x, g=None, what=""):
    """mine(x) and, with g, its gradients (x, then mine's parameters) against ref, an eval module of
    convs and BNs, by rule 2: the exact run is ref in fp64, the magnitudes magnitude_model(ref)'s
    output and gradients (seeded with |g|). Depths: the forward's Cin*KH*KW products (the largest
    conv), its bias, the BN fold and the epilogue; the gradients add the sum over N*Ho*Wo pixels
    and the transposed conv's Cout*KH*KW products."""
    convs = [m for m in ref.modules() if isinstance(m, nn.Conv2d)]
    depth = max(c.in_channels * c.kernel_size[0] * c.kernel_size[1] + 1 for c in convs) + BN_FOLD + CONV_EPILOGUE
    x_ = x.detach().requires_grad_(g is not None)
    out = mine(x_)
    exact_module, abs_module = copy.deepcopy(ref).double(), magnitude_model(ref)
    x64, abs_x = x.detach().double().requires_grad_(g is not None), absolute(x).requires_grad_(g is not None)
    exact, magnitude = exact_module(x64), abs_module(abs_x)
    assert_within(out, exact, magnitude, depth, x.dtype, f"{what} output")
    if g is None:
        return out
    assert_masks_unambiguous(exact_module, x, relative_bound(depth, x.dtype))
    grad_depth = depth + out.shape[0] * out.shape[2] * out.shape[3] + \
        max(c.out_channels * c.kernel_size[0] * c.kernel_size[1] for c in convs) + BN_FOLD + CONV_EPILOGUE
    names = ["x"] + [name for name, _ in mine.named_parameters()]
    for name, a, e, m in zip(names, _grads(mine, x_, out, g), _grads(exact_module, x64, exact, g.double()),
                             _grads(abs_module, abs_x, magnitude, g.double().abs())):
        assert_within(a, e, m, grad_depth, x.dtype, f"{what} grad {name}")
    return out


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
    x = torch.randn(2, kwargs["in_channels"], 9, 10, device=device)
    g = torch.randn(ref(x).shape, device=device)
    assert_eval_close(mine, ref, x, g)


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
    g = torch.randn(ref(x).shape, device=device)
    out = assert_eval_close(mine, ref, x, g)
    assert out.is_contiguous(memory_format=torch.channels_last)
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
    # Without autograd the module folds into kept weights, which the cpu backend may run on other
    # kernels (oneDNN with the fold as post-ops, Winograd): compared with the op on the same terms.
    with torch.no_grad(), _Recorder([]):
        through_op_no_grad = mine(x)

    def refuse(*args, **kwargs):
        raise AssertionError("torch.ops.fastaspp.atrous_conv2d called")

    monkeypatch.setattr(torch.ops.fastaspp, "atrous_conv2d", refuse)
    with torch.no_grad():
        assert torch.equal(mine(x), through_op_no_grad)
    direct = mine(x)  # autograd needed: the eager autograd.Function, not the op
    assert direct.requires_grad and torch.equal(direct, through_op)
    (grad_direct,) = torch.autograd.grad(direct.sum(), [x])
    assert torch.equal(grad_direct, grad_op)


def test_conv_bn_relu_fold_is_memoised_and_refreshed():
    # The cache's own value: whether a fold was redone is not visible in the results.
    _, mine = _pair(bias=False, stride=1, device=torch.device("cpu"))
    mine.eval()
    x = torch.randn(1, 4, 7, 7)
    with torch.no_grad():
        first = mine(x)
        folded = mine._fold_cache.value
        mine(x)
        assert mine._fold_cache.value is folded  # nothing changed: not refolded
        mine[1].running_var.mul_(4.0)  # an in-place buffer update must refresh the fold
        after = assert_eval_close(mine, nn.Sequential(mine[0], mine[1], nn.ReLU()), x)
    assert mine._fold_cache.value is not folded
    assert not torch.allclose(after, first)


def test_conv_bn_relu_eval_backward_twice():
    """An eval module whose parameters train (fine-tuning with frozen statistics): each call folds
    afresh, so a second backward does not run into the first call's freed graph."""
    ref, mine = _pair(bias=False, stride=1, device=torch.device("cpu"))
    ref.eval()
    mine.eval()
    x = torch.randn(2, 4, 7, 7)
    g = torch.ones(2, 6, 7, 7)
    for _ in range(2):
        assert_eval_close(mine, ref, x, g)
    assert mine._fold_cache.stamp is None


def test_conv_bn_relu_under_autocast_folds_in_the_autocast_dtype():
    """Under autocast the op casts its operands; a weight cast per call would be a new tensor each
    time, so the backends could never keep its re-laid-out copy. The kept fold (read through the
    module's cache, the only place it is visible) is made in the autocast dtype instead, and the
    second call reuses it; the result stays within bf16 error of the fp32 module."""
    _, mine = _pair(bias=True, stride=1, device=torch.device("cpu"))
    mine.eval()
    x = torch.randn(2, 4, 7, 7)
    with torch.no_grad():
        expected = mine(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = mine(x)
            kept = mine._fold_cache.value  # (weight, bias, scale, shift)
            assert all(t.dtype == torch.bfloat16 for t in kept)
            mine(x)
            assert all(a is b for a, b in zip(mine._fold_cache.value, kept))
        mine(x)  # fp32 again: refolded in fp32
        assert mine._fold_cache.value[0].dtype == torch.float32
    assert got.dtype == torch.bfloat16
    # bf16 rounds x, weight, scale, shift and the output: a few units of 2^-8 of the magnitude.
    torch.testing.assert_close(got.float(), expected, atol=0.05 * expected.abs().max().item(), rtol=0.02)


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
    """Three training steps (batch statistics, running statistics moved), fused fp32 and plain fp32
    each against plain fp64 (rule 3; gradient floors from the frozen-statistics gradient, as in
    test_aspp). The inputs keep every ReLU input 1e-5 of its scale away from 0 (asserted)."""
    device = device_for(backend)
    ref, mine = _pair(bias=True, device=device)
    ref[1].momentum = mine[1].momentum = momentum
    exact = copy.deepcopy(ref).double()
    for m in (ref, mine, exact):
        m.train()
    for step in range(3):
        x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(TRAIN_SEED + step)).to(device)
        x.requires_grad_()
        x64 = x.detach().double().requires_grad_()
        frozen = frozen_statistics(exact, x64)
        out, expected = mine(x), ref(x)
        with recording_relu_inputs(exact) as relu_in:
            exact_out = exact(x64)
        assert_relu_margin(relu_in)
        assert_as_accurate_as_plain(out, expected, exact_out, f"step {step} output")
        g = torch.randn_like(out)
        names = ["x"] + [name for name, _ in mine.named_parameters()]
        for name, a, b, e, f in zip(names, _grads(mine, x, out, g), _grads(ref, x, expected, g),
                                    _grads(exact, x64, exact_out, g.double()),
                                    _grads(frozen, x64, frozen(x64), g.double())):
            assert_as_accurate_as_plain(a, b, e, f"step {step} grad {name}", floor_scale=max(e.norm(), f.norm()).item())
    for key, value in exact.state_dict().items():
        if value.is_floating_point():
            assert_as_accurate_as_plain(mine.state_dict()[key], ref.state_dict()[key], value, key)
    assert mine[1].num_batches_tracked.item() == 3


TRAIN_SEED = 0
