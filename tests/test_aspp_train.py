"""The training-mode ASPP ops (epilogue BN statistics, prologue normalize + ReLU) against plain PyTorch.

Tolerances (tests/_cases.py): outputs against the fp64 reference on the same inputs within rule
2's bound (the branches: Cin*9 products, aspp_branches_bound; the projection: K products after the
3 roundings of its prologue, then the per-image bias). Statistics come from the kernel's fp32
accumulators: for fp32 outputs those are the stored values, so they are checked against the fp64
statistics of the kernel's own output (assert_statistics_within: the summation and Chan merges'
rounding); for half types against the exact output, with the accumulators' rule-2 error. fp64
gradients against autograd of the fp64 reference to 1e-10 / 1e-9 (rule 4) and by gradcheck
(rule 5). Checked to fail on a plausible bug (injected into the ops' inputs or outputs in a
scratch run): a dropped tap (wherever the tap is live), z or y off by 1e-3 (fp32, fp16), the
variance with the divisor m - 1 for m (the cases with m = N*H*W <= 200), and E[z²] - E[z]² in
fp32 for the variance (the large-means test).
"""
import pytest
import torch
import torch.nn.functional as F

import fastaspp
from fastaspp.ops import affine_relu_project, aspp_branches_stats, batch_norm_centre_scale

from _cases import CONV_EPILOGUE, UNIT_ROUNDOFF, aspp_branches_bound, assert_statistics_within, assert_within, \
    per_conversion, relative_bound
from conftest import ON_GPU, device_for

# (N, Cin, C, H, W, rates): odd channels, 1x1 maps, rates larger than the map, the OS16 geometry.
CASES = [(2, 5, 3, 9, 11, (2, 3, 6)), (3, 4, 2, 1, 1, (6, 12, 18)), (1, 3, 4, 13, 13, (12, 24, 36)),
         (2, 6, 5, 33, 33, (6, 12, 18))]
INTERPRETER_CASES = CASES[:2]


def _cases_for(backend):
    return CASES if backend != "triton" or ON_GPU else INTERPRETER_CASES


def _branch_inputs(case, device, dtype=torch.float32, seed=0):
    n, cin, c, h, w, rates = case
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cin, h, w, generator=gen, dtype=torch.float64)
    ws = [torch.randn(c, cin, 1, 1, generator=gen, dtype=torch.float64)]
    ws += [torch.randn(c, cin, 3, 3, generator=gen, dtype=torch.float64) for _ in rates]
    x = x.to(device, dtype).contiguous(memory_format=torch.channels_last)
    return x, [w.to(device, dtype) for w in ws], list(rates)


def _branches_reference(x, ws, rates):
    return torch.cat([F.conv2d(x, ws[0])] + [F.conv2d(x, w, padding=r, dilation=r) for w, r in zip(ws[1:], rates)], 1)


def _project_inputs(n, k, cout, h, w, device, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, k, h, w, generator=gen, dtype=torch.float64)
    centre = torch.randn(k, generator=gen, dtype=torch.float64) * 0.5
    scale = torch.rand(k, generator=gen, dtype=torch.float64) + 0.5
    shift = torch.randn(k, generator=gen, dtype=torch.float64) * 0.5
    weight = torch.randn(cout, k, generator=gen, dtype=torch.float64)
    bias = torch.randn(n, cout, generator=gen, dtype=torch.float64)
    z = z.to(device, dtype).contiguous(memory_format=torch.channels_last)
    return [z] + [t.to(device, dtype) for t in (centre, scale, shift, weight, bias)]


def _project_reference(z, centre, scale, shift, weight, bias):
    u = F.relu((z - centre.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))
    return F.conv2d(u, weight[:, :, None, None]) + bias[:, :, None, None]


def _project_bound(z, centre, scale, shift, weight, bias):
    """(exact, magnitude, depth) of the projection (rule 2): K products of the prologue's output, whose
    terms went through 3 roundings ((z - centre) * scale + shift), then the per-image bias."""
    f64 = lambda t: t.detach().double()  # noqa: E731
    exact = _project_reference(*(f64(t) for t in (z, centre, scale, shift, weight, bias)))
    a = lambda t: f64(t).abs()  # noqa: E731
    u = (a(z) + a(centre).view(1, -1, 1, 1)) * a(scale).view(1, -1, 1, 1) + a(shift).view(1, -1, 1, 1)
    magnitude = F.conv2d(u, a(weight)[:, :, None, None]) + a(bias)[:, :, None, None]
    return exact, magnitude, z.shape[1] + 3 + CONV_EPILOGUE


@pytest.mark.parametrize("index", range(len(CASES)))
def test_branches_stats_match_reference(backend, index):
    if CASES[index] not in _cases_for(backend):
        pytest.skip("interpreted Triton runs the small cases; the GPU run does all")
    device = device_for(backend)
    x, ws, rates = _branch_inputs(CASES[index], device)
    z, mean, var = aspp_branches_stats(x, ws, rates)
    ones = torch.ones(z.shape[1], dtype=torch.float64)
    exact, magnitude, depth = aspp_branches_bound(x, ws, rates, ones, 0 * ones, relu=False)
    assert_within(z, exact, magnitude, depth, torch.float32, "z")
    assert z.is_contiguous(memory_format=torch.channels_last) and mean.dtype == var.dtype == torch.float32
    assert_statistics_within(mean, var, z, 0, UNIT_ROUNDOFF[torch.float32], "z")


@pytest.mark.parametrize("shape", [(2, 7, 5, 9, 11), (3, 4, 3, 1, 1), (1, 24, 8, 33, 33)], ids=str)
def test_project_matches_reference(backend, shape):
    if shape[-1] == 33 and backend == "triton" and not ON_GPU:
        pytest.skip("interpreted Triton runs the small cases; the GPU run does all")
    device = device_for(backend)
    inputs = _project_inputs(*shape, device)
    y, mean, var = affine_relu_project(*inputs)
    exact, magnitude, depth = _project_bound(*inputs)
    assert_within(y, exact, magnitude, depth, torch.float32, "y")
    assert y.is_contiguous(memory_format=torch.channels_last)
    assert_statistics_within(mean, var, y, 0, UNIT_ROUNDOFF[torch.float32], "y")
    # NCHW z and a 4-D weight: the same bound.
    z, centre, scale, shift, weight, bias = inputs
    y2, *_ = affine_relu_project(z.contiguous(), centre, scale, shift, weight[:, :, None, None], bias)
    assert_within(y2, exact, magnitude, depth, torch.float32, "y from NCHW z")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_types(backend, dtype):
    """Against the fp64 reference on the same half values. z rounds to its dtype once; its statistics
    come from the fp32 accumulators, within rule 2's fp32 bound of the exact z. The projection rounds
    its normalised input to the dot's dtype on the GPU (tensor cores) and its output: twice."""
    device = device_for(backend)
    x, ws, rates = _branch_inputs(CASES[1] if backend == "triton" else CASES[0], device)
    x, ws = x.to(dtype), [w.to(dtype) for w in ws]
    z, mean, var = aspp_branches_stats(x, ws, rates)
    assert z.dtype == dtype and mean.dtype == torch.float32
    ones = torch.ones(z.shape[1], dtype=torch.float64)
    exact, magnitude, depth = aspp_branches_bound(x, ws, rates, ones, 0 * ones, relu=False)
    assert_within(z, exact, magnitude, depth, dtype, "z", storage_roundings=per_conversion(backend, dtype))
    accumulators = relative_bound(depth, torch.float32) * magnitude
    assert_statistics_within(mean, var, exact, accumulators, UNIT_ROUNDOFF[torch.float32], "z")
    inputs = [t.to(dtype) for t in _project_inputs(2, 6, 4, 5, 3, device)]
    y, mean, var = affine_relu_project(*inputs)
    assert y.dtype == dtype
    exact, magnitude, depth = _project_bound(*inputs)
    assert_within(y, exact, magnitude, depth, dtype, "y", storage_roundings=2 * per_conversion(backend, dtype))


def _reference_with_stats(out):
    var, mean = torch.var_mean(out, dim=(0, 2, 3), unbiased=False)
    return out, mean, var


def test_backward_matches_reference_fp64(backend):
    """Gradients of every input through all three outputs against autograd of plain PyTorch, both
    in fp64 (rule 4: 1e-10 absolute, 1e-9 relative, far above the ~1e-13 both sides' rounding)."""
    device = device_for(backend)
    x, ws, rates = _branch_inputs(CASES[0] if backend != "triton" or ON_GPU else (2, 3, 2, 5, 4, (1, 3)), device,
                                  torch.float64)
    leaves = [x.requires_grad_(), *(w.requires_grad_() for w in ws)]
    mine = aspp_branches_stats(x, ws, rates)
    expected = _reference_with_stats(_branches_reference(x, ws, rates))
    cotangents = [torch.randn_like(t) for t in expected]
    for a, b in zip(torch.autograd.grad(mine, leaves, cotangents), torch.autograd.grad(expected, leaves, cotangents)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)
    leaves = [t.requires_grad_() for t in _project_inputs(2, 7, 5, 4, 3, device, torch.float64)]
    mine = affine_relu_project(*leaves)
    expected = _reference_with_stats(_project_reference(*leaves))
    cotangents = [torch.randn_like(t) for t in expected]
    for a, b in zip(torch.autograd.grad(mine, leaves, cotangents), torch.autograd.grad(expected, leaves, cotangents)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


def test_branches_grad_input_op(backend):
    """The one-call input gradient of every branch (one launch on triton) against autograd of plain
    PyTorch in fp64 (rule 4), and opcheck."""
    device = device_for(backend)
    for case in _cases_for(backend)[:2]:
        x, ws, rates = _branch_inputs(case, device, torch.float64)
        x.requires_grad_()
        expected = _branches_reference(x, ws, rates)
        g = torch.randn_like(expected).contiguous(memory_format=torch.channels_last)
        dx = torch.ops.fastaspp.aspp_branches_grad_input(g, ws, rates, list(x.shape), backend)
        torch.testing.assert_close(dx, torch.autograd.grad(expected, x, g)[0], atol=1e-10, rtol=1e-9)
        assert dx.is_contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.fastaspp.aspp_branches_grad_input.default,
                          (g.float(), [w.float() for w in ws], rates, list(x.shape), backend))
    if backend == "cuda":  # its kernel op (every branch in one launch)
        torch.library.opcheck(torch.ops.fastaspp._aspp_branches_grad_input.default,
                              (g.float(), [w.float() for w in ws], rates, list(x.shape)))


def test_gradcheck_fp64(backend):
    """Every input, through every output, the statistics included (rule 5: affine or quadratic in
    each input, no ReLU kink within a step of these fp64 points)."""
    if backend == "triton" and not ON_GPU:
        pytest.skip("interpreted Triton is too slow for a numerical Jacobian (about 10 minutes); "
                    "test_backward_matches_reference_fp64 checks its gradients against plain PyTorch's")
    device = device_for(backend)
    x, ws, rates = _branch_inputs((2, 2, 2, 4, 3, (1, 3)), device, torch.float64)
    x.requires_grad_()
    ws = [w.requires_grad_() for w in ws]
    fn = lambda x, *ws: aspp_branches_stats(x, ws, rates)
    assert torch.autograd.gradcheck(fn, (x, *ws), eps=1e-6, atol=1e-6, rtol=1e-5)
    inputs = [t.requires_grad_() for t in _project_inputs(2, 3, 2, 3, 2, device, torch.float64)]
    assert torch.autograd.gradcheck(affine_relu_project, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("n,k", [(0, 8), (2, 0)], ids=["empty-batch", "no-channels"])
def test_cpu_projection_backward_on_empty_operands(n, k):
    """With nothing to sum over, the cpu projection backward's gradients are exact zeros, and the
    image-bias gradient is each image's sum of g (its GEMMs never run)."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(n, k, 3, 3, generator=gen)
    centre, shift = torch.randn(k, generator=gen), torch.randn(k, generator=gen)
    weight = torch.randn(4, k, generator=gen)
    g = torch.randn(n, 4, 3, 3, generator=gen)
    dz, dcentre, dscale, dshift, dweight, dbias = torch.ops.fastaspp._affine_relu_project_backward(
        g, z, centre, torch.rand(k, generator=gen), shift, weight)
    for name, t, shape in (("dz", dz, z.shape), ("dcentre", dcentre, (k,)), ("dscale", dscale, (k,)),
                           ("dshift", dshift, (k,)), ("dweight", dweight, weight.shape)):
        assert t.shape == shape and not t.any(), name
    exact = g.double().sum((2, 3))
    assert_within(dbias, exact, g.double().abs().sum((2, 3)), 9, torch.float32, "dimage_bias")


def test_opcheck(backend):
    device = device_for(backend)
    x, ws, rates = _branch_inputs(CASES[1], device)
    args = (x.requires_grad_(), [w.requires_grad_() for w in ws], rates, backend)
    torch.library.opcheck(torch.ops.fastaspp.aspp_branches_stats.default, args)
    inputs = [t.requires_grad_() for t in _project_inputs(2, 6, 4, 5, 3, device)]
    torch.library.opcheck(torch.ops.fastaspp.affine_relu_project.default, (*inputs, backend))
    if backend == "cpu":
        torch.library.opcheck(torch.ops.fastaspp._aspp_branches_stats_forward.default,
                              (x.detach(), [w.detach() for w in ws], rates))
        torch.library.opcheck(torch.ops.fastaspp._affine_relu_project_forward.default,
                              [t.detach() for t in inputs])
        z_in, centre, scale, shift, weight, _ = (t.detach() for t in inputs)
        g = torch.randn(z_in.shape[0], weight.shape[0], *z_in.shape[2:]).contiguous(memory_format=torch.channels_last)
        torch.library.opcheck(torch.ops.fastaspp._affine_relu_project_backward.default,
                              (g, z_in, centre, scale, shift, weight))
        z = torch.ops.fastaspp._aspp_branches_stats_forward.default(x.detach(), [w.detach() for w in ws], rates)[0]
        for mask in ([True, True], [True, False], [False, True]):
            torch.library.opcheck(torch.ops.fastaspp._aspp_branches_backward.default,
                                  (torch.randn_like(z), x.detach(), [w.detach() for w in ws], rates, mask))


def test_branches_backward_op_matches_autograd(backend):
    """The cpu backend's one-call ASPP backward (every branch's dx summed, every dW) against autograd
    of plain PyTorch in fp64 (rule 4), on both of its paths (the backend fixture's cpu and cpu-gemm)."""
    if backend != "cpu":
        pytest.skip("a cpu kernel")
    for case in CASES[:4]:
        x, ws, rates = _branch_inputs(case, "cpu", torch.float64)
        x.requires_grad_()
        ws = [w.requires_grad_() for w in ws]
        expected = _branches_reference(x, ws, rates)
        g = torch.randn_like(expected)
        dx, dws = torch.ops.fastaspp._aspp_branches_backward.default(g, x.detach(), [w.detach() for w in ws], rates,
                                                                    [True, True])
        want = torch.autograd.grad(expected, [x, *ws], g)
        for got, exp in zip([dx, *dws], want):
            torch.testing.assert_close(got, exp, atol=1e-10, rtol=1e-9)


def test_statistics_are_reproducible(backend):
    device = device_for(backend)
    x, ws, rates = _branch_inputs(CASES[1] if backend == "triton" else CASES[3], device)
    first = aspp_branches_stats(x, ws, rates)
    for a, b in zip(first, aspp_branches_stats(x, ws, rates)):
        assert torch.equal(a, b)


def test_statistics_are_stable_for_large_means(backend):
    """Per-patch centred sums: no E[z²] − E[z]² cancellation when the mean dwarfs the spread.

    y ~ 3e4 ± a few (m = 60 per channel). assert_statistics_within's bound for the centred
    algorithm is then dominated by the merges' 4 g A sqrt(L var), 1.8 to 3.5 here (A = 3e4,
    g = gamma_66), about a var: a weak check of the centred algorithm's accuracy, but E[y²] − E[y]²
    in fp32 loses ~u A² = 54 to cancellation (measured 70 to 130, tens of vars) and fails it."""
    device = device_for(backend)
    inputs = _project_inputs(2, 4, 3, 6, 5, device)
    inputs[5] = inputs[5] + 3e4
    y, mean, var = affine_relu_project(*inputs)
    assert_statistics_within(mean, var, y, 0, UNIT_ROUNDOFF[torch.float32], "y")


def test_batch_norm_scale_matches_batch_norm():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 5, 4, 6, generator=gen) * 2 + 1
    bn = torch.nn.BatchNorm2d(5, momentum=0.3).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5, generator=gen)
        bn.bias.uniform_(-0.5, 0.5, generator=gen)
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    var, mean = torch.var_mean(z, dim=(0, 2, 3), unbiased=False)
    centre, scale = batch_norm_centre_scale(mean, var, 3 * 4 * 6, bn.weight, running_mean, running_var, factor=0.3,
                                     eps=bn.eps)
    expected = bn(z)
    # torch.testing's fp32 defaults (1.3e-6 relative, 1e-5 absolute): one BN, the same formula in
    # another association, a few roundings on O(1) values (rule 2 with n ~ 6: 4e-7).
    torch.testing.assert_close((z - centre.view(1, -1, 1, 1)) * scale.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1),
                               expected)
    torch.testing.assert_close(running_mean, bn.running_mean)
    torch.testing.assert_close(running_var, bn.running_var)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_centre_scale(mean, var, 1, bn.weight, None, None, factor=0.1, eps=1e-5)


def test_bad_input():
    z, centre, scale, shift, weight, bias = _project_inputs(2, 6, 4, 5, 3, "cpu")
    with pytest.raises(ValueError, match="z must be a 4-D"):
        affine_relu_project(z[0], centre, scale, shift, weight, bias)
    with pytest.raises(ValueError, match=r"scale must have shape \[6\]"):
        affine_relu_project(z, centre, scale[:5], shift, weight, bias)
    with pytest.raises(ValueError, match=r"centre must have shape \[6\]"):
        affine_relu_project(z, centre[:, None], scale, shift, weight, bias)
    with pytest.raises(ValueError, match=r"weight must have shape \[Cout, K\]"):
        affine_relu_project(z, centre, scale, shift, weight[:, :5], bias)
    with pytest.raises(ValueError, match=r"image_bias must have shape \[2, 4\]"):
        affine_relu_project(z, centre, scale, shift, weight, bias[:1])
    with pytest.raises(TypeError, match="shift has dtype"):
        affine_relu_project(z, centre, scale, shift.double(), weight, bias)
    x, ws, rates = _branch_inputs(CASES[0], "cpu")
    with pytest.raises(ValueError, match="weights must hold"):
        aspp_branches_stats(x, ws[:-1], rates)
    with pytest.raises(ValueError, match=r"weights\[0\] must have shape"):
        aspp_branches_stats(x[:, :4], ws, rates)
    with pytest.raises(ValueError, match="atrous rates must be ints >= 1"):
        aspp_branches_stats(x, ws, [2, 0, 6])


def test_torch_compile_fullgraph(backend):
    device = device_for(backend)
    x, ws, rates = _branch_inputs(CASES[1], device)
    inputs = _project_inputs(3, len(ws) * 2, 4, 1, 1, device)

    def step(x, *ws):
        z, mean, var = aspp_branches_stats(x, ws, rates)
        return affine_relu_project(z, mean, torch.rsqrt(var + 1e-5), *inputs[3:])

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for a, b in zip(compiled(x, *ws), step(x, *ws)):  # the same kernels (rule 6)
        torch.testing.assert_close(a, b)


def test_module_exports():
    assert fastaspp.ops.aspp_branches_stats is aspp_branches_stats
    assert "affine_relu_project" in fastaspp.ops.__all__


def test_deterministic_mode_pins_one_triton_config():
    """Autotuning may pick another tiling (another summation order) in another process; the
    deterministic mode uses the first config of the dot's kind instead."""
    tl = pytest.importorskip("triton.language")
    from fastaspp.kernels import launch as K

    n_tc = len(K.GPU_CONV_TC_CONFIGS)
    # The pruning hook itself: which config autotuning picks is not observable from outside.
    prune = K.prune_by_dot_kind(n_tc)["early_config_prune"]
    configs = K.GPU_CONV_TC_CONFIGS + K.GPU_CONV_FMA_CONFIGS
    tensor_cores = dict(DOT_DTYPE=tl.bfloat16, DOT_PRECISION="tf32")
    fma = dict(DOT_DTYPE=tl.float32, DOT_PRECISION="ieee")
    was = torch.are_deterministic_algorithms_enabled()
    assert not was, "the suite runs with deterministic algorithms off"
    assert prune(configs, {}, **tensor_cores) == configs[:n_tc]
    try:
        torch.use_deterministic_algorithms(True)
        assert prune(configs, {}, **tensor_cores) == configs[:1]
        assert prune(configs, {}, **fma) == configs[n_tc:n_tc + 1]
    finally:
        torch.use_deterministic_algorithms(was)
