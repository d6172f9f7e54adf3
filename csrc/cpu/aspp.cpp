// CPU kernels of fastaspp::_aspp_branches_forward and _aspp_branches_stats_forward: every
// branch of an ASPP into one NHWC buffer, with the centre tap shared (docs/design.md §4): the
// 1x1 branch and the centre taps of all 3x3 branches read the same pixel, so they are one
// GEMM with N = (1+R)*C. The off-centre taps of each 3x3 branch then accumulate into that
// branch's channel slice (dead taps skipped). In eval, fp32/fp64 branches whose rate leaves
// small sub-grids run as Winograd convs instead (winograd.h), which need fewer products than
// the live taps, and branches with little work run whole by the direct loops (direct_conv.h).
// Weight preparations (the concatenated centre taps, tap matrices, Winograd transforms) are kept
// per weight version (common/kept.h). Eval applies every branch's scale, shift and ReLU in one epilogue;
// training returns the raw sums with their batch-norm statistics.
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "../common/rules.h"
#include "channel_stats.h"
#include "conv_paths.h"
#include "direct_conv.h"
#include "epilogue.h"
#include "../common/kept.h"
#include "tap_gemm.h"
#include "winograd.h"

namespace fastaspp {
namespace {

// Checks x, weights and rates; returns C, the channels of one branch.
int64_t check_branches(const at::Tensor& x, at::TensorList weights, at::IntArrayRef rates) {
  check_4d(x, "x");
  check_cpu_float(x, "x");
  const int64_t branches = static_cast<int64_t>(weights.size());
  TORCH_CHECK(branches == static_cast<int64_t>(rates.size()) + 1, "fastaspp: weights must hold ",
              rates.size() + 1, " tensors (the 1x1 branch, then one per rate), got ", branches);
  const int64_t in_ch = x.size(1);
  const int64_t ch = weights[0].size(0);
  for (int64_t i = 0; i < branches; ++i) {
    const int64_t k = i == 0 ? 1 : 3;
    check_cpu_float(weights[i], "weights");
    TORCH_CHECK(weights[i].dim() == 4 && weights[i].size(0) == ch && weights[i].size(1) == in_ch &&
                    weights[i].size(2) == k && weights[i].size(3) == k,
                "fastaspp: weights[", i, "] must have shape [", ch, ", ", in_ch, ", ", k, ", ", k, "], got ",
                weights[i].sizes());
    if (i > 0) TORCH_CHECK(rates[i - 1] >= 1, "fastaspp: rates must be >= 1, got ", rates);
  }
  return ch;
}

// Whether any off-centre tap of a 3x3 branch at `rate` reads the map: taps sit `rate` pixels from
// the centre, so none does once the rate reaches both sides of the map.
bool off_centre_live(int64_t in_h, int64_t in_w, int64_t rate) { return rate < in_h || rate < in_w; }

// The raw branch sums into acc: [N, H, W, (1+R)*C] in the compute dtype, contiguous (x must not
// be empty). Each branch runs one of three ways: whole by the direct loops when its live
// multiply-adds are few (direct_conv.h); whole as Winograd when allow_winograd and use_winograd
// accept it; otherwise its centre tap in the shared GEMM and its live off-centre taps one GEMM each.
void branches_into(const at::Tensor& x, at::TensorList weights, at::IntArrayRef rates, int64_t ch,
                   bool allow_winograd, const at::Tensor& acc) {
  enum class Way { kShared, kDirect, kWinograd };
  const int64_t branches = static_cast<int64_t>(weights.size());
  const int64_t batch = x.size(0), in_ch = x.size(1), in_h = x.size(2), in_w = x.size(3);
  const auto dtype = accumulator_dtype(x.scalar_type());
  std::vector<Way> way(branches, Way::kShared);
  std::vector<ConvGeometry> geometry(branches);
  for (int64_t i = 0; i < branches; ++i) {
    const int64_t r = i == 0 ? 0 : rates[i - 1];
    geometry[i] = aspp_branch_geometry(r);
    if (runs_direct(x.sizes(), weights[i].sizes(), in_h, in_w, geometry[i]))
      way[i] = Way::kDirect;
    else if (i > 0 && allow_winograd && use_winograd(batch, in_h, in_w, r, weights[i], dtype, WinogradRival::kTapGemms))
      way[i] = Way::kWinograd;
  }
  for (int64_t i = 0; i < branches; ++i) {
    if (way[i] != Way::kDirect) continue;
    at::Tensor slice = acc.narrow(3, i * ch, ch).permute({0, 3, 1, 2});  // [N, C, H, W] view
    direct_forward(x, weights[i], at::Tensor(), at::Tensor(), /*relu=*/false, geometry[i], slice);
  }
  if (std::all_of(way.begin(), way.end(), [](Way w) { return w == Way::kDirect; })) return;
  const at::Tensor xh = to_nhwc(x, dtype);

  // Shared centre tap: [N*H*W, Cin] @ [Cin, C] for every shared branch, one GEMM per run of
  // adjacent shared branches straight into the buffer, their centre taps concatenated once per
  // weight version (common/kept.h).
  const at::Tensor x_2d = xh.reshape({batch * in_h * in_w, in_ch});  // explicit: in_ch may be 0
  at::Tensor acc_2d = acc.view({-1, branches * ch});
  int64_t first = 0;
  while (first < branches) {
    if (way[first] != Way::kShared) {
      ++first;
      continue;
    }
    int64_t last = first;
    while (last < branches && way[last] == Way::kShared) ++last;
    const at::TensorList run = weights.slice(first, last - first);
    const at::Tensor centre = kept(run, {kCentreTaps, static_cast<int64_t>(dtype), first}, [&] {
      std::vector<at::Tensor> taps;
      for (int64_t i = first; i < last; ++i) {
        const int64_t mid = i == 0 ? 0 : 1;
        taps.push_back(weights[i].to(dtype).select(3, mid).select(2, mid));  // [C, Cin]
      }
      return at::cat(taps, 0).t();  // [Cin, run * C], transposed: BLAS reads it in place
    });
    at::Tensor out = acc_2d.narrow(1, first * ch, (last - first) * ch);
    at::mm_out(out, x_2d, centre);
    first = last;
  }

  // Off-centre taps of each shared 3x3 branch into its channel slice; Winograd branches whole.
  for (int64_t i = 1; i < branches; ++i) {
    const int64_t r = rates[i - 1];
    const at::Tensor slice = acc.narrow(3, i * ch, ch);
    if (way[i] == Way::kWinograd) {
      winograd_conv3x3(xh, weights[i], r, slice);  // xh is contiguous NHWC (to_nhwc)
    } else if (way[i] == Way::kShared && off_centre_live(in_h, in_w, r)) {
      const at::Tensor w_taps = kept_tap_matrices(weights[i], dtype);
      for (int64_t n = 0; n < batch; ++n) forward_image(xh, w_taps, geometry[i], n, slice, /*skip_centre=*/true);
    }
  }
}

at::Tensor branches_acc(const at::Tensor& x, at::TensorList weights, at::IntArrayRef rates, int64_t ch,
                        bool allow_winograd) {
  const int64_t branches = static_cast<int64_t>(weights.size());
  at::Tensor acc = at::empty({x.size(0), x.size(2), x.size(3), branches * ch},
                             x.options().dtype(accumulator_dtype(x.scalar_type())));
  branches_into(x, weights, rates, ch, allow_winograd, acc);
  return acc;
}

at::Tensor aspp_branches_forward_cpu(const at::Tensor& x, at::TensorList weights, at::IntArrayRef rates,
                                     const at::Tensor& scale, const at::Tensor& shift, bool relu) {
  const int64_t ch = check_branches(x, weights, rates);
  const int64_t branches = static_cast<int64_t>(weights.size());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == branches * ch && shift.dim() == 1 &&
                  shift.size(0) == branches * ch,
              "fastaspp: scale and shift must have shape [", branches * ch, "], got ", scale.sizes(), " and ",
              shift.sizes());

  at::Tensor y = at::empty({x.size(0), branches * ch, x.size(2), x.size(3)},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;
  if (accumulator_dtype(x.scalar_type()) == x.scalar_type()) {
    // fp32/fp64: the sums go straight into y's storage and the epilogue runs in place.
    const at::Tensor acc = y.permute({0, 2, 3, 1});
    branches_into(x, weights, rates, ch, /*allow_winograd=*/true, acc);
    bn_relu_epilogue(acc, scale, shift, relu, y);
  } else {
    bn_relu_epilogue(branches_acc(x, weights, rates, ch, /*allow_winograd=*/true), scale, shift, relu, y);
  }
  return y;
}

// Training: z = the raw branch sums (as _aspp_branches_forward with scale 1, shift 0, no ReLU)
// and the batch-norm statistics of z, taken from the fp32/fp64 sums before any cast.
std::tuple<at::Tensor, at::Tensor, at::Tensor> aspp_branches_stats_forward_cpu(const at::Tensor& x,
                                                                               at::TensorList weights,
                                                                               at::IntArrayRef rates) {
  const int64_t ch = check_branches(x, weights, rates);
  const int64_t branches = static_cast<int64_t>(weights.size());
  const auto dtype = accumulator_dtype(x.scalar_type());
  const auto cl = x.options().memory_format(at::MemoryFormat::ChannelsLast);
  const std::vector<int64_t> shape = {x.size(0), branches * ch, x.size(2), x.size(3)};
  if (x.size(0) * x.size(2) * x.size(3) == 0 || ch == 0) {
    const at::Tensor zeros = at::zeros({branches * ch}, x.options().dtype(dtype));
    return {at::empty(shape, cl), zeros, zeros.clone()};
  }
  const at::Tensor acc = branches_acc(x, weights, rates, ch, /*allow_winograd=*/false);
  auto [mean, var] = channel_stats(acc.view({-1, branches * ch}));
  // The NHWC buffer is already z in channels_last storage; half types need a rounded copy.
  at::Tensor z = acc.permute({0, 3, 1, 2});
  if (dtype != x.scalar_type()) z = at::empty(shape, cl).copy_(z);
  return {z, mean, var};
}

// The input and weight gradients of the raw branch sums (_aspp_branches_forward with scale 1, shift
// 0 and no ReLU) in one call: dx = the sum over branches of each one's transposed conv of its
// channel slice of grad, accumulated in one buffer; dweights[i] its weight gradient, in the layout
// of weights[i]. Each conv by its own path (conv_paths.h); the slices are read in place.
std::tuple<at::Tensor, std::vector<at::Tensor>> aspp_branches_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, at::TensorList weights, at::IntArrayRef rates,
    std::array<bool, 2> output_mask) {
  const int64_t ch = check_branches(x, weights, rates);
  const int64_t branches = static_cast<int64_t>(weights.size());
  check_4d(grad, "grad");
  TORCH_CHECK(grad.size(0) == x.size(0) && grad.size(1) == branches * ch && grad.size(2) == x.size(2) &&
                  grad.size(3) == x.size(3),
              "fastaspp: grad must have shape [", x.size(0), ", ", branches * ch, ", ", x.size(2), ", ", x.size(3),
              "], got ", grad.sizes());
  const auto dtype = accumulator_dtype(x.scalar_type());
  const at::Tensor gh = to_nhwc(grad, dtype);  // [N, H, W, (1+R)*C]
  at::Tensor dx_acc, xh;
  if (output_mask[0]) dx_acc = at::zeros({x.size(0), x.size(2), x.size(3), x.size(1)}, x.options().dtype(dtype));
  if (output_mask[1]) xh = to_nhwc(x, dtype);
  std::vector<at::Tensor> dweights;
  for (int64_t i = 0; i < branches; ++i) {
    const int64_t r = i == 0 ? 0 : rates[i - 1];
    const ConvGeometry geo = aspp_branch_geometry(r);
    const at::Tensor gi = gh.narrow(3, i * ch, ch);
    if (output_mask[0] && dx_acc.numel() > 0) add_grad_input(gi, weights[i], at::Tensor(), geo, dx_acc);
    if (output_mask[1]) {
      const at::Tensor dw = grad_weight(xh, gi, weights[i].size(2), weights[i].size(3), geo);
      dweights.push_back(in_layout_of(dw.to(weights[i].scalar_type()), weights[i]));
    }
  }
  at::Tensor dx;
  if (output_mask[0]) {
    dx = at::empty(x.sizes(), x.options().memory_format(result_format(x)));
    dx.copy_(dx_acc.permute({0, 3, 1, 2}));
  }
  return {dx, dweights};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastaspp, CPU, m) {
  m.impl("_aspp_branches_forward", &aspp_branches_forward_cpu);
  m.impl("_aspp_branches_stats_forward", &aspp_branches_stats_forward_cpu);
  m.impl("_aspp_branches_backward", &aspp_branches_backward_cpu);
}

}  // namespace fastaspp
