"""Weight preparations kept between calls (the modules' folded parameters, nn/_fold_cache.py; the
cpu backend's re-laid-out and transformed weights and the cuda bindings' layouts, csrc/common/kept.h)
and the rule that picks the cpu backend's path for a call.

Every way a weight can change must reach the next call: an in-place update, load_state_dict,
module.to() and the train/eval switch (which drops a module's kept fold). Each case compares the
fused module against the plain PyTorch module it replaces, after the change; the cache's internals
are read only to show that a value was kept or dropped.

Tolerances (tests/_cases.py, rule 2): against the plain module in fp64 on the same values, within
gamma_n of the magnitude (magnitude_model; the ASPP's by test_aspp.assert_eval_close, with
Winograd's magnitude where the cpu backend ran it); n = Cin*9 products plus the BN fold and the
epilogue for ConvBNReLU. A stale kept fold or layout is off by whole terms (the tests scale a
weight by -1.5 or load other parameters), far outside.
"""
import copy

import pytest
import torch
import torch.nn.functional as F

import fastaspp
from fastaspp import reference
from fastaspp.geometry import live_tap_pixels

from _cases import BN_FOLD, CONV_EPILOGUE, assert_within, conv_magnitude, magnitude_model
from test_aspp import ASPP_CASES, assert_eval_close, make_pair as aspp_pair, make_x, randomized
from conftest import CPU_PATHS
from test_nn import _pair as convbnrelu_pair


def _modules(kind):
    if kind == "convbnrelu":
        ref, mine = convbnrelu_pair(c_in=6, c_out=8, dilation=2, bias=True)
        x = torch.randn(2, 6, 9, 9, generator=torch.Generator().manual_seed(3)).contiguous(
            memory_format=torch.channels_last)
        return ref.eval(), mine.eval(), x
    case = ASPP_CASES[0]
    ref, mine = aspp_pair(case, "cpu")
    return ref.eval(), mine.eval(), make_x(case, "cpu")


def _assert_same(mine, ref, x):
    """mine(x) within rule 2's bound of ref in fp64; returns mine(x)."""
    if isinstance(mine, fastaspp.nn.ASPP):
        return assert_eval_close(mine, ref, x, "cpu", "aspp", x.dtype)
    with torch.no_grad():
        got = mine(x)
        exact = copy.deepcopy(ref).double()(x.double())
        magnitude = magnitude_model(ref)(x.double().abs())
    depth = ref[0].in_channels * ref[0].kernel_size[0] * ref[0].kernel_size[1] + BN_FOLD + CONV_EPILOGUE
    assert_within(got, exact, magnitude, depth, x.dtype, "convbnrelu")
    return got


def _conv_weight(module):
    return module[0].weight if isinstance(module, torch.nn.Sequential) else module.convs[1][0].weight


@pytest.fixture(params=["direct", "gemm", "onednn"])
def cpu_path(request, monkeypatch):
    """The cpu backend's small-problem loops (these shapes' own choice), its live-tap GEMMs, and
    oneDNN's conv with the fused epilogue (fp32 forwards)."""
    for variable, value in CPU_PATHS.get(request.param, {}).items():
        monkeypatch.setenv(variable, value)
    return request.param


@pytest.mark.parametrize("kind", ["convbnrelu", "aspp"])
def test_fold_is_kept_until_a_parameter_changes_in_place(kind, cpu_path):
    ref, mine, x = _modules(kind)
    _assert_same(mine, ref, x)
    kept = mine._fold_cache.value
    _assert_same(mine, ref, x)
    assert mine._fold_cache.value is kept  # nothing changed: one version check, no new fold
    with torch.no_grad():
        for m in (ref, mine):
            _conv_weight(m).mul_(-1.5)  # the conv weight: the backend's kept layout must be dropped too
    _assert_same(mine, ref, x)
    assert mine._fold_cache.value is not kept


@pytest.mark.parametrize("kind", ["convbnrelu", "aspp"])
def test_load_state_dict_reaches_the_next_call(kind, cpu_path):
    ref, mine, x = _modules(kind)
    _assert_same(mine, ref, x)
    other = randomized(reference.conv_bn_relu(6, 8, 3, padding=2, dilation=2, bias=True)) if kind == "convbnrelu" \
        else randomized(reference.ASPP(ASPP_CASES[0].c_in, ASPP_CASES[0].rates, ASPP_CASES[0].c))
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-0.7)
    ref.load_state_dict(other.state_dict())
    mine.load_state_dict(other.state_dict())
    _assert_same(mine, ref, x)


@pytest.mark.parametrize("kind", ["convbnrelu", "aspp"])
def test_module_to_reaches_the_next_call(kind, cpu_path):
    ref, mine, x = _modules(kind)
    _assert_same(mine, ref, x)
    ref.double()
    mine.double()
    got = _assert_same(mine, ref, x.double())
    assert got.dtype == torch.float64
    ref.float()
    mine.float()
    _assert_same(mine, ref, x)


@pytest.mark.parametrize("kind", ["convbnrelu", "aspp"])
def test_train_eval_switch_drops_the_kept_fold(kind, cpu_path):
    ref, mine, x = _modules(kind)
    _assert_same(mine, ref, x)
    assert mine._fold_cache.value is not None
    for m in (ref, mine):
        m.train()
        with torch.no_grad():
            m(torch.cat([x, x.flip(0)]))  # moves the running statistics in place
    assert mine._fold_cache.stamp is None and mine._fold_cache.value is None
    ref.eval()
    mine.eval()
    _assert_same(mine, ref, x)


def test_kept_layouts_follow_weights_of_the_op_itself(cpu_path):
    """The functional op with a weight that takes no gradient: its kept layout is reused while the
    weight is unchanged and redone after an in-place change or a zero budget (FASTASPP_CPU_KEPT_MB)."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 8, 8, generator=gen)
    w = torch.randn(7, 5, 3, 3, generator=gen)
    conv = lambda: fastaspp.ops.atrous_conv2d(x, w, padding=2, dilation=2)  # noqa: E731
    first = conv()
    assert torch.equal(conv(), first)
    with torch.no_grad():
        w.mul_(2.0).add_(0.5)
    after = conv()
    assert_within(after, F.conv2d(x.double(), w.double(), padding=2, dilation=2),
                  conv_magnitude(x, w, padding=2, dilation=2), 5 * 9, torch.float32, "after the change")
    fresh = fastaspp.ops.atrous_conv2d(x, w.clone(), padding=2, dilation=2)
    assert torch.equal(after, fresh)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cuda_kept_layouts_follow_weights(dtype, monkeypatch):
    """The cuda bindings keep a weight's forward and input-gradient layouts (csrc/cuda/binding_utils.h):
    reused while it is unchanged (the same bits), redone after an in-place change, and the same bits
    with a zero budget (FASTASPP_CUDA_KEPT_MB). GPU builds only."""
    reason = fastaspp._backend.unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(f"backend cuda unavailable: {reason}")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 9, 9, generator=gen).to("cuda", dtype).requires_grad_()
    w = torch.randn(24, 16, 3, 3, generator=gen).to("cuda", dtype)
    g = torch.randn(2, 24, 9, 9, generator=gen).to("cuda", dtype)

    def conv_and_grad():
        with fastaspp.backend("cuda"):
            out = fastaspp.ops.atrous_conv2d(x, w, padding=2, dilation=2)
            return out.detach(), torch.autograd.grad(out, x, g)[0]

    first = conv_and_grad()
    assert all(torch.equal(a, b) for a, b in zip(conv_and_grad(), first))
    with torch.no_grad():
        w.mul_(-1.5)
    after = conv_and_grad()
    geometry = dict(padding=2, dilation=2)
    assert_within(after[0], F.conv2d(x.detach().double(), w.double(), **geometry), conv_magnitude(x, w, **geometry),
                  16 * 9, dtype, "forward after the change", storage_roundings=1)
    xs = x.detach().double().requires_grad_()
    exact = torch.autograd.grad(F.conv2d(xs, w.double(), **geometry), xs, g.double())[0]
    xa = xs.detach().abs().requires_grad_()
    magnitude = torch.autograd.grad(F.conv2d(xa, w.double().abs(), **geometry), xa, g.double().abs())[0]
    assert_within(after[1], exact, magnitude, 24 * 9 + 2, dtype, "grad x after the change", storage_roundings=2)
    monkeypatch.setenv("FASTASPP_CUDA_KEPT_MB", "0")
    assert all(torch.equal(a, b) for a, b in zip(conv_and_grad(), after))


def test_zero_kept_budget_gives_the_same_bits(monkeypatch):
    ref, mine, x = _modules("aspp")
    kept = _assert_same(mine, ref, x)
    monkeypatch.setenv("FASTASPP_CPU_KEPT_MB", "0")
    mine._fold_cache.clear()
    assert torch.equal(_assert_same(mine, ref, x), kept)


def _macs(n, c_in, c_out, size, rate):
    live, _ = live_tap_pixels((size, size), (3, 3), (1, 1), (rate, rate), (rate, rate))
    return n * live * c_in * c_out


def test_the_cpu_path_follows_the_documented_rule(monkeypatch):
    """A conv runs the direct loops when its live multiply-adds are at most
    FASTASPP_CPU_DIRECT_MAX_MACS, the live-tap GEMMs otherwise (oneDNN switched off here): the two
    round differently, so the result's bits tell which ran."""
    monkeypatch.setenv("FASTASPP_CPU_ONEDNN", "0")
    gen = torch.Generator().manual_seed(0)
    n, c_in, c_out, size, rate = 1, 32, 24, 9, 2
    x = torch.randn(n, c_in, size, size, generator=gen)
    w = torch.randn(c_out, c_in, 3, 3, generator=gen)
    conv = lambda: fastaspp.ops.atrous_conv2d(x, w, padding=rate, dilation=rate)  # noqa: E731
    macs = _macs(n, c_in, c_out, size, rate)
    monkeypatch.setenv("FASTASPP_CPU_DIRECT_MAX_MACS", str(10**12))
    direct = conv()
    monkeypatch.setenv("FASTASPP_CPU_DIRECT_MAX_MACS", "-1")
    gemm = conv()
    assert not torch.equal(direct, gemm)  # else this test could not tell the paths apart
    exact = F.conv2d(x.double(), w.double(), padding=rate, dilation=rate)
    for name, out in (("direct", direct), ("gemm", gemm)):
        assert_within(out, exact, conv_magnitude(x, w, padding=rate, dilation=rate), c_in * 9, torch.float32, name)
    monkeypatch.setenv("FASTASPP_CPU_DIRECT_MAX_MACS", str(macs))
    assert torch.equal(conv(), direct)  # at the threshold: direct
    monkeypatch.setenv("FASTASPP_CPU_DIRECT_MAX_MACS", str(macs - 1))
    assert torch.equal(conv(), gemm)  # one multiply-add above it: the GEMMs
    monkeypatch.delenv("FASTASPP_CPU_DIRECT_MAX_MACS")
    assert macs <= fastaspp._ext._C.CPU_DIRECT_MAX_MACS
    assert torch.equal(conv(), direct)  # the default threshold (kDirectMaxMacs)


@pytest.mark.parametrize("rate", [2, 6])
def test_large_fp32_forwards_take_onednn_at_any_live_share(monkeypatch, rate):
    """Above the direct loops' range an fp32 forward runs oneDNN's conv with the fused epilogue, with
    most (rate 2) or few (rate 6) of its (pixel, tap) pairs live: oneDNN skips dead taps itself
    (benchmarks/cpu_onednn_live_share.py); the result's bits tell which path ran, and both match the
    reference. (Winograd, which the rule tries first for such a kept weight, is switched off:
    tests/test_cpu_conv_paths.py.)"""
    monkeypatch.setenv("FASTASPP_CPU_WINOGRAD", "0")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 16, 9, 9, generator=gen)
    w = torch.randn(8, 16, 3, 3, generator=gen)
    scale, shift = torch.rand(8, generator=gen), torch.randn(8, generator=gen)
    live, dense = live_tap_pixels((9, 9), (3, 3), (1, 1), (rate, rate), (rate, rate))
    assert (live > 0.5 * dense) == (rate == 2)  # both sides of the backward's live-share rule
    conv = lambda: fastaspp.ops.atrous_conv2d(x, w, padding=rate, dilation=rate, scale=scale, shift=shift,  # noqa: E731
                                              relu=True)
    monkeypatch.setenv("FASTASPP_CPU_DIRECT_MAX_MACS", "-1")
    by_path = {}
    for choice in ("0", "1"):
        monkeypatch.setenv("FASTASPP_CPU_ONEDNN", choice)
        by_path[choice] = conv()
        exact = reference.atrous_conv2d(x.double(), w.double(), padding=rate, dilation=rate, scale=scale.double(),
                                        shift=shift.double(), relu=True)
        magnitude = conv_magnitude(x, w, None, scale, shift, padding=rate, dilation=rate)
        assert_within(by_path[choice], exact, magnitude, 16 * 9 + CONV_EPILOGUE, torch.float32, f"oneDNN {choice}")
    assert not torch.equal(by_path["0"], by_path["1"])
    monkeypatch.delenv("FASTASPP_CPU_ONEDNN")
    assert torch.equal(conv(), by_path["1"])


def test_a_changed_weight_drops_all_its_kept_copies(monkeypatch):
    """After an in-place change, the next kept() of the weight drops every copy made from its older
    version, not only the one it replaces: here the direct loops' layout, when the live-tap GEMMs'
    matrices are remade (the same holds for the cuda bindings' copies on other streams). Read
    through torch.ops.fastaspp._kept_bytes."""
    kept_bytes = lambda: torch.ops.fastaspp._kept_bytes("cpu")  # noqa: E731
    monkeypatch.setenv("FASTASPP_CPU_ONEDNN", "0")
    monkeypatch.setenv("FASTASPP_CPU_WINOGRAD", "0")
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 9, 9, generator=gen)
    w = torch.randn(6, 4, 3, 3, generator=gen)

    def conv(direct):
        monkeypatch.setenv("FASTASPP_CPU_DIRECT_MAX_MACS", "100000000" if direct else "-1")
        return fastaspp.ops.atrous_conv2d(x, w, padding=2, dilation=2)

    conv(direct=False)  # kept: the tap matrices (and weights that died before are dropped)
    with_gemm = kept_bytes()
    conv(direct=True)  # kept as well: the direct loops' layout
    with_both = kept_bytes()
    assert with_both > with_gemm
    with torch.no_grad():
        w.mul_(-1.5)
    after = conv(direct=False)
    assert kept_bytes() == with_gemm  # the new tap matrices only: both old copies are gone
    assert_within(after, F.conv2d(x.double(), w.double(), padding=2, dilation=2),
                  conv_magnitude(x, w, padding=2, dilation=2), 4 * 9, torch.float32, "after the change")


def test_kept_bytes_names_its_argument():
    with pytest.raises(RuntimeError, match="device_type must be 'cpu' or 'cuda', got 'gpu'"):
        torch.ops.fastaspp._kept_bytes("gpu")
