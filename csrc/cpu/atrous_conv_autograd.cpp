// C++ autograd of the cpu backend's single conv: fastaspp::_atrous_conv2d_forward on CPU tensors
// that take a gradient records a C++ node whose backward is the one-call backward of
// atrous_conv.cpp. fastaspp.ops.atrous_conv2d calls the op directly in eager training: a Python
// autograd.Function around the same two kernels adds host time to every step, a visible share of
// a small conv's (docs/design.md §7).
//
// Registered to AutogradCPU only: the cuda and triton backends' backward compose their
// grad_input and grad_weight kernels in Python (fastaspp/ops/atrous_conv.py), and a CUDA call of
// this op stays differentiable only through the torch op fastaspp::atrous_conv2d.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <array>
#include <vector>

#include "../common/checks.h"
#include "../common/rules.h"
#include "atrous_conv.h"
#include "conv_paths.h"

namespace fastaspp {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The kernel ops, called through the dispatcher below autograd (not as C++ functions), so that
// dispatch modes and fake tensors see the op itself.
const c10::TypedOperatorHandle<decltype(atrous_conv2d_forward_cpu)>& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastaspp::_atrous_conv2d_forward", "")
                             .typed<decltype(atrous_conv2d_forward_cpu)>();
  return op;
}

const c10::TypedOperatorHandle<decltype(atrous_conv2d_backward_cpu)>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastaspp::_atrous_conv2d_backward", "")
                             .typed<decltype(atrous_conv2d_backward_cpu)>();
  return op;
}

// The backward's kernel, by itself when the backward is not recorded (the usual case), as a
// function of its own under create_graph=True, so that differentiating the gradients again raises
// instead of giving gradients that miss the terms through this conv.
class AtrousConv2dCpuBackward : public torch::autograd::Function<AtrousConv2dCpuBackward> {
 public:
  // The gradients output_mask asks for, in order (a C++ Function's outputs must all be defined).
  static variable_list forward(AutogradContext* /*ctx*/, const at::Tensor& grad, const at::Tensor& x,
                               const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                               const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& out,
                               at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                               std::array<bool, 5> output_mask) {
    variable_list all = run(grad, x, weight, bias, scale, out, stride, padding, dilation, output_mask);
    variable_list requested;
    for (const at::Tensor& t : all) {
      if (t.defined()) requested.push_back(t);
    }
    return requested;
  }

  static variable_list backward(AutogradContext* /*ctx*/, const variable_list& /*grads*/) {
    TORCH_CHECK(false,
                "fastaspp: atrous_conv2d on the cpu backend has no double backward (a gradient of its "
                "gradients); use eager torch.nn.functional.conv2d for higher-order gradients");
  }

  // (dx, dweight, dbias, dscale, dshift), undefined where output_mask says no.
  static variable_list run(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& out, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, std::array<bool, 5> output_mask) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dx, dweight, dbias, dscale, dshift] =
        backward_op().call(grad, x, weight, bias, scale, out, stride, padding, dilation, output_mask);
    return {dx, dweight, dbias, dscale, dshift};
  }
};

class AtrousConv2dCpu : public torch::autograd::Function<AtrousConv2dCpu> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& weight,
                            const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                            const std::optional<at::Tensor>& shift, at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, bool relu) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    at::Tensor y = forward_op().call(x, weight, bias, scale, shift, stride, padding, dilation, relu);
    // The ReLU's mask is read from the output: the pre-activation is never stored.
    ctx->save_for_backward({x, weight, bias.value_or(at::Tensor()), scale.value_or(at::Tensor()),
                            relu ? y : at::Tensor()});
    ctx->saved_data["geometry"] = std::vector<int64_t>{stride[0], stride[1], padding[0], padding[1], dilation[0],
                                                       dilation[1]};
    // needs_input_grad counts the tensor arguments that were given: the optional ones may be absent.
    ctx->saved_data["given"] = std::vector<bool>{bias.has_value() && bias->defined(),
                                                 scale.has_value() && scale->defined(),
                                                 shift.has_value() && shift->defined()};
    return y;
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<int64_t> geometry = ctx->saved_data["geometry"].toIntVector();
    const std::vector<bool> given = ctx->saved_data["given"].toBoolList().vec();
    // output_mask in the backward's order (x, weight, bias, scale, shift), each false when absent.
    std::array<bool, 5> output_mask{};
    size_t edge = 0;
    for (size_t i = 0; i < output_mask.size(); ++i) {
      if (i >= 2 && !given[i - 2]) continue;
      output_mask[i] = ctx->needs_input_grad(edge++);
    }
    const auto optional = [](const at::Tensor& t) { return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt; };
    const at::IntArrayRef stride(geometry.data(), 2), padding(geometry.data() + 2, 2), dilation(geometry.data() + 4, 2);
    const at::Tensor& grad = grads[0];
    variable_list result(5);
    if (at::GradMode::is_enabled()) {  // create_graph=True
      const variable_list requested =
          AtrousConv2dCpuBackward::apply(grad, saved[0], saved[1], optional(saved[2]), optional(saved[3]),
                                         optional(saved[4]), stride, padding, dilation, output_mask);
      size_t next = 0;
      for (size_t i = 0; i < output_mask.size(); ++i) {
        if (output_mask[i]) result[i] = requested[next++];
      }
    } else {
      result = AtrousConv2dCpuBackward::run(grad, saved[0], saved[1], optional(saved[2]), optional(saved[3]),
                                            optional(saved[4]), stride, padding, dilation, output_mask);
    }
    result.resize(9);  // one gradient per forward argument: none for the geometry and relu
    return result;
  }
};

// Whether a recorded call is torch's conv with nothing of fastaspp's to add: a bare conv (a bias at
// most: no scale, shift or ReLU to fuse) that the cpu rule sends to torch's conv both ways
// (conv_paths.h). It then records torch's own node, as eager does: a node of fastaspp's would only
// add copies around the same two calls (ConvBNReLU's convs in training are such calls).
bool plain_torch_conv(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& scale,
                      const std::optional<at::Tensor>& shift, at::IntArrayRef stride, at::IntArrayRef padding,
                      at::IntArrayRef dilation, bool relu) {
  if (relu || (scale.has_value() && scale->defined()) || (shift.has_value() && shift->defined())) return false;
  // Bad arguments are left to the kernel, whose own checks raise.
  if (x.dim() != 4 || weight.dim() != 4 || weight.size(1) != x.size(1)) return false;
  const ConvGeometry g = check_geometry("fastaspp", stride, padding, dilation);
  const auto [out_h, out_w] = check_out_size("fastaspp", x.size(2), x.size(3), weight.size(2), weight.size(3), g);
  return x.size(0) * weight.size(0) > 0 && torch_conv_both_ways(x, weight, out_h, out_w, g);
}

at::Tensor atrous_conv2d_forward_autograd(const at::Tensor& x, const at::Tensor& weight,
                                          const std::optional<at::Tensor>& bias,
                                          const std::optional<at::Tensor>& scale,
                                          const std::optional<at::Tensor>& shift, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  const auto takes_grad = [](const std::optional<at::Tensor>& t) { return t.has_value() && t->requires_grad(); };
  if (!at::GradMode::is_enabled() ||
      !(x.requires_grad() || weight.requires_grad() || takes_grad(bias) || takes_grad(scale) || takes_grad(shift))) {
    // Nothing to record (eval, no_grad): the kernel, without the node's cost.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return forward_op().call(x, weight, bias, scale, shift, stride, padding, dilation, relu);
  }
  if (plain_torch_conv(x, weight, scale, shift, stride, padding, dilation, relu)) {
    return at::convolution(x, weight, bias, stride, padding, dilation, false, {0, 0}, 1).contiguous(result_format(x));
  }
  return AtrousConv2dCpu::apply(x, weight, bias, scale, shift, stride, padding, dilation, relu);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastaspp, AutogradCPU, m) {
  m.impl("_atrous_conv2d_forward", &atrous_conv2d_forward_autograd);
}

}  // namespace fastaspp
