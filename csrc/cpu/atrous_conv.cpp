// CPU kernels of the "cpu" backend for fastaspp::_atrous_conv2d_*: one GEMM per live tap
// (tap_gemm.h). Forward groups taps by kernel column; backward gathers each live tap's
// rectangle.
#include <torch/library.h>

#include "tap_gemm.h"

namespace fastaspp {
namespace {

at::Tensor atrous_conv2d_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                     const at::Tensor& scale, const at::Tensor& shift,
                                     at::IntArrayRef stride, at::IntArrayRef padding,
                                     at::IntArrayRef dilation, bool relu) {
  check_4d(x, "x");
  check_4d(weight, "weight");
  check_cpu_float(x, "x");
  check_cpu_float(weight, "weight");
  check_cpu_float(scale, "scale");
  check_cpu_float(shift, "shift");
  const ConvGeometry g = make_geometry(stride, padding, dilation);
  const int64_t batch = x.size(0), in_ch = x.size(1), in_h = x.size(2), in_w = x.size(3);
  const int64_t out_ch = weight.size(0), kernel_h = weight.size(2), kernel_w = weight.size(3);
  TORCH_CHECK(weight.size(1) == in_ch, "fastaspp: weight expects ", weight.size(1),
              " input channels but x has ", in_ch);
  TORCH_CHECK(in_ch > 0 && out_ch > 0, "fastaspp: x and weight need at least one channel");
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == out_ch, "fastaspp: scale must have shape [",
              out_ch, "], got ", scale.sizes());
  TORCH_CHECK(shift.dim() == 1 && shift.size(0) == out_ch, "fastaspp: shift must have shape [",
              out_ch, "], got ", shift.sizes());
  const int64_t out_h = conv_out_size(in_h, kernel_h, g.stride[0], g.padding[0], g.dilation[0]);
  const int64_t out_w = conv_out_size(in_w, kernel_w, g.stride[1], g.padding[1], g.dilation[1]);
  TORCH_CHECK(out_h >= 1 && out_w >= 1, "fastaspp: output size ", out_h, "x", out_w,
              " is too small for input ", in_h, "x", in_w);

  at::Tensor y = at::empty({batch, out_ch, out_h, out_w},
                           x.options().memory_format(x.suggest_memory_format()));
  if (y.numel() == 0) return y;

  const auto dtype = compute_dtype(x.scalar_type());
  const at::Tensor xh = to_nhwc(x, dtype);
  const at::Tensor w_taps = tap_matrices(weight, dtype);  // [KH, KW, Cout, Cin]
  at::Tensor acc = at::zeros({batch, out_h, out_w, out_ch}, x.options().dtype(dtype));
  for (int64_t n = 0; n < batch; ++n) forward_image(xh, w_taps, g, n, acc);

  bn_relu_epilogue(acc, scale, shift, relu, y);
  return y;
}

at::Tensor atrous_conv2d_grad_input_cpu(const at::Tensor& grad, const at::Tensor& weight,
                                        at::IntArrayRef input_size, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_4d(grad, "grad");
  check_4d(weight, "weight");
  check_cpu_float(grad, "grad");
  check_cpu_float(weight, "weight");
  TORCH_CHECK(input_size.size() == 4, "fastaspp: input_size must have 4 elements, got ",
              input_size.size());
  const ConvGeometry g = make_geometry(stride, padding, dilation);
  const int64_t batch = input_size[0], in_ch = input_size[1], in_h = input_size[2],
                in_w = input_size[3];
  const int64_t out_ch = weight.size(0), kernel_h = weight.size(2), kernel_w = weight.size(3);
  const int64_t out_h = grad.size(2), out_w = grad.size(3);
  TORCH_CHECK(grad.size(0) == batch && grad.size(1) == out_ch &&
                  out_h == conv_out_size(in_h, kernel_h, g.stride[0], g.padding[0], g.dilation[0]) &&
                  out_w == conv_out_size(in_w, kernel_w, g.stride[1], g.padding[1], g.dilation[1]),
              "fastaspp: grad has shape ", grad.sizes(), ", which is not the output shape for input ",
              input_size, " and weight ", weight.sizes());
  TORCH_CHECK(weight.size(1) == in_ch, "fastaspp: weight expects ", weight.size(1),
              " input channels but input_size has ", in_ch);

  const auto fmt = grad.suggest_memory_format();
  if (batch * in_ch * in_h * in_w == 0 || grad.numel() == 0) {
    return at::zeros(input_size, grad.options().memory_format(fmt));
  }
  const auto dtype = compute_dtype(grad.scalar_type());
  const at::Tensor gh = to_nhwc(grad, dtype);
  const at::Tensor w_taps = tap_matrices(weight, dtype);  // [KH, KW, Cout, Cin]
  at::Tensor dx = at::zeros({batch, in_h, in_w, in_ch}, grad.options().dtype(dtype));
  for (const LiveTap& t : live_taps(kernel_h, kernel_w, in_h, in_w, out_h, out_w, g)) {
    accumulate_gemm(input_rect(dx, t, g), gather_rect(output_rect(gh, t)), w_taps[t.kh][t.kw]);
  }
  return dx.permute({0, 3, 1, 2}).to(grad.scalar_type()).contiguous(fmt);
}

at::Tensor atrous_conv2d_grad_weight_cpu(const at::Tensor& x, const at::Tensor& grad,
                                         at::IntArrayRef weight_size, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_4d(x, "x");
  check_4d(grad, "grad");
  check_cpu_float(x, "x");
  check_cpu_float(grad, "grad");
  TORCH_CHECK(weight_size.size() == 4, "fastaspp: weight_size must have 4 elements, got ",
              weight_size.size());
  const ConvGeometry g = make_geometry(stride, padding, dilation);
  const int64_t in_ch = x.size(1), in_h = x.size(2), in_w = x.size(3);
  const int64_t out_ch = weight_size[0], kernel_h = weight_size[2], kernel_w = weight_size[3];
  const int64_t out_h = grad.size(2), out_w = grad.size(3);
  TORCH_CHECK(weight_size[1] == in_ch, "fastaspp: weight_size expects ", weight_size[1],
              " input channels but x has ", in_ch);
  TORCH_CHECK(grad.size(0) == x.size(0) && grad.size(1) == out_ch &&
                  out_h == conv_out_size(in_h, kernel_h, g.stride[0], g.padding[0], g.dilation[0]) &&
                  out_w == conv_out_size(in_w, kernel_w, g.stride[1], g.padding[1], g.dilation[1]),
              "fastaspp: grad has shape ", grad.sizes(), ", which is not the output shape for x ",
              x.sizes(), " and weight ", weight_size);

  const auto dtype = compute_dtype(x.scalar_type());
  at::Tensor dw = at::zeros({kernel_h, kernel_w, out_ch, in_ch}, x.options().dtype(dtype));
  if (x.numel() > 0 && grad.numel() > 0) {
    const at::Tensor xh = to_nhwc(x, dtype);
    const at::Tensor gh = to_nhwc(grad, dtype);
    for (const LiveTap& t : live_taps(kernel_h, kernel_w, in_h, in_w, out_h, out_w, g)) {
      at::Tensor dw_tap = dw[t.kh][t.kw];  // [Cout, Cin] = grad^T @ x over the live rectangle
      at::mm_out(dw_tap, gather_rect(output_rect(gh, t)).t(), gather_rect(input_rect(xh, t, g)));
    }
  }
  return dw.permute({2, 3, 0, 1}).to(x.scalar_type()).contiguous();
}

}  // namespace

TORCH_LIBRARY_IMPL(fastaspp, CPU, m) {
  m.impl("_atrous_conv2d_forward", &atrous_conv2d_forward_cpu);
  m.impl("_atrous_conv2d_grad_input", &atrous_conv2d_grad_input_cpu);
  m.impl("_atrous_conv2d_grad_weight", &atrous_conv2d_grad_weight_cpu);
}

}  // namespace fastaspp
