// One conv's forward, input gradient and weight gradient on the cpu backend, each by one of two
// paths chosen per call by the rule in direct_conv.h: the direct loops for small problems, one GEMM
// per live tap (tap_gemm.h) otherwise. The single-conv ops (atrous_conv.cpp) and the ASPP's
// branches (aspp.cpp) both run their convs through here.
#pragma once

#include <ATen/ATen.h>

#include "tap_gemm.h"

namespace fastaspp {

// The weights as per-tap GEMM operands (tap_matrices), kept per weight version (kept.h).
at::Tensor kept_tap_matrices(const at::Tensor& weight, at::ScalarType dtype);

// [N, Ho, Wo, Cout] in the compute dtype: conv(x, weight) over live taps, one GEMM per tap.
at::Tensor gemm_forward(const at::Tensor& x, const at::Tensor& weight, const ConvGeometry& g, int64_t out_h,
                        int64_t out_w);

// dx += conv_transpose(g * scale, weight). g: the output gradient [N, Ho, Wo, Cout] in the compute
// dtype, unit channel stride, evenly spaced pixels (dense NHWC or a channel slice of it); scale:
// [Cout] in the compute dtype or undefined for 1; dx: [N, H, W, Cin] contiguous, compute dtype.
void add_grad_input(const at::Tensor& g, const at::Tensor& weight, const at::Tensor& scale, const ConvGeometry& geo,
                    at::Tensor& dx);

// [KH, KW, Cout, Cin] in the compute dtype: the weight gradient of conv(x) against g. xh: x as
// [N, H, W, Cin] contiguous in the compute dtype; g as for add_grad_input.
at::Tensor grad_weight_taps(const at::Tensor& xh, const at::Tensor& g, int64_t kernel_h, int64_t kernel_w,
                            const ConvGeometry& geo);

// The live multiply-adds of a conv of x [N, Cin, H, W] by weight [Cout, Cin, KH, KW] to Ho x Wo,
// and whether the rule sends it to the direct loops.
bool runs_direct(at::IntArrayRef x_size, at::IntArrayRef weight_size, int64_t out_h, int64_t out_w,
                 const ConvGeometry& geo);

}  // namespace fastaspp
