// CUDA registrations of fastaspp::_aspp_branches_forward, _aspp_branches_stats_forward and
// _aspp_branches_grad_input (schemas in csrc/aspp.cpp).
//
// The ASPP conv branches over one feature map x [N, Cin, H, W] (act = ReLU when relu):
//   b0 = act(conv1x1(x, weights[0]) * scale[0:C] + shift[0:C])
//   bi = act(conv3x3(x, weights[i], dilation = padding = rates[i-1]) * scale[iC:(i+1)C]
//            + shift[iC:(i+1)C])                                   for i = 1..R
// (eval: BN folded into scale / shift per branch by the caller), written straight into channels
// [i*C, (i+1)*C) of ONE channels_last buffer [N, (1+R)*C, H, W]: no torch.cat and no
// per-branch output tensor (docs/design.md §4). All branches are one launch of the forward conv
// kernel (fastaspp_atrous_conv2d_forward_branches_cuda: pixel stride (1+R)*C, branch i at channel
// offset i*C; grid.y over (branch, channel block), so a small batch still fills the GPU), which
// skips dead taps per tile (§2). x is brought to NHWC once for all branches.
// Training (_aspp_branches_stats_forward): the raw branches, with the BN statistics from the
// same launch's epilogues (§6), merged here; and their input gradient (_aspp_branches_grad_input),
// every branch summed in one launch's accumulators (§7).
// Not done here yet: sharing one read of x between b0 and the centre taps of b1..bR (§4).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <string>
#include <tuple>
#include <vector>

#include <cuda_runtime_api.h>

#include "../common/rules.h"
#include "../common/tap_geometry.h"
#include "atrous_conv.h"
#include "binding_utils.h"

namespace fastaspp {
namespace {

using namespace cuda_binding;  // binding_utils.h: the helpers both bindings share

// Checks the weights and rates the branch ops share, for c_in input channels, against the device
// and dtype of `ref` (x, or the gradient), already checked; returns C, the channels per branch.
int64_t check_branches(const char* op, const at::Tensor& ref, const char* ref_name, int64_t c_in,
                       at::TensorList weights, at::IntArrayRef rates) {
  const int64_t num_rates = static_cast<int64_t>(rates.size());
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == num_rates + 1, op,
              ": weights must hold len(rates) + 1 = ", num_rates + 1,
              " tensors (the 1x1 weight, then one 3x3 weight per rate), got ", weights.size());
  for (int64_t i = 0; i < num_rates; ++i) {
    TORCH_CHECK(rates[i] >= 1, op, ": rates[", i, "] must be >= 1 (it is the dilation and ",
                "padding of weights[", i + 1, "]), got ", rates[i]);
  }
  int64_t c = 0;  // channels per branch, from weights[0]
  for (int64_t i = 0; i <= num_rates; ++i) {
    const std::string name = "weights[" + std::to_string(i) + "]";
    const at::Tensor& wi = weights[i];
    check_tensor(op, wi, name.c_str(), 4);
    check_same(op, ref, ref_name, wi, name.c_str());
    if (i == 0) c = wi.size(0);
    const int64_t k = i == 0 ? 1 : 3;
    TORCH_CHECK(wi.size(0) == c && wi.size(1) == c_in && wi.size(2) == k && wi.size(3) == k,
                op, ": ", name, " must have shape [", c, ", ", c_in, ", ", k, ", ", k, "] (",
                i == 0 ? "the 1x1 branch" : "a 3x3 branch",
                "; C = weights[0].size(0), Cin = ", c_in, "), got ", wi.sizes());
  }
  return c;
}

// Branch i's kernel size, padding and dilation: the "same" geometry of aspp_branch_geometry (stride
// 1, padding = dilation), so every branch is H x W; 1x1 for the first, 3x3 for the rates.
FastasppBranchGeometry branch_geometry(at::IntArrayRef rates, size_t i) {
  const ConvGeometry g = aspp_branch_geometry(i == 0 ? 0 : rates[i - 1]);
  const int64_t k = i == 0 ? 1 : 3;
  return FastasppBranchGeometry{k, k, g.padding[0], g.padding[1], g.dilation[0], g.dilation[1]};
}

// Every branch into channels [i*C, (i+1)*C) of the channels_last buffer y, in one launch;
// options_for(i) gives branch i's epilogue. x is brought to NHWC once for all branches.
template <typename OptionsFor>
void launch_branches(const at::Tensor& x, at::TensorList weights, at::IntArrayRef rates, at::Tensor& y,
                     OptionsFor&& options_for) {
  const int64_t n = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t c = weights[0].size(0), c_total = y.size(1);
  const at::Tensor x_nhwc = x.contiguous(at::MemoryFormat::ChannelsLast);
  std::vector<at::Tensor> layouts;  // alive until the launch is queued (then the allocator orders reuse)
  std::vector<FastasppBranch> branches(weights.size());
  for (size_t i = 0; i < weights.size(); ++i) {
    layouts.push_back(weight_hwio(weights[i]));  // [k, k, Cin, C]
    FastasppBranch& b = branches[i];
    b.weight_hwio = layouts.back().data_ptr();
    b.geometry = branch_geometry(rates, i);
    b.y_channel_offset = static_cast<int64_t>(i) * c;
    b.options = options_for(static_cast<int64_t>(i));
  }
  Scratch scratch(x);
  check_launch(fastaspp_atrous_conv2d_forward_branches_cuda(
                   x_nhwc.data_ptr(), y.data_ptr(), /*y_pixel_stride=*/c_total, dtype_code(x.scalar_type()), n,
                   c_in, h, w, c, /*h_out=*/h, /*w_out=*/w, /*stride_h=*/1, /*stride_w=*/1, branches.data(),
                   static_cast<int>(branches.size()), scratch.get(), current_stream(x)),
               "aspp_branches", scratch);
}

at::Tensor aspp_branches_forward_cuda(const at::Tensor& x, at::TensorList weights,
                                      at::IntArrayRef rates, const at::Tensor& scale,
                                      const at::Tensor& shift, bool relu) {
  check_conv_switch();
  constexpr const char* op = "fastaspp::_aspp_branches_forward";
  check_tensor(op, x, "x", 4);
  const int64_t c = check_branches(op, x, "x", x.size(1), weights, rates);
  check_tensor(op, scale, "scale", 1);
  check_tensor(op, shift, "shift", 1);
  check_same(op, x, "x", scale, "scale");
  check_same(op, x, "x", shift, "shift");
  const int64_t c_total = static_cast<int64_t>(weights.size()) * c;
  TORCH_CHECK(scale.size(0) == c_total, op, ": scale must have (len(rates) + 1) * C = ",
              c_total, " elements (C = ", c, " per branch), got ", scale.size(0));
  TORCH_CHECK(shift.size(0) == c_total, op, ": shift must have (len(rates) + 1) * C = ",
              c_total, " elements (C = ", c, " per branch), got ", shift.size(0));

  const c10::cuda::CUDAGuard guard(x.device());
  // Every element is written by exactly one branch: no zeroing.
  at::Tensor y = at::empty({x.size(0), c_total, x.size(2), x.size(3)},
                           x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return y;  // N == 0, an empty map, or C == 0
  const at::Tensor scale_c = scale.contiguous();
  const at::Tensor shift_c = shift.contiguous();
  launch_branches(x, weights, rates, y, [&](int64_t i) {
    FastasppForwardOptions options{};
    options.scale = scale_c.narrow(0, i * c, c).data_ptr();
    options.shift = shift_c.narrow(0, i * c, c).data_ptr();
    options.relu = relu ? 1 : 0;
    return options;
  });
  return y;
}

// Training: the raw branches (no scale, shift or ReLU) and their BN batch statistics, from the
// epilogues' per-patch planes (one planes buffer for every branch: each writes its own columns).
std::tuple<at::Tensor, at::Tensor, at::Tensor> aspp_branches_stats_forward_cuda(const at::Tensor& x,
                                                                                at::TensorList weights,
                                                                                at::IntArrayRef rates) {
  check_conv_switch();
  constexpr const char* op = "fastaspp::_aspp_branches_stats_forward";
  check_tensor(op, x, "x", 4);
  const int64_t c = check_branches(op, x, "x", x.size(1), weights, rates);
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3);
  const int64_t c_total = static_cast<int64_t>(weights.size()) * c;
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor z = at::empty({n, c_total, h, w}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const auto acc = x.options().dtype(accumulator_dtype(x.scalar_type()));
  if (z.numel() == 0) return {z, at::zeros({c_total}, acc), at::zeros({c_total}, acc)};
  // Every (patch, channel) entry is written by the launch that owns the channel: no zeroing.
  at::Tensor planes = at::empty({3, fastaspp_conv_patch_count(n, h, w), c_total}, acc);
  launch_branches(x, weights, rates, z, [&](int64_t) {
    FastasppForwardOptions options{};
    options.stats = planes.data_ptr();
    return options;
  });
  auto [mean, var] = merge_patch_stats(planes);
  return {z, mean, var};
}

// Training backward: every branch's input gradient summed by one kernel launch per
// FASTASPP_MAX_BRANCHES branches (more are added up here), each branch reading its channel slice
// of grad in place.
at::Tensor aspp_branches_grad_input_cuda(const at::Tensor& grad, at::TensorList weights, at::IntArrayRef rates,
                                         at::IntArrayRef input_size) {
  check_conv_switch();
  constexpr const char* op = "fastaspp::_aspp_branches_grad_input";
  TORCH_CHECK(input_size.size() == 4, op, ": input_size must have 4 elements, got ", input_size.size());
  const int64_t n = input_size[0], c_in = input_size[1], h = input_size[2], w = input_size[3];
  TORCH_CHECK(n >= 0 && c_in >= 0 && h >= 0 && w >= 0, op, ": input_size must be non-negative, got ", input_size);
  check_tensor(op, grad, "grad", 4);
  const int64_t c = check_branches(op, grad, "grad", c_in, weights, rates);
  const int64_t c_total = static_cast<int64_t>(weights.size()) * c;
  TORCH_CHECK(grad.size(0) == n && grad.size(1) == c_total && grad.size(2) == h && grad.size(3) == w, op,
              ": grad must have shape [", n, ", ", c_total, ", ", h, ", ", w, "] (len(weights) * C channels of "
              "the input's map), got ", grad.sizes());

  const c10::cuda::CUDAGuard guard(grad.device());
  at::Tensor dx = at::empty({n, c_in, h, w}, grad.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (dx.numel() == 0) return dx;
  const at::Tensor g_nhwc = grad.contiguous(at::MemoryFormat::ChannelsLast);
  const int dtype = dtype_code(grad.scalar_type());
  const cudaStream_t stream = current_stream(grad);
  std::vector<at::Tensor> layouts;  // alive until the launch is queued
  Scratch scratch(grad);
  for (size_t first = 0; first < weights.size(); first += FASTASPP_MAX_BRANCHES) {
    const size_t count = std::min<size_t>(FASTASPP_MAX_BRANCHES, weights.size() - first);
    std::vector<FastasppGradBranch> branches(count);
    for (size_t j = 0; j < count; ++j) {
      const size_t i = first + j;
      layouts.push_back(weight_hwoi(weights[i]));  // [k, k, C, Cin]
      FastasppGradBranch& b = branches[j];
      b.weight_hwoi = layouts.back().data_ptr();
      b.geometry = branch_geometry(rates, i);
      b.grad_channel_offset = static_cast<int64_t>(i) * c;
    }
    // Past FASTASPP_MAX_BRANCHES branches (not DeepLabV3's 4 or 5), a second launch's sum is added.
    at::Tensor out = first == 0 ? dx : at::empty_like(dx);
    check_launch(fastaspp_atrous_conv2d_grad_input_branches_cuda(
                     g_nhwc.data_ptr(), /*grad_pixel_stride=*/c_total, out.data_ptr(), dtype, n, c_in, h, w, c,
                     /*h_out=*/h, /*w_out=*/w, /*stride_h=*/1, /*stride_w=*/1, branches.data(),
                     static_cast<int>(count), scratch.get(), stream),
                 "aspp_branches_grad_input", scratch);
    if (first > 0) dx.add_(out);
  }
  return dx;
}

}  // namespace
}  // namespace fastaspp

TORCH_LIBRARY_IMPL(fastaspp, CUDA, m) {
  m.impl("_aspp_branches_forward", &fastaspp::aspp_branches_forward_cuda);
  m.impl("_aspp_branches_stats_forward", &fastaspp::aspp_branches_stats_forward_cuda);
  m.impl("_aspp_branches_grad_input", &fastaspp::aspp_branches_grad_input_cuda);
}
