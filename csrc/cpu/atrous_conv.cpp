// CPU kernels of the "cpu" backend for fastaspp::_atrous_conv2d_*, each by the path conv_paths.h
// chooses per call: the direct loops for small problems (direct_conv.h), oneDNN's conv with the
// fused epilogue for large fp32 forwards, otherwise one GEMM per live tap (tap_gemm.h). The
// arguments were validated by the Python entry points (fastaspp/ops); the checks here guard the
// kernels' own invariants.
#include <torch/library.h>

#include <array>
#include <tuple>

#include "../affine.h"
#include "../common/checks.h"
#include "../common/rules.h"
#include "atrous_conv.h"
#include "channel_stats.h"
#include "conv_paths.h"
#include "direct_conv.h"
#include "epilogue.h"
#include "onednn_fused.h"
#include "winograd.h"

namespace fastaspp {
namespace {

// Prefix of the geometry checks' messages (checks.h), like this file's other messages.
constexpr const char* kOp = "fastaspp";

}  // namespace

at::Tensor atrous_conv2d_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                     const std::optional<at::Tensor>& shift, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  check_4d(x, "x");
  check_4d(weight, "weight");
  TORCH_CHECK(weight.size(1) == x.size(1), "fastaspp: weight expects ", weight.size(1), " input channels but x has ",
              x.size(1));
  const ConvGeometry g = check_geometry(kOp, stride, padding, dilation);
  const auto [out_h, out_w] = check_out_size(kOp, x.size(2), x.size(3), weight.size(2), weight.size(3), g);
  const auto options = x.options().memory_format(result_format(x));
  if (x.size(0) * weight.size(0) == 0) return at::empty({x.size(0), weight.size(0), out_h, out_w}, options);
  const Affine affine = fold_affine(bias, scale, shift, accumulator_dtype(x.scalar_type()));
  const ForwardPath path = forward_path(x, weight, out_h, out_w, g);
  const bool torch_conv = path == ForwardPath::kOnednn || path == ForwardPath::kTorchConv;
  at::Tensor y;
  if (!torch_conv) y = at::empty({x.size(0), weight.size(0), out_h, out_w}, options);
  switch (path) {
    case ForwardPath::kDirect:
      direct_forward(x, weight, affine.alpha, affine.beta, relu, g, y);
      return y;
    case ForwardPath::kOnednn:
      // Eval (kept weights): the epilogue as oneDNN's own bias and ReLU, with the scale folded into
      // the weight (onednn_fused.h).
      if (at::Tensor fused = onednn_fused_forward(x, weight, affine, relu, stride, padding, dilation); fused.defined())
        return fused.contiguous(result_format(x));
      [[fallthrough]];
    case ForwardPath::kTorchConv: {
      // torch's conv (for kTorchConv the algorithm eager PyTorch runs at this shape; its output
      // takes x's layout), then the fused epilogue in place: one pass.
      at::Tensor z = at::convolution(x, weight, std::nullopt, stride, padding, dilation, false, {0, 0}, 1)
                         .contiguous(result_format(x));
      affine_relu_inplace(z, affine.alpha, affine.beta, relu);
      return z;
    }
    case ForwardPath::kWinograd:
    case ForwardPath::kTapGemm:
      break;
  }
  // The raw conv in the accumulator dtype (NHWC), then the epilogue into y.
  const auto acc_dtype = accumulator_dtype(x.scalar_type());
  at::Tensor acc;
  if (path == ForwardPath::kWinograd) {
    const at::Tensor xh = to_nhwc(x, acc_dtype).contiguous();
    if (y.scalar_type() == acc_dtype && y.is_contiguous(at::MemoryFormat::ChannelsLast)) {
      // Straight into y, then the epilogue in place: no accumulator to allocate and copy.
      winograd_conv3x3(xh, weight, g.dilation[0], y.permute({0, 2, 3, 1}));
      affine_relu_inplace(y, affine.alpha, affine.beta, relu);
      return y;
    }
    acc = at::empty({x.size(0), out_h, out_w, weight.size(0)}, x.options().dtype(acc_dtype));
    winograd_conv3x3(xh, weight, g.dilation[0], acc);
  } else {
    acc = gemm_forward(x, weight, g, out_h, out_w);
  }
  const auto [alpha, beta] = dense_affine(affine, weight.size(0), x.options().dtype(acc_dtype));
  bn_relu_epilogue(acc, alpha, beta, relu, y);
  return y;
}

namespace {

at::Tensor atrous_conv2d_grad_input_cpu(const at::Tensor& grad, const at::Tensor& weight,
                                        at::IntArrayRef input_size, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_4d(grad, "grad");
  check_4d(weight, "weight");
  TORCH_CHECK(input_size.size() == 4, "fastaspp: input_size must have 4 elements, got ", input_size.size());
  const ConvGeometry g = check_geometry(kOp, stride, padding, dilation);
  const auto [out_h, out_w] = check_out_size(kOp, input_size[2], input_size[3], weight.size(2), weight.size(3), g);
  TORCH_CHECK(grad.size(0) == input_size[0] && grad.size(1) == weight.size(0) && grad.size(2) == out_h &&
                  grad.size(3) == out_w,
              "fastaspp: grad has shape ", grad.sizes(), ", which is not the output shape for input ", input_size,
              " and weight ", weight.sizes());
  at::Tensor dx = at::empty(input_size, grad.options().memory_format(result_format(grad)));
  if (dx.numel() > 0) grad_input(to_nhwc(grad, accumulator_dtype(grad.scalar_type())), weight, at::Tensor(), g, dx);
  return dx;
}

at::Tensor atrous_conv2d_grad_weight_cpu(const at::Tensor& x, const at::Tensor& grad,
                                         at::IntArrayRef weight_size, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_4d(x, "x");
  check_4d(grad, "grad");
  TORCH_CHECK(weight_size.size() == 4, "fastaspp: weight_size must have 4 elements, got ", weight_size.size());
  const ConvGeometry g = check_geometry(kOp, stride, padding, dilation);
  const auto [out_h, out_w] = check_out_size(kOp, x.size(2), x.size(3), weight_size[2], weight_size[3], g);
  TORCH_CHECK(weight_size[1] == x.size(1) && grad.size(0) == x.size(0) && grad.size(1) == weight_size[0] &&
                  grad.size(2) == out_h && grad.size(3) == out_w,
              "fastaspp: grad has shape ", grad.sizes(), ", which is not the output shape for x ", x.sizes(),
              " and weight ", weight_size);
  const at::Tensor gh = to_nhwc(grad, accumulator_dtype(x.scalar_type()));
  return grad_weight(to_nhwc(x, gh.scalar_type()), gh, weight_size[2], weight_size[3], g)
      .to(x.scalar_type())
      .contiguous();  // this op has no weight to take the layout of
}

}  // namespace

// With g the masked gradient: dx = conv_transpose(g * scale, weight), dweight = scale * wgrad(x, g),
// dshift = sum(g), dbias = scale * sum(g), dscale = <weight, wgrad(x, g)> + bias * sum(g): the
// pre-activation conv is never stored.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> atrous_conv2d_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& out, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 5> output_mask) {
  check_4d(grad, "grad");
  check_4d(x, "x");
  check_4d(weight, "weight");
  const ConvGeometry g = check_geometry(kOp, stride, padding, dilation);
  const auto [out_h, out_w] = check_out_size(kOp, x.size(2), x.size(3), weight.size(2), weight.size(3), g);
  TORCH_CHECK(grad.size(0) == x.size(0) && grad.size(1) == weight.size(0) && grad.size(2) == out_h &&
                  grad.size(3) == out_w,
              "fastaspp: grad has shape ", grad.sizes(), ", which is not the output shape for x ", x.sizes(),
              " and weight ", weight.sizes());
  const auto dtype = accumulator_dtype(x.scalar_type());
  const bool has_scale = scale.has_value() && scale->defined();
  const at::Tensor scale_acc = has_scale ? scale->to(dtype).contiguous() : at::Tensor();
  const at::Tensor gh = masked_nhwc(grad, out.has_value() ? *out : at::Tensor(), dtype);  // [N, Ho, Wo, Cout]

  at::Tensor dx, dweight, dbias, dscale, dshift;
  const bool need_raw = output_mask[1] || output_mask[3];
  at::Tensor raw;  // wgrad(x, g)
  if (backward_on_onednn(x, weight, out_h, out_w, g) && (output_mask[0] || need_raw)) {
    // One oneDNN call for both: dx = conv_transpose(g * scale, weight) is conv_transpose(g, weight
    // scaled per output channel), and the weight gradient does not read the weight's values.
    const at::Tensor w_scaled = has_scale ? weight * scale_acc.view({-1, 1, 1, 1}) : weight;
    auto grads = at::convolution_backward(gh.permute({0, 3, 1, 2}), x, w_scaled, std::nullopt, stride, padding,
                                          dilation, false, {0, 0}, 1, {output_mask[0], need_raw, false});
    if (output_mask[0]) dx = std::get<0>(grads).contiguous(result_format(x));
    if (need_raw) raw = std::get<1>(grads);
  } else {
    if (output_mask[0]) {
      dx = at::empty(x.sizes(), x.options().memory_format(result_format(x)));
      grad_input(gh, weight, scale_acc, g, dx);
    }
    if (need_raw) raw = grad_weight(to_nhwc(x, dtype), gh, weight.size(2), weight.size(3), g);
  }
  if (need_raw) {
    if (output_mask[1]) {
      dweight = in_layout_of((has_scale ? raw * scale_acc.view({-1, 1, 1, 1}) : raw).to(weight.scalar_type()), weight);
    }
    if (output_mask[3]) dscale = (raw * weight.to(dtype)).sum({1, 2, 3});
  }
  if (output_mask[2] || output_mask[3] || output_mask[4]) {
    const at::Tensor sums = channel_sums(gh.view({-1, gh.size(3)}));
    if (output_mask[2]) dbias = (has_scale ? sums * scale_acc : sums).to(bias->scalar_type());
    if (output_mask[3]) {
      if (bias.has_value() && bias->defined()) dscale = dscale + bias->to(dtype) * sums;
      dscale = dscale.to(scale->scalar_type());
    }
    if (output_mask[4]) dshift = sums.to(x.scalar_type());
  }
  return {dx, dweight, dbias, dscale, dshift};
}

TORCH_LIBRARY_IMPL(fastaspp, CPU, m) {
  m.impl("_atrous_conv2d_forward", &atrous_conv2d_forward_cpu);
  m.impl("_atrous_conv2d_grad_input", &atrous_conv2d_grad_input_cpu);
  m.impl("_atrous_conv2d_grad_weight", &atrous_conv2d_grad_weight_cpu);
  m.impl("_atrous_conv2d_backward", &atrous_conv2d_backward_cpu);
}

}  // namespace fastaspp
