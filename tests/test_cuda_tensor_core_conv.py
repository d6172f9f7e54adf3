"""The cuda backend's 16-bit kernels, the CuTe ones (csrc/cuda/conv_cute.cuh on wgmma in an sm_90a
build, on its 128 x 256 tile with FASTASPP_CUDA_CONV=wgmma_wide, on its 8-stage 64 x 128 tile with
FASTASPP_CUDA_CONV=wgmma_deep, on the 128 x 256 tile fed by TMA with FASTASPP_CUDA_CONV=wgmma_tma
(conv_tma.cuh: the stride-1 convs without the projection's prologue, at most 4 a launch; the rest
on the 64 x 128 tile; with FASTASPP_CUDA_SPLIT_K too, grids below a wave, which these are, on its
64 x 128 TMA tile, split), or on mma.sync with FASTASPP_CUDA_CONV=sm80, grad_weight_cute.cuh
likewise; the 64 x 128 tiles also with their K loop split, FASTASPP_CUDA_SPLIT_K=4, which these
small grids take) and WMMA (FASTASPP_CUDA_CONV=wmma), on the shapes that select the CuTe kernels
(channel counts in multiples of 8): several K chunks and their tail, more than one 128-channel
column block, strides 2 and (2, 3) (whose input gradient tiles each stride phase apart), a 5x5 kernel, dead
taps, a 1x1 map, the ASPP's channel-slice store, and the training ASPP's epilogue statistics and
projection prologue.
Forward, input and weight gradients. Needs a GPU build; elsewhere every case is skipped with the
reason.

Tolerances as in test_atrous_conv.py (rule 2): within gamma_n of the magnitude of the fp64
reference on the same rounded inputs (a split K loop adds its parts' sums in order: each product
still passes through fewer than n additions), n = Cin*KH*KW + CONV_EPILOGUE for the forward,
Cout*KH*KW + 2 for the input gradient and N*Ho*Wo + 2 for the weight gradient, plus one rounding
to the 16-bit output (two in the backward).
Statistics as in test_aspp_train.py: from the fp32 accumulators, whose distance from the exact
output is that output's fp32 bound (plus, for the projection, the rounding of its normalised input
to the 16-bit dot operand).
"""
import os

import pytest
import torch

import fastaspp
from fastaspp import reference
from fastaspp.ops import affine_relu_project, aspp_branches_stats

from _cases import CONV_EPILOGUE, UNIT_ROUNDOFF, ConvCase, absolute, aspp_branches_bound, assert_statistics_within, \
    assert_within, conv_magnitude, relative_bound
from test_aspp_train import _project_bound, _project_inputs

CASES = [
    ConvCase(2, 64, 136, 21, 21, dilation=6),           # two K chunks; column blocks of 128 and 8
    ConvCase(1, 40, 24, 13, 17, stride=2, padding=1),   # K tail (40 = 32 + 8), stride 2
    ConvCase(2, 24, 32, 10, 10, stride=2, padding=1),   # the input gradient, one stride phase a patch
    ConvCase(1, 16, 24, 11, 14, stride=(2, 3), padding=1),  # six phases, one with fewer rows and columns
    ConvCase(1, 16, 8, 9, 9, k=5, padding=4, dilation=2),
    ConvCase(1, 8, 8, 1, 1, dilation=6),                 # one live tap
    ConvCase(2, 32, 48, 9, 9, dilation=12),              # every off-centre tap dead
    ConvCase(1, 256, 256, 33, 33, dilation=12),          # an ASPP branch
]
# The CuTe kernels as the build picks them (on wgmma in an sm_90a build), the conv on the 128 x 256
# wgmma tile (two patches a CTA: the 21 x 21 and 13 x 11 maps leave the last CTA of each patch row
# one) and on the 8-stage 64 x 128 one, the 128 x 256 tile fed by TMA (the stride-2 cases, the
# projection and the 8-branch launch of 9 rates on the 64 x 128 tile; a 1x1 map, 8 channels of a
# 32-channel box and of a 64-channel weight box; with the split, the 64 x 128 TMA tile), their
# mma.sync path, and WMMA for everything; the "_split"
# ones split the 64 x 128 tiles' K loop in up to 4 parts (at most one part per 8 K steps: CASES'
# convs with 16 channels or fewer and one tap stay whole; the others split, some parts starting
# inside a tap). Each value is the environment the kernel runs under.
SPLIT = {"FASTASPP_CUDA_SPLIT_K": "4"}
KERNELS = {
    "cute": {},
    "cute_split": SPLIT,
    "wgmma_wide": {"FASTASPP_CUDA_CONV": "wgmma_wide"},
    "wgmma_deep": {"FASTASPP_CUDA_CONV": "wgmma_deep"},
    "wgmma_deep_split": {"FASTASPP_CUDA_CONV": "wgmma_deep", **SPLIT},
    "wgmma_tma": {"FASTASPP_CUDA_CONV": "wgmma_tma"},
    "wgmma_tma_split": {"FASTASPP_CUDA_CONV": "wgmma_tma", **SPLIT},
    "sm80": {"FASTASPP_CUDA_CONV": "sm80"},
    "sm80_split": {"FASTASPP_CUDA_CONV": "sm80", **SPLIT},
    "wmma": {"FASTASPP_CUDA_CONV": "wmma"},
}


@pytest.fixture(params=list(KERNELS))
def kernel(request, monkeypatch):
    reason = fastaspp._backend.unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(f"backend cuda unavailable: {reason}")
    for name in ("FASTASPP_CUDA_CONV", "FASTASPP_CUDA_SPLIT_K"):
        monkeypatch.delenv(name, raising=False)
    for name, value in KERNELS[request.param].items():
        monkeypatch.setenv(name, value)
    with fastaspp.backend("cuda"):
        yield request.param


def inputs(case, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(case.n, case.c_in, case.h, case.w, generator=g).to(memory_format=torch.channels_last)
    w = torch.randn(case.c_out, case.c_in, case.k, case.k, generator=g) / (case.c_in * case.k * case.k) ** 0.5
    s, t = torch.rand(case.c_out, generator=g) + 0.5, torch.randn(case.c_out, generator=g)
    return [v.to("cuda", dtype) for v in (x, w, s, t)]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_and_gradients(kernel, case, dtype):
    x, w, s, t = inputs(case, dtype)
    geometry = dict(stride=case.stride, padding=case.pad, dilation=case.dilation)
    x.requires_grad_()
    w.requires_grad_()
    out = fastaspp.ops.atrous_conv2d(x, w, None, scale=s, shift=t, relu=True, **geometry)
    f64 = [v.detach().double() for v in (x, w, s, t)]
    ref = reference.atrous_conv2d(f64[0], f64[1], None, scale=f64[2], shift=f64[3], relu=True, **geometry)
    assert_within(out, ref, conv_magnitude(x, w, None, s, t, **geometry), case.c_in * case.k ** 2 + CONV_EPILOGUE,
                  dtype, f"forward {kernel} {case}", storage_roundings=1)

    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out)
    dx, dw = torch.autograd.grad(out, [x, w], grad)
    mask = (out.detach() > 0).double()
    expected = []
    for values in (lambda v: v.detach().double(), absolute):  # the reference, then its magnitude
        xs, ws = values(x).requires_grad_(), values(w).requires_grad_()
        pre = reference.atrous_conv2d(xs, ws, None, scale=values(s), shift=values(t), **geometry)
        seed = grad.double() * mask if values is not absolute else grad.double().abs() * mask
        expected.append(torch.autograd.grad(pre, [xs, ws], seed))
    assert_within(dx, expected[0][0], expected[1][0], case.c_out * case.k ** 2 + 2, dtype,
                  f"grad x {kernel} {case}", storage_roundings=2)
    # The weight gradient (grad_weight_cute.cuh or WMMA): a sum over the batch's output pixels.
    pixels = out.shape[0] * out.shape[2] * out.shape[3]
    assert_within(dw, expected[0][1], expected[1][1], pixels + 2, dtype, f"grad weight {kernel} {case}",
                  storage_roundings=2)


@pytest.mark.parametrize("rates", [[6, 12, 18], list(range(1, 10))], ids=["3 rates", "9 rates"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_aspp_branches_store_their_channel_slices(kernel, dtype, rates):
    """Each branch writes its [i*C, (i+1)*C) slice of the shared buffer, no other channel; all
    branches run in one launch, or in two past 8 branches (9 rates: 10 branches)."""
    c_in, c = 64, 136
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, c_in, 21, 21, generator=g).to("cuda", dtype, memory_format=torch.channels_last)
    shapes = [(c, c_in, 1, 1)] + [(c, c_in, 3, 3)] * len(rates)
    ws = [(torch.randn(shape, generator=g) / (c_in * shape[2] * shape[3]) ** 0.5).to("cuda", dtype) for shape in shapes]
    branches = len(rates) + 1
    s = (torch.rand(branches * c, generator=g) + 0.5).to("cuda", dtype)
    t = torch.randn(branches * c, generator=g).to("cuda", dtype)
    out = fastaspp.ops.aspp_branches(x, ws, rates, s, t, relu=True)
    for i, w in enumerate(ws):
        r = rates[i - 1] if i else 0
        part = slice(i * c, (i + 1) * c)
        geometry = dict(padding=r, dilation=max(r, 1))
        ref = reference.atrous_conv2d(x.double(), w.double(), None, scale=s[part].double(), shift=t[part].double(),
                                      relu=True, **geometry)
        magnitude = conv_magnitude(x, w, None, s[part], t[part], stride=1, **geometry)
        assert_within(out[:, part], ref, magnitude, c_in * w.shape[2] * w.shape[3] + CONV_EPILOGUE, dtype,
                      f"branch {i} {kernel}", storage_roundings=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_training_aspp_statistics_and_prologue(kernel, dtype):
    """The branches' BN statistics from the epilogue (136 channels a branch: a second column block
    of 8) and the projection with its BN + ReLU prologue (K = 40 and 520: K tails; Cout = 136) and
    image bias, with its own statistics, on 16-bit operands that take the CuTe kernel. With a split
    K loop, the 3x3 branches (18 steps) and the K = 520 projection (17 steps) take two parts, whose
    statistics and prologue run in the second kernel and in each part."""
    rates, c_in, c = [2, 6, 12], 64, 136
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, c_in, 13, 11, generator=g).to("cuda", dtype, memory_format=torch.channels_last)
    shapes = [(c, c_in, 1, 1)] + [(c, c_in, 3, 3)] * len(rates)
    ws = [(torch.randn(shape, generator=g) / (c_in * shape[2] * shape[3]) ** 0.5).to("cuda", dtype) for shape in shapes]
    z, mean, var = aspp_branches_stats(x, ws, rates)
    ones = torch.ones(z.shape[1], dtype=torch.float64)
    exact, magnitude, depth = aspp_branches_bound(x, ws, rates, ones, 0 * ones, relu=False)
    assert_within(z, exact, magnitude, depth, dtype, f"z {kernel}", storage_roundings=1)
    accumulators = relative_bound(depth, torch.float32) * magnitude
    assert_statistics_within(mean, var, exact, accumulators, UNIT_ROUNDOFF[torch.float32], f"z {kernel}")

    for k in (40, 520):
        inputs = [t.to(dtype) for t in _project_inputs(2, k, 136, 9, 11, "cuda")]
        y, mean, var = affine_relu_project(*inputs)
        exact, magnitude, depth = _project_bound(*inputs)
        assert_within(y, exact, magnitude, depth, dtype, f"y {kernel} K={k}", storage_roundings=2)
        accumulators = (relative_bound(depth, torch.float32) + UNIT_ROUNDOFF[dtype]) * magnitude
        assert_statistics_within(mean, var, exact, accumulators, UNIT_ROUNDOFF[torch.float32], f"y {kernel} K={k}")


@pytest.mark.parametrize("rates", [[6, 12, 18], list(range(1, 10))], ids=["3 rates", "9 rates"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_aspp_input_gradient_sums_every_branch(kernel, dtype, rates):
    """The ASPP's input gradient, every branch's summed in one launch's accumulators (two launches,
    then one addition, past 8 branches), each branch reading its channel slice of the gradient."""
    c_in, c = 64, 136
    g = torch.Generator().manual_seed(4)
    shapes = [(c, c_in, 1, 1)] + [(c, c_in, 3, 3)] * len(rates)
    ws = [(torch.randn(shape, generator=g) / (c_in * shape[2] * shape[3]) ** 0.5).to("cuda", dtype) for shape in shapes]
    grad = torch.randn(2, len(ws) * c, 21, 21, generator=g).to("cuda", dtype, memory_format=torch.channels_last)
    dx = torch.ops.fastaspp.aspp_branches_grad_input(grad, ws, rates, [2, c_in, 21, 21], "cuda")
    expected = []
    for values in (lambda v: v.double(), absolute):  # the reference, then its magnitude
        xs = torch.zeros(2, c_in, 21, 21, dtype=torch.float64, device="cuda", requires_grad=True)
        out = torch.cat([reference.atrous_conv2d(xs, values(w), None, padding=r, dilation=max(r, 1))
                         for w, r in zip(ws, [0] + rates)], 1)
        expected.append(torch.autograd.grad(out, xs, values(grad))[0])
    # Every branch's terms in one sum: C * taps of each, plus the extra rounding of a second launch's sum.
    depth = c * (1 + 9 * len(rates)) + (1 if len(ws) > 8 else 0)
    assert_within(dx, expected[0], expected[1], depth, dtype, f"aspp grad x {kernel}", storage_roundings=2)


def _kernel_names(x, w):
    """Names of the CUDA kernels one bf16 conv forward and backward launch, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    def step():
        out = fastaspp.ops.atrous_conv2d(x, w, None, padding=2, dilation=2)
        torch.autograd.grad(out, [x, w], torch.ones_like(out))

    step()  # warm: image lookups
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return [e.key for e in prof.key_averages()]


def test_the_kernels_that_run_are_the_ones_chosen(kernel):
    """Which kernels a 16-bit forward and backward run: wgmma (Sm90Config, Sm90GwConfig) on a
    compute-capability 9.0 GPU with an sm_90a build (TORCH_CUDA_ARCH_LIST naming 9.0a, as
    benchmarks/gpu_run.sh builds), else mma.sync (Sm80Config, Sm80GwConfig); FASTASPP_CUDA_CONV=
    wgmma_wide and wgmma_deep run the conv on Sm90WideConfig and Sm90DeepConfig there, and wgmma_tma
    (this stride-1 conv) on conv_tma_kernel (the weight gradient as unset), sm80 and wmma force
    theirs. With FASTASPP_CUDA_SPLIT_K, the forward and the input gradient (9 patches, 18 K steps:
    two parts) are each followed by their split's second kernel. A wrong image check would
    otherwise let every other test pass on the fallback kernels."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 64, 17, 17, generator=g).to("cuda", torch.bfloat16, memory_format=torch.channels_last)
    w = torch.randn(64, 64, 3, 3, generator=g).to("cuda", torch.bfloat16)
    names = _kernel_names(x.requires_grad_(), w.requires_grad_())
    finalizers = [n for n in names if "conv_split_finalize_kernel" in n]
    convs = [n for n in names if "conv_" in n and "_kernel" in n and n not in finalizers]  # forward, input gradient
    wgrads = [n for n in names if "grad_weight_" in n and "finalize" not in n]
    sm90_build = "9.0a" in os.environ.get("TORCH_CUDA_ARCH_LIST", "") and torch.cuda.get_device_capability() == (9, 0)
    base = kernel.removesuffix("_split")
    if base == "wmma":
        conv, wgrad = "conv_wmma_kernel", "grad_weight_wmma_kernel"
    else:
        arch = "Sm90" if base in ("cute", "wgmma_wide", "wgmma_deep", "wgmma_tma") and sm90_build else "Sm80"
        conv, wgrad = f"{arch}Config", f"{arch}GwConfig"
        tiles = {"wgmma_wide": "Sm90WideConfig", "wgmma_deep": "Sm90DeepConfig", "wgmma_tma": "conv_tma_kernel"}
        if base in tiles and sm90_build:
            conv = tiles[base]
    assert len(convs) == 2 and all(conv in n for n in convs), (kernel, convs)
    assert len(wgrads) == 1 and wgrad in wgrads[0], (kernel, wgrads)
    # One second kernel per split launch: the forward's and the input gradient's instantiations.
    assert len(finalizers) == (2 if kernel.endswith("_split") else 0), (kernel, finalizers)
