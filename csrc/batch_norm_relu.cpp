// Schemas of the cpu backend's training batch norm + ReLU (csrc/cpu/batch_norm_relu.cpp), which
// fastaspp.nn's conv + BN blocks run in eager training on CPU tensors (the call: csrc/eager_calls.cpp).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastaspp, m) {
  // y = act((z - mean) / sqrt(var + eps) * weight + bias) per channel, act = ReLU when relu, with
  // mean and var z's per-channel batch mean and biased variance over N*H*W (returned, in the
  // accumulator dtype: float32, float64 for float64 z); y in z's dtype and memory format. weight and
  // bias absent: 1 and 0.
  m.def("_batch_norm_relu_train_forward(Tensor z, Tensor? weight, Tensor? bias, float eps, bool relu) "
        "-> (Tensor, Tensor, Tensor)");
  // Its backward: (dz, dweight, dbias) given the gradient of y and the forward's mean and var;
  // undefined where output_mask says no.
  m.def("_batch_norm_relu_train_backward(Tensor grad, Tensor z, Tensor? weight, Tensor? bias, Tensor mean, "
        "Tensor var, float eps, bool relu, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}
