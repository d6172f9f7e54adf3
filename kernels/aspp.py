"""Triton ASPP branches (eval mode) of fastaspp: b0..bR of DESIGN.md §2 written into one buffer.

Contract:

    aspp_branches_forward(x, weights, rates, scale, shift, relu=True) -> y
        x [N, Cin, H, W]; weights = [w0, w1, ..., wR]: w0 [C, Cin, 1, 1] is the 1x1 branch,
        wi [C, Cin, 3, 3] (i >= 1) the 3x3 branch with dilation = padding = rates[i-1]
        (rates: R >= 0 ints >= 1; a rate may exceed the map).  scale, shift [(1+R)*C]: BN folded
        per branch (DESIGN.md §2.3), concatenated in branch order.
        y [N, (1+R)*C, H, W] with channels_last (dense NHWC) storage; channels [i*C, (i+1)*C)
        hold act(conv_i(x) * scale[i*C:(i+1)*C] + shift[i*C:(i+1)*C]) (act = ReLU if relu), i.e.
        torch.cat([branch_0, ..., branch_R], 1) without the cat (§2.5: each branch's epilogue
        stores straight into its channel slice).  Batch 0 returns the empty buffer.

    aspp_branches_stats_forward(x, weights, rates) -> (z, mean, var)
        z = aspp_branches_forward(x, weights, rates, 1, 0, relu=False); mean, var [(1+R)*C]: z's
        per-channel batch mean and biased variance (fp32, fp64 for fp64), from the epilogues.
    affine_relu_project_forward(z, centre, scale, shift, weight, image_bias) -> (y, mean, var)
        y = weight [Cout, K] applied to relu((z - centre) * scale + shift) (a GEMM prologue) + image_bias
        [N, Cout] per image; y [N, Cout, H, W] channels_last; mean, var: y's batch statistics.

Same dtypes as kernels/atrous_conv.py (float32, float16, bfloat16, float64, accumulated in
float32 / float64); weights, scale and shift must have x's dtype and device.  x is converted to
NHWC once and shared by all branches.

Each branch is one atrous_conv2d_forward_into launch, which already skips dead taps (§2.1): at
rates larger than the map only the centre tap of a 3x3 branch runs.  Not exploited yet on this
backend: the shared centre tap (§2.2) -- b0 and the centre taps of b1..bR read the same pixels
and could be one GEMM with N = (1+R)*C; here each branch reads x for it separately.  The pooling
branch and the projection (§2.4, §2.5 back-to-back GEMM) are not part of this function.
"""

import operator

import torch

from .atrous_conv import _nhwc_empty, atrous_conv2d_forward_into, merge_stats, stats_buffer


def _check_args(x, weights, rates, scale, shift):
    """Validates the ASPP-specific structure; returns (C, weights as a list, rates as ints)."""
    for name, t in (("x", x), ("scale", scale), ("shift", shift)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor [N, Cin, H, W], got shape {tuple(x.shape)}")
    try:
        rates = tuple(rates)
    except TypeError:
        raise TypeError(f"rates must be a sequence of ints, got {rates!r}") from None
    for r in rates:
        if isinstance(r, bool) or not hasattr(r, "__index__"):
            raise TypeError(f"rates must be a sequence of ints, got {rates!r}")
    rates = tuple(operator.index(r) for r in rates)
    if any(r < 1 for r in rates):
        raise ValueError(f"rates must be >= 1, got {rates}")
    weights = list(weights)
    if len(weights) != 1 + len(rates):
        raise ValueError(f"weights must hold 1 + len(rates) = {1 + len(rates)} tensors "
                         f"(the 1x1 branch, then one 3x3 per rate), got {len(weights)}")
    if not isinstance(weights[0], torch.Tensor) or weights[0].dim() != 4:
        raise ValueError("weights[0] must be a 4-D tensor [C, Cin, 1, 1]")
    c, cin = weights[0].shape[0], x.shape[1]
    for i, w in enumerate(weights):
        k = 1 if i == 0 else 3
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != (c, cin, k, k):
            got = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
            raise ValueError(f"weights[{i}] must have shape [C={c}, Cin={cin}, {k}, {k}], "
                             f"got {got}")
    for name, t in [(f"weights[{i}]", w) for i, w in enumerate(weights)] + [
            ("scale", scale), ("shift", shift)]:
        if t.dtype != x.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}; they must match")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    for name, t in (("scale", scale), ("shift", shift)):
        if tuple(t.shape) != ((1 + len(rates)) * c,):
            raise ValueError(f"{name} must be 1-D of length (1 + R) * C = {(1 + len(rates)) * c}, "
                             f"got shape {tuple(t.shape)}")
    return c, weights, rates


def aspp_branches_forward(x, weights, rates, scale, shift, relu=True, stats=None):
    """The ASPP conv branches, scaled, shifted (BN folded in eval) and optionally ReLU'd, concatenated:
    [N, (1+R)*C, H, W] channels_last. With stats (a stats_buffer of the result), every branch's
    epilogue also records its per-patch BN statistics there."""
    c, weights, rates = _check_args(x, weights, rates, scale, shift)
    n, _, h, w = x.shape
    y = _nhwc_empty(n, (1 + len(rates)) * c, h, w, x)
    if y.numel() == 0:
        return y
    x = x.contiguous(memory_format=torch.channels_last)  # once, not once per branch
    for i, wt in enumerate(weights):
        r = rates[i - 1] if i else 0  # the 1x1 branch: no padding (its dilation is irrelevant)
        sl = slice(i * c, (i + 1) * c)
        atrous_conv2d_forward_into(x, wt, scale[sl], shift[sl], (1, 1), (r, r),
                                   (max(r, 1),) * 2, bool(relu), y, i * c, stats=stats)
    return y


def _acc_dtype(t):
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _empty_stats(t, channels):
    return (t.new_zeros(channels, dtype=_acc_dtype(t)),) * 2


def aspp_branches_stats_forward(x, weights, rates):
    """Training forward of the branches: (z, mean, var). z = the raw conv outputs [N, (1+R)*C, H, W]
    (channels_last, x's dtype); mean, var [(1+R)*C] = their per-channel BN batch statistics (biased
    variance over N*H*W, fp32 or fp64), gathered in the conv epilogues (DESIGN.md §2.6) from the
    unrounded accumulators. Zeros when N*H*W == 0."""
    total = len(list(weights)) * weights[0].shape[0]
    ones, zeros = x.new_ones(total), x.new_zeros(total)
    n, _, h, w = x.shape
    if n * h * w == 0:
        _check_args(x, weights, rates, ones, zeros)
        return (_nhwc_empty(n, total, h, w, x), *_empty_stats(x, total))
    stats = stats_buffer(_nhwc_empty(n, total, h, w, x[:0]))
    z = aspp_branches_forward(x, weights, rates, ones, zeros, relu=False, stats=stats)
    return (z, *merge_stats(stats))


def affine_relu_project_forward(z, centre, scale, shift, weight, image_bias):
    """The projection of a training ASPP: (y, mean, var) with
    y[n, o] = sum_k weight[o, k] * relu((z[n, k] - centre[k]) * scale[k] + shift[k]) + image_bias[n, o].

    z [N, K, H, W] (any layout); centre, scale, shift [K] (the branch BN: batch mean, γ/σ, β);
    weight [Cout, K]; image_bias [N, Cout] (the pooling branch through its projection slice).
    the normalize + ReLU is applied as z is loaded (a GEMM prologue), never stored. y
    [N, Cout, H, W] channels_last in z's dtype; mean, var [Cout]: y's BN batch statistics from
    the epilogue, as aspp_branches_stats_forward's. Arguments are validated by the caller.
    """
    n, k, h, w = z.shape
    cout = weight.shape[0]
    y = _nhwc_empty(n, cout, h, w, z)
    if y.numel() == 0:
        return (y, *_empty_stats(z, cout))
    stats = stats_buffer(y)
    ones = z.new_ones(cout)
    atrous_conv2d_forward_into(z, weight.reshape(cout, k, 1, 1), ones, torch.zeros_like(ones), (1, 1), (0, 0),
                               (1, 1), False, y, 0, prologue=(centre, scale, shift), image_bias=image_bias,
                               stats=stats)
    return (y, *merge_stats(stats))
