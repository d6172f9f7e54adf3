"""The implicit-GEMM building blocks the conv and ASPP kernels share (docs/design.md §2, §7).

Device side: the tap index math (the mirror of csrc/common/tap_geometry.h), a program's 2-D output
patch, the per-tap accumulation with dead-tap skipping, and the epilogue (scale, shift, per-image
bias, ReLU, store into a channel slice, BN statistics). Host side: patch shapes, NHWC buffers and
the per-patch statistics planes.

Along one axis, tap k reads input i = o * stride + k * dilation - padding for output o; the outputs
for which that lies inside the image form one range [lo, hi) (live_out_range). A program owns a
TILE_H x TILE_W patch of one image, flattened into BLOCK_M GEMM rows; for each tap one scalar test
intersects the tap's live rows and columns with the patch, and a tap that reads only padding for the
whole patch is skipped (no loads, no MACs); a partly live one is clipped by the load masks. Patch
sides need not be powers of two: tile_shape splits the map into near-equal patches of at most
BLOCK_M pixels (33x33 with BLOCK_M=128 -> 11x11 patches), so the odd DeepLab feature sizes waste few
GEMM rows while patches stay 2-D for tap skipping. Offsets into activation tensors are int64.
"""

import math

import torch
import triton
import triton.language as tl

from fastaspp._rules import accumulator_dtype

from .launch import CONV_CONFIGS, cdiv


@triton.jit
def floor_div(a, b):
    """floor(a / b) for b > 0 and any sign of a, whatever the rounding of `//`."""
    q = a // b
    return tl.where(q * b > a, q - 1, q)


@triton.jit
def ceil_div(a, b):
    """ceil(a / b) for b > 0 and any sign of a."""
    return -floor_div(-a, b)


@triton.jit
def live_out_range(off, win_lo, win_hi, stride, out_size):
    """[lo, hi): outputs o in [0, out_size) whose input o * stride + off lies in [win_lo, win_hi).

    With the window [0, in_size) this is tap_live_range of tap_geometry.h (off = k*d - p).
    """
    lo = tl.maximum(ceil_div(win_lo - off, stride), 0)
    hi = tl.minimum(floor_div(win_hi - 1 - off, stride) + 1, out_size)
    return lo, hi


@triton.jit
def program_patch(pid, Ho, Wo, BLOCK_M: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
    """Program pid's patch: image n, the GEMM rows' output pixels (oh, ow), its origin and the end of
    the rows/cols that exist, [oh0, oh_end) x [ow0, ow_end)."""
    tiles_w = tl.cdiv(Wo, TILE_W)
    tiles_h = tl.cdiv(Ho, TILE_H)
    n = pid // (tiles_h * tiles_w)
    oh0 = (pid // tiles_w) % tiles_h * TILE_H
    ow0 = pid % tiles_w * TILE_W
    offs_m = tl.arange(0, BLOCK_M)
    oh = oh0 + offs_m // TILE_W  # rows past the patch (m >= TILE_H*TILE_W) fail oh < oh_end
    ow = ow0 + offs_m % TILE_W
    return n, oh, ow, oh0, ow0, tl.minimum(oh0 + TILE_H, Ho), tl.minimum(ow0 + TILE_W, Wo)


@triton.jit
def accumulate_tap(acc, enabled, x_ptr, w_tap, pro_centre_ptr, pro_scale_ptr, pro_shift_ptr,
                    n, oh, ow, oh0, ow0, oh_end, ow_end, off_h, off_w, H, W, Ho, Wo, Cin, Cout,
                    x_pix_stride, stride_h, stride_w, offs_n, n_ok,
                    PROLOGUE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += the patch's pixels shifted by (off_h, off_w) @ w_tap [Cin, Cout] over Cin, unless the
    tap reads only padding for the whole patch (or is not enabled): then no loads and no MACs.
    x's pixels are x_pix_stride elements apart (Cin, or more for a channel slice of a wider buffer)."""
    lo_h, hi_h = live_out_range(off_h, 0, H, stride_h, Ho)
    lo_w, hi_w = live_out_range(off_w, 0, W, stride_w, Wo)
    lo_h = tl.maximum(lo_h, oh0)
    hi_h = tl.minimum(hi_h, oh_end)
    lo_w = tl.maximum(lo_w, ow0)
    hi_w = tl.minimum(hi_w, ow_end)
    if enabled & (lo_h < hi_h) & (lo_w < hi_w):
        m_ok = (oh >= lo_h) & (oh < hi_h) & (ow >= lo_w) & (ow < hi_w)
        ih = oh * stride_h + off_h
        iw = ow * stride_w + off_w
        x_rows = x_ptr + ((n.to(tl.int64) * H + ih) * W + iw) * x_pix_stride
        offs_k = tl.arange(0, BLOCK_K)
        for k0 in range(0, Cin, BLOCK_K):
            kk = k0 + offs_k
            k_ok = kk < Cin
            a_ok = m_ok[:, None] & k_ok[None, :]
            a = tl.load(x_rows[:, None] + kk[None, :], mask=a_ok, other=0.0)
            if PROLOGUE:  # the previous BN's normalize + ReLU, applied as A is loaded
                p_centre = tl.load(pro_centre_ptr + kk, mask=k_ok, other=0.0).to(ACC_DTYPE)
                p_scale = tl.load(pro_scale_ptr + kk, mask=k_ok, other=0.0).to(ACC_DTYPE)
                p_shift = tl.load(pro_shift_ptr + kk, mask=k_ok, other=0.0).to(ACC_DTYPE)
                a = (a.to(ACC_DTYPE) - p_centre[None, :]) * p_scale[None, :] + p_shift[None, :]
                a = tl.maximum(a, 0.0, propagate_nan=tl.PropagateNan.ALL)
                a = tl.where(a_ok, a, 0.0)  # padding is zero after the prologue too
            b = tl.load(w_tap + kk[:, None] * Cout + offs_n[None, :],
                        mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                         out_dtype=ACC_DTYPE)
    return acc


@triton.jit
def epilogue(acc, scale_ptr, shift_ptr, bias_ptr, y_ptr, stats_ptr, n, oh, ow, oh_end, ow_end, Ho, Wo,
              Cout, offs_n, n_ok, y_pix_stride, y_c_off, stats_plane,
              RELU: tl.constexpr, IMAGE_BIAS: tl.constexpr, STATS: tl.constexpr, ACC_DTYPE: tl.constexpr,
              HAS_SCALE: tl.constexpr = True, HAS_SHIFT: tl.constexpr = True):
    """act(acc * scale + shift [+ bias[n]]) stored NHWC at channel y_c_off of a y_pix_stride-channel
    buffer (scale 1 and shift 0 unless HAS_SCALE / HAS_SHIFT); with STATS, the patch's BN statistics
    into row program_id(0) of the stats planes."""
    out = acc
    if HAS_SCALE:
        scale = tl.load(scale_ptr + offs_n, mask=n_ok, other=0.0).to(ACC_DTYPE)
        out = out * scale[None, :]
    if HAS_SHIFT:
        shift = tl.load(shift_ptr + offs_n, mask=n_ok, other=0.0).to(ACC_DTYPE)
        out = out + shift[None, :]
    if IMAGE_BIAS:
        bias = tl.load(bias_ptr + n.to(tl.int64) * Cout + offs_n, mask=n_ok, other=0.0)
        out += bias.to(ACC_DTYPE)[None, :]
    if RELU:
        out = tl.maximum(out, 0.0, propagate_nan=tl.PropagateNan.ALL)  # NaN stays NaN, as torch
    y_rows = ((n.to(tl.int64) * Ho + oh) * Wo + ow) * y_pix_stride + y_c_off
    store_ok = ((oh < oh_end) & (ow < ow_end))[:, None] & n_ok[None, :]
    tl.store(y_ptr + y_rows[:, None] + offs_n[None, :], out.to(y_ptr.dtype.element_ty),
             mask=store_ok)
    if STATS:  # BN batch statistics of this patch (docs/design.md §6), about the patch's own mean
        count = tl.sum(store_ok.to(ACC_DTYPE), axis=0)
        total = tl.sum(tl.where(store_ok, out, 0.0), axis=0)
        centred = tl.where(store_ok, out - (total / tl.maximum(count, 1.0))[None, :], 0.0)
        m2 = tl.sum(centred * centred, axis=0)
        row = stats_ptr + tl.program_id(0).to(tl.int64) * y_pix_stride + y_c_off + offs_n
        tl.store(row, count, mask=n_ok)
        tl.store(row + stats_plane, total, mask=n_ok)
        tl.store(row + 2 * stats_plane, m2, mask=n_ok)



# ----------------------------------------------------------------------------------------------
# Host side.
# ----------------------------------------------------------------------------------------------

def tile_shape(rows, cols, block_m):
    """(tile_h, tile_w) of near-equal 2-D patches of at most block_m pixels covering rows x cols."""
    rows, cols = max(rows, 1), max(cols, 1)
    # Square-ish patches, wider when the map has few rows so that the GEMM rows stay filled.
    target_w = min(max(math.isqrt(block_m), cdiv(block_m, rows)), block_m)
    tile_w = cdiv(cols, cdiv(cols, target_w))
    tile_h = cdiv(rows, cdiv(rows, block_m // tile_w))
    return tile_h, tile_w



def nhwc_empty(n, c, h, w, like):
    """An [n, c, h, w] tensor whose storage is dense NHWC, as the kernels write it."""
    return torch.empty((n, h, w, c), device=like.device, dtype=like.dtype).permute(0, 3, 1, 2)


def stats_buffer(out):
    """Zeroed per-patch statistics planes for atrous_conv2d_forward_into(..., stats=) into `out`
    [N, Ctot, Ho, Wo]: [3, rows, Ctot] in the accumulator dtype, rows = the most patches any
    config can cut the output into (unused rows keep count 0)."""
    n, ctot, ho, wo = out.shape
    rows = max(n * math.prod(cdiv(size, t) for size, t in zip((ho, wo), tile_shape(ho, wo, block)))
               for block in {c.kwargs["BLOCK_M"] for c in CONV_CONFIGS})
    return torch.zeros((3, max(rows, 1), ctot), device=out.device, dtype=accumulator_dtype(out.dtype))


_UNREAD_STATS = {}


def unread_stats(device, dtype):
    """The stats_ptr argument of a launch without STATS: a kept one-element tensor per (device,
    accumulator dtype, as a real one). Never an input: the kernels' autotuners zero stats_ptr after
    tuning (reset_to_zero) wherever there is more than one config (a GPU), so the first call of each
    shape would zero that input."""
    placeholder = _UNREAD_STATS.get((device, dtype))
    if placeholder is None:
        placeholder = _UNREAD_STATS[(device, dtype)] = torch.zeros(1, device=device, dtype=dtype)
    return placeholder


def merge_stats(stats):
    """(mean, biased variance) per channel from stats_buffer planes: Chan et al.'s pairwise
    combination of per-patch (count, sum, M2 about the patch mean), in a fixed order."""
    count, total, m2 = stats.unbind(0)
    n = count.sum(0)
    mean = total.sum(0) / n.clamp_min(1)
    patch_mean = total / count.clamp_min(1)
    spread = (count * (patch_mean - mean).square()).sum(0)
    return mean, (m2.sum(0) + spread) / n.clamp_min(1)

