"""Tap liveness: the Python twin of tap_geometry.h, and the CPU kernel's dead-tap skipping."""
import itertools

import pytest
import torch

from fastaspp.geometry import conv_out_size, live_tap_pixels, tap_live_range


@pytest.mark.parametrize("in_size,k,stride,padding,dilation",
                         list(itertools.product([1, 2, 5, 33], [1, 3, 5], [1, 2, 3], [0, 1, 6, 18], [1, 2, 6, 18])))
def test_live_range_matches_brute_force(in_size, k, stride, padding, dilation):
    out = conv_out_size(in_size, k, stride, padding, dilation)
    if out < 1:
        return
    for tap in range(k):
        live = [o for o in range(out) if 0 <= o * stride + tap * dilation - padding < in_size]
        lo, hi = tap_live_range(tap, in_size, out, stride, padding, dilation)
        assert list(range(lo, hi)) == live


@pytest.mark.parametrize("size,rate,share", [(33, 6, 0.77), (33, 12, 0.57), (33, 18, 0.40), (65, 36, 0.40)])
def test_live_share_matches_design_table(size, rate, share):
    """docs/design.md §2: share of (pixel, tap) pairs of a 3x3 tap reading real data. Integer counts,
    one division: the 0.01 is the table's two-decimal rounding (at most 0.005), not a tolerance
    for arithmetic."""
    live, dense = live_tap_pixels((size, size), (3, 3), (1, 1), (rate, rate), (rate, rate))
    assert abs(live / dense - share) < 0.01


def _gemm_calls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key in ("aten::mm", "aten::addmm", "aten::addmm_"))


@pytest.mark.parametrize("size,rate,live_taps",
                         [(33, 6, 9), (9, 6, 9), (5, 6, 1), (33, 40, 1), (16, 12, 9), (12, 12, 1)])
def test_cpu_kernel_runs_one_gemm_per_live_tap(size, rate, live_taps, monkeypatch):
    """Work scales with live taps: dead taps launch no GEMM, forward and backward (the live-tap GEMM
    path, which these small shapes reach only when the direct loops are switched off)."""
    monkeypatch.setenv("FASTASPP_CPU_DIRECT_MAX_MACS", "-1")
    monkeypatch.setenv("FASTASPP_CPU_ONEDNN", "0")
    monkeypatch.setenv("FASTASPP_CPU_WINOGRAD", "0")
    x = torch.randn(1, 8, size, size)
    w = torch.randn(4, 8, 3, 3)
    s, t = torch.ones(4), torch.zeros(4)
    geometry = ([1, 1], [rate, rate], [rate, rate])
    ops = torch.ops.fastaspp  # the cpu kernel ops (private): the GEMM count is a property of the kernel
    assert _gemm_calls(lambda: ops._atrous_conv2d_forward(x, w, None, s, t, *geometry, True)) == live_taps
    g = torch.randn(1, 4, size, size)
    assert _gemm_calls(lambda: ops._atrous_conv2d_grad_input(g, w, list(x.shape), *geometry)) == live_taps
    assert _gemm_calls(lambda: ops._atrous_conv2d_grad_weight(x, g, list(w.shape), *geometry)) == live_taps


def test_small_problems_run_no_gemm():
    """The direct loops (csrc/cpu/direct_conv.h): a small conv's forward and whole backward call no
    BLAS at all, whatever its live taps."""
    x = torch.randn(2, 8, 9, 9)
    w = torch.randn(4, 8, 3, 3)
    geometry = ([1, 1], [2, 2], [2, 2])
    out = torch.ops.fastaspp._atrous_conv2d_forward(x, w, None, None, None, *geometry, True)
    assert _gemm_calls(lambda: torch.ops.fastaspp._atrous_conv2d_forward(x, w, None, None, None, *geometry, True)) == 0
    backward = lambda: torch.ops.fastaspp._atrous_conv2d_backward(  # noqa: E731
        torch.randn_like(out), x, w, None, None, out, *geometry, [True] * 2 + [False] * 3)
    assert _gemm_calls(backward) == 0
