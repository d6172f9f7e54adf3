// oneDNN's convolution with fastaspp's BN epilogue as its own bias and ReLU post-op, for eval: the
// per-channel scale is folded into a copy of the weight, which is also reordered into oneDNN's
// preferred layout for this input shape, and both are kept (common/kept.h). The conv then writes the final
// output in one pass, with no epilogue pass over it and no per-call weight reorder.
#pragma once

#include <ATen/ATen.h>

#include "../affine.h"

namespace fastaspp {

// act(conv(x, weight) * alpha + beta) through mkldnn::_convolution_pointwise, or an undefined tensor
// when this path does not apply: x not fp32, a weight or alpha that cannot be kept (it trains, or is
// an inference tensor), or a torch without the oneDNN op. The caller then runs oneDNN's plain conv
// and the epilogue instead.
// stride, padding, dilation: the op's own (already checked) arguments.
at::Tensor onednn_fused_forward(const at::Tensor& x, const at::Tensor& weight, const Affine& affine, bool relu,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);

}  // namespace fastaspp
