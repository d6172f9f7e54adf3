"""The cpu backend's Winograd ASPP branches (csrc/cpu/winograd.cpp) against plain convolutions.

Eval runs a 3x3 branch as Winograd over its rate's sub-grids when that needs at most 80% of the
live (pixel, tap) products; FASTASPP_CPU_WINOGRAD=0 forces the live-tap GEMMs. Branches with little
work run the direct loops instead (csrc/cpu/direct_conv.h), and every shape here is small: these tests
switch that path off (FASTASPP_CPU_DIRECT_MAX_MACS=-1) so that the rule above decides.

Tolerances (tests/_cases.py, rule 2): against the fp64 reference on the same inputs, elementwise
within gamma_n of the magnitude of the computation that ran. Winograd computes
P_h P_w ((G_h G_w w) * (B_h B_w d)) summed over channels; its magnitude takes every transform entry
by its absolute value (winograd_conv_magnitude, a Python twin of the plans, checked in
test_magnitude_twin_is_the_conv), n = the transforms' roundings plus Cin (winograd_depth). That
magnitude is 20 to 350 times the direct conv's on average for F(2..6, 3) (the transforms'
growth, where "F(6,3) loses about 4 bits" comes from): the worst case, the errors here stay
below 1/15 of it (benchmarks/cpu_eval_ceiling.py --check measured up to 8e-6 of the output's
scale).
The GEMM path takes the direct magnitude. Checked to fail on a plausible bug, in a scratch run: a
tap dropped from the reference's weights fails every case with a live corner tap, a scale off by
1e-3 every fp32 and fp64 case.
"""
import pytest
import torch
import torch.nn.functional as F

import fastaspp

from _cases import aspp_branches_bound, assert_within, winograd_conv_magnitude
from _cases import expect_winograd as expect_winograd_for_rate
from test_aspp import ASPP_CASES, aspp_eval_bound, make_pair, make_x


def expect_winograd(h: int, w: int, rates) -> bool:
    return any(expect_winograd_for_rate(h, w, r) for r in rates)


@pytest.fixture(autouse=True)
def no_direct_loops(monkeypatch):
    monkeypatch.setenv("FASTASPP_CPU_DIRECT_MAX_MACS", "-1")


# (n, c_in, h, w, rates): every per-axis plan (s = 1, 2, 3..6, and several tiles for s > 6).
CASES = [
    (1, 16, 33, 33, (6, 12, 18)),   # the paper's OS16 geometry: s = 6, 3, 2
    (2, 7, 17, 20, (2, 3, 5)),      # s = 9..10 (two tiles), 6..7, 4
    (3, 5, 5, 9, (1, 2, 3)),        # small maps
    (1, 4, 70, 64, (12, 24, 36)),   # the largest map
    (2, 8, 13, 13, (1, 4)),         # rate 1: s = 13, three tiles
    (1, 6, 40, 3, (7, 2)),          # a thin map: s = 1 on one axis
    (1, 3, 1, 33, (6,)),            # one row
    (1, 3, 1, 1, (6,)),             # 1x1 map: only the centre tap, stays on the GEMMs
]


def branches(x, ws, rates, scale, shift, relu=True):
    # The cpu kernel op (private): these tests pin its path and transform choices.
    return torch.ops.fastaspp._aspp_branches_forward(x, ws, list(rates), scale, shift, relu)


def assert_branches_within(out, x, ws, rates, scale, shift, winograd, what="", storage_roundings=0):
    """Rule 2 with Winograd's magnitude (winograd) or the direct one."""
    exact, magnitude, depth = aspp_branches_bound(x, ws, rates, scale, shift, True, winograd)
    assert_within(out, exact, magnitude, depth, x.dtype, what, storage_roundings)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_magnitude_twin_is_the_conv(case):
    """winograd_conv_magnitude's plans, with signed entries, compute the conv itself: the twin builds
    the transforms winograd.cpp builds (the same points and construction)."""
    n, c_in, h, w, rates = case
    x, ws, _, _ = make_inputs(n, c_in, h, w, rates, torch.float64)
    for weight, r in zip(ws[1:], rates):
        signed = winograd_conv_magnitude(x, weight, r, absolute_values=False)
        torch.testing.assert_close(signed, F.conv2d(x, weight, padding=r, dilation=r), atol=1e-10, rtol=0)


def make_inputs(n, c_in, h, w, rates, dtype, c=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=gen, dtype=dtype).contiguous(memory_format=torch.channels_last)
    ws = [torch.randn(c, c_in, 1, 1, generator=gen, dtype=dtype)]
    ws += [torch.randn(c, c_in, 3, 3, generator=gen, dtype=dtype) for _ in rates]
    b = len(ws) * c
    scale = torch.rand(b, generator=gen, dtype=dtype) + 0.5
    shift = torch.randn(b, generator=gen, dtype=dtype)
    return x, ws, scale, shift


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_winograd_matches_conv(case, dtype, monkeypatch):
    n, c_in, h, w, rates = case
    x, ws, scale, shift = make_inputs(n, c_in, h, w, rates, dtype)
    out = branches(x, ws, rates, scale, shift)
    monkeypatch.setenv("FASTASPP_CPU_WINOGRAD", "0")
    gemm = branches(x, ws, rates, scale, shift)
    assert_branches_within(out, x, ws, rates, scale, shift, winograd=True, what="winograd")
    assert_branches_within(gemm, x, ws, rates, scale, shift, winograd=False, what="gemm")
    # The two paths round differently: unequal bits mean the Winograd path ran.
    assert torch.equal(out, gemm) != expect_winograd(h, w, rates)


def test_chunked_transforms(monkeypatch):
    """A zero workspace budget makes every tile its own chunk (its own GEMM)."""
    n, c_in, h, w, rates = CASES[1]
    x, ws, scale, shift = make_inputs(n, c_in, h, w, rates, torch.float64)
    monkeypatch.setenv("FASTASPP_CPU_WINOGRAD_WORKSPACE_MB", "0")
    assert_branches_within(branches(x, ws, rates, scale, shift), x, ws, rates, scale, shift, winograd=True)


def test_half_inputs_compute_winograd_in_fp32():
    x, ws, scale, shift = make_inputs(1, 16, 33, 33, (6, 12, 18), torch.bfloat16)
    out = branches(x, ws, (6, 12, 18), scale, shift)
    assert out.dtype == torch.bfloat16
    # fp32 Winograd, then one rounding to bf16.
    assert_branches_within(out, x, ws, (6, 12, 18), scale, shift, winograd=True, storage_roundings=1)


def test_kept_weights_are_reused_and_follow_in_place_changes(monkeypatch):
    rates = (6, 12, 18)
    x, ws, scale, shift = make_inputs(1, 8, 33, 33, rates, torch.float32)
    first = branches(x, ws, rates, scale, shift)
    assert torch.equal(branches(x, ws, rates, scale, shift), first)  # from the kept transforms
    with torch.no_grad():
        ws[2].mul_(-2.0)
    after = branches(x, ws, rates, scale, shift)
    assert torch.equal(after, branches(x, [w.clone() for w in ws], rates, scale, shift))  # fresh transforms
    assert_branches_within(after, x, ws, rates, scale, shift, winograd=True)
    # Nothing kept (a zero budget) gives the same bits.
    monkeypatch.setenv("FASTASPP_CPU_KEPT_MB", "0")
    assert torch.equal(branches(x, ws, rates, scale, shift), after)


def test_weights_without_kept_transforms_run_the_gemms(monkeypatch):
    """Weights that take a gradient or are inference tensors cannot keep their transforms, and
    transforming per call costs more than Winograd saves: such branches run the live-tap GEMMs."""
    rates = (6, 12)
    x, ws, scale, shift = make_inputs(1, 6, 20, 20, rates, torch.float64)
    assert expect_winograd(20, 20, rates)
    monkeypatch.setenv("FASTASPP_CPU_WINOGRAD", "0")
    gemm = branches(x, ws, rates, scale, shift)
    monkeypatch.delenv("FASTASPP_CPU_WINOGRAD")
    assert not torch.equal(branches(x, ws, rates, scale, shift), gemm)

    grad_ws = [w.clone().requires_grad_() for w in ws]
    out = fastaspp.ops.aspp_branches(x, grad_ws, rates, scale, shift)
    assert torch.equal(out.detach(), gemm)
    out.sum().backward()
    assert all(w.grad is not None for w in grad_ws)
    with torch.inference_mode():
        inf_ws = [w.clone() for w in ws]
        assert torch.equal(branches(x.clone(), inf_ws, rates, scale, shift), gemm)
    assert_branches_within(gemm, x, ws, rates, scale, shift, winograd=False)


def test_module_eval_keeps_transforms(monkeypatch):
    """nn.ASPP's memoised folded weights are detached, so eval under no_grad runs Winograd from
    kept transforms: the same bits on every call, unlike the live-tap GEMMs'."""
    case = ASPP_CASES[6]  # 33x33, rates (6, 12, 18)
    ref, mine = make_pair(case, torch.device("cpu"))
    ref.eval(), mine.eval()
    x = make_x(case, torch.device("cpu"))
    with torch.no_grad():
        first, second = mine(x), mine(x)
        monkeypatch.setenv("FASTASPP_CPU_WINOGRAD", "0")
        gemm = mine(x)
    assert torch.equal(first, second)
    assert not torch.equal(first, gemm)
    exact, magnitude, depth = aspp_eval_bound(ref, x, winograd=True)
    assert_within(first, exact, magnitude, depth, torch.float32, "module eval")
