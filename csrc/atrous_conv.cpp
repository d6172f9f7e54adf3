// Schemas of fastaspp's C++ atrous-convolution kernels.
//
// These are the per-device kernels behind the "cpu" and "cuda" backends; the
// public op torch.ops.fastaspp.atrous_conv2d (fastaspp/ops/atrous_conv.py)
// validates arguments, picks the backend and owns autograd. Fake (meta)
// implementations are registered from Python.
#include <torch/library.h>

TORCH_LIBRARY(fastaspp, m) {
  m.def(
      "_atrous_conv2d_forward(Tensor x, Tensor weight, Tensor scale, Tensor shift, "
      "int[2] stride, int[2] padding, int[2] dilation, bool relu) -> Tensor");
  m.def(
      "_atrous_conv2d_grad_input(Tensor grad, Tensor weight, int[4] input_size, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "_atrous_conv2d_grad_weight(Tensor x, Tensor grad, int[4] weight_size, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
}
