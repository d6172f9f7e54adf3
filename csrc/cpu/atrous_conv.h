// The cpu backend's single-conv forward and one-call backward (atrous_conv.cpp): the CPU kernels
// of fastaspp::_atrous_conv2d_forward and _atrous_conv2d_backward. Their C++ autograd
// (atrous_conv_autograd.cpp) calls the ops through the dispatcher with these signatures.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>
#include <tuple>

namespace fastaspp {

// y = act((conv2d(x, weight, stride, padding, dilation) + bias) * scale + shift) per output channel
// (nullopt: no bias, scale 1, shift 0), in x's suggested memory format.
at::Tensor atrous_conv2d_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& scale,
                                     const std::optional<at::Tensor>& shift, at::IntArrayRef stride,
                                     at::IntArrayRef padding, at::IntArrayRef dilation, bool relu);

// The whole backward of the forward above: (dx, dweight, dbias, dscale, dshift), undefined where
// output_mask says no. With `out` (the saved output of a ReLU'd forward) the gradient is first
// masked to out > 0. dweight comes in weight's layout (in_layout_of).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> atrous_conv2d_backward_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& out, at::IntArrayRef stride,
    at::IntArrayRef padding, at::IntArrayRef dilation, std::array<bool, 5> output_mask);

}  // namespace fastaspp
