"""The cpu training batch norm + ReLU (csrc/cpu/batch_norm_relu.cpp) against nn.BatchNorm2d + ReLU.

Tolerances: float64 against the float64 modules to 1e-12 relative (rule 4: only summation order
differs); float32 and the half types against the float64 modules on the same stored inputs, within
an error bound: the statistics and gradient sums add at most 16 terms in the accumulator dtype
(float32) before each fp64 add, and each value goes through a few more roundings in it over the
magnitudes named below, then one rounding to the storage dtype. The ReLU's mask is checked exactly
in float64; in the lower precisions the reference takes the mask of the fused output, since a value
within rounding of 0 may fall either way (as it may between two eager runs on different CPUs).
Checked to fail on plausible bugs (scratch runs, one at a time): the unbiased variance in the
statistics, dz without its mean-gradient term, and the ReLU mask of the channels_last gradient sums
taken from z - mean instead of the normalised output.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastaspp
from fastaspp import _ext
from fastaspp.nn._train_bn import batch_norm_act

from _cases import UNIT_ROUNDOFF

pytestmark = pytest.mark.skipif(not _ext.loaded(), reason="fastaspp._C not built")

SHAPES = [(2, 3, 5, 7), (4, 8, 1, 1), (1, 5, 2, 3), (3, 16, 9, 9), (2, 1, 4, 4)]
ACC_U = 2.0 ** -24  # float32 accumulators (every dtype but float64)
ROUNDINGS = 8  # accumulator roundings along one output's path, with room: subtract, multiply, add, scale terms
# The statistics and gradient sums add up to 16 terms in the accumulator dtype before each fp64 add
# (kFlush in batch_norm_relu.cpp), after the few roundings of each term.
SUM_ROUNDINGS = 16 + 4


def _bn(channels, dtype=torch.float64, affine=True, momentum=0.1, track=True, seed=0):
    torch.manual_seed(seed)
    bn = nn.BatchNorm2d(channels, momentum=momentum, affine=affine, track_running_stats=track).to(dtype)
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    if track:
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


def _z(shape, dtype, channels_last, seed=1, offset=0.0):
    gen = torch.Generator().manual_seed(seed)
    z = (torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + offset).to(dtype)
    return z.contiguous(memory_format=torch.channels_last) if channels_last else z


def _float64_copy(bn):
    """An independent float64 nn.BatchNorm2d with bn's state: the reference modules."""
    ref = nn.BatchNorm2d(bn.num_features, momentum=bn.momentum, affine=bn.affine,
                         track_running_stats=bn.track_running_stats).double()
    ref.load_state_dict({k: v.double() if v.is_floating_point() else v for k, v in bn.state_dict().items()})
    return ref.train(bn.training)


def _run(bn, z, relu, grad, fused=True):
    z = z.detach().requires_grad_()
    y = batch_norm_act(bn, z, relu) if fused else (F.relu(bn(z)) if relu else bn(z))
    y.backward(grad)
    params = [p.grad for p in (bn.weight, bn.bias) if p is not None]
    return y.detach(), z.grad, params


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("affine, momentum, track", [(True, 0.1, True), (False, 0.3, True), (True, None, True),
                                                     (True, 0.1, False)])
def test_float64_matches_modules(shape, channels_last, relu, affine, momentum, track):
    bn = _bn(shape[1], affine=affine, momentum=momentum, track=track).train()
    ref = _float64_copy(bn)
    z = _z(shape, torch.float64, channels_last)
    grad = _z(shape, torch.float64, channels_last, seed=2)
    for _step in range(2):  # twice: momentum=None averages over the batches seen
        y, dz, dparams = _run(bn, z, relu, grad)
        y_ref, dz_ref, dparams_ref = _run(ref, z, relu, grad, fused=False)
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dz, dz_ref, rtol=1e-10, atol=1e-11)
        for a, b in zip(dparams, dparams_ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
        assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        for p in (bn, ref):
            for t in p.parameters():
                t.grad = None
    for name, buf in bn.named_buffers():
        torch.testing.assert_close(buf, dict(ref.named_buffers())[name], rtol=1e-12, atol=0)


def _bound(z64, bn64, y_ref, dtype):
    """Per-element bound on |y - y_ref| (see the module docstring): the statistics' roundings over
    (|z - mean| + mean |z|) * |alpha| (the mean's error scales with mean |z|, the variance's with
    |z - mean|), ROUNDINGS more over that and |beta|, then the storage rounding of y."""
    mean = z64.mean((0, 2, 3), keepdim=True)
    var = z64.var((0, 2, 3), unbiased=False, keepdim=True)
    alpha = (bn64.weight.view(1, -1, 1, 1) if bn64.weight is not None else 1) / torch.sqrt(var + bn64.eps)
    beta = bn64.bias.view(1, -1, 1, 1) if bn64.bias is not None else 0
    centred = (z64 - mean).abs() + z64.abs().mean((0, 2, 3), keepdim=True)
    return ((SUM_ROUNDINGS + ROUNDINGS) * ACC_U * centred * alpha.abs() + ROUNDINGS * ACC_U * abs(beta)
            + UNIT_ROUNDOFF[dtype] * y_ref.abs())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES[:4])
def test_low_precision_within_bound(dtype, channels_last, shape):
    bn = _bn(shape[1], dtype=torch.float32).train()  # fp32 parameters, as under mixed precision
    ref = _float64_copy(bn)
    z = _z(shape, dtype, channels_last, offset=3.0)  # a mean well off 0: the centred form's case
    grad = _z(shape, dtype, channels_last, seed=2)
    y, dz, (dw, db) = _run(bn, z, True, grad)
    assert y.dtype == dtype and dz.dtype == dtype and dw.dtype == torch.float32
    z64 = z.double().requires_grad_()
    # The reference takes the fused output's ReLU mask (module docstring).
    pre = ref(z64)
    y_ref = pre * (y.double() > 0)
    y_ref.backward(grad.double())
    assert ((y.double() - y_ref).abs() <= _bound(z64.detach(), ref, y_ref.detach(), dtype)).all()
    # Gradients: dz = alpha * (g - mean(g) - xhat * mean(g * xhat)): roundings over those terms'
    # magnitudes, xhat's with the rounded mean's share as above.
    g = (grad.double() * (y.double() > 0)).abs()
    mean = z64.detach().mean((0, 2, 3), keepdim=True)
    xhat = ((z64.detach() - mean).abs() + z64.detach().abs().mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        z64.detach().var((0, 2, 3), unbiased=False, keepdim=True) + bn.eps)
    alpha = ref.weight.detach().view(1, -1, 1, 1).abs() / torch.sqrt(
        z64.detach().var((0, 2, 3), unbiased=False, keepdim=True) + bn.eps)
    magnitude = alpha * (g + g.mean((0, 2, 3), keepdim=True) + xhat * (g * xhat).mean((0, 2, 3), keepdim=True))
    dz_bound = (SUM_ROUNDINGS + ROUNDINGS) * ACC_U * magnitude + UNIT_ROUNDOFF[dtype] * z64.grad.abs()
    assert ((dz.double() - z64.grad).abs() <= dz_bound).all()
    sum_bound = SUM_ROUNDINGS * ACC_U * (g * xhat).sum((0, 2, 3))
    assert ((dw.double() - ref.weight.grad).abs() <= sum_bound + ACC_U * ref.weight.grad.abs()).all()
    assert ((db.double() - ref.bias.grad).abs() <= SUM_ROUNDINGS * ACC_U * g.sum((0, 2, 3))
            + ACC_U * ref.bias.grad.abs()).all()
    # Running statistics (float32 buffers): the batch statistics' roundings, then one float32 update.
    scale = z.double().abs().mean((0, 2, 3))
    assert ((bn.running_mean.double() - ref.running_mean).abs()
            <= SUM_ROUNDINGS * ACC_U * (scale + ref.running_mean.abs())).all()
    torch.testing.assert_close(bn.running_var.double(), ref.running_var, rtol=2 * SUM_ROUNDINGS * ACC_U, atol=0)


def test_bits_do_not_depend_on_thread_count():
    shape = (2, 16, 48, 48)  # above the parallel loops' grain
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for channels_last in (False, True):
                bn = _bn(16, dtype=torch.float32).train()
                z = _z(shape, torch.float32, channels_last)
                y, dz, dparams = _run(bn, z, True, _z(shape, torch.float32, channels_last, seed=2))
                results.append((y, dz, *dparams, bn.running_mean, bn.running_var))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(results[:2], results[2:]):
        for a, b in zip(one, two):
            assert torch.equal(a, b)


def test_gradcheck_fp64():
    bn = _bn(3).train()
    z = _z((2, 3, 4, 5), torch.float64, True).requires_grad_()

    def f(z, weight, bias):
        return _ext._C.batch_norm_relu_train(z, weight, bias, None, None, 0.0, 1e-5, True)

    assert torch.autograd.gradcheck(f, (z, bn.weight, bn.bias), eps=1e-6, atol=1e-7, rtol=1e-6)


def test_one_value_per_channel_raises_as_batch_norm():
    bn = _bn(4).train()
    z = torch.randn(1, 4, 1, 1, dtype=torch.float64)
    with pytest.raises(ValueError) as ours:
        batch_norm_act(bn, z, True)
    with pytest.raises(ValueError) as theirs:
        bn(z)
    assert str(ours.value) == str(theirs.value)


def test_double_backward_raises():
    bn = _bn(3).train()
    z = _z((2, 3, 4, 5), torch.float64, False).requires_grad_()
    (dz,) = torch.autograd.grad(batch_norm_act(bn, z, True).square().sum(), [z], create_graph=True)
    with pytest.raises(RuntimeError, match="batch norm \\+ ReLU on the cpu backend has no double backward"):
        dz.sum().backward()


def _node(module, x):
    return module(x).grad_fn.name()


def test_route():
    """ConvBNReLU training on CPU tensors runs the fused node; the modules run where the rule says."""
    m = fastaspp.nn.ConvBNReLU(3, 4, 3, padding=1).double().train()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    assert "BatchNormReluCpu" in _node(m, x)
    calls = []
    handle = m[1].register_forward_hook(lambda *args: calls.append(args[0]))
    assert _node(m, x) == "ReluBackward0" and calls == [m[1]]  # a hook on the BN: the module runs, and calls it
    handle.remove()
    assert "BatchNormReluCpu" in _node(m, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _node(m.float(), x.float()) == "ReluBackward0"
    sync = fastaspp.nn.ConvBNReLU(3, 4, 3, padding=1).double().train()
    sync[1] = fastaspp.nn.SyncBatchNorm2d(4).double()
    assert _node(sync, x) == "ReluBackward0"


def test_compiled_training_runs_the_modules():
    """Under torch.compile the BN runs as the module (the op's route): a fullgraph trace, with the
    eager fused step's results and running statistics."""
    compiled_module = fastaspp.nn.ConvBNReLU(3, 4, 3, padding=1).double().train()
    eager_module = fastaspp.nn.ConvBNReLU(3, 4, 3, padding=1).double().train()
    eager_module.load_state_dict(compiled_module.state_dict())
    x = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), eager_module(x), rtol=1e-12, atol=1e-12)
    for a, b in zip(compiled_module[1].buffers(), eager_module[1].buffers()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
