"""Shapes, tolerances and error bounds shared by the tests.

Numeric tolerances: the rule for the whole suite
------------------------------------------------
A tolerance is an error bound derived from the computation, never a number that happened to pass
on one machine: the suite must pass on any x86 CPU (AVX2 or AVX-512 kernels, ATEN_CPU_CAPABILITY),
at any thread count and under load, where summation orders, SIMD widths, FMA and thread splits
differ, and so do both sides of a comparison.

1. Compare with float64, not fp32 with fp32: the reference runs in fp64 on the very values the
   kernel got (inputs cast to the kernel's dtype first, then widened), so only the kernel's own
   rounding is measured; the reference's rounding (gamma_n(2^-53)) is added to every bound.
2. Worst-case elementwise bound (Higham, Accuracy and Stability of Numerical Algorithms, 2nd ed.,
   §3.1, Lemma 3.3): a value made of sums of products, each term going through at most n roundings
   of unit roundoff u, is within gamma_n = n u / (1 - n u) of the sum of its terms' absolute values,
   in ANY summation order or blocking, with or without FMA, on any thread split. That sum, the
   magnitude M, is the same computation in fp64 on absolute values (conv_magnitude, magnitude_model;
   their autograd seeded with |grad| gives the gradients' magnitudes). ReLU is 1-Lipschitz and
   passes the bound on. n is stated where a bound is used: Cin*KH*KW for a conv's dot product plus
   its epilogue (CONV_EPILOGUE) and folded BN (BN_FOLD); N*Ho*Wo for a sum over pixels (weight,
   bias, scale gradients); Cout*KH*KW for an input gradient. u = 2^-24 (fp32), 2^-53 (fp64). Half
   types accumulate in fp32 and round to their storage type r times along a term's path (stated
   per test; the Triton interpreter truncates to bf16, a conversion then counts twice:
   per_conversion): ((1 + u_acc)^n (1 + u_h)^r - 1) M, u_h = 2^-11 (fp16), 2^-8 (bf16), u_acc = 2^-23
   (tensor-core adders may truncate). A composite chains the bound: errors passed on stay below
   gamma_n1 M1 and the next stage adds gamma_n2 of its own magnitude, so an eval ASPP (branches,
   then the projection over them) is within gamma_(n1+n2) of the composite's magnitude. Winograd
   (the cpu ASPP branches in eval) computes P((G w) * (B d)): its magnitude takes |P|, |G|, |B|
   (winograd_conv_magnitude), 20 to 350 times the direct conv's, which is where its extra error
   comes from; tests use it only where the bits show that Winograd ran.
   Gradients through a ReLU are compared term by term only where the masks cannot differ: every
   ReLU input of the exact run lies farther from 0 than the forward bound (assert_masks_unambiguous),
   or the op's reference takes its mask from the kernel's output.
3. Where no useful a-priori bound exists (batch statistics in training, whole networks, several
   steps), the yardstick is plain PyTorch: the fused and the plain module in the same dtype on the
   same inputs, each measured against the plain module in fp64; the fused error (2-norm) within 3x
   plain's plus 8 fp32 ulps (1 bf16 ulp) of the exact tensor's norm, or, for gradients through a
   training BN, of the gradient before the BN backward's cancellation (frozen_statistics):
   assert_as_accurate_as_plain. Test inputs keep every ReLU input of the exact run 1e-5 of its
   layer's scale away from 0 (assert_relu_margin), so that the three runs share their masks.
4. fp64 against fp64 with a fixed tolerance (1e-10 .. 1e-9 relative): both sides lie within
   gamma_n(2^-53) M, about 1e-16 n M; for the sizes there that is below 1e-12 of the scale, so the
   tolerance holds everywhere, and a real bug (a missing tap, a wrong scale) is off by far more.
   Whole-network training steps in fp64 take their bound from a plain fp32 step instead (its
   deviation from fp64 measures the conditioning: test_models.assert_fp64_agrees).
5. torch.autograd.gradcheck (fp64, eps=1e-6, atol=1e-6, rtol=1e-5): the functions are affine in
   each input (conv, bias, scale, shift) or quadratic (variances), so central differences are
   exact but for rounding, about u64 |f| / eps = 1e-10 |f|; ReLU kinks are kept away from the
   points (shifted pre-activations; fp64 data, the same on every machine).
6. The same computation twice (bitwise reproducibility, eager against a compiled or exported graph
   of the same kernels, a kept layout against a fresh one) is compared with torch.equal, or with
   torch.testing's fp32 defaults where a graph may re-associate the elementwise tail (a few ulps).

Every bound must still fail on a plausible bug (a dropped tap, a scale or shift off by 1e-3, a
divisor off by one, a missing pixel): each was checked by perturbing the kernel's input or output,
or the reference's parameters, in a scratch copy and seeing the tests fail (the test files say
which).
"""
import contextlib
import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from fastaspp import reference


@dataclass(frozen=True)
class ConvCase:
    n: int
    c_in: int
    c_out: int
    h: int
    w: int
    k: int = 3
    stride: int | tuple = 1
    padding: int | tuple = None  # None: "same" padding, dilation * (k - 1) / 2
    dilation: int | tuple = 1

    @property
    def pad(self):
        if self.padding is not None:
            return self.padding
        d = self.dilation if isinstance(self.dilation, int) else self.dilation[0]
        return d * (self.k - 1) // 2

    def __str__(self):
        return (f"n{self.n}_c{self.c_in}x{self.c_out}_{self.h}x{self.w}_k{self.k}"
                f"_s{self.stride}_p{self.pad}_d{self.dilation}").replace(" ", "")


# At least 30 combinations: ASPP-like rates on small maps, rates larger than the
# map, 1x1 maps, stride 2, odd channels, non-square maps, batch 1 and 0.
CASES = [
    ConvCase(2, 5, 7, 9, 11, dilation=2),
    ConvCase(1, 3, 4, 1, 1, dilation=6),            # 1x1 map, only the centre tap lives
    ConvCase(2, 4, 6, 1, 1, k=1),                   # 1x1 conv on a 1x1 map
    ConvCase(1, 8, 8, 5, 5, dilation=6),            # rate larger than the map
    ConvCase(2, 3, 5, 7, 7, dilation=12),           # rate much larger than the map
    ConvCase(1, 6, 4, 9, 9, dilation=4),            # partially live corner taps
    ConvCase(2, 4, 6, 8, 7, stride=2, padding=1),   # stride 2
    ConvCase(1, 5, 3, 9, 9, stride=2, dilation=2),  # stride 2 with dilation
    ConvCase(2, 3, 5, 9, 9, k=5, stride=2, padding=3, dilation=2),
    ConvCase(1, 4, 3, 6, 6, k=1),
    ConvCase(3, 7, 9, 6, 5, dilation=1),
    ConvCase(1, 16, 16, 8, 8, dilation=3),
    ConvCase(1, 9, 17, 7, 10, dilation=(1, 3), padding=(1, 3)),
    ConvCase(2, 5, 6, 10, 6, stride=(1, 2), dilation=(2, 1), padding=(2, 1)),
    ConvCase(1, 3, 3, 5, 5, padding=0, dilation=2),  # valid conv: no padding at all
    ConvCase(1, 3, 4, 6, 6, padding=4, dilation=2),  # padding larger than "same"
    ConvCase(1, 4, 4, 6, 9, padding=1, dilation=3),  # padding smaller than "same"
    ConvCase(0, 3, 4, 5, 5, dilation=2),             # empty batch
    ConvCase(0, 3, 4, 5, 5, k=1),
    ConvCase(1, 1, 1, 3, 3),                         # single channel
    ConvCase(1, 1, 5, 8, 8, dilation=2),
    ConvCase(2, 5, 1, 8, 8, dilation=3),
    ConvCase(1, 12, 20, 11, 11, dilation=6),
    ConvCase(1, 12, 20, 11, 11, dilation=9),
    ConvCase(2, 6, 8, 13, 13, dilation=18),
    ConvCase(1, 3, 5, 3, 17, dilation=4),
    ConvCase(1, 3, 5, 17, 3, dilation=4),
    ConvCase(1, 5, 7, 7, 7, k=5, dilation=1),
    ConvCase(1, 5, 7, 12, 12, k=5, dilation=3),
    ConvCase(1, 5, 7, 12, 12, k=7, dilation=2),
    ConvCase(2, 3, 4, 2, 2, stride=2, padding=1),
    ConvCase(1, 3, 4, 3, 3, stride=3, dilation=2),
    ConvCase(1, 20, 24, 4, 4, k=1, stride=2),
]

# The Triton interpreter takes seconds per call, so on a machine without a GPU the triton
# backend runs this subset (every kind of case once); the rest are marked slow for it (see
# conftest.py) and run in the GPU session, where triton runs for real.
GRADCHECK_CASES = [
    ConvCase(1, 2, 3, 5, 5, dilation=2),
    ConvCase(2, 3, 2, 4, 4, dilation=6),
    ConvCase(1, 2, 2, 6, 5, stride=2, padding=1),
    ConvCase(1, 2, 3, 5, 5, k=1),
    ConvCase(1, 2, 2, 7, 7, dilation=3, padding=(2, 4)),
]
OPCHECK_CASES = [ConvCase(2, 3, 4, 6, 6, dilation=2), ConvCase(1, 3, 5, 5, 7, stride=2, padding=1)]
INTERPRETER_CASES = {CASES[i] for i in (0, 1, 2, 4, 6, 8, 12, 13, 17, 21, 31)} | \
    {GRADCHECK_CASES[0], GRADCHECK_CASES[2], OPCHECK_CASES[1]}



# ---------------------------------------------------------------- rounding-error bounds (the rule above)
UNIT_ROUNDOFF = {torch.float64: 2.0 ** -53, torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11,
                 torch.bfloat16: 2.0 ** -8}
U64 = UNIT_ROUNDOFF[torch.float64]
# Half types accumulate in fp32; tensor-core adders may truncate instead of rounding: 2u for them.
HALF_ACCUMULATOR_U = 2.0 ** -23
# Roundings a conv's epilogue adds to a term of its output: the bias folded into the shift
# (bias * scale, + shift), the scale multiply, the shift add.
CONV_EPILOGUE = 4
# A BN in eval folded into (scale, shift) in fp32: var + eps, sqrt and divide (or rsqrt as two),
# * gamma; shift = beta - mean * scale: at most 6 roundings on any term.
BN_FOLD = 6


def gamma(n, u):
    """Higham's gamma_n = n u / (1 - n u), the relative error of n roundings of unit roundoff u."""
    assert n * u < 0.5, f"n = {n} roundings: too many for a worst-case bound in this precision"
    return n * u / (1 - n * u)


def relative_bound(depth, dtype, storage_roundings=0):
    """The bound on |computed - exact| / magnitude (rule 2): `depth` roundings in dtype's
    accumulator (fp64 for fp64, fp32 otherwise) and `storage_roundings` to dtype itself (half
    types), plus the fp64 reference's own depth roundings."""
    if dtype in (torch.float64, torch.float32):
        own = gamma(depth, UNIT_ROUNDOFF[dtype])
    else:
        own = (1 + HALF_ACCUMULATOR_U) ** depth * (1 + UNIT_ROUNDOFF[dtype]) ** storage_roundings - 1
    return own + gamma(depth, U64)


def per_conversion(backend, dtype):
    """Roundings one conversion to a half storage type counts for: 1, or 2 under the Triton
    interpreter, whose fp32 -> bf16 conversion truncates (error below 2 u_h, one ulp)."""
    interpreted = backend == "triton" and os.environ.get("TRITON_INTERPRET") == "1"
    return 2 if interpreted and dtype == torch.bfloat16 else 1


def folded_shift_roundings(backend, dtype):
    """Roundings of a bias folded into the shift, beta = bias * scale + shift: the cuda kernels read
    beta in the activations' dtype (csrc/cuda/atrous_conv_cuda.cpp folds it in fp32, then rounds it
    to a 16-bit dtype once), the others in the accumulator's. |beta' - beta| <= u_h |beta| and
    |beta| <= (|bias| |scale| + |shift|) <= magnitude: one rounding at the storage unit."""
    return 1 if backend == "cuda" and dtype in (torch.float16, torch.bfloat16) else 0


@contextlib.contextmanager
def environ(**values):
    """Environment variables set for a block (the cpu backend reads its switches on every call)."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def absolute(v):
    """|v| in fp64 (None stays None): an input of a magnitude computation."""
    return None if v is None else v.detach().to(torch.float64).abs()


def conv_magnitude(x, w, b=None, s=None, t=None, stride=1, padding=0, dilation=1):
    """Elementwise sum of |terms| of (conv(x, w) + b) * s + t: the fp64 reference on absolute values."""
    return reference.atrous_conv2d(absolute(x), absolute(w), absolute(b), stride, padding, dilation,
                                   scale=absolute(s), shift=absolute(t))


def assert_within(actual, exact, magnitude, depth, dtype, what="", storage_roundings=0):
    """|actual - exact| <= relative_bound(depth, dtype, storage_roundings) * magnitude, elementwise
    (rule 2). exact is the fp64 reference on actual's inputs, magnitude the same on their absolute
    values. Half types add u_h * smallest normal per rounding for gradual underflow (scaled by the
    coefficients that follow, below 4 in magnitude in these tests)."""
    actual = actual.detach().to(torch.float64)
    exact = exact.detach().to(device=actual.device, dtype=torch.float64)
    bound = relative_bound(depth, dtype, storage_roundings) * magnitude.detach().to(exact)
    if dtype in (torch.float16, torch.bfloat16):
        bound = bound + 4 * (depth + storage_roundings) * torch.finfo(dtype).smallest_normal * UNIT_ROUNDOFF[dtype]
    assert actual.shape == exact.shape == bound.shape, (what, actual.shape, exact.shape, bound.shape)
    err = (actual - exact).abs()
    bad = ~(err <= bound)  # NaN fails too
    if bad.any():
        ratio = torch.where(bad, err / bound.clamp_min(1e-300), torch.zeros_like(err))
        i = np.unravel_index(int(ratio.flatten().nan_to_num(float("inf")).argmax()), tuple(err.shape))
        raise AssertionError(
            f"{what} ({dtype}, {depth} roundings, {storage_roundings} to storage): {int(bad.sum())} of "
            f"{err.numel()} elements outside the rounding bound; worst at {tuple(int(k) for k in i)}: "
            f"|{actual[i].item():.9g} - {exact[i].item():.9g}| = {err[i].item():.3g} > {bound[i].item():.3g} "
            f"(magnitude {magnitude[i].item():.3g})")


def assert_statistics_within(mean, var, z, error, u, what=""):
    """Batch mean and biased variance over (N, H, W) computed from a kernel's accumulators z' with
    |z' - z| <= error elementwise (z exact, fp64; error 0 when z is the kernel's own output), the
    way fastaspp.ops.aspp_train documents it: per-patch count, sum and centred sum of squares M2,
    merged by Chan et al.'s formula (M2 = M2_a + M2_b + n_a n_b / n * delta^2, delta the patches'
    mean difference), in precision u (rule 2).

    With m = N*H*W per channel, A = max|z'|, L = log2(m) and g = gamma_(m+6) (with the fp64
    reference's u): a sum of m terms in any order and merge tree, then a division, errs by at most
    g * mean|z'| <= g A; so does every patch or merged mean.
      mean: |mean' - mean(z)| <= mean(error) + g A.
      var:  the variance of z' differs from that of z by at most s = 2 mean(|z - mean| error) +
            mean(error^2); the sums of squares are sums of non-negative terms (relative error g);
            a merge's delta is off by at most 2 g A, sum(n_a n_b / n) <= m L over any merge tree and
            sum(n_a n_b / n * delta^2) <= m var, so Cauchy-Schwarz bounds the merges' error by
            4 g A sqrt(L var) to first order and 8 g^2 A^2 L beyond."""
    m = z.numel() // max(z.shape[1], 1)
    dims = (0, 2, 3)
    z = z.detach().double()
    error = error.detach().double().to(z.device) if torch.is_tensor(error) else torch.zeros_like(z)
    var_ref, mean_ref = torch.var_mean(z, dim=dims, unbiased=False)
    g = gamma(m + 6, u + U64)
    big = (z.abs() + error).amax(dim=dims)
    levels = max(1.0, math.log2(max(m, 1)))
    mean_bound = error.mean(dims) + g * big
    s = 2 * ((z - mean_ref.view(1, -1, 1, 1)).abs() * error).mean(dims) + (error ** 2).mean(dims)
    var_bound = s + g * (var_ref + s) + 4 * g * big * (levels * (var_ref + s)).sqrt() + 8 * g * g * big * big * levels
    for name, got, exact, bound in (("mean", mean, mean_ref, mean_bound), ("var", var, var_ref, var_bound)):
        err = (got.detach().double().to(exact.device) - exact).abs()
        assert (err <= bound).all(), (f"{what} {name}: |{got.tolist()} - {exact.tolist()}| = {err.tolist()} "
                                      f"exceeds {bound.tolist()}")


def assert_as_accurate_as_plain(fused, plain, exact, what="", dtype=torch.float32, factor=3.0, floor_ulps=8,
                                floor_scale=None):
    """Rule 3: the fused result's distance from the fp64 result (2-norm) is at most `factor` times plain
    PyTorch's in the same dtype, plus floor_ulps of dtype's eps times the exact tensor's norm (or
    floor_scale where the exact value is itself rounding noise)."""
    exact = exact.detach().double()
    err_fused = (fused.detach().double().to(exact.device) - exact).norm().item()
    err_plain = (plain.detach().double().to(exact.device) - exact).norm().item()
    scale = exact.norm().item() if floor_scale is None else floor_scale
    floor = floor_ulps * torch.finfo(dtype).eps * scale
    assert err_fused <= factor * err_plain + floor, (
        f"{what}: fused is {err_fused:.3g} from fp64, more than {factor} x plain's {err_plain:.3g} + {floor:.3g}")


# ---------------------------------------------------------------- Winograd (the cpu ASPP branches in eval)
# A Python twin of csrc/cpu/winograd.cpp's plans: per axis, a sub-grid of s pixels (those of one
# residue mod the rate) in tiles of m outputs, each y = P((G w) * (B d)) over its m + 2 inputs d.
_WINOGRAD_POINTS = (0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5)  # winograd.cpp's kPoints; infinity last
_WINOGRAD_MAX_TILE = 6


def _evaluation(points, coeffs):
    e = np.zeros((points, coeffs))
    for i in range(points - 1):
        e[i] = [_WINOGRAD_POINTS[i] ** j for j in range(coeffs)]
    e[points - 1, coeffs - 1] = 1.0
    return e


def _toom_cook(m, r):
    a = m + r - 1
    return _evaluation(a, m).T, _evaluation(a, r), np.linalg.inv(_evaluation(a, a)).T  # at, g, bt


def winograd_axis_plan(s):
    """(m, tiles, weight_t [points, 3], input_t [points, m + 2], output_t [m, points]) of axis_plan(s)."""
    if s == 1:
        return 1, 1, np.array([[0.0, 1.0, 0.0]]), np.array([[0.0, 1.0, 0.0]]), np.array([[1.0]])
    if s == 2:  # F(2,2) with the roles of data and filter swapped
        at, g, bt = _toom_cook(2, 2)
        input_t = np.zeros((3, 4))
        input_t[:, 1], input_t[:, 2] = g[:, 0], g[:, 1]
        return 2, 1, bt, input_t, np.stack([at[1], at[0]])
    m = min(s, _WINOGRAD_MAX_TILE)
    tiles = math.ceil(s / m)
    at, g, bt = _toom_cook(m, 3)
    return m, tiles, g, bt, at


def winograd_axis_work(size, rate):
    """(tiles, products) along one axis (winograd.cpp's axis_work): every sub-grid padded to whole
    tiles of the axis' plan."""
    _, tiles, weight_t, _, _ = winograd_axis_plan(math.ceil(size / rate))
    grids = min(rate, size)
    return grids * tiles, grids * tiles * weight_t.shape[0]


def live_pairs(size, rate):
    """Live (pixel, tap) pairs along one axis of a 3x3 conv at padding = dilation = rate."""
    return sum(max(0, min(size, size - k * rate) - max(0, -k * rate)) for k in (-1, 0, 1))


def expect_winograd(h, w, rate, against_onednn=False, batch=1, c_in=0, c_out=0):
    """winograd.cpp's use_winograd for a kept fp32/fp64 weight: products at most 80% of the live pairs
    against the tap GEMMs; against oneDNN a channel depth c_in*c_out/(c_in+c_out) of at least 48, at
    least 32 tiles, and products at most 50% (depth >= 192) or 32% of the live pairs."""
    (tiles_h, products_h), (tiles_w, products_w) = winograd_axis_work(h, rate), winograd_axis_work(w, rate)
    share = products_h * products_w / (live_pairs(h, rate) * live_pairs(w, rate))
    if not against_onednn:
        return share <= 0.8
    depth = c_in * c_out / (c_in + c_out) if c_in + c_out else 0.0
    if depth < 48 or batch * tiles_h * tiles_w < 32:
        return False
    return share <= (0.5 if depth >= 192 else 0.32)


def _winograd_axis(size, rate, absolute_values):
    """[size, 3, size]: output o's coefficient of tap k times input j along one axis, summed over the
    plan's points with the transforms' entries (|entries| when absolute_values)."""
    m, tiles, wt, it, ot = winograd_axis_plan(math.ceil(size / rate))
    if absolute_values:
        wt, it, ot = np.abs(wt), np.abs(it), np.abs(ot)
    coef = np.einsum("ip,pk,pj->ikj", ot, wt, it)  # [m, 3, m + 2]
    a = np.zeros((size, 3, size))
    for residue in range(min(rate, size)):
        for tile in range(tiles):
            for i in range(m):
                o = (tile * m + i) * rate + residue
                if o >= size:
                    continue
                for j in range(m + 2):
                    k = tile * m + j - 1
                    p = k * rate + residue
                    if k >= 0 and p < size:
                        a[o, :, p] += coef[i, :, j]
    return torch.from_numpy(a)


def winograd_conv_magnitude(x, w, rate, absolute_values=True):
    """The magnitude of the cpu backend's Winograd 3x3 conv (padding = dilation = rate): the sum of
    |terms| of P_h P_w ((G_h G_w w) * (B_h B_w d)) summed over channels, per output; with
    absolute_values=False the same contraction is the conv itself (how this twin is checked)."""
    x, w = x.detach().double(), w.detach().double()
    if absolute_values:
        x, w = x.abs(), w.abs()
    ah = _winograd_axis(x.shape[2], rate, absolute_values).to(x.device)
    aw = _winograd_axis(x.shape[3], rate, absolute_values).to(x.device)
    t = torch.einsum("akj,ncjw->nckaw", ah, x)            # along h: [N, Cin, kh, H, W]
    t = torch.einsum("blw,nckaw->ncklab", aw, t)          # along w: [N, Cin, kh, kw, H, W]
    return torch.einsum("ockl,ncklab->noab", w, t)


def winograd_depth(c_in):
    """Roundings on a term of a Winograd output in winograd.cpp: the input transform along each axis
    (rounded coefficient, product, up to 7 additions: 9 each), the weight transform (rounded
    coefficient, product, 2 additions: 4 each), the product, the Cin-long sum over channels, and
    the output transform along each axis (coefficient, product, up to 7 additions: 9 each)."""
    return 2 * 9 + 2 * 4 + c_in + 2 * 9


def aspp_branches_bound(x, weights, rates, scale, shift, relu=True, winograd=False):
    """(exact, magnitude, depth) of fastaspp.ops.aspp_branches: every conv branch in fp64 on the same
    inputs, its magnitude, and the roundings on a term (rule 2). With winograd (the cpu backend,
    weights that keep their transforms), a 3x3 branch that winograd.cpp may run takes the
    Winograd magnitude, which bounds the direct one too (|sum| <= sum of ||)."""
    import torch.nn.functional as F

    x64, h, w, c_in = x.detach().double(), x.shape[2], x.shape[3], x.shape[1]
    exact, magnitude, depth = [], [], 0
    for i, weight in enumerate(weights):
        w64 = weight.detach().double()
        if i == 0:
            exact.append(F.conv2d(x64, w64))
            magnitude.append(F.conv2d(x64.abs(), w64.abs()))
            depth = max(depth, c_in)
            continue
        r = rates[i - 1]
        exact.append(F.conv2d(x64, w64, padding=r, dilation=r))
        if winograd and expect_winograd(h, w, r):
            magnitude.append(winograd_conv_magnitude(x64, w64, r))
            depth = max(depth, winograd_depth(c_in))
        else:
            magnitude.append(F.conv2d(x64.abs(), w64.abs(), padding=r, dilation=r))
            depth = max(depth, 9 * c_in)
    s64, t64 = (v.detach().to(x64.device, torch.float64).view(1, -1, 1, 1) for v in (scale, shift))
    exact = torch.cat(exact, 1) * s64 + t64
    return (exact.relu() if relu else exact), torch.cat(magnitude, 1) * s64.abs() + t64.abs(), depth + CONV_EPILOGUE


def magnitude_model(module):
    """A float64 copy of `module` that computes the magnitude of its eval forward (rule 2): every
    parameter by its absolute value, every BN's running mean by minus its absolute value (so that
    eval BN gives (|z| + |mean|) |gamma| / sqrt(var + eps) + |beta|). ReLU, average pooling,
    bilinear upsampling, max pooling and residual sums pass magnitudes on as they are; its
    autograd gives the magnitudes of the gradients (seeded with |grad|)."""
    import copy

    m = copy.deepcopy(module).double().eval()
    with torch.no_grad():
        for p in m.parameters():
            p.abs_()
        for sub in m.modules():
            if isinstance(sub, torch.nn.modules.batchnorm._BatchNorm) and sub.running_mean is not None:
                sub.running_mean.abs_().neg_()
    return m


@contextlib.contextmanager
def recording_relu_inputs(module):
    """Collects the input of every nn.ReLU of `module` during the block, in call order."""
    seen = []
    hooks = [r.register_forward_pre_hook(lambda _, inp: seen.append(inp[0].detach()))
             for r in module.modules() if isinstance(r, torch.nn.ReLU)]
    try:
        yield seen
    finally:
        for h in hooks:
            h.remove()


def relu_inputs(module, x):
    """The inputs of every nn.ReLU of `module` on x, in call order."""
    with recording_relu_inputs(module) as seen:
        module(x)
    return seen


def assert_relu_margin(inputs, margin=1e-5):
    """Rule 3's runs share their ReLU masks: no ReLU input of the exact run (recording_relu_inputs)
    lies within `margin` of its layer's largest |input| from 0. fp32 errors of these inputs are
    below 1e-6 of that scale (plain PyTorch's, measured ~1e-7, and the fused ones within 3x of
    plain's: the rule itself), so no mask flips between the fused, plain and exact runs; a flip
    would change a gradient by a whole term, which no rounding tolerance should absorb. A property
    of the fp64 test data, the same on every machine."""
    for i, p in enumerate(inputs):
        if p.numel():
            closest = (p.abs().min() / p.abs().max().clamp_min(1e-300)).item()
            assert closest > margin, f"ReLU {i}: an input {closest:.3g} of its layer's scale from 0 (test data)"


def assert_masks_unambiguous(exact_module, x, relative):
    """Every ReLU input of the exact run lies farther from 0 than relative * its magnitude
    (magnitude_model), so no run within that rounding bound can flip a ReLU mask: gradients are then
    compared term by term. A flip would change a gradient by a whole term, not by rounding."""
    with torch.no_grad():
        pre = relu_inputs(exact_module, x.detach().double())
        mags = relu_inputs(magnitude_model(exact_module), x.detach().double().abs())
    for i, (p, m) in enumerate(zip(pre, mags)):
        closest = (p.abs() / m.clamp_min(1e-300)).min().item()
        assert closest > relative, f"ReLU {i}: an input within {closest:.3g} of its magnitude from 0 (test data)"


def frozen_statistics(module, x, seed=None):
    """A copy of a training `module` (fp64) whose BNs normalise with this batch's statistics as fixed
    running statistics (eval), other modules (dropout) as they are: the same forward as module(x),
    whose gradients are the batch-norm backward's first term alone, before the batch statistics'
    terms cancel part of it. Their norms are the scale of the terms a training gradient is summed
    from: rounding errors scale with them, not with what is left after the cancellation."""
    import copy

    frozen = copy.deepcopy(module)
    stats = {}
    bns = [m for m in frozen.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training]

    def record(bn, inputs):
        stats[bn] = torch.var_mean(inputs[0], dim=[d for d in range(inputs[0].dim()) if d != 1], unbiased=False)

    hooks = [bn.register_forward_pre_hook(record) for bn in bns]
    try:
        with torch.no_grad():
            if seed is not None:
                torch.manual_seed(seed)
            frozen(x.detach())
    finally:
        for h in hooks:
            h.remove()
    with torch.no_grad():
        for bn, (var, mean) in stats.items():
            bn.running_mean.copy_(mean)
            bn.running_var.copy_(var)
            bn.eval()
    return frozen
