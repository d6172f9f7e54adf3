// Live-tap GEMM machinery shared by the CPU kernels (atrous_conv.cpp, aspp.cpp, aspp_train.cpp).
//
// Work is organised by tap, not by pixel: for tap (kh, kw) the output pixels that read
// real data form a rectangle (tap_live_range per axis). Dead taps are skipped outright and
// partially live ones run a GEMM over their rectangle only, so work scales with live
// (pixel, tap) pairs (DESIGN.md §2.1). GEMMs go through ATen (MKL/OpenBLAS); copies and
// the epilogue are at::parallel_for loops. Half types compute in fp32, fp64 in fp64.
// Activations are NHWC views [N, H, W, C] in the compute dtype.
#pragma once

#include <ATen/ATen.h>

#include <utility>
#include <vector>

#include "../common/tap_geometry.h"

namespace fastaspp {

struct ConvGeometry {
  int64_t stride[2];
  int64_t padding[2];
  int64_t dilation[2];
};

// One live tap: its kernel index and the output rectangle where it reads real data.
struct LiveTap {
  int64_t kh, kw;
  LiveRange rows, cols;
  int64_t in_row0, in_col0;  // input coordinate read by the rectangle's first pixel
};

ConvGeometry make_geometry(at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);
std::vector<LiveTap> live_taps(int64_t kernel_h, int64_t kernel_w, int64_t in_h, int64_t in_w,
                               int64_t out_h, int64_t out_w, const ConvGeometry& g);

at::ScalarType compute_dtype(at::ScalarType t);
// [N, H, W, C] view of an NCHW-shaped tensor, in the compute dtype.
at::Tensor to_nhwc(const at::Tensor& t, at::ScalarType dtype);
// [KH, KW, Cout, Cin] view whose tap matrices BLAS reads in place (see tap_gemm.cpp).
at::Tensor tap_matrices(const at::Tensor& weight, at::ScalarType dtype);

// The input pixels read by a tap's output rectangle / the rectangle itself: [N, rows, cols, C].
at::Tensor input_rect(const at::Tensor& nhwc, const LiveTap& t, const ConvGeometry& g);
at::Tensor output_rect(const at::Tensor& nhwc, const LiveTap& t);
// A [N*rows*cols, C] contiguous matrix of a rectangle's pixels (no copy when already dense).
at::Tensor gather_rect(const at::Tensor& rect);
// rect += values ([N*rows*cols, C] contiguous); rect may be strided (unit channel stride).
void add_to_rect(const at::Tensor& rect, const at::Tensor& values);
// rect += a @ b, in place when rect is dense.
void accumulate_gemm(const at::Tensor& rect, const at::Tensor& a, const at::Tensor& b);

// acc[n] += conv(xh[n], taps) over the live taps, grouped by kernel column. acc is
// [N, Ho, Wo, Cout] with unit channel stride and pixels evenly spaced (it may be a channel
// slice of a wider buffer). With skip_centre the centre tap of an odd kernel is left out
// (ASPP computes it for all branches in one GEMM).
void forward_image(const at::Tensor& xh, const at::Tensor& w_taps, const ConvGeometry& g, int64_t n,
                   const at::Tensor& acc, bool skip_centre = false);

// y = act(acc * scale + shift) per channel, from NHWC accumulators into y (NCHW or NHWC storage).
void bn_relu_epilogue(const at::Tensor& acc, const at::Tensor& scale, const at::Tensor& shift, bool relu,
                      at::Tensor& y);

// y = act(y * alpha + beta) per channel, in place: y [N, C, H, W] fp32/fp64, contiguous or
// channels_last; alpha, beta: [C] in y's dtype, or undefined for ones / zeros.
void affine_relu_inplace(at::Tensor& y, const at::Tensor& alpha, const at::Tensor& beta, bool relu);

// Per-channel mean and biased variance of acc_2d ([P, C] contiguous, fp32 or fp64; P > 0), in
// its dtype: the batch-norm training statistics. Deterministic whatever the thread count.
std::pair<at::Tensor, at::Tensor> channel_stats(const at::Tensor& acc_2d);

// grad as a contiguous [N, H, W, C] tensor in `dtype`, zero where out <= 0 when out is defined (the
// gradient through a ReLU, read from its saved output; NaN outputs keep their gradient, as with
// grad.masked_fill(out <= 0, 0)). grad and out: [N, C, H, W], any strides.
at::Tensor masked_nhwc(const at::Tensor& grad, const at::Tensor& out, at::ScalarType dtype);

// Per-channel sums of a_2d ([P, C] contiguous, fp32 or fp64), in fixed blocks of pixels merged in
// order: the same bits whatever the thread count.
at::Tensor channel_sums(const at::Tensor& a_2d);

void check_cpu_float(const at::Tensor& t, const char* name);
void check_4d(const at::Tensor& t, const char* name);

}  // namespace fastaspp
