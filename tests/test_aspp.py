"""fastaspp.nn.ASPP and the ASPP ops against the reference ASPP (torchvision's layout).

Tolerances (tests/_cases.py): eval and the ops against the reference in fp64 within the rounding
bound of rule 2 (aspp_eval_bound: the branches, Winograd's magnitude where the cpu backend ran it,
then the projection over them); training, whose batch statistics admit no useful a-priori bound,
within 3x plain PyTorch's own fp32 error against fp64 (rule 3). Checked to fail on a plausible
bug, in a scratch run: eval against a reference with a dropped tap (every case with a live corner
tap), a pooling weight off by 1%, a projection BN weight or a branch BN bias off by 1e-3 (the cases
where the Winograd path did not run: its worst-case bound is 20 to 350 times wider); training with
a fused conv weight off by 1e-4 or a projection BN momentum off by 1e-3 (every case it reaches).
"""
import copy
import os
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import fastaspp
from fastaspp import reference

from _cases import BN_FOLD, CONV_EPILOGUE, absolute, aspp_branches_bound, assert_as_accurate_as_plain, \
    assert_masks_unambiguous, assert_relu_margin, assert_within, environ, expect_winograd, frozen_statistics, \
    magnitude_model, per_conversion, recording_relu_inputs, relative_bound, winograd_conv_magnitude, winograd_depth
from conftest import ON_GPU, device_for


@dataclass(frozen=True)
class AsppCase:
    n: int
    c_in: int
    c: int
    h: int
    w: int
    rates: tuple

    def __str__(self):
        return f"n{self.n}_c{self.c_in}x{self.c}_{self.h}x{self.w}_r{'-'.join(map(str, self.rates))}"


ASPP_CASES = [
    AsppCase(2, 7, 8, 9, 11, (2, 3, 6)),
    AsppCase(2, 5, 4, 1, 1, (6, 12, 18)),      # 1x1 map: only centre taps live
    AsppCase(2, 6, 5, 13, 13, (12, 24, 36)),   # rates larger than the map
    AsppCase(3, 9, 6, 17, 15, (6, 12, 18)),    # odd in_channels, partly live taps
    AsppCase(4, 4, 3, 5, 5, (2,)),             # one atrous branch
    AsppCase(1, 3, 4, 6, 6, (1, 2, 3, 4)),     # four atrous branches, batch 1
    AsppCase(2, 8, 8, 33, 33, (6, 12, 18)),    # the paper's OS16 geometry, few channels
    AsppCase(1, 6, 4, 70, 70, (12, 24, 36)),   # the largest map of the issue
]
# Cases the Triton interpreter runs in CI (see conftest.py); the GPU run does all of them.
ASPP_INTERPRETER_CASES = {ASPP_CASES[i] for i in (1, 4)}


def randomized(module):
    """Non-trivial BN statistics and affine parameters, so folding errors show."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.uniform_(-0.5, 0.5, generator=gen)
    return module


def make_pair(case, device):
    torch.manual_seed(0)
    ref = randomized(reference.ASPP(case.c_in, case.rates, case.c)).to(device)
    mine = fastaspp.nn.ASPP(case.c_in, case.rates, case.c).to(device)
    mine.load_state_dict(ref.state_dict(), strict=True)
    return ref, mine


def make_x(case, device, channels_last=True, seed=1):
    x = torch.randn(case.n, case.c_in, case.h, case.w, generator=torch.Generator().manual_seed(seed))
    x = x.to(device)
    return x.to(memory_format=torch.channels_last) if channels_last else x


def _folded_bn_magnitude(bn, m):
    """|scale| * m + |beta| + |mean| |scale| per channel: the magnitude of a folded eval BN applied to
    values of magnitude m."""
    scale = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    shift = bn.bias.detach().double().abs() + bn.running_mean.double().abs() * scale.abs()
    return scale.abs().view(1, -1, 1, 1) * m + shift.view(1, -1, 1, 1)


def aspp_eval_bound(ref, x, winograd):
    """(exact, magnitude, depth) of an eval ASPP (rule 2): the reference in fp64 on x's values, the
    magnitude of each branch (Winograd's where the cpu backend may run it: winograd), their BNs
    folded, then of the projection over them; depth: the longest branch chain (9 Cin products, the
    Winograd transforms, or the pooling branch's mean over H*W then Cin products) plus the
    projection's ((2+R)*C products, the per-image bias added), each with its folded BN (BN_FOLD) and
    epilogue (CONV_EPILOGUE)."""
    x64 = x.detach().double()
    exact = copy.deepcopy(ref).double().eval()(x64)
    n, c_in, h, w = x.shape
    mags, depth = [], 0
    for branch in list(ref.convs)[:-1]:
        conv, bn = branch[0], branch[1]
        weight = conv.weight.detach().double()
        if conv.kernel_size == (1, 1):
            mag, d = F.conv2d(x64.abs(), weight.abs()), c_in
        elif winograd and expect_winograd(h, w, conv.dilation[0]):
            mag, d = winograd_conv_magnitude(x64, weight, conv.dilation[0]), winograd_depth(c_in)
        else:
            r = conv.dilation[0]
            mag, d = F.conv2d(x64.abs(), weight.abs(), padding=r, dilation=r), 9 * c_in
        mags.append(_folded_bn_magnitude(bn, mag))
        depth = max(depth, d)
    pool = ref.convs[-1]
    pooled = F.conv2d(x64.abs().mean((2, 3), keepdim=True), pool[1].weight.detach().double().abs())
    mags.append(_folded_bn_magnitude(pool[2], pooled).expand(-1, -1, h, w))
    depth = max(depth, h * w + 1 + c_in)
    proj_conv, proj_bn = ref.project[0], ref.project[1]
    magnitude = _folded_bn_magnitude(proj_bn, F.conv2d(torch.cat(mags, 1), proj_conv.weight.detach().double().abs()))
    depth += proj_conv.in_channels + 2 * (BN_FOLD + CONV_EPILOGUE) + 1
    return exact, magnitude, depth


def ran_winograd(module, x, out, backend):
    """Whether the cpu backend's Winograd path made `out` (module(x)): out differs in its bits from the
    same call with Winograd switched off. Equal bits satisfy the other paths' (much tighter) bound."""
    if backend != "cpu" or os.environ.get("FASTASPP_CPU_WINOGRAD") == "0":
        return False
    with torch.no_grad(), environ(FASTASPP_CPU_WINOGRAD="0"):
        return not torch.equal(out, module(x))


def assert_eval_close(mine, ref, x, backend, what="", dtype=torch.float32, storage_roundings=0):
    """mine(x) (eval, no grad) within rule 2's bound of the fp64 reference (aspp_eval_bound);
    returns mine(x)."""
    with torch.no_grad():
        out = mine(x)
    exact, magnitude, depth = aspp_eval_bound(ref, x, winograd=ran_winograd(mine, x, out, backend))
    assert_within(out, exact, magnitude, depth, dtype, what, storage_roundings)
    return out


def test_state_dict_matches_torchvision_layout():
    ref, mine = make_pair(ASPP_CASES[0], "cpu")
    assert list(mine.state_dict().keys()) == list(ref.state_dict().keys())
    keys = list(mine.state_dict().keys())
    assert "convs.0.0.weight" in keys and "convs.3.0.weight" in keys and "convs.4.1.weight" in keys
    assert "convs.4.2.running_var" in keys and "project.0.weight" in keys and "project.1.num_batches_tracked" in keys
    assert isinstance(mine.project[3], torch.nn.Dropout) and mine.project[3].p == 0.5


@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("aspp_case", ASPP_CASES, ids=str)
def test_eval_fused_matches_reference(backend, aspp_case, channels_last):
    device = device_for(backend)
    ref, mine = make_pair(aspp_case, device)
    ref.eval()
    mine.eval()
    x = make_x(aspp_case, device, channels_last)
    with torch.no_grad():
        calls = []
        with _Recorder(calls):
            out = mine(x)
    # One fused branches op; no feature-map concat (only the tiny folded-BN vectors are concatenated).
    assert "fastaspp.aspp_branches.default" in calls and "aten.cat.default[4-D]" not in calls
    assert torch.equal(assert_eval_close(mine, ref, x, backend, f"eval {aspp_case}"), out)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt)


def test_eval_bf16(backend):
    case = ASPP_CASES[1] if backend == "triton" else ASPP_CASES[3]
    device = device_for(backend)
    ref, mine = make_pair(case, device)
    ref.eval()
    mine.eval().to(torch.bfloat16)
    x = make_x(case, device)
    # Rule 2 against the reference on the same bf16 values (module and input), computed in fp64.
    # Roundings to bf16 on a term's path: the folded branch scale or shift, the branch output, the
    # folded projection weight or the per-image bias, the output: 4.
    out = assert_eval_close(mine, ref.to(torch.bfloat16), x.to(torch.bfloat16), backend, "eval bf16",
                            torch.bfloat16, storage_roundings=4 * per_conversion(backend, torch.bfloat16))
    assert out.dtype == torch.bfloat16


def test_fold_cache_refreshes_when_state_changes(backend):
    case = ASPP_CASES[0] if backend != "triton" else ASPP_CASES[1]
    device = device_for(backend)
    ref, mine = make_pair(case, device)
    ref.eval()
    mine.eval()
    x = make_x(case, device)
    with torch.no_grad():
        mine(x)
        for m in (ref, mine):
            m.convs[1][1].running_mean.add_(0.3)
            m.project[1].weight.mul_(1.5)
        assert_eval_close(mine, ref, x, backend, "after a BN change")
        for m in (ref, mine):  # a conv weight: backends' kept copies of it must be dropped too
            m.convs[1][0].weight.mul_(-1.0)
        assert_eval_close(mine, ref, x, backend, "after a weight change")
        mine.load_state_dict(randomized(reference.ASPP(case.c_in, case.rates, case.c)).to(device).state_dict())
        ref.load_state_dict(mine.state_dict())
        assert_eval_close(mine, ref, x, backend, "after load_state_dict")


def test_memoised_folded_weights_are_detached():
    """Eval under no_grad memoises the folded parameters detached (same storage and version counter
    as the parameters), so that backends may keep their re-laid-out or transformed copies."""
    case = ASPP_CASES[0]
    _, mine = make_pair(case, torch.device("cpu"))
    mine.eval()
    x = make_x(case, torch.device("cpu"))
    with torch.no_grad():
        mine(x)
    weights = mine._fold_cache.value.weights  # the cache's internals: what backends key their copies on
    params = [branch[0].weight for branch in mine.convs[:-1]]
    assert not any(w.requires_grad for w in weights)
    assert all(w.data_ptr() == p.data_ptr() for w, p in zip(weights, params))
    with torch.no_grad():
        params[1].add_(1.0)
    assert weights[1]._version == params[1]._version


def _grads(module, x, out, g):
    return torch.autograd.grad(out, [x, *module.parameters()], g)


# The training tests' inputs: no ReLU input of the fp64 runs lies within 1e-5 of its layer's scale
# from 0 (asserted: assert_relu_margin), so that the fused, plain and exact runs share their masks.
TRAIN_SEED = 632


def assert_train_steps_as_accurate_as_plain(mine, ref, case, device, steps, seed, grads=True):
    """Rule 3 over `steps` training steps: outputs (same dropout mask: same seed), every gradient
    (through x and each parameter) and the state, fused fp32 and plain fp32 each against the plain
    module in fp64. Floors: 8 fp32 ulps of the exact tensor, and for gradients of the gradient with
    the batch statistics frozen (frozen_statistics), which is what a training gradient is summed
    from before the batch-norm backward cancels part of it. With 2 values per channel (batch 2 of
    1x1 maps) a BN's input gradient cancels entirely but for eps, and every gradient upstream is
    rounding noise of the cancelled terms: the frozen gradient is then the only scale there is."""
    exact = copy.deepcopy(ref).double()
    for m in (ref, mine, exact):
        m.train()
    for step in range(steps):
        x = make_x(case, device, seed=seed + step).requires_grad_()
        x64 = x.detach().double().requires_grad_()
        frozen = frozen_statistics(exact, x64, seed=step)
        torch.manual_seed(step)
        out = mine(x)
        torch.manual_seed(step)
        expected = ref(x)
        torch.manual_seed(step)
        with recording_relu_inputs(exact) as relu_in:
            exact_out = exact(x64)
        assert_as_accurate_as_plain(out, expected, exact_out, f"step {step} output")
        if not grads:
            continue
        assert_relu_margin(relu_in)
        torch.manual_seed(step)
        frozen_out = frozen(x64)
        g = torch.randn_like(out)
        names = ["x"] + [name for name, _ in mine.named_parameters()]
        for name, a, b, e, f in zip(names, _grads(mine, x, out, g), _grads(ref, x, expected, g),
                                    _grads(exact, x64, exact_out, g.double()),
                                    _grads(frozen, x64, frozen_out, g.double())):
            assert_as_accurate_as_plain(a, b, e, f"step {step} grad {name}", floor_scale=max(e.norm(), f.norm()).item())
    for key, value in exact.state_dict().items():
        if value.is_floating_point():
            assert_as_accurate_as_plain(mine.state_dict()[key], ref.state_dict()[key], value, key)
        else:
            assert torch.equal(mine.state_dict()[key], value), key


# Training needs batch >= 2: at batch 1 the pooling branch's BatchNorm sees one value per
# channel and raises (torchvision's ASPP too).
@pytest.mark.parametrize("aspp_case", [c for c in ASPP_CASES[:6] if c.n > 1], ids=str)
def test_train_matches_reference(backend, aspp_case):
    """Outputs (same dropout mask), every gradient and the running statistics, over three steps,
    as accurate as plain PyTorch's against fp64 (rule 3)."""
    device = device_for(backend)
    ref, mine = make_pair(aspp_case, device)
    assert_train_steps_as_accurate_as_plain(mine, ref, aspp_case, device, steps=3, seed=TRAIN_SEED)


def test_train_fuses_statistics_and_normalisation(backend):
    """One branches op with epilogue statistics, one projection op with the BN in its prologue; no
    feature-map concat and no batch-norm kernel except the pooling branch's (on [N, C, 1, 1])."""
    case = ASPP_CASES[4]
    device = device_for(backend)
    _, mine = make_pair(case, device)
    mine.train()
    calls = []
    with _Recorder(calls):
        mine(make_x(case, device))
    assert calls.count("fastaspp.aspp_branches_stats.default") == 1
    assert calls.count("fastaspp.affine_relu_project.default") == 1
    assert "aten.cat.default[4-D]" not in calls
    assert sum("batch_norm" in name for name in calls) == 1, calls


def test_train_branch_by_branch_when_bns_differ(backend):
    """momentum=None (cumulative averages) routes training branch by branch; results still match."""
    case = ASPP_CASES[0] if backend != "triton" else ASPP_CASES[4]
    device = device_for(backend)
    ref, mine = make_pair(case, device)
    for m in (ref, mine):
        m.train()
        for bn in m.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.momentum = None
    assert not mine._branch_bns_shareable()
    assert_train_steps_as_accurate_as_plain(mine, ref, case, device, steps=2, seed=20, grads=False)


def test_training_step_is_bitwise_reproducible(backend):
    """No atomics or order-dependent reductions anywhere: two identical steps agree bit for bit."""
    case = ASPP_CASES[4]
    device = device_for(backend)
    results = []
    for _ in range(2):
        _, mine = make_pair(case, device)
        mine.train()
        x = make_x(case, device).requires_grad_()
        torch.manual_seed(3)
        out = mine(x)
        grads = torch.autograd.grad(out, [x, *mine.parameters()], torch.ones_like(out))
        results.append([out, *grads, *mine.buffers()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_eval_with_autograd_matches_reference(backend):
    """Eval with autograd runs branch by branch (no Winograd: the weights take gradients). Output and
    every gradient by rule 2: the gradients' magnitudes are magnitude_model's gradients seeded with
    |grad| (no ReLU mask: an upper bound), their depth the forward's (the projection's weight
    gradient sums forward values) plus the sums over N*H*W pixels and through the projection and a
    3x3 branch backward. The exact run's ReLU inputs are farther from 0 than the forward bound
    (asserted), so every run shares its masks."""
    case = ASPP_CASES[4]
    device = device_for(backend)
    ref, mine = make_pair(case, device)
    ref.eval()
    mine.eval()
    x = make_x(case, device).requires_grad_()
    out = mine(x)
    exact_module = copy.deepcopy(ref).double()
    exact_x = x.detach().double().requires_grad_()
    exact, magnitude, depth = aspp_eval_bound(ref, x, winograd=False)
    assert_within(out, exact, magnitude, depth, torch.float32, "eval with autograd")
    assert_masks_unambiguous(exact_module, x, relative_bound(depth, torch.float32))
    g = torch.randn_like(out)
    expected = _grads(exact_module, exact_x, exact_module(exact_x), g.double())
    abs_module, abs_x = magnitude_model(ref), absolute(x).requires_grad_()
    magnitudes = _grads(abs_module, abs_x, abs_module(abs_x), g.double().abs())
    grad_depth = depth + case.n * case.h * case.w + 9 * (len(case.rates) + 2) * case.c + 2 * (BN_FOLD + CONV_EPILOGUE)
    names = ["x"] + [name for name, _ in mine.named_parameters()]
    for name, a, e, m in zip(names, _grads(mine, x, out, g), expected, magnitudes):
        assert_within(a, e, m, grad_depth, torch.float32, f"grad {name}")


def test_gradcheck_fp64(backend):
    if backend == "triton":
        pytest.skip("covered by the per-op fp64 gradcheck (the ASPP training path is made of those ops)")
    case = AsppCase(2, 3, 2, 4, 4, (1, 3))
    device = device_for(backend)
    _, mine = make_pair(case, device)
    mine = mine.double().eval()
    mine.project[3].p = 0.0
    x = make_x(case, device).double().requires_grad_()
    params = [mine.convs[1][0].weight, mine.project[0].weight]
    # Rule 5: no pre-activation of this fp64 data (the same on every machine) lies within a step
    # of eps = 1e-6 of a ReLU kink, so the central differences err by rounding alone (~1e-10).
    assert torch.autograd.gradcheck(lambda x, *p: mine(x), (x, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


def assert_branches_close(out, x, ws, rates, scale, shift, relu, backend):
    """aspp_branches' output by rule 2 (aspp_branches_bound), with Winograd's magnitude where the cpu
    backend ran it (bits unequal to the call with FASTASPP_CPU_WINOGRAD=0)."""
    winograd = False
    if backend == "cpu":
        with torch.no_grad(), environ(FASTASPP_CPU_WINOGRAD="0"):
            winograd = not torch.equal(out, fastaspp.ops.aspp_branches(x, ws, rates, scale, shift, relu))
    exact, magnitude, depth = aspp_branches_bound(x, ws, rates, scale, shift, relu, winograd)
    assert_within(out, exact, magnitude, depth, x.dtype, "branches")


@pytest.mark.parametrize("aspp_case", [ASPP_CASES[1], ASPP_CASES[4]], ids=str)
def test_aspp_branches_op(backend, aspp_case):
    device = device_for(backend)
    gen = torch.Generator().manual_seed(0)
    x = make_x(aspp_case, device)
    ws = [torch.randn(aspp_case.c, aspp_case.c_in, 1, 1, generator=gen)]
    ws += [torch.randn(aspp_case.c, aspp_case.c_in, 3, 3, generator=gen) for _ in aspp_case.rates]
    ws = [w.to(device) for w in ws]
    b = len(ws) * aspp_case.c
    scale, shift = torch.randn(b, generator=gen).to(device), torch.randn(b, generator=gen).to(device)
    out = fastaspp.ops.aspp_branches(x, ws, aspp_case.rates, scale, shift)
    assert_branches_close(out, x, ws, aspp_case.rates, scale, shift, True, backend)
    assert out.is_contiguous(memory_format=torch.channels_last)
    for relu in (True, False):
        torch.library.opcheck(torch.ops.fastaspp.aspp_branches.default,
                              (x, ws, list(aspp_case.rates), scale, shift, relu, backend))
        if backend == "cpu":
            torch.library.opcheck(torch.ops.fastaspp._aspp_branches_forward.default,
                                  (x, ws, list(aspp_case.rates), scale, shift, relu))
    # Differentiable: opcheck again with inputs that require grad (checks the registered autograd).
    ws = [w.requires_grad_() for w in ws]
    torch.library.opcheck(torch.ops.fastaspp.aspp_branches.default,
                          (x.requires_grad_(), ws, list(aspp_case.rates), scale, shift, False, backend))


def test_aspp_branches_with_zero_input_channels(backend):
    """An empty reduction: every conv is zero, so each branch is act(shift), exactly."""
    device = device_for(backend)
    x = torch.randn(2, 0, 9, 7, device=device)
    ws = [torch.randn(4, 0, k, k, device=device) for k in (1, 3, 3, 3)]
    shift = torch.linspace(-1.0, 1.0, 16, device=device)
    out = fastaspp.ops.aspp_branches(x, ws, (2, 3, 5), torch.ones(16, device=device), shift)
    torch.testing.assert_close(out, torch.relu(shift).view(1, -1, 1, 1).expand(2, 16, 9, 7))


def test_aspp_branches_follow_in_place_weight_changes(backend):
    """Backends may keep re-laid-out copies of weights that take no gradient (Triton packs them once);
    an in-place change must still reach the output."""
    case = ASPP_CASES[4]
    device = device_for(backend)
    gen = torch.Generator().manual_seed(0)
    x = make_x(case, device)
    ws = [torch.randn(case.c, case.c_in, k, k, generator=gen).to(device) for k in [1] + [3] * len(case.rates)]
    ones, zeros = torch.ones(len(ws) * case.c, device=device), torch.zeros(len(ws) * case.c, device=device)
    first = fastaspp.ops.aspp_branches(x, ws, case.rates, ones, zeros, relu=False)
    assert torch.equal(fastaspp.ops.aspp_branches(x, ws, case.rates, ones, zeros, relu=False), first)
    with torch.no_grad():
        ws[1].mul_(-2.0)
    after = fastaspp.ops.aspp_branches(x, ws, case.rates, ones, zeros, relu=False)
    assert_branches_close(after, x, ws, case.rates, ones, zeros, False, backend)


def test_aspp_branches_gradcheck_fp64(backend):
    if backend == "triton" and not ON_GPU:
        pytest.skip("interpreted Triton is too slow for a numerical Jacobian; test_aspp_train's fp64 comparisons "
                    "of the branch gradients with autograd cover its backward")
    device = device_for(backend)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 5, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    rates = [2, 7]
    ws = [torch.randn(2, 3, 1, 1, generator=gen, dtype=torch.float64)]
    ws += [torch.randn(2, 3, 3, 3, generator=gen, dtype=torch.float64) for _ in rates]
    ws = [w.to(device).requires_grad_() for w in ws]
    scale = torch.randn(6, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    shift = (torch.randn(6, generator=gen, dtype=torch.float64) + 0.5).to(device).requires_grad_()
    for relu in (False, True):
        fn = lambda x, s, t, *ws, relu=relu: fastaspp.ops.aspp_branches(x, ws, rates, s, t, relu)
        assert torch.autograd.gradcheck(fn, (x, scale, shift, *ws), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_torch_compile_fullgraph(backend):
    case = ASPP_CASES[1] if backend == "triton" else ASPP_CASES[0]
    device = device_for(backend)
    ref, mine = make_pair(case, device)
    mine.eval()
    x = make_x(case, device)
    torch._dynamo.reset()
    compiled = torch.compile(mine, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), mine(x))


def test_torch_compile_fullgraph_training(backend):
    case = ASPP_CASES[4]
    device = device_for(backend)
    _, eager = make_pair(case, device)
    _, compiled_module = make_pair(case, device)
    for m in (eager, compiled_module):
        m.train()
        m.project[3].p = 0.0  # dropout off: compare exactly
    torch._dynamo.reset()
    compiled = torch.compile(compiled_module, fullgraph=True, backend="aot_eager")
    x = make_x(case, device).requires_grad_()
    out, expected = compiled(x), eager(x)
    # The same kernels on both sides (rule 6; the same bits on CPU, measured): torch.testing's fp32
    # defaults leave room for a graph that re-associates the aten tail, a few ulps.
    torch.testing.assert_close(out, expected)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(expected, x, g)[0])
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled_module.state_dict()[key], value, msg=key)


@pytest.mark.parametrize("rates,message", [((), "1 to 4 rates"), ((1, 2, 3, 4, 5), "1 to 4 rates"),
                                           ((6, 0), "ints >= 1"), ((6.5,), "ints >= 1")])
def test_bad_rates(rates, message):
    with pytest.raises(ValueError, match=message):
        fastaspp.nn.ASPP(8, rates)


def test_bad_input():
    m = fastaspp.nn.ASPP(8, (6, 12, 18), 4).eval()
    with pytest.raises(ValueError, match=r"x has 5 channels but this ASPP expects in_channels=8"):
        m(torch.randn(1, 5, 9, 9))
    with pytest.raises(ValueError, match=r"x must be a 4-D tensor"):
        m(torch.randn(8, 9, 9))
    with pytest.raises(ValueError, match=r"weights must hold 3 tensors"):
        fastaspp.ops.aspp_branches(torch.randn(1, 8, 5, 5), [torch.randn(4, 8, 1, 1)], [6, 12], torch.ones(12),
                                   torch.ones(12))
    with pytest.raises(ValueError, match=r"weights\[1\] must have shape \(4, 8, 3, 3\)"):
        fastaspp.ops.aspp_branches(torch.randn(1, 8, 5, 5), [torch.randn(4, 8, 1, 1), torch.randn(4, 8, 1, 1)],
                                   [6], torch.ones(8), torch.ones(8))
    with pytest.raises(ValueError, match=r"scale must have length \(1\+R\)\*C=8"):
        fastaspp.ops.aspp_branches(torch.randn(1, 8, 5, 5), [torch.randn(4, 8, 1, 1), torch.randn(4, 8, 3, 3)],
                                   [6], torch.ones(7), torch.ones(8))


class _Recorder(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the ops a block dispatches."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if func is torch.ops.aten.cat.default:
            name += f"[{args[0][0].dim()}-D]"
        self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("module_cl", [False, True], ids=["module-nchw", "module-cl"])
@pytest.mark.parametrize("input_cl", [False, True], ids=["x-nchw", "x-cl"])
def test_train_dropout_mask_matches_reference_in_every_layout(module_cl, input_cl):
    """Dropout draws its mask in memory order: the fused training output must be laid out as the
    reference's, whatever the layouts of the module and the input."""
    torch.manual_seed(0)
    ref = reference.ASPP(16, (2, 3), 8)
    mine = fastaspp.nn.ASPP(16, (2, 3), 8)
    mine.load_state_dict(ref.state_dict())
    fmt = torch.channels_last if module_cl else torch.contiguous_format
    ref.to(memory_format=fmt).train()
    mine.to(memory_format=fmt).train()
    x = torch.randn(2, 16, 9, 9)
    x = x.contiguous(memory_format=torch.channels_last) if input_cl else x
    torch.manual_seed(1)
    expected = ref(x)
    torch.manual_seed(1)
    out = mine(x)
    torch.manual_seed(1)
    exact = copy.deepcopy(ref).double()(x.double())
    # Rule 3: a mask drawn in another order would be off by whole elements, not by rounding.
    assert_as_accurate_as_plain(out, expected, exact, "output")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_pooling_branch_matches_reference(training, layout, dtype):
    """fastaspp.nn.ASPPPooling is production's own copy of the reference's pooling branch: the same
    children (state_dict keys) and the same torch ops, so bitwise the same output, dtype, memory
    format and running statistics."""
    torch.manual_seed(0)
    ref = randomized(reference.ASPPPooling(6, 4))
    mine = fastaspp.nn.ASPPPooling(6, 4)
    assert [(k, v.shape) for k, v in mine.state_dict().items()] == [(k, v.shape) for k, v in ref.state_dict().items()]
    mine.load_state_dict(ref.state_dict(), strict=True)
    ref.to(dtype).train(training)
    mine.to(dtype).train(training)
    x = torch.randn(3, 6, 5, 7, generator=torch.Generator().manual_seed(2)).to(dtype).contiguous(memory_format=layout)
    expected, out = ref(x), mine(x)
    assert out.dtype == expected.dtype == dtype and out.shape == (3, 4, 5, 7) and out.stride() == expected.stride()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for (key, a), b in zip(mine.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=key)
