"""The cpu backend's single-conv paths that the backbone uses (csrc/cpu/conv_paths.h): Winograd for
the forward of a 3x3 stride-1 conv with padding = dilation, and oneDNN for the backward, each
against the fp64 reference, and the rule that picks them.

The kernel op (private) is called directly: the path is a property of the kernel, and the public op
adds nothing here. Every shape here is small, so the direct loops are switched off
(FASTASPP_CPU_DIRECT_MAX_MACS=-1) and the rules above decide. Which path ran shows in the bits: two
paths round differently, so a result equal to the one with Winograd (or oneDNN) switched off means
that path did not run.

Tolerances (tests/_cases.py, rule 2): within gamma_n of the computation's magnitude, elementwise.
Winograd's magnitude takes its transforms' entries by absolute value (winograd_conv_magnitude, the
Python twin of the plans tested in test_cpu_winograd.py) and its depth is winograd_depth(Cin), the
same bound the ASPP branches are held to; the tile size enters through the transforms (F(m, 3) with
m <= 6).
"""
import pytest
import torch
import torch.nn.functional as F

import fastaspp
from fastaspp.geometry import live_tap_pixels

from _cases import CONV_EPILOGUE, assert_within, conv_magnitude, expect_winograd, winograd_conv_magnitude, \
    winograd_depth


@pytest.fixture(autouse=True)
def no_direct_loops(monkeypatch):
    monkeypatch.setenv("FASTASPP_CPU_DIRECT_MAX_MACS", "-1")


def forward(x, w, b, s, t, stride, padding, dilation, relu=True):
    return torch.ops.fastaspp._atrous_conv2d_forward(x, w, b, s, t, [stride] * 2, list(padding), list(dilation),
                                                     relu)


def make_inputs(n, c_in, c_out, h, w, dtype, channels_last=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, h, w, generator=gen, dtype=dtype)
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    weight = torch.randn(c_out, c_in, 3, 3, generator=gen, dtype=dtype)
    bias = torch.randn(c_out, generator=gen, dtype=dtype)
    scale = torch.rand(c_out, generator=gen, dtype=dtype) + 0.5
    shift = torch.randn(c_out, generator=gen, dtype=dtype)
    return x, weight, bias, scale, shift


def winograd_bound(x, weight, bias, scale, shift, rate, relu):
    """(exact, magnitude, depth) of act((conv + b) * s + t) run as Winograd."""
    x64, w64 = x.double(), weight.double()
    s64, t64, b64 = (v.double().view(1, -1, 1, 1) for v in (scale, shift, bias))
    exact = (F.conv2d(x64, w64, padding=rate, dilation=rate) + b64) * s64 + t64
    magnitude = (winograd_conv_magnitude(x64, w64, rate) + b64.abs()) * s64.abs() + t64.abs()
    return (exact.relu() if relu else exact), magnitude, winograd_depth(x.shape[1]) + CONV_EPILOGUE


# (n, c_in, c_out, h, w, rate): the backbone's geometries scaled down, every per-axis plan.
CASES = [
    (1, 8, 6, 33, 33, 2),    # layer4 at output stride 16: s = 17, three tiles
    (2, 5, 7, 17, 20, 4),    # layer4 at output stride 8 on a small map: s = 5
    (1, 6, 4, 13, 13, 1),    # an undilated 3x3: one sub-grid of 13
    (1, 3, 5, 9, 31, 3),     # uneven sides
    (1, 4, 4, 40, 3, 2),     # a thin map
]


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "linear"])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_runs_winograd_within_its_bound(case, dtype, channels_last, relu, monkeypatch):
    monkeypatch.setenv("FASTASPP_CPU_ONEDNN", "0")  # few channels: against oneDNN the rule says no (below)
    n, c_in, c_out, h, w, r = case
    assert expect_winograd(h, w, r)  # every case is one the rule sends to Winograd
    x, weight, bias, scale, shift = make_inputs(n, c_in, c_out, h, w, dtype, channels_last)
    out = forward(x, weight, bias, scale, shift, 1, (r, r), (r, r), relu)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert_within(out, *winograd_bound(x, weight, bias, scale, shift, r, relu), dtype, "winograd forward")
    monkeypatch.setenv("FASTASPP_CPU_WINOGRAD", "0")
    assert not torch.equal(out, forward(x, weight, bias, scale, shift, 1, (r, r), (r, r), relu))


def test_half_inputs_compute_winograd_in_fp32():
    x, weight, bias, scale, shift = make_inputs(1, 8, 6, 33, 33, torch.bfloat16)
    out = forward(x, weight, bias, scale, shift, 1, (2, 2), (2, 2))
    assert out.dtype == torch.bfloat16
    exact, magnitude, depth = winograd_bound(x, weight, bias, scale, shift, 2, True)
    assert_within(out, exact, magnitude, depth, torch.bfloat16, "bf16 winograd", storage_roundings=1)


@pytest.mark.parametrize("geometry", [
    dict(stride=2, padding=(2, 2), dilation=(2, 2)),   # strided
    dict(stride=1, padding=(1, 1), dilation=(2, 2)),   # padding != dilation
    dict(stride=1, padding=(2, 1), dilation=(2, 1)),   # a different rate per axis
], ids=["stride2", "pad-ne-dil", "two-rates"])
def test_winograd_only_for_its_geometry(geometry, monkeypatch):
    x, weight, bias, scale, shift = make_inputs(1, 8, 6, 33, 33, torch.float64)
    out = forward(x, weight, bias, scale, shift, geometry["stride"], geometry["padding"], geometry["dilation"])
    monkeypatch.setenv("FASTASPP_CPU_WINOGRAD", "0")
    assert torch.equal(out, forward(x, weight, bias, scale, shift, geometry["stride"], geometry["padding"],
                                    geometry["dilation"]))


def test_winograd_only_for_weights_that_keep_their_transforms(monkeypatch):
    """A weight that takes a gradient (training) cannot keep its transforms, and transforming per
    call costs more than Winograd saves: such a conv takes the other paths."""
    x, weight, bias, scale, shift = make_inputs(1, 8, 6, 33, 33, torch.float64)
    trained = weight.clone().requires_grad_()
    out = forward(x, trained, bias, scale, shift, 1, (2, 2), (2, 2))
    monkeypatch.setenv("FASTASPP_CPU_WINOGRAD", "0")
    assert torch.equal(out, forward(x, weight, bias, scale, shift, 1, (2, 2), (2, 2)))


def test_winograd_follows_in_place_weight_changes(monkeypatch):
    monkeypatch.setenv("FASTASPP_CPU_ONEDNN", "0")  # few channels: Winograd against the tap GEMMs
    x, weight, bias, scale, shift = make_inputs(1, 8, 6, 33, 33, torch.float32)
    first = forward(x, weight, bias, scale, shift, 1, (2, 2), (2, 2))
    assert torch.equal(forward(x, weight, bias, scale, shift, 1, (2, 2), (2, 2)), first)  # kept transforms
    weight.mul_(-1.5)
    after = forward(x, weight, bias, scale, shift, 1, (2, 2), (2, 2))
    assert torch.equal(after, forward(x, weight.clone(), bias, scale, shift, 1, (2, 2), (2, 2)))
    assert_within(after, *winograd_bound(x, weight, bias, scale, shift, 2, True), torch.float32, "after the change")


# (n, channels, size, rate, runs Winograd): the measured rule against oneDNN (winograd.cpp), on
# the backbone's channel counts, one case per side of each of its limits.
AGAINST_ONEDNN = [
    (1, 128, 33, 1, True),    # narrow (depth 64): products 0.245 of the live pairs, 36 tiles
    (1, 256, 33, 2, True),    # layer3 at output stride 8 on a 257 px input: 0.255
    (1, 256, 49, 2, True),    # narrow at 0.313, near its limit
    (1, 256, 33, 4, False),   # narrow at 0.495 of the live pairs
    (1, 512, 33, 4, True),    # wide (depth 256) at 0.495
    (1, 512, 17, 2, False),   # 16 tiles: the bmm runs at a third of its rate
    (1, 512, 25, 1, False),   # 25 tiles
    (2, 512, 17, 2, True),    # the batch makes 32
    (1, 64, 65, 1, False),    # depth 32: the transforms cost what the products save
]


@pytest.mark.parametrize("n,channels,size,rate,winograd", AGAINST_ONEDNN, ids=str)
def test_winograd_against_onednn_follows_the_measured_rule(n, channels, size, rate, winograd, monkeypatch):
    """Where oneDNN would run the fp32 forward, Winograd takes over only within the measured rule, and
    the Python twin (expect_winograd) agrees. Both paths' numerics are held to their bounds by the
    tests above and below (every per-axis plan of these shapes is among CASES); here the bits only
    say which one ran."""
    assert expect_winograd(size, size, rate, against_onednn=True, batch=n, c_in=channels, c_out=channels) == winograd
    x, weight, bias, scale, shift = make_inputs(n, channels, channels, size, size, torch.float32)
    out = forward(x, weight, bias, scale, shift, 1, (rate, rate), (rate, rate))
    monkeypatch.setenv("FASTASPP_CPU_WINOGRAD", "0")
    onednn = forward(x, weight, bias, scale, shift, 1, (rate, rate), (rate, rate))
    assert torch.equal(out, onednn) != winograd
    monkeypatch.setenv("FASTASPP_CPU_WINOGRAD", "1")  # forced where it can run, whatever the rule
    assert not torch.equal(forward(x, weight, bias, scale, shift, 1, (rate, rate), (rate, rate)), onednn)


@pytest.mark.parametrize("kernel,stride", [(1, 1), (3, 2), (1, 2)], ids=["1x1", "3x3-s2", "1x1-s2"])
def test_onednn_forward_folds_the_scale_into_kept_weights(kernel, stride, monkeypatch):
    """In eval (a weight that keeps derived copies) an fp32 oneDNN forward runs oneDNN's conv with the
    scale folded into a kept copy of the weight and the shift and ReLU as its post-ops
    (csrc/cpu/onednn_fused.h): within the direct bound plus the fold's rounding, different bits from
    the unfolded path that a training weight takes, and refolded after an in-place change of the
    weight or the scale."""
    monkeypatch.setenv("FASTASPP_CPU_ONEDNN", "1")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 15, 15, generator=gen).contiguous(memory_format=torch.channels_last)
    weight = torch.randn(12, 16, kernel, kernel, generator=gen)
    scale, shift = torch.rand(12, generator=gen) + 0.5, torch.randn(12, generator=gen)
    pad = kernel // 2
    run = lambda w: forward(x, w, None, scale, shift, stride, (pad, pad), (1, 1))  # noqa: E731

    def check(out):
        exact = (F.conv2d(x.double(), weight.double(), None, stride, pad) * scale.double().view(1, -1, 1, 1)
                 + shift.double().view(1, -1, 1, 1)).relu()
        magnitude = conv_magnitude(x, weight, None, scale, shift, stride, pad, 1)
        assert_within(out, exact, magnitude, 16 * kernel * kernel + CONV_EPILOGUE + 1, torch.float32, "folded")

    folded = run(weight)
    check(folded)
    assert folded.is_contiguous(memory_format=torch.channels_last)
    assert not torch.equal(folded, run(weight.clone().requires_grad_()).detach())
    assert torch.equal(run(weight), folded)  # from the kept copy
    scale.mul_(-0.5)
    check(run(weight))
    weight.mul_(3.0)
    check(run(weight))


# (n, c_in, c_out, h, w, stride, rate): the backward's geometries, strided ones included.
BACKWARD_CASES = [(2, 8, 6, 21, 21, 1, 2), (1, 6, 5, 17, 13, 2, 1), (2, 4, 7, 12, 12, 1, 4)]


@pytest.mark.parametrize("onednn", ["1", "0"], ids=["onednn", "gemm"])
@pytest.mark.parametrize("case", BACKWARD_CASES, ids=str)
def test_backward_paths_within_their_bound(case, onednn, monkeypatch):
    """The one-call backward of fp32 conv + affine + ReLU, on oneDNN (FASTASPP_CPU_ONEDNN=1, and by
    the rule whenever more than half of the pairs are live) and on the live-tap GEMMs: dx against
    the fp64 reference within gamma_(9 Cout + 3) of |g| conv_transpose |w s|, dweight within
    gamma_(N Ho Wo + 2) of the wgrad of |g s| and |x|."""
    monkeypatch.setenv("FASTASPP_CPU_ONEDNN", onednn)
    monkeypatch.setenv("FASTASPP_CPU_WINOGRAD", "0")  # the forward on the path under test too
    n, c_in, c_out, h, w, stride, r = case
    x, weight, bias, scale, shift = make_inputs(n, c_in, c_out, h, w, torch.float32)
    out = forward(x, weight, bias, scale, shift, stride, (r, r), (r, r))
    g = torch.randn_like(out)
    geometry = ([stride] * 2, [r, r], [r, r])
    dx, dw, db, ds, dt = torch.ops.fastaspp._atrous_conv2d_backward(g, x, weight, bias, scale, out, *geometry,
                                                                    [True] * 5)
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    y64 = ((F.conv2d(x64, w64, stride=stride, padding=r, dilation=r) + bias.double().view(1, -1, 1, 1))
           * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1))
    g64 = g.double() * (out > 0)  # the saved output's ReLU mask
    exact_dx, exact_dw = torch.autograd.grad(y64, (x64, w64), g64)
    gs = (g64 * scale.double().view(1, -1, 1, 1)).abs()
    dx_magnitude = torch.nn.grad.conv2d_input(x.shape, weight.double().abs(), gs, stride, r, r)
    dw_magnitude = torch.nn.grad.conv2d_weight(x.double().abs(), weight.shape, gs, stride, r, r)
    assert_within(dx, exact_dx, dx_magnitude, 9 * c_out + 3, torch.float32, "dx")
    assert_within(dw, exact_dw, dw_magnitude, n * out.shape[2] * out.shape[3] + 3, torch.float32, "dweight")
    assert dx.is_contiguous(memory_format=torch.channels_last) and dw.is_contiguous()
    pixels = n * out.shape[2] * out.shape[3]
    assert_within(dt, g64.sum((0, 2, 3)), g64.abs().sum((0, 2, 3)), pixels, torch.float32, "dshift")
    assert_within(out, y64.relu(), conv_magnitude(x, weight, bias, scale, shift, stride, r, r),
                  9 * c_in + CONV_EPILOGUE, torch.float32, "forward")
    if onednn == "1":  # the rule's own choice agrees: these convs keep more than half their pairs live
        monkeypatch.delenv("FASTASPP_CPU_ONEDNN")
        again = torch.ops.fastaspp._atrous_conv2d_backward(g, x, weight, bias, scale, out, *geometry, [True] * 5)
        assert torch.equal(again[0], dx) and torch.equal(again[1], dw)


# (channels, size, rate, path the backward's rule takes): the live-share threshold is 0.42 for narrow
# convs (Cin x Cout below 2^15) and 0.5 for wide ones (conv_paths.h, onednn_min_live_share).
BACKWARD_SHARE_CASES = [(8, 9, 4, "onednn"), (8, 9, 5, "gemm"), (181, 9, 4, "onednn"), (182, 9, 4, "gemm"),
                        (182, 9, 3, "onednn")]


@pytest.mark.parametrize("channels,size,rate,path", BACKWARD_SHARE_CASES, ids=str)
def test_backward_live_share_threshold_follows_the_channel_count(channels, size, rate, path, monkeypatch):
    """A float32 backward above the direct range takes oneDNN above its live-share threshold, which is
    lower for narrow convs, whose per-tap GEMMs lost to oneDNN at 47-50% live
    (benchmarks/results/cpu-onednn-live-share-thresholds-*); the bits tell which path ran."""
    live, dense = live_tap_pixels((size, size), (3, 3), (1, 1), (rate, rate), (rate, rate))
    threshold = 0.5 if channels * channels >= 2**15 else 0.42
    assert (live / dense > threshold) == (path == "onednn")  # the case sits where its comment says
    x, weight, bias, scale, shift = make_inputs(1, channels, channels, size, size, torch.float32)
    out = forward(x, weight, bias, scale, shift, 1, (rate, rate), (rate, rate))
    g = torch.randn_like(out)
    geometry = ([1, 1], [rate, rate], [rate, rate])
    backward = lambda: torch.ops.fastaspp._atrous_conv2d_backward(  # noqa: E731
        g, x, weight, bias, scale, out, *geometry, [True, True, False, False, False])[:2]
    by_path = {}
    for name, choice in (("onednn", "1"), ("gemm", "0")):
        monkeypatch.setenv("FASTASPP_CPU_ONEDNN", choice)
        by_path[name] = backward()
    monkeypatch.delenv("FASTASPP_CPU_ONEDNN")
    differ = [not torch.equal(a, b) for a, b in zip(by_path["onednn"], by_path["gemm"])]
    assert any(differ)  # else the bits could not tell the paths apart
    chosen = backward()
    assert torch.equal(chosen[0], by_path[path][0]) and torch.equal(chosen[1], by_path[path][1])


def weight_layouts(weight):
    return {"nchw": weight.contiguous(), "channels_last": weight.contiguous(memory_format=torch.channels_last)}


def same_layout(a, b):
    """Autograd's layout contract: equal strides wherever the size is not 1."""
    return a.shape == b.shape and all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.stride(), b.stride()))


@pytest.mark.parametrize("path", ["direct", "onednn", "gemm"])
def test_weight_gradient_comes_in_the_weights_layout(path, monkeypatch):
    """dweight has its weight's strides, so autograd stores it without a copy (its layout contract),
    on every backward path, with the same values for either layout (dweight never reads the weight)."""
    if path == "direct":
        monkeypatch.delenv("FASTASPP_CPU_DIRECT_MAX_MACS")
    else:
        monkeypatch.setenv("FASTASPP_CPU_ONEDNN", "1" if path == "onednn" else "0")
    x, weight, bias, scale, shift = make_inputs(2, 8, 6, 21, 21, torch.float32)
    g = torch.randn(2, 6, 21, 21).contiguous(memory_format=torch.channels_last)
    grads = {}
    for layout, w in weight_layouts(weight).items():
        dw = torch.ops.fastaspp._atrous_conv2d_backward(g, x, w, bias, scale, None, [1, 1], [2, 2], [2, 2],
                                                        [False, True, False, False, False])[1]
        assert same_layout(dw, w), layout
        grads[layout] = dw
    assert torch.equal(grads["nchw"], grads["channels_last"])


@pytest.mark.parametrize("direct", [False, True], ids=["gemm", "direct"])
def test_aspp_branch_weight_gradients_come_in_the_weights_layout(direct, monkeypatch):
    """The same for every branch of the ASPP's one-call backward, dead taps (zero) included."""
    if direct:
        monkeypatch.delenv("FASTASPP_CPU_DIRECT_MAX_MACS")
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 9, 9, generator=gen).contiguous(memory_format=torch.channels_last)
    rates = [2, 6, 12]  # rate 12 on a 9x9 map: every off-centre tap is dead
    shapes = [(5, 8, 1, 1)] + [(5, 8, 3, 3)] * len(rates)
    weights = [torch.randn(s, generator=gen) for s in shapes]
    g = torch.randn(2, 5 * len(shapes), 9, 9, generator=gen).contiguous(memory_format=torch.channels_last)
    grads = {}
    for layout in ("nchw", "channels_last"):
        ws = [weight_layouts(w)[layout] for w in weights]
        _, dws = torch.ops.fastaspp._aspp_branches_backward(g, x, ws, rates, [False, True])
        assert all(same_layout(dw, w) for dw, w in zip(dws, ws)), layout
        grads[layout] = dws
    for a, b in zip(grads["nchw"], grads["channels_last"]):
        assert torch.equal(a, b)
    dead = torch.ones(3, 3, dtype=torch.bool)
    dead[1, 1] = False
    assert (grads["channels_last"][3][:, :, dead] == 0).all()
    assert (grads["channels_last"][3][:, :, 1, 1] != 0).all()


# (c, size, rate, path): fp32 3x3 convs (c -> c channels, batch 1) inside the direct loops' range,
# one on each side of every limit of the forward's rule there (csrc/cpu/conv_paths.h).
DIRECT_RANGE_CASES = [
    (8, 9, 1, "direct"),      # 40 K multiply-adds: the loops at any share of live pairs
    (32, 9, 6, "direct"),     # 230 K, 31% live
    (64, 9, 6, "direct"),     # 922 K, 31% live: few enough live pairs
    (32, 17, 1, "torch"),     # 2.5 M, 92% live: torch's conv and the epilogue
    (64, 17, 6, "onednn"),    # 6.2 M, 58% live: oneDNN with the folded epilogue
]


@pytest.mark.parametrize("c,size,rate,path", DIRECT_RANGE_CASES, ids=str)
def test_fp32_forward_in_the_direct_range_keeps_the_loops_only_where_they_win(c, size, rate, path, monkeypatch):
    """Within FASTASPP_CPU_DIRECT_MAX_MACS an fp32 forward keeps the direct loops only when its live
    multiply-adds are few (CPU_DIRECT_ANY_SHARE_MAX_MACS) or few of its pairs are live
    (CPU_DIRECT_MAX_LIVE_SHARE); otherwise torch's conv with the epilogue in place, up to
    CPU_TORCH_CONV_MAX_MACS, then oneDNN with the scale folded into its weight. The bits say which
    ran: the loops' result is the one with oneDNN switched off (which leaves the loops), torch's conv
    is F.conv2d followed by the epilogue, and oneDNN's differs from both. Each within the direct
    bound."""
    monkeypatch.delenv("FASTASPP_CPU_DIRECT_MAX_MACS")
    monkeypatch.setenv("FASTASPP_CPU_WINOGRAD", "0")
    C = fastaspp._ext._C
    x, weight, _, scale, shift = make_inputs(1, c, c, size, size, torch.float32)
    live, dense = live_tap_pixels((size, size), (3, 3), (1, 1), (rate, rate), (rate, rate))
    macs = live * c * c
    assert macs <= C.CPU_DIRECT_MAX_MACS
    loops = macs <= C.CPU_DIRECT_ANY_SHARE_MAX_MACS or live / dense <= C.CPU_DIRECT_MAX_LIVE_SHARE
    assert path == ("direct" if loops else "torch" if macs <= C.CPU_TORCH_CONV_MAX_MACS else "onednn")

    out = forward(x, weight, None, scale, shift, 1, (rate, rate), (rate, rate))
    exact = (F.conv2d(x.double(), weight.double(), padding=rate, dilation=rate) * scale.double().view(1, -1, 1, 1)
             + shift.double().view(1, -1, 1, 1)).relu()
    magnitude = conv_magnitude(x, weight, None, scale, shift, 1, rate, rate)
    assert_within(out, exact, magnitude, 9 * c + CONV_EPILOGUE + 1, torch.float32, path)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch_conv = (F.conv2d(x, weight, padding=rate, dilation=rate) * scale.view(1, -1, 1, 1)
                  + shift.view(1, -1, 1, 1)).relu()
    monkeypatch.setenv("FASTASPP_CPU_ONEDNN", "0")
    direct = forward(x, weight, None, scale, shift, 1, (rate, rate), (rate, rate))
    assert torch.equal(out, direct) == (path == "direct")
    assert torch.equal(out, torch_conv) == (path == "torch")


@pytest.mark.parametrize("c,size,rate,path", DIRECT_RANGE_CASES, ids=str)
def test_fp32_backward_in_the_direct_range_follows_the_forward_rule(c, size, rate, path, monkeypatch):
    """The one-call backward in the direct loops' range keeps the loops where the forward does, and
    otherwise runs torch's convolution_backward (as above the range): dx and dweight within the
    bounds of test_backward_paths_within_their_bound, equal to the loops' (oneDNN switched off)
    only where the loops are the rule's pick."""
    monkeypatch.delenv("FASTASPP_CPU_DIRECT_MAX_MACS")
    x, weight, _, scale, shift = make_inputs(1, c, c, size, size, torch.float32)
    g = torch.randn(1, c, size, size, generator=torch.Generator().manual_seed(2))
    geometry = ([1, 1], [rate, rate], [rate, rate])
    backward = lambda: torch.ops.fastaspp._atrous_conv2d_backward(  # noqa: E731
        g, x, weight, None, scale, None, *geometry, [True, True, False, False, False])
    dx, dw = backward()[:2]
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    y64 = F.conv2d(x64, w64, padding=rate, dilation=rate) * scale.double().view(1, -1, 1, 1)
    exact_dx, exact_dw = torch.autograd.grad(y64, (x64, w64), g.double())
    gs = (g.double() * scale.double().view(1, -1, 1, 1)).abs()
    dx_magnitude = torch.nn.grad.conv2d_input(x.shape, weight.double().abs(), gs, 1, rate, rate)
    dw_magnitude = torch.nn.grad.conv2d_weight(x.double().abs(), weight.shape, gs, 1, rate, rate)
    assert_within(dx, exact_dx, dx_magnitude, 9 * c + 3, torch.float32, f"{path} dx")
    assert_within(dw, exact_dw, dw_magnitude, size * size + 3, torch.float32, f"{path} dweight")
    monkeypatch.setenv("FASTASPP_CPU_ONEDNN", "0")
    loops_dx, loops_dw = backward()[:2]
    assert torch.equal(dx, loops_dx) == (path == "direct")
    assert torch.equal(dw, loops_dw) == (path == "direct")
