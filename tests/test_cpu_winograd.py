"""The cpu backend's Winograd ASPP branches (csrc/cpu/winograd.cpp) against plain convolutions.

Eval runs a 3x3 branch as Winograd over its rate's sub-grids when that needs at most 80% of the
live (pixel, tap) products; FASTASPP_CPU_WINOGRAD=0 forces the live-tap GEMMs. Branches with little
work run the direct loops instead (csrc/cpu/direct_conv.h), and every shape here is small: these tests
switch that path off (FASTASPP_CPU_DIRECT_MAX_MACS=-1) so that the rule above decides. Tolerances:
fp64 agrees to 1e-10 of the output's scale; fp32 to 3e-5 of it (F(6,3) loses about 4 bits: measured
up to 8e-6, benchmarks/cpu_eval_ceiling.py --check).
"""
import math

import pytest
import torch
import torch.nn.functional as F

import fastaspp

from test_aspp import ASPP_CASES, make_pair, make_x


def axis_products(size: int, rate: int) -> int:
    """Products per axis of the plan in winograd.cpp: every sub-grid of s pixels padded to tiles."""
    s = math.ceil(size / rate)
    if s <= 2:
        tiles, points = 1, 2 * s - 1  # 1 product for s = 1, F(2,2) swapped for s = 2
    else:
        tiles = math.ceil(s / 6)
        points = math.ceil(s / tiles) + 2
    return min(rate, size) * tiles * points


def live_pairs(size: int, rate: int) -> int:
    return sum(max(0, min(size, size - k * rate) - max(0, -k * rate)) for k in (-1, 0, 1))


def expect_winograd(h: int, w: int, rates) -> bool:
    return any(axis_products(h, r) * axis_products(w, r) <= 0.8 * live_pairs(h, r) * live_pairs(w, r)
               for r in rates)


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
    return torch.ops.fastaspp._aspp_branches_forward(x, ws, list(rates), scale, shift, relu)


def reference_branches(x, ws, rates, scale, shift):
    x, ws = x.double(), [w.double() for w in ws]
    y = torch.cat([F.conv2d(x, ws[0])] + [F.conv2d(x, w, padding=r, dilation=r) for w, r in zip(ws[1:], rates)], 1)
    return F.relu(y * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))


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
    expected = reference_branches(x, ws, rates, scale, shift)
    out = branches(x, ws, rates, scale, shift)
    monkeypatch.setenv("FASTASPP_CPU_WINOGRAD", "0")
    gemm = branches(x, ws, rates, scale, shift)
    tol = (1e-10 if dtype == torch.float64 else 3e-5) * expected.abs().max().item()
    torch.testing.assert_close(out.double(), expected, atol=tol, rtol=0)
    torch.testing.assert_close(gemm.double(), expected, atol=tol, rtol=0)
    # The two paths round differently: unequal bits mean the Winograd path ran.
    assert torch.equal(out, gemm) != expect_winograd(h, w, rates)


def test_chunked_transforms(monkeypatch):
    """A zero workspace budget makes every tile its own chunk (its own GEMM)."""
    n, c_in, h, w, rates = CASES[1]
    x, ws, scale, shift = make_inputs(n, c_in, h, w, rates, torch.float64)
    monkeypatch.setenv("FASTASPP_CPU_WINOGRAD_WORKSPACE_MB", "0")
    torch.testing.assert_close(branches(x, ws, rates, scale, shift), reference_branches(x, ws, rates, scale, shift),
                               atol=1e-10, rtol=0)


def test_half_inputs_compute_winograd_in_fp32():
    x, ws, scale, shift = make_inputs(1, 16, 33, 33, (6, 12, 18), torch.bfloat16)
    out = branches(x, ws, (6, 12, 18), scale, shift)
    assert out.dtype == torch.bfloat16
    expected = reference_branches(x, ws, (6, 12, 18), scale, shift)
    torch.testing.assert_close(out.double(), expected, atol=1e-2 * expected.abs().max().item(), rtol=1e-2)


def test_kept_weights_are_reused_and_follow_in_place_changes(monkeypatch):
    rates = (6, 12, 18)
    x, ws, scale, shift = make_inputs(1, 8, 33, 33, rates, torch.float32)
    first = branches(x, ws, rates, scale, shift)
    assert torch.equal(branches(x, ws, rates, scale, shift), first)  # from the kept transforms
    with torch.no_grad():
        ws[2].mul_(-2.0)
    after = branches(x, ws, rates, scale, shift)
    assert torch.equal(after, branches(x, [w.clone() for w in ws], rates, scale, shift))  # fresh transforms
    torch.testing.assert_close(after.double(), reference_branches(x, ws, rates, scale, shift),
                               atol=3e-5 * after.abs().max().item(), rtol=0)
    # Nothing kept (a zero budget) gives the same bits.
    monkeypatch.setenv("FASTASPP_CPU_KEPT_MB", "0")
    assert torch.equal(branches(x, ws, rates, scale, shift), after)


def test_weights_without_kept_transforms_run_the_gemms(monkeypatch):
    """Weights that take a gradient or are inference tensors cannot keep their transforms, and
    transforming per call costs more than Winograd saves: such branches run the live-tap GEMMs."""
    rates = (6, 12)
    x, ws, scale, shift = make_inputs(1, 6, 20, 20, rates, torch.float64)
    expected = reference_branches(x, ws, rates, scale, shift)
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
    torch.testing.assert_close(gemm, expected, atol=1e-10, rtol=0)


def test_module_eval_keeps_transforms(monkeypatch):
    """nn.ASPP's memoised folded weights are detached, so eval under no_grad runs Winograd from
    kept transforms: the same bits on every call, unlike the live-tap GEMMs'."""
    case = ASPP_CASES[6]  # 33x33, rates (6, 12, 18)
    ref, mine = make_pair(case, torch.device("cpu"))
    ref.eval(), mine.eval()
    x = make_x(case, torch.device("cpu"))
    with torch.no_grad():
        first, second = mine(x), mine(x)
        expected = ref(x)
        monkeypatch.setenv("FASTASPP_CPU_WINOGRAD", "0")
        gemm = mine(x)
    assert torch.equal(first, second)
    assert not torch.equal(first, gemm)
    torch.testing.assert_close(first, expected, atol=3e-5 * expected.abs().max().item(), rtol=1e-4)
