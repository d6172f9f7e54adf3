// The cpu backend's paths for one conv (see conv_paths.h).
#include "conv_paths.h"

#include "direct_conv.h"
#include "../common/checks.h"
#include "../common/kept.h"
#include "winograd.h"

namespace fastaspp {

at::Tensor kept_tap_matrices(const at::Tensor& weight, at::ScalarType dtype) {
  return kept({weight}, {kTapMatrices, static_cast<int64_t>(dtype)}, [&] { return tap_matrices(weight, dtype); });
}

bool runs_direct(at::IntArrayRef x_size, at::IntArrayRef weight_size, int64_t out_h, int64_t out_w,
                 const ConvGeometry& geo) {
  return use_direct(live_macs(x_size, weight_size, out_h, out_w, geo));
}

namespace {

// Whether oneDNN may run x's conv at all: fp32, and `choice` (of FASTASPP_CPU_ONEDNN, common/switches.h:
// "0" never, "1" always, unset by the rule) not "0". Above the direct loops' range the forward takes
// it whenever it may (conv_paths.h).
bool onednn_allowed(const at::Tensor& x, int choice) {
  return x.scalar_type() == at::kFloat && choice != kSwitchOff;
}

// The share of a conv's (output pixel, tap) pairs that are live.
double live_share(int64_t pairs, int64_t out_h, int64_t out_w, const at::Tensor& weight) {
  const double dense = static_cast<double>(out_h * weight.size(2)) * static_cast<double>(out_w * weight.size(3));
  return dense > 0 ? static_cast<double>(pairs) / dense : 0.0;
}

// Within the direct loops' range: whether a conv of `macs` live multiply-adds, `share` of its pairs
// live, leaves the loops for torch's (oneDNN's) conv, forward and backward alike (conv_paths.h).
bool leaves_loops(const at::Tensor& x, int choice, int64_t macs, double share) {
  if (!onednn_allowed(x, choice)) return false;
  return choice == kSwitchOn || (macs > kDirectAnyShareMaxMacs && share > kDirectMaxLiveShareFp32);
}

}  // namespace

ForwardPath forward_path(const at::Tensor& x, const at::Tensor& weight, int64_t out_h, int64_t out_w,
                         const ConvGeometry& geo) {
  const int64_t pairs = live_pairs(x.sizes(), weight.sizes(), out_h, out_w, geo);
  const int choice = checked_switch(kCpuOnednn);
  const bool onednn = onednn_allowed(x, choice);
  // A 1x1 conv has no dead taps for the direct loops to skip, and oneDNN's GEMM outruns them from
  // the smallest maps on: fp32 1x1 convs take oneDNN whenever it is allowed.
  const bool one_by_one = weight.size(2) == 1 && weight.size(3) == 1;
  if (one_by_one && onednn) return ForwardPath::kOnednn;
  const int64_t macs = x.size(0) * pairs * x.size(1) * weight.size(0);
  if (use_direct(macs)) {
    if (!leaves_loops(x, choice, macs, live_share(pairs, out_h, out_w, weight))) return ForwardPath::kDirect;
    return macs <= kTorchConvMaxMacs ? ForwardPath::kTorchConv : ForwardPath::kOnednn;
  }
  const int64_t rate = winograd_rate(weight.sizes(), geo);
  if (rate > 0 && use_winograd(x.size(0), x.size(2), x.size(3), rate, weight, accumulator_dtype(x.scalar_type()),
                               onednn ? WinogradRival::kOnednn : WinogradRival::kTapGemms))
    return ForwardPath::kWinograd;
  return onednn ? ForwardPath::kOnednn : ForwardPath::kTapGemm;
}

double onednn_min_live_share(int64_t c_in, int64_t c_out) {
  return c_in * c_out >= kOnednnWideChannelProduct ? kOnednnMinLiveShare : kOnednnMinLiveShareNarrow;
}

bool backward_on_onednn(const at::Tensor& x, const at::Tensor& weight, int64_t out_h, int64_t out_w,
                        const ConvGeometry& geo) {
  const int64_t pairs = live_pairs(x.sizes(), weight.sizes(), out_h, out_w, geo);
  const int choice = checked_switch(kCpuOnednn);
  const int64_t macs = x.size(0) * pairs * x.size(1) * weight.size(0);
  const double share = live_share(pairs, out_h, out_w, weight);
  if (use_direct(macs)) return leaves_loops(x, choice, macs, share);
  if (!onednn_allowed(x, choice)) return false;
  return choice == kSwitchOn || share > onednn_min_live_share(x.size(1), weight.size(0));
}

bool torch_conv_both_ways(const at::Tensor& x, const at::Tensor& weight, int64_t out_h, int64_t out_w,
                          const ConvGeometry& geo) {
  const ForwardPath path = forward_path(x, weight, out_h, out_w, geo);
  const bool forward = path == ForwardPath::kTorchConv || (path == ForwardPath::kOnednn && !keepable(weight));
  return forward && backward_on_onednn(x, weight, out_h, out_w, geo);
}

int64_t winograd_rate(at::IntArrayRef weight_size, const ConvGeometry& geo) {
  const int64_t rate = geo.dilation[0];
  const bool fits = weight_size[2] == 3 && weight_size[3] == 3 && geo.stride[0] == 1 && geo.stride[1] == 1 &&
                    geo.dilation[1] == rate && geo.padding[0] == rate && geo.padding[1] == rate;
  return fits ? rate : 0;
}

at::Tensor gemm_forward(const at::Tensor& x, const at::Tensor& weight, const ConvGeometry& g, int64_t out_h,
                        int64_t out_w) {
  const auto dtype = accumulator_dtype(x.scalar_type());
  const at::Tensor xh = to_nhwc(x, dtype);
  const at::Tensor w_taps = kept_tap_matrices(weight, dtype);  // [KH, KW, Cout, Cin]
  at::Tensor acc = at::zeros({x.size(0), out_h, out_w, weight.size(0)}, x.options().dtype(dtype));
  for (int64_t n = 0; n < x.size(0); ++n) forward_image(xh, w_taps, g, n, acc);
  return acc;
}

void add_grad_input(const at::Tensor& g, const at::Tensor& weight, const at::Tensor& scale, const ConvGeometry& geo,
                    at::Tensor& dx) {
  const std::vector<int64_t> x_size = {dx.size(0), dx.size(3), dx.size(1), dx.size(2)};
  if (runs_direct(x_size, weight.sizes(), g.size(1), g.size(2), geo)) {
    at::Tensor dx_nchw = dx.permute({0, 3, 1, 2});
    direct_grad_input(g, weight, scale, geo, dx_nchw, /*accumulate=*/true);
    return;
  }
  const at::Tensor gs = scale.defined() ? g * scale : g;
  const at::Tensor w_taps = kept_tap_matrices(weight, g.scalar_type());
  for (const LiveTap& t : live_taps(weight.size(2), weight.size(3), dx.size(1), dx.size(2), g.size(1), g.size(2), geo))
    accumulate_gemm(input_rect(dx, t, geo), gather_rect(output_rect(gs, t)), w_taps[t.kh][t.kw]);
}

void grad_input(const at::Tensor& g, const at::Tensor& weight, const at::Tensor& scale, const ConvGeometry& geo,
                at::Tensor& dx) {
  if (dx.numel() == 0) return;
  if (runs_direct(dx.sizes(), weight.sizes(), g.size(1), g.size(2), geo)) {
    direct_grad_input(g, weight, scale, geo, dx);  // straight into dx: nothing to add to
    return;
  }
  at::Tensor acc = at::zeros({dx.size(0), dx.size(2), dx.size(3), dx.size(1)}, g.options());
  add_grad_input(g, weight, scale, geo, acc);
  dx.copy_(acc.permute({0, 3, 1, 2}));
}

at::Tensor grad_weight(const at::Tensor& xh, const at::Tensor& g, int64_t kernel_h, int64_t kernel_w,
                       const ConvGeometry& geo) {
  const std::vector<int64_t> x_size = {xh.size(0), xh.size(3), xh.size(1), xh.size(2)};
  if (runs_direct(x_size, {g.size(3), xh.size(3), kernel_h, kernel_w}, g.size(1), g.size(2), geo))
    return direct_grad_weight(xh, g, kernel_h, kernel_w, geo);
  // channels_last storage [Cout, KH, KW, Cin]: each tap's [Cout, Cin] matrix has unit Cin stride, so
  // the GEMM writes it in place, and the result is laid out as a channels_last weight is.
  at::Tensor dw = at::empty({g.size(3), xh.size(3), kernel_h, kernel_w},
                            xh.options().memory_format(at::MemoryFormat::ChannelsLast));
  const at::Tensor taps = dw.permute({2, 3, 0, 1});  // [KH, KW, Cout, Cin]
  std::vector<bool> live(kernel_h * kernel_w, false);
  for (const LiveTap& t : live_taps(kernel_h, kernel_w, xh.size(1), xh.size(2), g.size(1), g.size(2), geo)) {
    at::Tensor dw_tap = taps[t.kh][t.kw];  // [Cout, Cin] = g^T @ x over the live rectangle
    at::mm_out(dw_tap, gather_rect(output_rect(g, t)).t(), gather_rect(input_rect(xh, t, geo)));
    live[t.kh * kernel_w + t.kw] = true;
  }
  for (int64_t tap = 0; tap < kernel_h * kernel_w; ++tap)
    if (!live[tap]) taps[tap / kernel_w][tap % kernel_w].zero_();  // a dead tap reads only padding
  return dw;
}

}  // namespace fastaspp
