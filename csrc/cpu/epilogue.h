// The BN/ReLU epilogue of the cpu backend: the per-channel affine and optional ReLU that follow a
// conv, y = act(conv * scale + shift), and in the backward the gradient through that ReLU.
// Half types compute in fp32, fp64 in fp64 (accumulator_dtype of common/rules.h).
#pragma once

#include <ATen/ATen.h>

namespace fastaspp {

// y = act(acc * scale + shift) per channel, from NHWC accumulators into y (NCHW or NHWC storage).
void bn_relu_epilogue(const at::Tensor& acc, const at::Tensor& scale, const at::Tensor& shift, bool relu,
                      at::Tensor& y);

// y = act(y * alpha + beta) per channel, in place: y [N, C, H, W] fp32/fp64, contiguous or
// channels_last; alpha, beta: [C] in y's dtype, or undefined for ones / zeros.
void affine_relu_inplace(at::Tensor& y, const at::Tensor& alpha, const at::Tensor& beta, bool relu);

// grad as a contiguous [N, H, W, C] tensor in `dtype`, zero where out <= 0 when out is defined (the
// gradient through a ReLU, read from its saved output; NaN outputs keep their gradient, as with
// grad.masked_fill(out <= 0, 0)). grad and out: [N, C, H, W], any strides.
at::Tensor masked_nhwc(const at::Tensor& grad, const at::Tensor& out, at::ScalarType dtype);

}  // namespace fastaspp
