// CUDA registration of fastaspp::_affine_relu_project_forward (schema in csrc/aspp.cpp): the
// training-mode ASPP projection
//   y = weight @ relu((z - centre) * scale + shift) + image_bias[n]   per pixel,
// with y's BN batch statistics. One launch of the forward conv kernel as a 1x1 conv over z: the
// branches' BN + ReLU is its src prologue, applied to each tile as it is staged, so the normalised
// z is never stored; the pooling branch is its per-image bias; the statistics come from its
// epilogue, merged here (docs/design.md §6). The backward stays torch ops
// (fastaspp/ops/aspp_train.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include <cuda_runtime_api.h>

#include "../common/rules.h"
#include "atrous_conv.h"
#include "binding_utils.h"

namespace fastaspp {
namespace {

using namespace cuda_binding;  // binding_utils.h: the helpers the bindings share

// t is a CUDA tensor of z's device and dtype with exactly `shape`.
void check_operand(const char* op, const at::Tensor& t, const char* name, const at::Tensor& z,
                   at::IntArrayRef shape) {
  check_tensor(op, t, name, static_cast<int64_t>(shape.size()));
  check_same(op, z, "z", t, name);
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ", t.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_relu_project_forward_cuda(
    const at::Tensor& z, const at::Tensor& centre, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& weight, const at::Tensor& image_bias) {
  check_conv_switch();
  constexpr const char* op = "fastaspp::_affine_relu_project_forward";
  check_tensor(op, z, "z", 4);
  const int64_t n = z.size(0), k = z.size(1), h = z.size(2), w = z.size(3);
  check_operand(op, centre, "centre", z, {k});
  check_operand(op, scale, "scale", z, {k});
  check_operand(op, shift, "shift", z, {k});
  check_tensor(op, weight, "weight", 2);
  TORCH_CHECK(weight.size(1) == k, op, ": weight must have shape [Cout, ", k, "] (K = z.size(1)), got ",
              weight.sizes());
  const int64_t c_out = weight.size(0);
  check_operand(op, weight, "weight", z, {c_out, k});
  check_operand(op, image_bias, "image_bias", z, {n, c_out});

  const c10::cuda::CUDAGuard guard(z.device());
  at::Tensor y = at::empty({n, c_out, h, w}, z.options().memory_format(at::MemoryFormat::ChannelsLast));
  const auto acc = z.options().dtype(accumulator_dtype(z.scalar_type()));
  if (y.numel() == 0) return {y, at::zeros({c_out}, acc), at::zeros({c_out}, acc)};

  const at::Tensor z_nhwc = z.contiguous(at::MemoryFormat::ChannelsLast);
  // [1, 1, K, Cout]: the forward's weight layout. Not kept: a training weight is never keepable.
  const at::Tensor w_io = weight.t().contiguous();
  const at::Tensor centre_c = centre.contiguous(), scale_c = scale.contiguous(), shift_c = shift.contiguous();
  const at::Tensor bias_c = image_bias.contiguous();
  // Every (patch, channel) entry is written by the launch: no zeroing.
  at::Tensor planes = at::empty({3, fastaspp_conv_patch_count(n, h, w), c_out}, acc);
  FastasppForwardOptions options{};
  options.image_bias = bias_c.data_ptr();
  if (k > 0) {  // with no channels, y is the bias alone (and empty tensors may have null data)
    options.x_centre = centre_c.data_ptr();
    options.x_scale = scale_c.data_ptr();
    options.x_shift = shift_c.data_ptr();
  }
  options.stats = planes.data_ptr();
  Scratch scratch(z);
  check_launch(fastaspp_atrous_conv2d_forward_fused_cuda(
                   z_nhwc.data_ptr(), w_io.data_ptr(), y.data_ptr(), /*y_pixel_stride=*/c_out,
                   /*y_channel_offset=*/0, dtype_code(z.scalar_type()), n, k, h, w, c_out, 1, 1, h, w,
                   1, 1, 0, 0, 1, 1, &options, scratch.get(), current_stream(z)),
               "affine_relu_project_forward", scratch);
  auto [mean, var] = merge_patch_stats(planes);
  return {y, mean, var};
}

}  // namespace
}  // namespace fastaspp

TORCH_LIBRARY_IMPL(fastaspp, CUDA, m) {
  m.impl("_affine_relu_project_forward", &fastaspp::affine_relu_project_forward_cuda);
}
