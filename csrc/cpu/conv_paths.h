// One conv's forward, input gradient and weight gradient on the cpu backend, each by a path chosen
// per call: the direct loops for small problems (the rule in direct_conv.h), one GEMM per live tap
// (tap_gemm.h) otherwise. A single conv's forward above the direct loops' range may instead run
// Winograd (winograd.h) or, in fp32, oneDNN's convolution with fastaspp's epilogue applied in place,
// or in eval folded into oneDNN's own bias and ReLU (onednn_fused.h; forward_path below). The
// single-conv ops (atrous_conv.cpp) and the ASPP's branches (aspp.cpp) both run their convs through
// here.
#pragma once

#include <ATen/ATen.h>

#include "tap_gemm.h"

namespace fastaspp {

// The weights as per-tap GEMM operands (tap_matrices), kept per weight version (common/kept.h).
at::Tensor kept_tap_matrices(const at::Tensor& weight, at::ScalarType dtype);

// [N, Ho, Wo, Cout] in the compute dtype: conv(x, weight) over live taps, one GEMM per tap.
at::Tensor gemm_forward(const at::Tensor& x, const at::Tensor& weight, const ConvGeometry& g, int64_t out_h,
                        int64_t out_w);

// dx += conv_transpose(g * scale, weight). g: the output gradient [N, Ho, Wo, Cout] in the compute
// dtype, unit channel stride, evenly spaced pixels (dense NHWC or a channel slice of it); scale:
// [Cout] in the compute dtype or undefined for 1; dx: [N, H, W, Cin] contiguous, compute dtype.
void add_grad_input(const at::Tensor& g, const at::Tensor& weight, const at::Tensor& scale, const ConvGeometry& geo,
                    at::Tensor& dx);

// dx = conv_transpose(g * scale, weight), overwriting dx ([N, Cin, H, W], any dtype and layout);
// g and scale as for add_grad_input.
void grad_input(const at::Tensor& g, const at::Tensor& weight, const at::Tensor& scale, const ConvGeometry& geo,
                at::Tensor& dx);

// [Cout, Cin, KH, KW] (nn.Conv2d's shape) in channels_last layout, in the compute dtype: the weight
// gradient of conv(x) against g. xh: x as [N, H, W, Cin] contiguous in the compute dtype; g as for
// add_grad_input.
at::Tensor grad_weight(const at::Tensor& xh, const at::Tensor& g, int64_t kernel_h, int64_t kernel_w,
                            const ConvGeometry& geo);

// Whether the rule of direct_conv.h sends a conv of x [N, Cin, H, W] by weight [Cout, Cin, KH, KW]
// to Ho x Wo to the direct loops.
bool runs_direct(at::IntArrayRef x_size, at::IntArrayRef weight_size, int64_t out_h, int64_t out_w,
                 const ConvGeometry& geo);

// The path of a single conv's forward. Above the direct loops' range, oneDNN (at::convolution, with
// FMA) outruns one GEMM per live tap on this project's CPUs at every live share measured: it skips
// dead taps itself (benchmarks/results/cpu-onednn-live-share-*: 14 shapes from 27% to 96% of the
// (pixel, tap) pairs live, the ASPP's 2048-channel branches included). So every fp32 forward runs
// oneDNN; FASTASPP_CPU_ONEDNN=0 never uses it. Half types and fp64 keep the GEMMs (oneDNN would
// round half outputs before the epilogue; fp64 dilated convs are not oneDNN's).
//
// A 1x1 fp32 conv takes oneDNN whenever it is allowed, below the direct loops' range too: with no
// dead taps to skip, the loops lost to oneDNN's GEMM even on 5x5 maps.
// Before oneDNN: Winograd, for a 3x3 conv with stride 1 and padding = dilation = the same rate on
// both axes (every dilated 3x3 of a DeepLab backbone and the plain 3x3s), when use_winograd accepts
// it against the path it would replace: oneDNN for fp32, the tap GEMMs otherwise (kept weights;
// fewer products by a measured margin, docs/design.md §9).
//
// Within the direct loops' range, an fp32 conv (oneDNN allowed) keeps the loops only where they won
// on every CPU measured: at most kDirectAnyShareMaxMacs live multiply-adds, or at most
// kDirectMaxLiveShareFp32 of its pairs live. The loops multiply without FMA: on an AVX-512 CPU they
// took up to 1.9x eager's time on mostly live convs of 2-8 M multiply-adds
// (benchmarks/results/cpu-direct-crossover-20261202T*). Otherwise, up to
// kTorchConvMaxMacs, torch's own conv (at::convolution: the algorithm eager PyTorch runs at that
// shape, im2col + BLAS on small maps, where oneDNN's setup costs more than the conv) and the
// epilogue in place, which is eager's conv with one pass after it instead of BN's and ReLU's; above
// it oneDNN with the folded epilogue, as above the range.
enum class ForwardPath { kDirect, kWinograd, kOnednn, kTorchConv, kTapGemm };
constexpr int64_t kDirectAnyShareMaxMacs = int64_t{1} << 19;
constexpr double kDirectMaxLiveShareFp32 = 0.4;
constexpr int64_t kTorchConvMaxMacs = int64_t{1} << 22;
ForwardPath forward_path(const at::Tensor& x, const at::Tensor& weight, int64_t out_h, int64_t out_w,
                         const ConvGeometry& geo);

// Whether a single conv's backward (input and weight gradients) runs oneDNN's convolution_backward:
// fp32 above the direct loops' range with more than onednn_min_live_share of its pairs live, and
// within it wherever the forward's rule would not keep the loops (FASTASPP_CPU_ONEDNN=0 never, =1
// always). Otherwise the direct loops or the live-tap GEMMs: unlike its forward, oneDNN's backward
// does not skip dead taps, and took 1.5 to 5 times the GEMMs' time at 27-40% live, while the GEMMs
// lost to it on the backbone's mostly live convs (cpu-onednn-live-share-*, docs/design.md §8).
// Narrow convs (Cin x Cout below kOnednnWideChannelProduct) switch earlier: their per-tap GEMMs are
// small, and with 64 to 160 channels lost to oneDNN by 1.3 to 1.7x at 47-50% live while winning at
// 42% and below; from 192 channels the GEMMs were level or ahead at 50% live
// (cpu-onednn-live-share-thresholds-*).
constexpr double kOnednnMinLiveShare = 0.5;
constexpr double kOnednnMinLiveShareNarrow = 0.42;
constexpr int64_t kOnednnWideChannelProduct = int64_t{1} << 15;
double onednn_min_live_share(int64_t c_in, int64_t c_out);
bool backward_on_onednn(const at::Tensor& x, const at::Tensor& weight, int64_t out_h, int64_t out_w,
                        const ConvGeometry& geo);

// Whether a conv whose gradient is recorded runs torch's own conv both ways: its forward takes
// kTorchConv, or kOnednn with a weight that is not kept (a weight taking a gradient: the folded
// oneDNN form needs a kept one, so at::convolution runs), and its backward backward_on_onednn.
bool torch_conv_both_ways(const at::Tensor& x, const at::Tensor& weight, int64_t out_h, int64_t out_w,
                          const ConvGeometry& geo);

// The rate of a conv winograd_conv3x3 can run (3x3, stride 1, padding = dilation = rate on both
// axes), or 0.
int64_t winograd_rate(at::IntArrayRef weight_size, const ConvGeometry& geo);

}  // namespace fastaspp
