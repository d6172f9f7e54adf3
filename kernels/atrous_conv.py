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
of x and grad respectively (fastaspp._rules.result_format); every kernel works on NHWC storage, so
NCHW inputs are converted once on entry and the result once on exit.  Batch 0 (or any empty
dimension) returns without launching.  Dtypes, precision and autotuning: kernels/launch.py.

Tiling and dead-tap skipping (docs/design.md §2, §7; the building blocks are kernels/implicit_gemm.py):

* forward: implicit GEMM, one program = one 2-D patch of TILE_H x TILE_W output pixels of one
  image (flattened into BLOCK_M GEMM rows) x BLOCK_N output channels.  For each tap a scalar test
  intersects the tap's live rows/cols with the patch; a tap that reads only padding for the whole
  patch is skipped (no loads, no MACs), a partly live one is clipped by the load masks.  Live taps
  loop over Cin in BLOCK_K chunks into the accumulator; the epilogue applies scale, shift,
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
"""

import torch
import triton
import triton.language as tl

from fastaspp._rules import accumulator_dtype, result_format
from fastaspp.geometry import conv_out_size

from .implicit_gemm import (accumulate_tap, epilogue, floor_div, live_out_range, nhwc_empty, program_patch,
                            stats_buffer, tile_shape, unread_stats)
from .kept import KeptCopies
from .launch import (CONV_CONFIGS, CONV_PRUNE, INTERPRET, SUPPORTED_DTYPES, WGRAD_CONFIGS, WGRAD_PRUNE, cdiv,
                     dtype_meta, launch_ctx, launch_tuned)

__all__ = ["SUPPORTED_DTYPES", "atrous_conv2d_forward", "atrous_conv2d_forward_into", "atrous_conv2d_grad_input",
           "atrous_conv2d_grad_weight", "stats_buffer"]

# grad_weight splits the pixel reduction until about this many programs per SM are in flight,
# but never into slices shorter than _WGRAD_MIN_SLICE pixels (small under the interpreter so that
# the split path is exercised by small CPU tests).
_WGRAD_PROGRAMS_PER_SM = 2
_WGRAD_MIN_SLICE = 16 if INTERPRET else 1024
_WGRAD_MAX_SPLIT = 64

_CONV_KEY = ["N", "H", "W", "Cin", "Cout", "KH", "KW",
             "stride_h", "stride_w", "pad_h", "pad_w", "dil_h", "dil_w"]


def _fwd_tiles(args):
    return tile_shape(args["Ho"], args["Wo"], args["BLOCK_M"])


def _dgrad_tiles(args):
    # Patches tile one stride residue class: cdiv(H, s) x cdiv(W, s) pixels at most.
    return tile_shape(cdiv(args["H"], args["stride_h"]),
                      cdiv(args["W"], args["stride_w"]), args["BLOCK_M"])


# ----------------------------------------------------------------------------------------------
# Forward: y = act(conv(x, w) * scale + shift), NHWC.
# ----------------------------------------------------------------------------------------------

# reset_to_zero: autotuning runs every config, and configs with more patches would leave
# per-patch statistics rows the chosen config does not overwrite (Triton zeroes after tuning).
@triton.autotune(configs=CONV_CONFIGS, key=_CONV_KEY, prune_configs_by=CONV_PRUNE,
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
    n, oh, ow, oh0, ow0, oh_end, ow_end = program_patch(tl.program_id(0), Ho, Wo, BLOCK_M, TILE_H, TILE_W)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < Cout

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for tap in range(0, KH * KW):
        off_h = tap // KW * dil_h - pad_h
        off_w = tap % KW * dil_w - pad_w
        acc = accumulate_tap(acc, True, x_ptr, w_ptr + tap * Cin * Cout, pro_centre_ptr, pro_scale_ptr,
                              pro_shift_ptr, n, oh, ow, oh0, ow0, oh_end, ow_end, off_h, off_w, H, W, Ho, Wo,
                              Cin, Cout, Cin, stride_h, stride_w, offs_n, n_ok, PROLOGUE, ACC_DTYPE, DOT_DTYPE,
                              DOT_PRECISION, BLOCK_K)
    epilogue(acc, scale_ptr, shift_ptr, bias_ptr, y_ptr, stats_ptr, n, oh, ow, oh_end, ow_end, Ho, Wo, Cout,
              offs_n, n_ok, y_pix_stride, y_c_off, stats_plane, RELU, IMAGE_BIAS, STATS, ACC_DTYPE,
              HAS_SCALE, HAS_SHIFT)




# ----------------------------------------------------------------------------------------------
# grad_input: dx = conv_transpose(grad, w), NHWC, per stride residue class.
# ----------------------------------------------------------------------------------------------

@triton.autotune(configs=CONV_CONFIGS, key=_CONV_KEY, prune_configs_by=CONV_PRUNE)
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
        q_h = floor_div(r_h - off_h, stride_h)
        q_w = floor_div(r_w - off_w, stride_w)
        aligned = (q_h * stride_h == r_h - off_h) & (q_w * stride_w == r_w - off_w)
        lo_h, hi_h = live_out_range(off_h, ih0, ih_end, stride_h, Ho)
        lo_w, hi_w = live_out_range(off_w, iw0, iw_end, stride_w, Wo)
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

@triton.autotune(configs=WGRAD_CONFIGS, key=_CONV_KEY + ["SPLIT_M"], prune_configs_by=WGRAD_PRUNE)
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
    lo_h, hi_h = live_out_range(off_h, 0, H, stride_h, Ho)
    lo_w, hi_w = live_out_range(off_w, 0, W, stride_w, Wo)
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


# Tap-major copies of weights that take no gradient (eval-folded, frozen): kernels/kept.py.
TAP_MAJOR = KeptCopies()


def _tap_major(weight, dims):
    """weight.permute(*dims).contiguous(), kept as kernels/kept.py says."""
    return TAP_MAJOR.get((weight,), dims, lambda: weight.permute(*dims).contiguous())


def _geometry_args(stride, padding, dilation):
    return (int(stride[0]), int(stride[1]), int(padding[0]), int(padding[1]),
            int(dilation[0]), int(dilation[1]))


def _forward_out_hw(x, weight, geo):
    return (conv_out_size(x.shape[2], weight.shape[2], geo[0], geo[2], geo[4]),
            conv_out_size(x.shape[3], weight.shape[3], geo[1], geo[3], geo[5]))


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
    y = nhwc_empty(x.shape[0], weight.shape[0], ho, wo, x)
    atrous_conv2d_forward_into(x, weight, scale, shift, stride, padding, dilation, relu, y, 0)
    return y.contiguous(memory_format=result_format(x))


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
    acc_dt, dot_dt, prec = dtype_meta(x.dtype)
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
    # Pointers a constexpr leaves unread get x's (no per-call placeholder tensors); stats_ptr, which
    # autotuning zeroes, a kept placeholder.
    scale_arg = scale.contiguous() if scale is not None else x_nhwc
    shift_arg = shift.contiguous() if shift is not None else x_nhwc

    def grid(meta):
        return (n * cdiv(ho, meta["TILE_H"]) * cdiv(wo, meta["TILE_W"]),
                cdiv(cout, meta["BLOCK_N"]))

    pro = [t.contiguous() for t in prologue] if prologue is not None else [x_nhwc] * 3
    bias = image_bias.contiguous() if image_bias is not None else x_nhwc
    stats_planes = stats if stats is not None else unread_stats(x.device, accumulator_dtype(x.dtype))
    with launch_ctx(x):
        launch_tuned(
            _atrous_fwd_kernel, grid, x_nhwc, w_kkio, scale_arg, shift_arg, out, *pro, bias, stats_planes,
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
    fmt = result_format(grad)
    acc_dt, dot_dt, prec = dtype_meta(grad.dtype)
    dx = nhwc_empty(n, cin, h, w, grad)
    if dx.numel() == 0:
        return dx.contiguous(memory_format=fmt)
    if cout == 0 or ho == 0 or wo == 0:
        return dx.zero_().contiguous(memory_format=fmt)
    g_nhwc = grad.contiguous(memory_format=torch.channels_last)
    w_kkoi = _tap_major(weight, (2, 3, 0, 1))  # [KH, KW, Cout, Cin]: the transposed GEMM

    def grid(meta):
        per_class = (cdiv(cdiv(h, geo[0]), meta["TILE_H"])
                     * cdiv(cdiv(w, geo[1]), meta["TILE_W"]))
        return (n * geo[0] * geo[1] * per_class, cdiv(cin, meta["BLOCK_N"]))

    with launch_ctx(grad):
        launch_tuned(
            _atrous_dgrad_kernel, grid, g_nhwc, w_kkoi, dx,
            n, h, w, cin, ho, wo, cout, kh, kw, *geo,
            ACC_DTYPE=acc_dt, DOT_DTYPE=dot_dt, DOT_PRECISION=prec)
    return dx.contiguous(memory_format=fmt)


def _wgrad_split(t, taps, cout, cin, m_max):
    """How many slices the pixel reduction of grad_weight is cut into (>= 1)."""
    sms = torch.cuda.get_device_properties(t.device).multi_processor_count if t.is_cuda else 4
    programs = taps * cdiv(cout, 128) * cdiv(cin, 128)  # at the largest blocks
    want = cdiv(_WGRAD_PROGRAMS_PER_SM * sms, programs)
    return max(1, min(want, cdiv(m_max, _WGRAD_MIN_SLICE), _WGRAD_MAX_SPLIT))


def atrous_conv2d_grad_weight(x, grad, weight_size, stride, padding, dilation):
    """d/dW of sum(conv2d(x, W) * grad): [Cout, Cin, KH, KW], contiguous, x.dtype."""
    cout, cin, kh, kw = (int(v) for v in weight_size)
    n, _, h, w = x.shape
    ho, wo = grad.shape[2], grad.shape[3]
    geo = _geometry_args(stride, padding, dilation)
    acc_dt, dot_dt, prec = dtype_meta(x.dtype)
    if n == 0 or cout == 0 or cin == 0 or kh * kw == 0 or ho * wo == 0:
        return torch.zeros((cout, cin, kh, kw), device=x.device, dtype=x.dtype)
    x_nhwc = x.contiguous(memory_format=torch.channels_last)
    g_nhwc = grad.contiguous(memory_format=torch.channels_last)
    split = _wgrad_split(x, kh * kw, cout, cin, n * ho * wo)
    ws = torch.empty((split, kh * kw, cout, cin), device=x.device, dtype=accumulator_dtype(x.dtype))

    def grid(meta):
        return (cdiv(cout, meta["BLOCK_CO"]) * cdiv(cin, meta["BLOCK_CI"]),
                kh * kw, split)

    with launch_ctx(x):
        launch_tuned(
            _atrous_wgrad_kernel, grid, x_nhwc, g_nhwc, ws,
            n, h, w, cin, ho, wo, cout, kh, kw, *geo, split,
            ACC_DTYPE=acc_dt, DOT_DTYPE=dot_dt, DOT_PRECISION=prec)
    dw = ws.sum(0) if split > 1 else ws[0]  # fixed-order sum: deterministic
    return dw.view(kh, kw, cout, cin).permute(2, 3, 0, 1).to(x.dtype).contiguous()

