"""Triton ASPP branches (eval mode) of fastaspp: b0..bR of docs/design.md §1 written into one buffer.

Contract:

    aspp_branches_forward(x, weights, rates, scale, shift, relu=True) -> y
        x [N, Cin, H, W]; weights = [w0, w1, ..., wR]: w0 [C, Cin, 1, 1] is the 1x1 branch,
        wi [C, Cin, 3, 3] (i >= 1) the 3x3 branch with dilation = padding = rates[i-1]
        (rates: R >= 0 ints >= 1; a rate may exceed the map).  scale, shift [(1+R)*C]: BN folded
        per branch (docs/design.md §3), concatenated in branch order.
        y [N, (1+R)*C, H, W] with channels_last (dense NHWC) storage; channels [i*C, (i+1)*C)
        hold act(conv_i(x) * scale[i*C:(i+1)*C] + shift[i*C:(i+1)*C]) (act = ReLU if relu), i.e.
        torch.cat([branch_0, ..., branch_R], 1) without the cat (§4: each branch's epilogue
        stores straight into its channel slice).  Batch 0 returns the empty buffer.

    aspp_branches_stats_forward(x, weights, rates) -> (z, mean, var)
        z = aspp_branches_forward(x, weights, rates, 1, 0, relu=False); mean, var [(1+R)*C]: z's
        per-channel batch mean and biased variance (fp32, fp64 for fp64), from the epilogues.
    aspp_branches_grad_input(grad, weights, rates, input_size) -> dx
        d/dx of sum(grad * aspp_branches_forward(x, weights, rates, 1, 0, relu=False)): every
        branch's transposed convolution summed in one accumulator, one launch; dx NHWC storage.
    affine_relu_project_forward(z, centre, scale, shift, weight, image_bias) -> (y, mean, var)
        y = weight [Cout, K] applied to relu((z - centre) * scale + shift) (a GEMM prologue) + image_bias
        [N, Cout] per image; y [N, Cout, H, W] channels_last; mean, var: y's batch statistics.

Same dtypes as kernels/atrous_conv.py (kernels/launch.py); weights, scale and shift must have x's
dtype and device.  x is converted to NHWC once and shared by all branches.

All branches are ONE launch of _aspp_branches_kernel: grid axis 1 runs over (branch, channel
block), so every branch's patches are in flight together. One branch alone has few programs at
batch 1 (33x33 with 128-pixel patches: 9 patches x 2 channel blocks, for 132 SMs on an H100), and
four launches in a row also paid four launch overheads. Each program skips the taps that read only
padding for its patch (§2), the same tap loop as kernels/atrous_conv.py (accumulate_tap): at
rates larger than the map only the centre tap of a 3x3 branch runs. The weights go in packed,
tap-major, kept for weights that take no gradient.

Not exploited on this backend: the shared centre tap (§4). b0 and the centre taps of b1..bR read
the same pixels; sharing the read needs every branch's accumulator in one program (R+1 of them per
patch) or an fp32 round trip of the centre sums, and it saves loads (mostly L2 hits), no MACs, so
it waits for a GPU measurement. The pooling branch and the projection (§5, the back-to-back
GEMM) are not part of this function.
"""

import functools

import torch
import triton
import triton.language as tl

from fastaspp._rules import accumulator_dtype

from .atrous_conv import atrous_conv2d_forward_into
from .implicit_gemm import (accumulate_tap, epilogue, merge_stats, nhwc_empty, program_patch, stats_buffer,
                            tile_shape, unread_stats)
from .kept import KeptCopies
from .launch import CONV_CONFIGS, CONV_PRUNE, cdiv, dtype_meta, launch_ctx, launch_tuned


@triton.autotune(configs=CONV_CONFIGS, key=["N", "H", "W", "Cin", "C", "BRANCHES"], prune_configs_by=CONV_PRUNE,
                 reset_to_zero=["stats_ptr"])
@triton.heuristics({"TILE_H": lambda a: tile_shape(a["H"], a["W"], a["BLOCK_M"])[0],
                    "TILE_W": lambda a: tile_shape(a["H"], a["W"], a["BLOCK_M"])[1]})
@triton.jit
def _aspp_branches_kernel(
    x_ptr,  # [N, H, W, Cin]
    w_ptr,  # packed: the 1x1 branch [Cin, C], then each 3x3 branch [9, Cin, C]
    rates_ptr,  # [BRANCHES] int32: 0 for the 1x1 branch, then the rates
    scale_ptr, shift_ptr,  # [BRANCHES * C] when AFFINE (else scale 1, shift 0)
    y_ptr,  # [N, H, W, BRANCHES * C]
    stats_ptr,  # [3, rows, BRANCHES * C] when STATS
    N, H, W, Cin, C, BRANCHES, stats_plane,
    RELU: tl.constexpr, STATS: tl.constexpr, AFFINE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):
    """Every branch in one launch: axis 1 runs over (branch, channel block), so all branches' patches
    are in flight together (one branch's grid alone fills few SMs at batch 1)."""
    n, oh, ow, oh0, ow0, oh_end, ow_end = program_patch(tl.program_id(0), H, W, BLOCK_M, TILE_H, TILE_W)
    blocks_n = tl.cdiv(C, BLOCK_N)
    branch = tl.program_id(1) // blocks_n
    offs_n = tl.program_id(1) % blocks_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < C
    rate = tl.load(rates_ptr + branch)
    one_by_one = branch == 0
    # The 1x1 branch is the centre tap (offset 0) of a 3x3 whose other taps are switched off.
    w_branch = w_ptr + tl.where(one_by_one, 0, 9 * branch - 8).to(tl.int64) * Cin * C
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for tap in range(0, 9):
        slot = tl.where(one_by_one, 0, tap)
        acc = accumulate_tap(acc, (tap == 4) | (branch > 0), x_ptr, w_branch + slot * Cin * C, x_ptr, x_ptr,
                              x_ptr, n, oh, ow, oh0, ow0, oh_end, ow_end, (tap // 3 - 1) * rate,
                              (tap % 3 - 1) * rate, H, W, H, W, Cin, C, Cin, 1, 1, offs_n, n_ok, False, ACC_DTYPE,
                              DOT_DTYPE, DOT_PRECISION, BLOCK_K)
    epilogue(acc, scale_ptr + branch * C, shift_ptr + branch * C, scale_ptr, y_ptr, stats_ptr, n, oh, ow, oh_end,
              ow_end, H, W, C, offs_n, n_ok, BRANCHES * C, branch * C, stats_plane, RELU, False, STATS, ACC_DTYPE,
              AFFINE, AFFINE)


@triton.autotune(configs=CONV_CONFIGS, key=["N", "H", "W", "Cin", "C", "BRANCHES"], prune_configs_by=CONV_PRUNE)
@triton.heuristics({"TILE_H": lambda a: tile_shape(a["H"], a["W"], a["BLOCK_M"])[0],
                    "TILE_W": lambda a: tile_shape(a["H"], a["W"], a["BLOCK_M"])[1]})
@triton.jit
def _aspp_grad_input_kernel(
    g_ptr,  # [N, H, W, BRANCHES * C]: the gradient of the branches' buffer
    w_ptr,  # packed transposed tap matrices: the 1x1 branch [C, Cin], then each 3x3 branch [9, C, Cin]
    rates_ptr,  # [BRANCHES] int32: 0 for the 1x1 branch, then the rates
    dx_ptr,  # [N, H, W, Cin]
    N, H, W, Cin, C, BRANCHES,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):
    """dx = sum over branches and taps of the gradient shifted back by the tap's offset @ its weight
    transposed, in one accumulator: one launch and one store of dx for the whole ASPP (stride 1, so
    input and output pixels are the same grid). Taps skipped per patch as in the forward."""
    n, ih, iw, ih0, iw0, ih_end, iw_end = program_patch(tl.program_id(0), H, W, BLOCK_M, TILE_H, TILE_W)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels
    n_ok = offs_n < Cin
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for branch in range(0, BRANCHES):
        rate = tl.load(rates_ptr + branch)
        one_by_one = branch == 0
        w_branch = w_ptr + tl.where(one_by_one, 0, 9 * branch - 8).to(tl.int64) * Cin * C
        for tap in range(0, 9):
            slot = tl.where(one_by_one, 0, tap)
            # Output pixel o read input o + off in the forward, so input i takes the gradient at i - off.
            acc = accumulate_tap(acc, (tap == 4) | (branch > 0), g_ptr + branch * C, w_branch + slot * Cin * C,
                                  g_ptr, g_ptr, g_ptr, n, ih, iw, ih0, iw0, ih_end, iw_end, -(tap // 3 - 1) * rate,
                                  -(tap % 3 - 1) * rate, H, W, H, W, C, Cin, BRANCHES * C, 1, 1, offs_n, n_ok, False,
                                  ACC_DTYPE, DOT_DTYPE, DOT_PRECISION, BLOCK_K)
    dx_rows = ((n.to(tl.int64) * H + ih) * W + iw) * Cin
    store_ok = ((ih < ih_end) & (iw < iw_end))[:, None] & n_ok[None, :]
    tl.store(dx_ptr + dx_rows[:, None] + offs_n[None, :], acc.to(dx_ptr.dtype.element_ty), mask=store_ok)


def aspp_branches_grad_input(grad, weights, rates, input_size):
    """d/dx of sum(aspp_branches_forward(x, weights, rates, 1, 0, relu=False) * grad) in one launch:
    grad [N, (1+R)*C, H, W] (any layout; read NHWC); returns dx [N, Cin, H, W] with NHWC storage.
    Arguments are validated by the caller."""
    n, cin, h, w = (int(v) for v in input_size)
    c = weights[0].shape[0]
    branches = len(weights)
    acc_dt, dot_dt, prec = dtype_meta(grad.dtype)
    dx = nhwc_empty(n, cin, h, w, grad)
    if dx.numel() == 0:
        return dx
    if c == 0:
        return dx.zero_()
    g = grad.contiguous(memory_format=torch.channels_last)
    rates_t = _rates_tensor(tuple(int(r) for r in rates), grad.device)

    def grid(meta):
        return (n * cdiv(h, meta["TILE_H"]) * cdiv(w, meta["TILE_W"]), cdiv(cin, meta["BLOCK_N"]))

    with launch_ctx(grad):
        launch_tuned(_aspp_grad_input_kernel, grid, g, _packed_weights(weights, (2, 3, 0, 1)), rates_t, dx, n, h, w,
                     cin, c, branches, ACC_DTYPE=acc_dt, DOT_DTYPE=dot_dt, DOT_PRECISION=prec)
    return dx


@functools.lru_cache(maxsize=64)
def _rates_tensor(rates, device):
    """(0, *rates) as int32 on device, made once per (rates, device): not a host-to-device copy per call."""
    return torch.tensor((0,) + tuple(rates), dtype=torch.int32, device=device)


# The branch weights packed into one tap-major tensor, for weights that take no gradient: kernels/kept.py.
PACKED = KeptCopies()


def _packed_weights(weights, dims):
    """The branch weights as one tap-major tensor, each permuted by dims: (2, 3, 1, 0) gives w0 as
    [Cin, C], then each wi as [3, 3, Cin, C] (forward); (2, 3, 0, 1) the transposed [C, Cin] tap
    matrices (input gradient). Kept in PACKED."""
    return PACKED.get(weights, dims, lambda: torch.cat([w.permute(*dims).reshape(-1) for w in weights]))


def aspp_branches_forward(x, weights, rates, scale, shift, relu=True, stats=None):
    """The ASPP conv branches, scaled, shifted (BN folded in eval; scale and shift both None for 1
    and 0) and optionally ReLU'd, concatenated: [N, (1+R)*C, H, W] channels_last, in one kernel
    launch. With stats (a stats_buffer of the result), the epilogues also record their per-patch BN
    statistics there. Arguments are validated by the caller (fastaspp.ops)."""
    weights, rates = list(weights), tuple(int(r) for r in rates)
    c = weights[0].shape[0]
    n, cin, h, w = x.shape
    branches = 1 + len(rates)
    y = nhwc_empty(n, branches * c, h, w, x)
    if y.numel() == 0:
        return y
    if cin == 0:  # empty reduction: every conv is zero
        y.zero_() if shift is None else y.copy_((torch.relu(shift) if relu else shift).view(1, -1, 1, 1).expand_as(y))
        return y
    acc_dt, dot_dt, prec = dtype_meta(x.dtype)
    x = x.contiguous(memory_format=torch.channels_last)
    rates_t = _rates_tensor(rates, x.device)
    # Pointers a constexpr leaves unread get x's (no per-call placeholder tensors); stats_ptr, which
    # autotuning zeroes, a kept placeholder.
    affine = scale is not None
    stats_planes = stats if stats is not None else unread_stats(x.device, accumulator_dtype(x.dtype))

    def grid(meta):
        return (n * cdiv(h, meta["TILE_H"]) * cdiv(w, meta["TILE_W"]),
                branches * cdiv(c, meta["BLOCK_N"]))

    with launch_ctx(x):
        launch_tuned(
            _aspp_branches_kernel, grid, x, _packed_weights(weights, (2, 3, 1, 0)), rates_t,
            scale.contiguous() if affine else x, shift.contiguous() if affine else x, y, stats_planes,
            n, h, w, cin, c, branches, stats_planes[0].numel() if stats is not None else 0,
            RELU=bool(relu), STATS=stats is not None, AFFINE=affine, ACC_DTYPE=acc_dt, DOT_DTYPE=dot_dt,
            DOT_PRECISION=prec)
    return y


def _empty_stats(t, channels):
    # Two tensors, not one twice: op outputs must never alias.
    return tuple(t.new_zeros(channels, dtype=accumulator_dtype(t.dtype)) for _ in range(2))


def aspp_branches_stats_forward(x, weights, rates):
    """Training forward of the branches: (z, mean, var). z = the raw conv outputs [N, (1+R)*C, H, W]
    (channels_last, x's dtype); mean, var [(1+R)*C] = their per-channel BN batch statistics (biased
    variance over N*H*W, fp32 or fp64), gathered in the conv epilogues (docs/design.md §6) from the
    unrounded accumulators. Zeros when N*H*W == 0."""
    total = len(list(weights)) * weights[0].shape[0]
    n, _, h, w = x.shape
    if n * h * w == 0:
        return (nhwc_empty(n, total, h, w, x), *_empty_stats(x, total))
    stats = stats_buffer(nhwc_empty(n, total, h, w, x[:0]))
    z = aspp_branches_forward(x, weights, rates, None, None, relu=False, stats=stats)
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
    y = nhwc_empty(n, cout, h, w, z)
    if y.numel() == 0:
        return (y, *_empty_stats(z, cout))
    stats = stats_buffer(y)
    atrous_conv2d_forward_into(z, weight.reshape(cout, k, 1, 1), None, None, (1, 1), (0, 0),
                               (1, 1), False, y, 0, prologue=(centre, scale, shift), image_bias=image_bias,
                               stats=stats)
    return (y, *merge_stats(stats))
