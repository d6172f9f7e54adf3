// Schemas of fastaspp's C++ atrous-convolution kernels.
//
// These are the per-device kernels behind the "cpu" and "cuda" backends; the
// public op torch.ops.fastaspp.atrous_conv2d (fastaspp/ops/atrous_conv.py)
// validates arguments, picks the backend and owns autograd; the cpu kernel of
// _atrous_conv2d_forward also has a C++ autograd of its own (cpu/atrous_conv_autograd.cpp), which
// eager training calls on CPU tensors. Fake (meta) implementations are registered from Python.
#include <torch/library.h>

TORCH_LIBRARY(fastaspp, m) {
  // y = act((conv2d(x, weight, stride, padding, dilation) + bias) * scale + shift) per output
  // channel (None: no bias, scale 1, shift 0), in x's suggested memory format.
  m.def(
      "_atrous_conv2d_forward(Tensor x, Tensor weight, Tensor? bias, Tensor? scale, Tensor? shift, "
      "int[2] stride, int[2] padding, int[2] dilation, bool relu) -> Tensor");
  m.def(
      "_atrous_conv2d_grad_input(Tensor grad, Tensor weight, int[4] input_size, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  m.def(
      "_atrous_conv2d_grad_weight(Tensor x, Tensor grad, int[4] weight_size, "
      "int[2] stride, int[2] padding, int[2] dilation) -> Tensor");
  // The whole backward of _atrous_conv2d_forward in one call (cpu): (dx, dweight, dbias, dscale,
  // dshift), None where output_mask is false; `out`, the saved output of a ReLU'd forward, masks
  // the gradient (None: no ReLU). dweight has weight's strides (autograd then stores it uncopied).
  m.def(
      "_atrous_conv2d_backward(Tensor grad, Tensor x, Tensor weight, Tensor? bias, Tensor? scale, "
      "Tensor? out, int[2] stride, int[2] padding, int[2] dilation, bool[5] output_mask) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
