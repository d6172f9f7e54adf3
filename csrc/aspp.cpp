// Schemas of fastaspp's C++ ASPP kernels (per-device; the public ops live in fastaspp/ops/aspp.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastaspp, m) {
  // ASPP conv branches: act(conv_i(x) * scale_i + shift_i) for the 1x1 branch (weights[0])
  // and the 3x3 branches of dilation rates[i-1] (weights[i]), written into one NHWC buffer
  // [N, (1+R)*C, H, W], branch i in channels [i*C, (i+1)*C); act = ReLU when relu. Eval uses
  // it with BN folded; the cuda backend's training path with scale 1, shift 0 and no ReLU.
  m.def("_aspp_branches_forward(Tensor x, Tensor[] weights, int[] rates, Tensor scale, Tensor shift, "
        "bool relu) -> Tensor");
  // Training forward of the branches: (z, mean, var) with z = the raw branch convs, as
  // _aspp_branches_forward with scale 1, shift 0 and no ReLU, and mean/var [(1+R)*C] its
  // per-channel batch-norm statistics (biased variance over N*H*W), float32 (float64 for a
  // float64 x), taken before z is rounded to x's dtype.
  m.def("_aspp_branches_stats_forward(Tensor x, Tensor[] weights, int[] rates) -> (Tensor, Tensor, Tensor)");
  // Training forward of the projection: y = weight @ relu((z - centre) * scale + shift) +
  // image_bias[n] per pixel (z [N, K, H, W], centre/scale/shift [K], weight [Cout, K],
  // image_bias [N, Cout]; BN of the branches applied on the fly, the pooling branch in the
  // bias), as (y, mean, var): y [N, Cout, H, W] channels_last in z's dtype, mean/var [Cout]
  // its batch-norm statistics as above. The normalised z is never materialised.
  m.def("_affine_relu_project_forward(Tensor z, Tensor centre, Tensor scale, Tensor shift, Tensor weight, "
        "Tensor image_bias) -> (Tensor, Tensor, Tensor)");
  // Its backward (cpu), given g [N, Cout, H, W], the gradient reaching y (its statistics' terms
  // included) in the accumulator dtype: (dz, dcentre, dscale, dshift, dweight, dimage_bias), each
  // in its input's dtype.
  m.def("_affine_relu_project_backward(Tensor g, Tensor z, Tensor centre, Tensor scale, Tensor shift, "
        "Tensor weight) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Input gradient of the raw branch sums (cuda): d/dx of sum(grad * branches(x)) with scale 1,
  // shift 0 and no ReLU, grad [N, (1+R)*C, H, W], as a [N, Cin, H, W] channels_last tensor with
  // input_size = [N, Cin, H, W]. Every branch's share in one accumulator.
  m.def("_aspp_branches_grad_input(Tensor grad, Tensor[] weights, int[] rates, int[] input_size) -> Tensor");
  // Backward of the raw branch sums (cpu): (dx, [dweight_i]) of sum(grad * branches(x)) with scale
  // 1, shift 0 and no ReLU, every branch's input gradient summed in one buffer; None / [] where
  // output_mask (dx, dweights) is false. Each dweight has its weight's strides.
  m.def("_aspp_branches_backward(Tensor grad, Tensor x, Tensor[] weights, int[] rates, bool[2] output_mask) "
        "-> (Tensor, Tensor[])");
}
