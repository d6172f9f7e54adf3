"""Triton kernels for the atrous (dilated, strided) 2-D convolution of fastaspp.

Contract (the same semantics as the C++ backends; arguments are validated by the caller):

    atrous_conv2d_forward(x, weight, scale, shift, stride, padding, dilation, relu) -> y
        y = act(conv2d(x, weight, None, stride, padding, dilation) * scale[c] + shift[c]),
        act = ReLU if relu else identity.  x [N, Cin, H, W], weight [Cout, Cin, KH, KW],
        scale/shift [Cout]; y [N, Cout, Ho, Wo] with Ho = (H + 2p - d(K-1) - 1) // s + 1.
    atrous_conv2d_forward_into(x, weight, scale, shift, stride, padding, dilation, relu,
                               out, channel_offset) -> None
        the same y, stored into out[:, channel_offset:channel_offset + Cout] of a preallocated
        out [N, Ctot, Ho, Wo] with dense NHWC storage (out.permute(0, 2, 3, 1).is_contiguous()),
        x's dtype and device; the other channels of out are not touched.  This is how several
        convolutions write one concatenated buffer without torch.cat (docs/design.md §4).  out must
        not share memory with x (asserted, with the other invariants).
        Keyword options fuse the training steps of docs/design.md §6: prologue=(m, s, t) reads x as
        relu((x - m) * s + t), image_bias adds a per-image [N, Cout] bias, stats= records per-patch BN
        statistics (stats_buffer / merge_stats).
    atrous_conv2d_grad_input(grad, weight, input_size, stride, padding, dilation) -> dx
        the transposed convolution of grad [N, Cout, Ho, Wo]: dx [N, Cin, H, W] = input_size.
    atrous_conv2d_grad_weight(x, grad, weight_size, stride, padding, dilation) -> dw
        dw [Cout, Cin, KH, KW] = weight_size, contiguous.

stride, padding and dilation are (h, w) tuples of ints.  y and dx come back in the memory format
of x and grad respectively (torch's suggest_memory_format, as the C++ kernels and the fake impls
choose it); every kernel works on NHWC storage,
so NCHW inputs are converted once on entry and the result once on exit.  Batch 0 (or any empty
dimension) returns without launching.

Dtypes: float32, float16, bfloat16 and float64.  Products are accumulated in float32 (float64 for
float64 inputs).  float32 operands use ``input_precision=FP32_DOT_PRECISION`` ("ieee" by default,
so results match PyTorch's fp32 convolution closely; set it to "tf32" for tensor-core speed at
~1e-3 relative error); "ieee" fp32 and fp64 run on the FMA units, autotuned over their own
smaller configs.  Under TRITON_INTERPRET=1, bfloat16 operands are widened to float32 before
tl.dot, because the interpreter (numpy has no bfloat16) computes bfloat16 arithmetic wrongly; on
the GPU they go to the tensor cores as bfloat16.

Tiling and dead-tap skipping (docs/design.md §2, §7).  Along one axis, tap k reads input
i = o * stride + k * dilation - padding for output o; the outputs for which that lies inside the
image form one range [lo, hi) (``_live_out_range``, the mirror of ``tap_live_range`` in
csrc/common/tap_geometry.h).

* forward: implicit GEMM, one program = one 2-D patch of TILE_H x TILE_W output pixels of one
  image (flattened into BLOCK_M GEMM rows) x BLOCK_N output channels.  For each tap a scalar test
  intersects the tap's live rows/cols with the patch; a tap that reads only padding for the whole
  patch is skipped (no loads, no MACs), a partly live one is clipped by the load masks.  Live taps
  loop over Cin in BLOCK_K chunks into a float32 accumulator; the epilogue applies scale, shift,
  ReLU and the cast, and stores NHWC with a pixel stride of Ctot channels starting at
  channel_offset (Ctot = Cout, offset 0 for atrous_conv2d_forward).
* grad_input: the same with the roles swapped: one program = a patch of input pixels x BLOCK_N
  input channels, reducing over taps and Cout with the weight transposed.  Input pixels are split
  into stride residue classes (ih = r + stride * q), so for each tap either every pixel of a patch
  lines up with an output pixel (o = q + const, contiguous) or none does: stride > 1 costs no
  masked-out MACs, and the divisibility test is one scalar test per tap.
* grad_weight: one program = (tap, Cout block, Cin block); it reduces grad^T @ x over the tap's
  live output rectangle only (all images), so dead taps run no pixel loop and store zeros.  When
  there are too few such programs to fill the GPU, the pixel range is split into SPLIT_M slices
  whose partial sums are added on the host (deterministic, no atomics).

Patch sides need not be powers of two: ``_tile_shape`` splits the map into near-equal patches of at
most BLOCK_M pixels (33x33 with BLOCK_M=128 -> 11x11 patches), so the odd DeepLab feature sizes
(33, 65, 97) waste few GEMM rows while patches stay 2-D for tap skipping.  Offsets into
activation tensors are computed in int64.
"""

import contextlib
import math
import os

import torch
import triton
import triton.language as tl
from torch._prims_common import suggest_memory_format
from torch.utils.weak import WeakIdKeyDictionary

# Decided at import: the interpreter needs the variable set before triton is imported anyway.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

# input_precision of tl.dot for float32 operands: "ieee" (exact fp32 products) or "tf32".
FP32_DOT_PRECISION = "ieee"

# The dtypes these kernels accept (the op layer checks against this before calling).
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)

# grad_weight splits the pixel reduction until about this many programs per SM are in flight,
# but never into slices shorter than _WGRAD_MIN_SLICE pixels (small under the interpreter so that
# the split path is exercised by small CPU tests).
_WGRAD_PROGRAMS_PER_SM = 2
_WGRAD_MIN_SLICE = 16 if _INTERPRET else 1024
_WGRAD_MAX_SPLIT = 64


def _cfg(num_warps, num_stages, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


# Tensor-core configs (fp16, bf16, fp32 as tf32), Hopper-oriented (H100): 128-256 wide tiles,
# BLOCK_K 64, 3-4 stage pipelines; smaller tiles for batch 1 / small maps where large tiles leave
# SMs idle.  forward and grad_input share them (BLOCK_N runs over Cout in forward, over Cin in
# grad_input).  Defined even under the interpreter: tests compile each for sm_90 ahead of time.
GPU_CONV_TC_CONFIGS = [
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=256, BLOCK_K=64),
    _cfg(8, 3, BLOCK_M=256, BLOCK_N=128, BLOCK_K=64),
    _cfg(8, 3, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
    _cfg(4, 4, BLOCK_M=128, BLOCK_N=128, BLOCK_K=64),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64),
    _cfg(4, 4, BLOCK_M=64, BLOCK_N=64, BLOCK_K=64),
]
GPU_WGRAD_TC_CONFIGS = [
    _cfg(8, 3, BLOCK_CO=128, BLOCK_CI=256, BLOCK_M=64),
    _cfg(8, 3, BLOCK_CO=128, BLOCK_CI=128, BLOCK_M=64),
    _cfg(4, 4, BLOCK_CO=128, BLOCK_CI=128, BLOCK_M=32),
    _cfg(4, 4, BLOCK_CO=64, BLOCK_CI=128, BLOCK_M=64),
    _cfg(4, 4, BLOCK_CO=64, BLOCK_CI=64, BLOCK_M=64),
]
# FMA configs (fp64, and fp32 with "ieee" precision): no tensor cores, 4/8-byte operands; smaller
# K steps keep the shared-memory pipeline within Hopper's 227 KB.
GPU_CONV_FMA_CONFIGS = [
    _cfg(4, 2, BLOCK_M=64, BLOCK_N=64, BLOCK_K=32),
    _cfg(8, 2, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32),
    _cfg(4, 3, BLOCK_M=32, BLOCK_N=64, BLOCK_K=32),
]
GPU_WGRAD_FMA_CONFIGS = [
    _cfg(4, 2, BLOCK_CO=64, BLOCK_CI=64, BLOCK_M=32),
    _cfg(8, 2, BLOCK_CO=128, BLOCK_CI=64, BLOCK_M=32),
    _cfg(4, 3, BLOCK_CO=32, BLOCK_CI=64, BLOCK_M=32),
]

if _INTERPRET:
    # Autotuning is pointless and slow in the interpreter: one small config (tl.dot needs >= 16).
    _CONV_TC_CONFIGS = [_cfg(4, 1, BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)]
    _CONV_FMA_CONFIGS = []
    _WGRAD_TC_CONFIGS = [_cfg(4, 1, BLOCK_CO=16, BLOCK_CI=16, BLOCK_M=16)]
    _WGRAD_FMA_CONFIGS = []
elif os.environ.get("FASTASPP_TRITON_AUTOTUNE") == "0":
    # One config per kind, no autotuning: the GPU test run sets this so that its many shapes
    # compile once instead of once per config (the benchmarks autotune and check the result).
    _CONV_TC_CONFIGS, _CONV_FMA_CONFIGS = GPU_CONV_TC_CONFIGS[-1:], GPU_CONV_FMA_CONFIGS[:1]
    _WGRAD_TC_CONFIGS, _WGRAD_FMA_CONFIGS = GPU_WGRAD_TC_CONFIGS[-1:], GPU_WGRAD_FMA_CONFIGS[:1]
else:
    _CONV_TC_CONFIGS, _CONV_FMA_CONFIGS = GPU_CONV_TC_CONFIGS, GPU_CONV_FMA_CONFIGS
    _WGRAD_TC_CONFIGS, _WGRAD_FMA_CONFIGS = GPU_WGRAD_TC_CONFIGS, GPU_WGRAD_FMA_CONFIGS


def deterministic_configs():
    """Whether autotuning is off for bit-identical results across processes: every kernel here is
    deterministic for a given config (no atomics, fixed-order reductions), but autotuning may pick
    a different tiling, so a different summation order, in another process. On under
    torch.use_deterministic_algorithms(True) or FASTASPP_DETERMINISTIC=1: the first config of the
    dot's kind is used."""
    return torch.are_deterministic_algorithms_enabled() or os.environ.get("FASTASPP_DETERMINISTIC") == "1"


def _prune_by_dot_kind(n_tensor_core_configs):
    """Autotune only the configs made for the dot the dtype gets: tensor cores, or FMA."""

    def prune(configs, named_args, **kwargs):
        dot = kwargs["DOT_DTYPE"]
        tensor_cores = dot in (tl.float16, tl.bfloat16) or (
            dot == tl.float32 and kwargs["DOT_PRECISION"] != "ieee")
        chosen = (configs[:n_tensor_core_configs] if tensor_cores else configs[n_tensor_core_configs:]) or configs
        return chosen[:1] if deterministic_configs() else chosen

    return {"early_config_prune": prune}


_CONV_CONFIGS = _CONV_TC_CONFIGS + _CONV_FMA_CONFIGS
_CONV_PRUNE = _prune_by_dot_kind(len(_CONV_TC_CONFIGS))
_WGRAD_CONFIGS = _WGRAD_TC_CONFIGS + _WGRAD_FMA_CONFIGS
_WGRAD_PRUNE = _prune_by_dot_kind(len(_WGRAD_TC_CONFIGS))

_CONV_KEY = ["N", "H", "W", "Cin", "Cout", "KH", "KW",
             "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w"]


# ----------------------------------------------------------------------------------------------
# Shared index math (device side).  Mirrors csrc/common/tap_geometry.h.
# ----------------------------------------------------------------------------------------------

@triton.jit
def _floor_div(a, b):
    """floor(a / b) for b > 0 and any sign of a, whatever the rounding of `//`."""
    q = a // b
    return tl.where(q * b > a, q - 1, q)


@triton.jit
def _ceil_div(a, b):
    """ceil(a / b) for b > 0 and any sign of a."""
    return -_floor_div(-a, b)


@triton.jit
def _live_out_range(off, win_lo, win_hi, stride, out_size):
    """[lo, hi): outputs o in [0, out_size) whose input o * stride + off lies in [win_lo, win_hi).

    With the window [0, in_size) this is tap_live_range of tap_geometry.h (off = k*d - p).
    """
    lo = tl.maximum(_ceil_div(win_lo - off, stride), 0)
    hi = tl.minimum(_floor_div(win_hi - 1 - off, stride) + 1, out_size)
    return lo, hi


# ----------------------------------------------------------------------------------------------
# Patch shapes (host side, fed to the kernels through triton.heuristics).
# ----------------------------------------------------------------------------------------------

def _tile_shape(rows, cols, block_m):
    """(tile_h, tile_w) of near-equal 2-D patches of at most block_m pixels covering rows x cols."""
    rows, cols = max(rows, 1), max(cols, 1)
    # Square-ish patches, wider when the map has few rows so that the GEMM rows stay filled.
    target_w = min(max(math.isqrt(block_m), triton.cdiv(block_m, rows)), block_m)
    tile_w = triton.cdiv(cols, triton.cdiv(cols, target_w))
    tile_h = triton.cdiv(rows, triton.cdiv(rows, block_m // tile_w))
    return tile_h, tile_w


def _fwd_tiles(args):
    return _tile_shape(args["Ho"], args["Wo"], args["BLOCK_M"])


def _dgrad_tiles(args):
    # Patches tile one stride residue class: cdiv(H, s) x cdiv(W, s) pixels at most.
    return _tile_shape(triton.cdiv(args["H"], args["stride_h"]),
                       triton.cdiv(args["W"], args["stride_w"]), args["BLOCK_M"])


# ----------------------------------------------------------------------------------------------
# Forward: y = act(conv(x, w) * scale + shift), NHWC.
# ----------------------------------------------------------------------------------------------

# reset_to_zero: autotuning runs every config, and configs with more patches would leave
# per-patch statistics rows the chosen config does not overwrite (Triton zeroes after tuning).
@triton.autotune(configs=_CONV_CONFIGS, key=_CONV_KEY, prune_configs_by=_CONV_PRUNE,
                 reset_to_zero=["stats_ptr"])
@triton.heuristics({"TILE_H": lambda a: _fwd_tiles(a)[0], "TILE_W": lambda a: _fwd_tiles(a)[1]})
@triton.jit
def _atrous_fwd_kernel(
    x_ptr,  # [N, H, W, Cin]
    w_ptr,  # [KH, KW, Cin, Cout]
    scale_ptr, shift_ptr,  # [Cout], read when HAS_SCALE / HAS_SHIFT (else 1 and 0)
    y_ptr,  # [N, Ho, Wo, y_pix_stride]; this conv's Cout channels start at y_c_off
    pro_centre_ptr, pro_scale_ptr, pro_shift_ptr,  # [Cin]: PROLOGUE's per-input-channel affine
    bias_ptr,  # [N, Cout]: IMAGE_BIAS's per-image bias
    stats_ptr,  # [3, rows, y_pix_stride]: STATS's per-patch (count, sum, centred M2) planes
    N, H, W, Cin, Ho, Wo, Cout, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    y_pix_stride, y_c_off, stats_plane,
    RELU: tl.constexpr, PROLOGUE: tl.constexpr, IMAGE_BIAS: tl.constexpr, STATS: tl.constexpr,
    HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):
    n, oh, ow, oh0, ow0, oh_end, ow_end = _patch(tl.program_id(0), Ho, Wo, BLOCK_M, TILE_H, TILE_W)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Cout

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for tap in range(0, KH * KW):
        off_h = tap // KW * dil_h - pad_h
        off_w = tap % KW * dil_w - pad_w
        acc = _accumulate_tap(acc, True, x_ptr, w_ptr + tap * Cin * Cout, pro_centre_ptr, pro_scale_ptr,
                              pro_shift_ptr, n, oh, ow, oh0, ow0, oh_end, ow_end, off_h, off_w, H, W, Ho, Wo,
                              Cin, Cout, Cin, stride_h, stride_w, offs_n, n_ok, PROLOGUE, ACC_DTYPE, DOT_DTYPE,
                              DOT_PRECISION, BLOCK_K)
    _epilogue(acc, scale_ptr, shift_ptr, bias_ptr, y_ptr, stats_ptr, n, oh, ow, oh_end, ow_end, Ho, Wo, Cout,
              offs_n, n_ok, y_pix_stride, y_c_off, stats_plane, RELU, IMAGE_BIAS, STATS, ACC_DTYPE,
              HAS_SCALE, HAS_SHIFT)


@triton.jit
def _patch(pid, Ho, Wo, BLOCK_M: tl.constexpr, TILE_H: tl.constexpr, TILE_W: tl.constexpr):
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
def _accumulate_tap(acc, enabled, x_ptr, w_tap, pro_centre_ptr, pro_scale_ptr, pro_shift_ptr,
                    n, oh, ow, oh0, ow0, oh_end, ow_end, off_h, off_w, H, W, Ho, Wo, Cin, Cout,
                    x_pix_stride, stride_h, stride_w, offs_n, n_ok,
                    PROLOGUE: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr,
                    DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc += the patch's pixels shifted by (off_h, off_w) @ w_tap [Cin, Cout] over Cin, unless the
    tap reads only padding for the whole patch (or is not enabled): then no loads and no MACs.
    x's pixels are x_pix_stride elements apart (Cin, or more for a channel slice of a wider buffer)."""
    lo_h, hi_h = _live_out_range(off_h, 0, H, stride_h, Ho)
    lo_w, hi_w = _live_out_range(off_w, 0, W, stride_w, Wo)
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
def _epilogue(acc, scale_ptr, shift_ptr, bias_ptr, y_ptr, stats_ptr, n, oh, ow, oh_end, ow_end, Ho, Wo,
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
# grad_input: dx = conv_transpose(grad, w), NHWC, per stride residue class.
# ----------------------------------------------------------------------------------------------

@triton.autotune(configs=_CONV_CONFIGS, key=_CONV_KEY, prune_configs_by=_CONV_PRUNE)
@triton.heuristics({"TILE_H": lambda a: _dgrad_tiles(a)[0], "TILE_W": lambda a: _dgrad_tiles(a)[1]})
@triton.jit
def _atrous_dgrad_kernel(
    g_ptr,  # [N, Ho, Wo, Cout]
    w_ptr,  # [KH, KW, Cout, Cin]
    dx_ptr,  # [N, H, W, Cin]
    N, H, W, Cin, Ho, Wo, Cout, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    TILE_H: tl.constexpr, TILE_W: tl.constexpr,
):
    # pid -> (image, residue class (r_h, r_w), patch).  The patch holds input pixels
    # ih = r_h + stride_h * (q0h + t), t < TILE_H (same along w).
    pid = tl.program_id(0)
    tiles_w = tl.cdiv(tl.cdiv(W, stride_w), TILE_W)
    tiles_h = tl.cdiv(tl.cdiv(H, stride_h), TILE_H)
    tw = pid % tiles_w
    th = (pid // tiles_w) % tiles_h
    res = (pid // (tiles_w * tiles_h)) % (stride_h * stride_w)
    n = pid // (tiles_w * tiles_h * stride_h * stride_w)
    r_h = res // stride_w
    r_w = res % stride_w
    # First input row/col of the patch and one past its last existing one.
    ih0 = r_h + stride_h * th * TILE_H
    iw0 = r_w + stride_w * tw * TILE_W
    ih_end = tl.minimum(ih0 + stride_h * (TILE_H - 1) + 1, H)
    iw_end = tl.minimum(iw0 + stride_w * (TILE_W - 1) + 1, W)

    offs_m = tl.arange(0, BLOCK_M)
    t_h = offs_m // TILE_W
    t_w = offs_m % TILE_W
    ih = ih0 + stride_h * t_h
    iw = iw0 + stride_w * t_w
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # input channels
    n_ok = offs_n < Cin
    offs_k = tl.arange(0, BLOCK_K)  # output channels
    img_row0 = n.to(tl.int64) * Ho

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for tap in range(0, KH * KW):
        kh = tap // KW
        kw = tap % KW
        off_h = kh * dil_h - pad_h
        off_w = kw * dil_w - pad_w
        # ih = oh * s + off  <=>  oh = (r - off) / s + (q0 + t): the whole residue class either
        # lines up with this tap (divisible) or receives nothing from it.
        q_h = _floor_div(r_h - off_h, stride_h)
        q_w = _floor_div(r_w - off_w, stride_w)
        aligned = (q_h * stride_h == r_h - off_h) & (q_w * stride_w == r_w - off_w)
        lo_h, hi_h = _live_out_range(off_h, ih0, ih_end, stride_h, Ho)
        lo_w, hi_w = _live_out_range(off_w, iw0, iw_end, stride_w, Wo)
        if aligned & (lo_h < hi_h) & (lo_w < hi_w):  # dead for this whole patch: skipped
            oh = q_h + th * TILE_H + t_h
            ow = q_w + tw * TILE_W + t_w
            m_ok = (oh >= lo_h) & (oh < hi_h) & (ow >= lo_w) & (ow < hi_w)
            g_rows = g_ptr + ((img_row0 + oh) * Wo + ow) * Cout
            w_tap = w_ptr + tap * Cout * Cin
            for k0 in range(0, Cout, BLOCK_K):
                kk = k0 + offs_k
                k_ok = kk < Cout
                a = tl.load(g_rows[:, None] + kk[None, :],
                            mask=m_ok[:, None] & k_ok[None, :], other=0.0)
                b = tl.load(w_tap + kk[:, None] * Cin + offs_n[None, :],
                            mask=k_ok[:, None] & n_ok[None, :], other=0.0)
                acc = tl.dot(a.to(DOT_DTYPE), b.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                             out_dtype=ACC_DTYPE)

    # Every input pixel belongs to exactly one (residue, patch): all of dx is written here.
    dx_rows = ((n.to(tl.int64) * H + ih) * W + iw) * Cin
    store_ok = ((t_h < TILE_H) & (ih < H) & (iw < W))[:, None] & n_ok[None, :]
    tl.store(dx_ptr + dx_rows[:, None] + offs_n[None, :], acc.to(dx_ptr.dtype.element_ty),
             mask=store_ok)


# ----------------------------------------------------------------------------------------------
# grad_weight: dw[tap, co, ci] = sum over images and the tap's live output pixels of
# grad[n, o, co] * x[n, o * s + off, ci].
# ----------------------------------------------------------------------------------------------

@triton.autotune(configs=_WGRAD_CONFIGS, key=_CONV_KEY + ["SPLIT_M"], prune_configs_by=_WGRAD_PRUNE)
@triton.jit
def _atrous_wgrad_kernel(
    x_ptr,  # [N, H, W, Cin]
    g_ptr,  # [N, Ho, Wo, Cout]
    ws_ptr,  # [SPLIT_M, KH * KW, Cout, Cin], ACC_DTYPE partial sums
    N, H, W, Cin, Ho, Wo, Cout, KH, KW,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    SPLIT_M,
    ACC_DTYPE: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_CO: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_M: tl.constexpr,
):
    pid = tl.program_id(0)
    blocks_ci = tl.cdiv(Cin, BLOCK_CI)
    offs_co = pid // blocks_ci * BLOCK_CO + tl.arange(0, BLOCK_CO)
    offs_ci = pid % blocks_ci * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co_ok = offs_co < Cout
    ci_ok = offs_ci < Cin
    tap = tl.program_id(1)
    split = tl.program_id(2)
    kh = tap // KW
    kw = tap % KW
    off_h = kh * dil_h - pad_h
    off_w = kw * dil_w - pad_w
    # The tap's live output rectangle; the reduction runs over (n, oh, ow) in it, flattened.
    lo_h, hi_h = _live_out_range(off_h, 0, H, stride_h, Ho)
    lo_w, hi_w = _live_out_range(off_w, 0, W, stride_w, Wo)
    rect_h = tl.maximum(hi_h - lo_h, 0)
    rect_w = tl.maximum(hi_w - lo_w, 0)
    rect = rect_h * rect_w
    m_total = N * rect  # 0 for a dead tap: no loop at all
    slice_len = tl.cdiv(tl.cdiv(m_total, SPLIT_M), BLOCK_M) * BLOCK_M
    m_begin = split * slice_len
    m_end = tl.minimum(m_begin + slice_len, m_total)

    acc = tl.zeros((BLOCK_CO, BLOCK_CI), dtype=ACC_DTYPE)
    for m0 in range(m_begin, m_end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_ok = m < m_end
        img = m // rect
        pix = m % rect
        oh = lo_h + pix // rect_w
        ow = lo_w + pix % rect_w
        g_rows = ((img.to(tl.int64) * Ho + oh) * Wo + ow) * Cout
        x_rows = ((img.to(tl.int64) * H + oh * stride_h + off_h) * W + ow * stride_w + off_w) * Cin
        g = tl.load(g_ptr + g_rows[:, None] + offs_co[None, :],
                    mask=m_ok[:, None] & co_ok[None, :], other=0.0)
        a = tl.load(x_ptr + x_rows[:, None] + offs_ci[None, :],
                    mask=m_ok[:, None] & ci_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(g.to(DOT_DTYPE)), a.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION,
                     out_dtype=ACC_DTYPE)

    ws_rows = ((split * KH * KW + tap) * Cout + offs_co).to(tl.int64) * Cin
    tl.store(ws_ptr + ws_rows[:, None] + offs_ci[None, :], acc,
             mask=co_ok[:, None] & ci_ok[None, :])


# ----------------------------------------------------------------------------------------------
# Host wrappers.
# ----------------------------------------------------------------------------------------------

_TL_DTYPES = {
    torch.float32: tl.float32,
    torch.float16: tl.float16,
    torch.bfloat16: tl.bfloat16,
    torch.float64: tl.float64,
}


def _dtype_meta(dtype):
    """(ACC_DTYPE, DOT_DTYPE, DOT_PRECISION) constexprs for activations of `dtype`."""
    if dtype not in _TL_DTYPES:
        raise TypeError(f"triton backend: dtype {dtype} not supported "
                        "(float32, float16, bfloat16, float64)")
    if dtype == torch.float64:
        return tl.float64, tl.float64, "ieee"
    if dtype == torch.bfloat16 and _INTERPRET:
        return tl.float32, tl.float32, "ieee"  # interpreter bf16 arithmetic is broken
    if dtype == torch.float32:
        return tl.float32, tl.float32, FP32_DOT_PRECISION
    # fp16/bf16 go to the tensor cores as they are; the precision flag only concerns fp32.
    return tl.float32, _TL_DTYPES[dtype], "tf32"


def _memory_format(t):
    """The layout a result takes from t: torch's suggest_memory_format (what the C++ kernels and the
    ops' fake impls use too, so that eager and traced strides agree on ambiguous shapes)."""
    return suggest_memory_format(t)


def _nhwc_empty(n, c, h, w, like):
    """An [n, c, h, w] tensor whose storage is dense NHWC, as the kernels write it."""
    return torch.empty((n, h, w, c), device=like.device, dtype=like.dtype).permute(0, 3, 1, 2)


# Tap-major copies of weights that take no gradient (eval-folded, frozen), kept while the weight
# lives and is unchanged, so that repeated inference pays the re-layout once (otherwise every call
# pays an extra kernel and its launch: benchmarks/results/GPU-NOTES.md). Weights that train are
# re-laid out per call, as they change every step and a kept copy would only add memory. Keyed by
# identity, weakly.
_TAP_MAJOR = WeakIdKeyDictionary()


def _stamp(weight):
    """What must be unchanged for a kept re-layout of weight to stay valid."""
    return weight._version, weight.data_ptr(), weight.dtype, weight.shape, weight.stride()


def _kept(weights, tag, make):
    """make() (a re-layout of weights), remembered under tag while every weight lives unchanged.
    Weights that take a gradient, or are inference tensors (no version counter), get make() every
    call."""
    if any(w.requires_grad or w.is_inference() for w in weights):
        return make()
    stamp = tuple(_stamp(w) for w in weights) + tuple(id(w) for w in weights)
    kept = _TAP_MAJOR.setdefault(weights[0], {})
    hit = kept.get(tag)
    if hit is None or hit[0] != stamp:
        hit = kept[tag] = (stamp, make())
    return hit[1]


def _tap_major(weight, dims):
    """weight.permute(*dims).contiguous(), kept as _kept says."""
    return _kept((weight,), dims, lambda: weight.permute(*dims).contiguous())


def _launch_ctx(t):
    if t.is_cuda:
        return torch.cuda.device(t.device)
    if not _INTERPRET:
        raise RuntimeError("triton backend: tensors on device "
                           f"'{t.device}' need TRITON_INTERPRET=1 set before triton is imported "
                           "(CUDA tensors run natively)")
    return contextlib.nullcontext()


def _out_size(in_size, k, s, p, d):
    return (in_size + 2 * p - d * (k - 1) - 1) // s + 1


def _geometry_args(stride, padding, dilation):
    return (int(stride[0]), int(stride[1]), int(padding[0]), int(padding[1]),
            int(dilation[0]), int(dilation[1]))


def _forward_out_hw(x, weight, geo):
    return (_out_size(x.shape[2], weight.shape[2], geo[0], geo[2], geo[4]),
            _out_size(x.shape[3], weight.shape[3], geo[1], geo[3], geo[5]))


def _check_out(out, channel_offset, x, cout, ho, wo):
    """The invariants atrous_conv2d_forward_into's index math relies on (its callers build `out`)."""
    assert out.dtype == x.dtype and out.device == x.device, "out must have x's dtype and device"
    assert tuple(out.shape[::2]) == (x.shape[0], ho) and out.shape[3] == wo, "out must be [N, Ctot, Ho, Wo]"
    assert 0 <= channel_offset and channel_offset + cout <= out.shape[1], "channel slice outside out"
    # is_contiguous ignores the strides of size-1 dims, which the kernel's index math never uses.
    assert out.permute(0, 2, 3, 1).is_contiguous(), "out must have dense NHWC storage"
    # The kernel reads x while other programs write out: shared storage would race.
    assert not (out.numel() and x.numel()
                and out.untyped_storage().data_ptr() == x.untyped_storage().data_ptr()), "out shares x's memory"
    return int(channel_offset)


def atrous_conv2d_forward(x, weight, scale, shift, stride, padding, dilation, relu):
    """act(conv2d(x, weight, None, stride, padding, dilation) * scale + shift) in x's format (scale,
    shift: [Cout] or None for 1 and 0)."""
    ho, wo = _forward_out_hw(x, weight, _geometry_args(stride, padding, dilation))
    y = _nhwc_empty(x.shape[0], weight.shape[0], ho, wo, x)
    atrous_conv2d_forward_into(x, weight, scale, shift, stride, padding, dilation, relu, y, 0)
    return y.contiguous(memory_format=_memory_format(x))


def _acc_dtype(dtype):
    """The torch dtype a dtype accumulates in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stats_buffer(out):
    """Zeroed per-patch statistics planes for atrous_conv2d_forward_into(..., stats=) into `out`
    [N, Ctot, Ho, Wo]: [3, rows, Ctot] in the accumulator dtype, rows = the most patches any
    config can cut the output into (unused rows keep count 0)."""
    n, ctot, ho, wo = out.shape
    rows = max(n * math.prod(triton.cdiv(size, t) for size, t in zip((ho, wo), _tile_shape(ho, wo, block)))
               for block in {c.kwargs["BLOCK_M"] for c in _CONV_CONFIGS})
    return torch.zeros((3, max(rows, 1), ctot), device=out.device, dtype=_acc_dtype(out.dtype))


def merge_stats(stats):
    """(mean, biased variance) per channel from stats_buffer planes: Chan et al.'s pairwise
    combination of per-patch (count, sum, M2 about the patch mean), in a fixed order."""
    count, total, m2 = stats.unbind(0)
    n = count.sum(0)
    mean = total.sum(0) / n.clamp_min(1)
    patch_mean = total / count.clamp_min(1)
    spread = (count * (patch_mean - mean).square()).sum(0)
    return mean, (m2.sum(0) + spread) / n.clamp_min(1)


def atrous_conv2d_forward_into(x, weight, scale, shift, stride, padding, dilation, relu,
                               out, channel_offset, *, prologue=None, image_bias=None, stats=None):
    """atrous_conv2d_forward's result stored into out[:, channel_offset:channel_offset + Cout].

    out: [N, Ctot, Ho, Wo], dense NHWC storage, x's dtype and device.  Returns None.
    Optional fusions (docs/design.md §6), all validated by the caller:
      prologue=(m, s, t): x is read as relu((x - m) * s + t) per input channel ([Cin] each;
        padding stays zero), the previous BN's normalize + ReLU applied while loading;
      image_bias [N, Cout]: added per image after scale/shift, before the ReLU;
      stats (from stats_buffer(out)): per-patch count, sum and centred sum of squares of the
        stored values (before the cast) for merge_stats, columns channel_offset.. of the planes.
    """
    n, cin, h, w = x.shape
    cout, _, kh, kw = weight.shape
    geo = _geometry_args(stride, padding, dilation)
    ho, wo = _forward_out_hw(x, weight, geo)
    c0 = _check_out(out, channel_offset, x, cout, ho, wo)
    acc_dt, dot_dt, prec = _dtype_meta(x.dtype)
    if n * cout * ho * wo == 0:
        return
    if cin == 0 and (image_bias is not None or stats is not None):
        raise ValueError("atrous_conv2d_forward_into: image_bias and stats need Cin >= 1")
    if cin == 0:  # empty reduction: the convolution is zero
        y = shift if shift is not None else out.new_zeros(cout)
        y = torch.relu(y) if relu else y
        out[:, c0:c0 + cout].copy_(y.view(1, -1, 1, 1).expand(n, cout, ho, wo))
        return
    x_nhwc = x.contiguous(memory_format=torch.channels_last)
    w_kkio = _tap_major(weight, (2, 3, 1, 0))  # [KH, KW, Cin, Cout]: B rows along Cin
    # Pointers a constexpr leaves unread get x's (no per-call placeholder tensors).
    scale_arg = scale.contiguous() if scale is not None else x_nhwc
    shift_arg = shift.contiguous() if shift is not None else x_nhwc

    def grid(meta):
        return (n * triton.cdiv(ho, meta["TILE_H"]) * triton.cdiv(wo, meta["TILE_W"]),
                triton.cdiv(cout, meta["BLOCK_N"]))

    pro = [t.contiguous() for t in prologue] if prologue is not None else [x_nhwc] * 3
    bias = image_bias.contiguous() if image_bias is not None else x_nhwc
    stats_planes = stats if stats is not None else x_nhwc
    with _launch_ctx(x):
        _atrous_fwd_kernel[grid](
            x_nhwc, w_kkio, scale_arg, shift_arg, out, *pro, bias, stats_planes,
            n, h, w, cin, ho, wo, cout, kh, kw, *geo, out.shape[1], c0,
            stats_planes[0].numel() if stats is not None else 0,
            RELU=bool(relu), PROLOGUE=prologue is not None, IMAGE_BIAS=image_bias is not None,
            STATS=stats is not None, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None,
            ACC_DTYPE=acc_dt, DOT_DTYPE=dot_dt, DOT_PRECISION=prec)


def atrous_conv2d_grad_input(grad, weight, input_size, stride, padding, dilation):
    """d/dx of sum(conv2d(x, weight) * grad): [N, Cin, H, W] in grad's memory format."""
    n, cin, h, w = (int(v) for v in input_size)
    _, cout, ho, wo = grad.shape
    kh, kw = weight.shape[2], weight.shape[3]
    geo = _geometry_args(stride, padding, dilation)
    fmt = _memory_format(grad)
    acc_dt, dot_dt, prec = _dtype_meta(grad.dtype)
    dx = _nhwc_empty(n, cin, h, w, grad)
    if dx.numel() == 0:
        return dx.contiguous(memory_format=fmt)
    if cout == 0 or ho == 0 or wo == 0:
        return dx.zero_().contiguous(memory_format=fmt)
    g_nhwc = grad.contiguous(memory_format=torch.channels_last)
    w_kkoi = _tap_major(weight, (2, 3, 0, 1))  # [KH, KW, Cout, Cin]: the transposed GEMM

    def grid(meta):
        per_class = (triton.cdiv(triton.cdiv(h, geo[0]), meta["TILE_H"])
                     * triton.cdiv(triton.cdiv(w, geo[1]), meta["TILE_W"]))
        return (n * geo[0] * geo[1] * per_class, triton.cdiv(cin, meta["BLOCK_N"]))

    with _launch_ctx(grad):
        _atrous_dgrad_kernel[grid](
            g_nhwc, w_kkoi, dx,
            n, h, w, cin, ho, wo, cout, kh, kw, *geo,
            ACC_DTYPE=acc_dt, DOT_DTYPE=dot_dt, DOT_PRECISION=prec)
    return dx.contiguous(memory_format=fmt)


def _wgrad_split(t, taps, cout, cin, m_max):
    """How many slices the pixel reduction of grad_weight is cut into (>= 1)."""
    sms = torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else 4
    programs = taps * triton.cdiv(cout, 128) * triton.cdiv(cin, 128)  # at the largest blocks
    want = triton.cdiv(_WGRAD_PROGRAMS_PER_SM * sms, programs)
    return max(1, min(want, triton.cdiv(m_max, _WGRAD_MIN_SLICE), _WGRAD_MAX_SPLIT))


def atrous_conv2d_grad_weight(x, grad, weight_size, stride, padding, dilation):
    """d/dW of sum(conv2d(x, W) * grad): [Cout, Cin, KH, KW], contiguous, x.dtype."""
    cout, cin, kh, kw = (int(v) for v in weight_size)
    n, _, h, w = x.shape
    ho, wo = grad.shape[2], grad.shape[3]
    geo = _geometry_args(stride, padding, dilation)
    acc_dt, dot_dt, prec = _dtype_meta(x.dtype)
    if n == 0 or cout == 0 or cin == 0 or kh * kw == 0 or ho * wo == 0:
        return torch.zeros((cout, cin, kh, kw), device=x.device, dtype=x.dtype)
    x_nhwc = x.contiguous(memory_format=torch.channels_last)
    g_nhwc = grad.contiguous(memory_format=torch.channels_last)
    split = _wgrad_split(x, kh * kw, cout, cin, n * ho * wo)
    ws = torch.empty((split, kh * kw, cout, cin), device=x.device, dtype=_acc_dtype(x.dtype))

    def grid(meta):
        return (triton.cdiv(cout, meta["BLOCK_CO"]) * triton.cdiv(cin, meta["BLOCK_CI"]),
                kh * kw, split)

    with _launch_ctx(x):
        _atrous_wgrad_kernel[grid](
            x_nhwc, g_nhwc, ws,
            n, h, w, cin, ho, wo, cout, kh, kw, *geo, split,
            ACC_DTYPE=acc_dt, DOT_DTYPE=dot_dt, DOT_PRECISION=prec)
    dw = ws.sum(0) if split > 1 else ws[0]  # fixed-order sum: deterministic
    return dw.view(kh, kw, cout, cin).permute(2, 3, 0, 1).to(x.dtype).contiguous()
