// CUDA registrations of fastaspp::_atrous_conv2d_{forward,grad_input,grad_weight}.
//
// The schemas live in csrc/atrous_conv.cpp. This file validates arguments, brings tensors to
// the layouts the pure-CUDA launchers of atrous_conv.h expect (NHWC activations, tap-major
// weights), allocates outputs / scratch with torch and launches on the current stream.
// The helpers it shares with aspp_cuda.cpp live in binding_utils.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime_api.h>

#include "../affine.h"
#include "../common/checks.h"
#include "../common/rules.h"
#include "atrous_conv.h"
#include "binding_utils.h"

namespace fastaspp {
namespace {

using namespace cuda_binding;  // binding_utils.h: the helpers both bindings share

// Kernels write NHWC; hand back the layout the caller's tensor had.
at::Tensor to_format(const at::Tensor& nhwc, at::MemoryFormat fmt) {
  return fmt == at::MemoryFormat::ChannelsLast ? nhwc : nhwc.contiguous();
}

at::Tensor atrous_conv2d_forward_cuda(const at::Tensor& x, const at::Tensor& weight,
                                      const std::optional<at::Tensor>& bias,
                                      const std::optional<at::Tensor>& scale,
                                      const std::optional<at::Tensor>& shift, at::IntArrayRef stride,
                                      at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  check_conv_switch();
  constexpr const char* op = "fastaspp::_atrous_conv2d_forward";
  check_tensor(op, x, "x", 4);
  check_tensor(op, weight, "weight", 4);
  check_same(op, x, "x", weight, "weight");
  const ConvGeometry g = check_geometry(op, stride, padding, dilation);
  const int64_t n = x.size(0), c_in = x.size(1), h = x.size(2), w = x.size(3);
  const int64_t c_out = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK(weight.size(1) == c_in, op, ": weight has ", weight.size(1),
              " input channels but x has ", c_in, " (groups must be 1)");
  TORCH_CHECK(kh >= 1 && kw >= 1, op, ": weight kernel size must be >= 1, got ", kh, "x", kw);
  const auto [ho, wo] = check_out_size(op, h, w, kh, kw, g);

  const c10::cuda::CUDAGuard guard(x.device());
  const at::MemoryFormat fmt = result_format(x);
  at::Tensor y =
      at::empty({n, c_out, ho, wo}, x.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (y.numel() == 0) return to_format(y, fmt);

  const at::Tensor x_nhwc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor w_hwio = weight_hwio(weight);  // [KH,KW,Cin,Cout]
  // The launcher reads (scale, shift) in x's dtype. A bias is folded into the shift in fp32 (fp64),
  // then rounded once; without one, scale and shift go to x's dtype directly: the same values, and
  // no round trip through the accumulator's dtype (up to four conversion kernels per call).
  const bool folds_bias = bias.has_value() && bias->defined();
  const Affine affine = fold_affine(bias, scale, shift,
                                    folds_bias ? accumulator_dtype(x.scalar_type()) : x.scalar_type());
  const auto [scale_c, shift_c] = dense_affine(affine, c_out, x.options());
  FastasppForwardOptions options{};
  options.scale = scale_c.data_ptr();
  options.shift = shift_c.data_ptr();
  options.relu = relu ? 1 : 0;
  Scratch scratch(x);
  check_launch(fastaspp_atrous_conv2d_forward_fused_cuda(
                   x_nhwc.data_ptr(), w_hwio.data_ptr(), y.data_ptr(), /*y_pixel_stride=*/c_out,
                   /*y_channel_offset=*/0, dtype_code(x.scalar_type()), n, c_in, h, w, c_out, kh, kw, ho, wo,
                   g.stride[0], g.stride[1], g.padding[0], g.padding[1], g.dilation[0], g.dilation[1], &options,
                   scratch.get(), current_stream(x)),
               "atrous_conv2d_forward", scratch);
  return to_format(y, fmt);
}

at::Tensor atrous_conv2d_grad_input_cuda(const at::Tensor& grad, const at::Tensor& weight,
                                         at::IntArrayRef input_size, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_conv_switch();
  constexpr const char* op = "fastaspp::_atrous_conv2d_grad_input";
  check_tensor(op, grad, "grad", 4);
  check_tensor(op, weight, "weight", 4);
  check_same(op, grad, "grad", weight, "weight");
  const ConvGeometry g = check_geometry(op, stride, padding, dilation);
  TORCH_CHECK(input_size.size() == 4, op, ": input_size must have 4 elements, got ",
              input_size.size());
  const int64_t n = input_size[0], c_in = input_size[1], h = input_size[2], w = input_size[3];
  TORCH_CHECK(n >= 0 && c_in >= 0 && h >= 0 && w >= 0, op,
              ": input_size must be non-negative, got ", input_size);
  const int64_t c_out = weight.size(0), kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK(weight.size(1) == c_in, op, ": weight has ", weight.size(1),
              " input channels but input_size has ", c_in);
  TORCH_CHECK(kh >= 1 && kw >= 1, op, ": weight kernel size must be >= 1, got ", kh, "x", kw);
  const auto [ho, wo] = check_out_size(op, h, w, kh, kw, g);
  TORCH_CHECK(grad.size(0) == n && grad.size(1) == c_out && grad.size(2) == ho &&
                  grad.size(3) == wo,
              op, ": grad must have shape [", n, ", ", c_out, ", ", ho, ", ", wo, "], got ",
              grad.sizes());

  const c10::cuda::CUDAGuard guard(grad.device());
  const at::MemoryFormat fmt = result_format(grad);
  at::Tensor dx =
      at::empty({n, c_in, h, w}, grad.options().memory_format(at::MemoryFormat::ChannelsLast));
  if (dx.numel() == 0) return to_format(dx, fmt);

  const at::Tensor g_nhwc = grad.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor w_hwoi = weight_hwoi(weight);  // [KH,KW,Cout,Cin]
  Scratch scratch(grad);
  check_launch(fastaspp_atrous_conv2d_grad_input_cuda(
                   g_nhwc.data_ptr(), w_hwoi.data_ptr(), dx.data_ptr(),
                   dtype_code(grad.scalar_type()), n, c_in, h, w, c_out, kh, kw, ho, wo,
                   g.stride[0], g.stride[1], g.padding[0], g.padding[1], g.dilation[0],
                   g.dilation[1], scratch.get(), current_stream(grad)),
               "atrous_conv2d_grad_input", scratch);
  return to_format(dx, fmt);
}

at::Tensor atrous_conv2d_grad_weight_cuda(const at::Tensor& x, const at::Tensor& grad,
                                          at::IntArrayRef weight_size, at::IntArrayRef stride,
                                          at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_conv_switch();
  constexpr const char* op = "fastaspp::_atrous_conv2d_grad_weight";
  check_tensor(op, x, "x", 4);
  check_tensor(op, grad, "grad", 4);
  check_same(op, x, "x", grad, "grad");
  const ConvGeometry g = check_geometry(op, stride, padding, dilation);
  TORCH_CHECK(weight_size.size() == 4, op, ": weight_size must have 4 elements, got ",
              weight_size.size());
  const int64_t c_out = weight_size[0], c_in = weight_size[1], kh = weight_size[2],
                kw = weight_size[3];
  TORCH_CHECK(c_out >= 0 && c_in >= 0 && kh >= 1 && kw >= 1, op,
              ": weight_size must be [Cout >= 0, Cin >= 0, KH >= 1, KW >= 1], got ",
              weight_size);
  const int64_t n = x.size(0), h = x.size(2), w = x.size(3);
  TORCH_CHECK(x.size(1) == c_in, op, ": x has ", x.size(1), " channels but weight_size has ",
              c_in, " input channels");
  const auto [ho, wo] = check_out_size(op, h, w, kh, kw, g);
  TORCH_CHECK(grad.size(0) == n && grad.size(1) == c_out && grad.size(2) == ho &&
                  grad.size(3) == wo,
              op, ": grad must have shape [", n, ", ", c_out, ", ", ho, ", ", wo, "], got ",
              grad.sizes());

  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor dw = at::empty({c_out, c_in, kh, kw}, x.options());
  if (dw.numel() == 0) return dw;

  const int dtype = dtype_code(x.scalar_type());
  const at::Tensor x_nhwc = x.contiguous(at::MemoryFormat::ChannelsLast);
  const at::Tensor g_nhwc = grad.contiguous(at::MemoryFormat::ChannelsLast);
  const int64_t ws_bytes = fastaspp_atrous_conv2d_grad_weight_cuda_workspace_bytes(
      dtype, n, c_in, h, w, c_out, kh, kw, ho, wo);
  TORCH_CHECK(ws_bytes >= 0, op, ": could not size the workspace");
  // Every byte is written by the first pass before the second reads it: no zeroing needed.
  const at::Tensor ws = at::empty({ws_bytes}, x.options().dtype(at::kByte));
  const cudaStream_t stream = current_stream(x);
  check_launch(fastaspp_atrous_conv2d_grad_weight_cuda(
                   x_nhwc.data_ptr(), g_nhwc.data_ptr(), dw.data_ptr(), ws.data_ptr(), ws_bytes,
                   dtype, n, c_in, h, w, c_out, kh, kw, ho, wo, g.stride[0], g.stride[1],
                   g.padding[0], g.padding[1], g.dilation[0], g.dilation[1], stream),
               "atrous_conv2d_grad_weight");
  return dw;
}

}  // namespace
}  // namespace fastaspp

TORCH_LIBRARY_IMPL(fastaspp, CUDA, m) {
  m.impl("_atrous_conv2d_forward", &fastaspp::atrous_conv2d_forward_cuda);
  m.impl("_atrous_conv2d_grad_input", &fastaspp::atrous_conv2d_grad_input_cuda);
  m.impl("_atrous_conv2d_grad_weight", &fastaspp::atrous_conv2d_grad_weight_cuda);
}
