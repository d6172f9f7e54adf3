// Live-tap GEMM machinery shared by the CPU kernels (conv_paths.cpp, aspp.cpp, winograd.cpp).
//
// Work is organised by tap, not by pixel: for tap (kh, kw) the output pixels that read
// real data form a rectangle (tap_live_range per axis). Dead taps are skipped outright and
// partially live ones run a GEMM over their rectangle only, so work scales with live
// (pixel, tap) pairs (docs/design.md §2). GEMMs go through ATen (MKL/OpenBLAS); copies and
// the epilogue (epilogue.h) are at::parallel_for loops. Half types compute in fp32, fp64 in fp64.
// Activations are NHWC views [N, H, W, C] in the compute dtype.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "../common/rules.h"
#include "../common/tap_geometry.h"

namespace fastaspp {

// One live tap: its kernel index and the output rectangle where it reads real data.
struct LiveTap {
  int64_t kh, kw;
  LiveRange rows, cols;
  int64_t in_row0, in_col0;  // input coordinate read by the rectangle's first pixel
};

std::vector<LiveTap> live_taps(int64_t kernel_h, int64_t kernel_w, int64_t in_h, int64_t in_w,
                               int64_t out_h, int64_t out_w, const ConvGeometry& g);

// [N, H, W, C] view of an NCHW-shaped tensor, in the given (accumulator) dtype.
at::Tensor to_nhwc(const at::Tensor& t, at::ScalarType dtype);
// t with the strides of `like` (a weight gradient in its weight's layout). Autograd stores a
// gradient whose strides are its parameter's as it is; any other layout it copies (its layout
// contract), so returning the weight's layout saves that copy. No copy when t already has it.
at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like);
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

}  // namespace fastaspp
