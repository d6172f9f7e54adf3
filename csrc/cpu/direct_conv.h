// Direct convolution for small problems on CPU: plain loops over output (or input) pixels and live
// taps, vectorised over channels, with no GEMM call, no per-tap allocation and no thread fan-out
// below a grain of work. A conv with little work costs its arithmetic plus one output allocation,
// where the live-tap GEMM path (tap_gemm.h) pays a BLAS call and several tensor views per tap.
//
// The rule: a call runs direct when its live multiply-adds (N * live (pixel, tap) pairs * Cin *
// Cout) are at most FASTASPP_CPU_DIRECT_MAX_MACS (default kDirectMaxMacs: where oneDNN's conv with
// the fused epilogue starts to win for fp32 on this project's 2-core CPUs, a little before the
// live-tap GEMMs do; benchmarks/results/cpu-direct-crossover-*). The loops multiply
// and add without FMA (every clone rounds alike), so above that oneDNN's FMA kernels outrun them;
// below, the other paths' fixed costs (per-tap calls, oneDNN's setup) weigh more.
#pragma once

#include <ATen/ATen.h>

#include "tap_gemm.h"

namespace fastaspp {

// The default threshold of the rule above, in multiply-adds.
constexpr int64_t kDirectMaxMacs = 8000000;

// Live (output pixel, tap) pairs of one image of a conv of x [N, Cin, H, W] with a
// [Cout, Cin, KH, KW] weight to Ho x Wo (the C++ twin of fastaspp.geometry.live_tap_pixels).
int64_t live_pairs(at::IntArrayRef x_size, at::IntArrayRef weight_size, int64_t out_h, int64_t out_w,
                   const ConvGeometry& g);

// Multiply-adds over live taps of that conv: N * live_pairs * Cin * Cout.
int64_t live_macs(at::IntArrayRef x_size, at::IntArrayRef weight_size, int64_t out_h, int64_t out_w,
                  const ConvGeometry& g);

// Whether a conv of `macs` live multiply-adds runs direct (the rule above).
bool use_direct(int64_t macs);

// y = act(conv(x, weight) * alpha + beta) per output channel, written into y ([N, Cout, Ho, Wo]
// of x's dtype, any strides). alpha, beta: contiguous [Cout] in the compute dtype (accumulator_dtype),
// or undefined for ones / zeros.
void direct_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha, const at::Tensor& beta,
                    bool relu, const ConvGeometry& g, at::Tensor& y);

// dx = conv_transpose(g * scale, weight) into dx ([N, Cin, H, W] of any dtype and strides), or
// dx += it with accumulate (dx then in the compute dtype). gm: the output gradient as
// [N, Ho, Wo, Cout] in the compute dtype, unit channel stride, evenly spaced pixels (a dense NHWC
// tensor or a channel slice of one); scale: [Cout] in the compute dtype, or undefined for 1.
void direct_grad_input(const at::Tensor& gm, const at::Tensor& weight, const at::Tensor& scale,
                       const ConvGeometry& g, at::Tensor& dx, bool accumulate = false);

// The weight gradient, the sum over pixels of g * x per tap, as [Cout, Cin, KH, KW] (nn.Conv2d's
// layout) in the compute dtype. xh: x as [N, H, W, Cin], contiguous, compute dtype; gm as for
// direct_grad_input.
at::Tensor direct_grad_weight(const at::Tensor& xh, const at::Tensor& gm, int64_t kernel_h, int64_t kernel_w,
                              const ConvGeometry& g);

}  // namespace fastaspp
