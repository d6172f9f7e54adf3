// The per-channel affine of fastaspp::_atrous_conv2d_forward, y = act((conv + bias) * scale + shift),
// folded once per call into y = act(conv * alpha + beta): alpha = scale, beta = bias * scale + shift.
// Host-side (ATen), shared by the cpu and cuda bindings.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastaspp {

// alpha and beta in `dtype`; undefined where they would be all ones (alpha) or all zeros (beta),
// so that a plain conv allocates nothing for them.
struct Affine {
  at::Tensor alpha, beta;
};

inline Affine fold_affine(const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                          const std::optional<at::Tensor>& shift, at::ScalarType dtype) {
  Affine f;
  if (scale.has_value() && scale->defined()) f.alpha = scale->to(dtype).contiguous();
  if (bias.has_value() && bias->defined())
    f.beta = f.alpha.defined() ? bias->to(dtype) * f.alpha : bias->to(dtype).contiguous();
  if (shift.has_value() && shift->defined())
    f.beta = f.beta.defined() ? f.beta + shift->to(dtype) : shift->to(dtype).contiguous();
  return f;
}

// alpha and beta as [channels] tensors of `options`, ones and zeros where undefined.
inline std::pair<at::Tensor, at::Tensor> dense_affine(const Affine& f, int64_t channels,
                                                      const at::TensorOptions& options) {
  return {f.alpha.defined() ? f.alpha.to(options.dtype().toScalarType()).contiguous() : at::ones({channels}, options),
          f.beta.defined() ? f.beta.to(options.dtype().toScalarType()).contiguous() : at::zeros({channels}, options)};
}

}  // namespace fastaspp
