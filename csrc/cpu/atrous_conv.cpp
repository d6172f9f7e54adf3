// CPU kernels of the "cpu" backend for fastaspp::_atrous_conv2d_*. Two paths, chosen per call by
// the rule in direct_conv.h: small problems run the direct loops there; others one GEMM per live
// tap (tap_gemm.h), the forward grouping taps by kernel column, the gradients gathering each live
// tap's rectangle. The arguments were validated by the Python entry points (fastaspp/ops); the
// checks here guard the kernels' own invariants.
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <array>
#include <tuple>

#include "../affine.h"
#include "direct_conv.h"
#include "kept.h"
#include "tap_gemm.h"

namespace fastaspp {
namespace {

std::pair<int64_t, int64_t> out_hw(at::IntArrayRef x_size, at::IntArrayRef weight_size, const ConvGeometry& g) {
  const int64_t out_h = conv_out_size(x_size[2], weight_size[2], g.stride[0], g.padding[0], g.dilation[0]);
  const int64_t out_w = conv_out_size(x_size[3], weight_size[3], g.stride[1], g.padding[1], g.dilation[1]);
  TORCH_CHECK(out_h >= 1 && out_w >= 1, "fastaspp: output size ", out_h, "x", out_w, " is too small for input ",
              x_size, " and weight ", weight_size);
  return {out_h, out_w};
}

// The weights as per-tap GEMM operands (tap_matrices), kept as kept.h says.
at::Tensor kept_tap_matrices(const at::Tensor& weight, at::ScalarType dtype) {
  return kept({weight}, {kTapMatrices, static_cast<int64_t>(dtype)}, [&] { return tap_matrices(weight, dtype); });
}

// [N, Ho, Wo, Cout] in the compute dtype: conv(x, weight) over live taps, one GEMM per tap.
at::Tensor gemm_forward(const at::Tensor& x, const at::Tensor& weight, const ConvGeometry& g, int64_t out_h,
                        int64_t out_w) {
  const auto dtype = compute_dtype(x.scalar_type());
  const at::Tensor xh = to_nhwc(x, dtype);
  const at::Tensor w_taps = kept_tap_matrices(weight, dtype);  // [KH, KW, Cout, Cin]
  at::Tensor acc = at::zeros({x.size(0), out_h, out_w, weight.size(0)}, x.options().dtype(dtype));
  for (int64_t n = 0; n < x.size(0); ++n) forward_image(xh, w_taps, g, n, acc);
  return acc;
}

// [N, H, W, Cin] in gh's dtype: the transposed conv of gh ([N, Ho, Wo, Cout], NHWC), per live tap.
at::Tensor gemm_grad_input(const at::Tensor& gh, const at::Tensor& weight, at::IntArrayRef input_size,
                           const ConvGeometry& g) {
  const at::Tensor w_taps = kept_tap_matrices(weight, gh.scalar_type());
  at::Tensor dx = at::zeros({input_size[0], input_size[2], input_size[3], input_size[1]}, gh.options());
  for (const LiveTap& t : live_taps(weight.size(2), weight.size(3), input_size[2], input_size[3], gh.size(1),
                                    gh.size(2), g)) {
    accumulate_gemm(input_rect(dx, t, g), gather_rect(output_rect(gh, t)), w_taps[t.kh][t.kw]);
  }
  return dx;
}

// [KH, KW, Cout, Cin] in xh's dtype: sum of gh^T @ x over each live tap's rectangle.
at::Tensor gemm_grad_weight(const at::Tensor& xh, const at::Tensor& gh, int64_t kernel_h, int64_t kernel_w,
                            const ConvGeometry& g) {
  at::Tensor dw = at::zeros({kernel_h, kernel_w, gh.size(3), xh.size(3)}, xh.options());
  for (const LiveTap& t : live_taps(kernel_h, kernel_w, xh.size(1), xh.size(2), gh.size(1), gh.size(2), g)) {
    at::Tensor dw_tap = dw[t.kh][t.kw];
    at::mm_out(dw_tap, gather_rect(output_rect(gh, t)).t(), gather_rect(input_rect(xh, t, g)));
  }
  return dw;
}

at::Tensor atrous_conv2d_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                     const std::optional<at::Tensor>& shift, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, bool relu) {
  check_4d(x, "x");
  check_4d(weight, "weight");
  TORCH_CHECK(weight.size(1) == x.size(1), "fastaspp: weight expects ", weight.size(1), " input channels but x has ",
              x.size(1));
  const ConvGeometry g = make_geometry(stride, padding, dilation);
  const auto [out_h, out_w] = out_hw(x.sizes(), weight.sizes(), g);
  at::Tensor y = at::empty({x.size(0), weight.size(0), out_h, out_w},
                           x.options().memory_format(x.suggest_memory_format()));
  if (y.numel() == 0) return y;
  const Affine affine = fold_affine(bias, scale, shift, compute_dtype(x.scalar_type()));
  if (use_direct(live_macs(x.sizes(), weight.sizes(), out_h, out_w, g))) {
    direct_forward(x, weight, affine.alpha, affine.beta, relu, g, y);
  } else {
    const auto [alpha, beta] = dense_affine(affine, weight.size(0), x.options().dtype(compute_dtype(x.scalar_type())));
    bn_relu_epilogue(gemm_forward(x, weight, g, out_h, out_w), alpha, beta, relu, y);
  }
  return y;
}

at::Tensor atrous_conv2d_grad_input_cpu(const at::Tensor& grad, const at::Tensor& weight,
                                        at::IntArrayRef input_size, at::IntArrayRef stride,
                                        at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_4d(grad, "grad");
  check_4d(weight, "weight");
  TORCH_CHECK(input_size.size() == 4, "fastaspp: input_size must have 4 elements, got ", input_size.size());
  const ConvGeometry g = make_geometry(stride, padding, dilation);
  const auto [out_h, out_w] = out_hw(input_size, weight.sizes(), g);
  TORCH_CHECK(grad.size(0) == input_size[0] && grad.size(1) == weight.size(0) && grad.size(2) == out_h &&
                  grad.size(3) == out_w,
              "fastaspp: grad has shape ", grad.sizes(), ", which is not the output shape for input ", input_size,
              " and weight ", weight.sizes());
  at::Tensor dx = at::empty(input_size, grad.options().memory_format(grad.suggest_memory_format()));
  if (dx.numel() == 0) return dx;
  const at::Tensor gh = to_nhwc(grad, compute_dtype(grad.scalar_type()));
  if (use_direct(live_macs(input_size, weight.sizes(), out_h, out_w, g))) {
    direct_grad_input(gh, weight, at::Tensor(), g, dx);
  } else {
    dx.copy_(gemm_grad_input(gh, weight, input_size, g).permute({0, 3, 1, 2}));
  }
  return dx;
}

// [KH, KW, Cout, Cin] in the compute dtype: the weight gradient of conv(x) against gh (NHWC).
at::Tensor grad_weight_taps(const at::Tensor& x, const at::Tensor& gh, int64_t kernel_h, int64_t kernel_w,
                            const ConvGeometry& g) {
  const at::Tensor xh = to_nhwc(x, gh.scalar_type());
  const int64_t macs = live_macs(x.sizes(), {gh.size(3), x.size(1), kernel_h, kernel_w}, gh.size(1), gh.size(2), g);
  return use_direct(macs) ? direct_grad_weight(xh, gh, kernel_h, kernel_w, g)
                          : gemm_grad_weight(xh, gh, kernel_h, kernel_w, g);
}

at::Tensor atrous_conv2d_grad_weight_cpu(const at::Tensor& x, const at::Tensor& grad,
                                         at::IntArrayRef weight_size, at::IntArrayRef stride,
                                         at::IntArrayRef padding, at::IntArrayRef dilation) {
  check_4d(x, "x");
  check_4d(grad, "grad");
  TORCH_CHECK(weight_size.size() == 4, "fastaspp: weight_size must have 4 elements, got ", weight_size.size());
  const ConvGeometry g = make_geometry(stride, padding, dilation);
  const auto [out_h, out_w] = out_hw(x.sizes(), weight_size, g);
  TORCH_CHECK(weight_size[1] == x.size(1) && grad.size(0) == x.size(0) && grad.size(1) == weight_size[0] &&
                  grad.size(2) == out_h && grad.size(3) == out_w,
              "fastaspp: grad has shape ", grad.sizes(), ", which is not the output shape for x ", x.sizes(),
              " and weight ", weight_size);
  const at::Tensor gh = to_nhwc(grad, compute_dtype(x.scalar_type()));
  return grad_weight_taps(x, gh, weight_size[2], weight_size[3], g)
      .permute({2, 3, 0, 1})
      .to(x.scalar_type())
      .contiguous();
}

// The whole backward of _atrous_conv2d_forward in one call: (dx, dweight, dbias, dscale, dshift)
// of y = act((conv(x, weight) + bias) * scale + shift), undefined where output_mask says no. With
// `out` (the saved output of a ReLU'd forward) the gradient is first masked to out > 0. With
// g the masked gradient: dx = conv_transpose(g * scale, weight), dweight = scale * wgrad(x, g),
// dshift = sum(g), dbias = scale * sum(g), dscale = <weight, wgrad(x, g)> + bias * sum(g): the
// pre-activation conv is never stored.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> atrous_conv2d_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& out, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 5> output_mask) {
  check_4d(grad, "grad");
  check_4d(x, "x");
  check_4d(weight, "weight");
  const ConvGeometry g = make_geometry(stride, padding, dilation);
  const auto [out_h, out_w] = out_hw(x.sizes(), weight.sizes(), g);
  TORCH_CHECK(grad.size(0) == x.size(0) && grad.size(1) == weight.size(0) && grad.size(2) == out_h &&
                  grad.size(3) == out_w,
              "fastaspp: grad has shape ", grad.sizes(), ", which is not the output shape for x ", x.sizes(),
              " and weight ", weight.sizes());
  const auto dtype = compute_dtype(x.scalar_type());
  const bool has_scale = scale.has_value() && scale->defined();
  const at::Tensor scale_acc = has_scale ? scale->to(dtype).contiguous() : at::Tensor();
  const at::Tensor gh = masked_nhwc(grad, out.has_value() ? *out : at::Tensor(), dtype);  // [N, Ho, Wo, Cout]
  const int64_t macs = live_macs(x.sizes(), weight.sizes(), out_h, out_w, g);

  at::Tensor dx, dweight, dbias, dscale, dshift;
  if (output_mask[0]) {
    dx = at::empty(x.sizes(), x.options().memory_format(x.suggest_memory_format()));
    if (dx.numel() > 0) {
      if (use_direct(macs)) {
        direct_grad_input(gh, weight, scale_acc, g, dx);
      } else {
        const at::Tensor scaled = has_scale ? gh * scale_acc : gh;
        dx.copy_(gemm_grad_input(scaled, weight, x.sizes(), g).permute({0, 3, 1, 2}));
      }
    }
  }
  if (output_mask[1] || output_mask[3]) {
    const at::Tensor taps = grad_weight_taps(x, gh, weight.size(2), weight.size(3), g);  // [KH, KW, Cout, Cin]
    if (output_mask[1]) {
      const at::Tensor scaled = has_scale ? taps * scale_acc.view({1, 1, -1, 1}) : taps;
      dweight = scaled.permute({2, 3, 0, 1}).to(weight.scalar_type()).contiguous();
    }
    if (output_mask[3]) dscale = (taps * weight.to(dtype).permute({2, 3, 0, 1})).sum({0, 1, 3});
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

}  // namespace

TORCH_LIBRARY_IMPL(fastaspp, CPU, m) {
  m.impl("_atrous_conv2d_forward", &atrous_conv2d_forward_cpu);
  m.impl("_atrous_conv2d_grad_input", &atrous_conv2d_grad_input_cpu);
  m.impl("_atrous_conv2d_grad_weight", &atrous_conv2d_grad_weight_cpu);
  m.impl("_atrous_conv2d_backward", &atrous_conv2d_backward_cpu);
}

}  // namespace fastaspp
