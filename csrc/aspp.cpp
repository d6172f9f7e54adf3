// Schemas of fastaspp's C++ ASPP kernels (per-device; the public ops live in fastaspp/ops/aspp.py).
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(fastaspp, m) {
  // ASPP conv branches: act(conv_i(x) * scale_i + shift_i) for the 1x1 branch (weights[0])
  // and the 3x3 branches of dilation rates[i-1] (weights[i]), written into one NHWC buffer
  // [N, (1+R)*C, H, W], branch i in channels [i*C, (i+1)*C); act = ReLU when relu. Eval uses
  // it with BN folded; training with scale 1, shift 0 and no ReLU (BN follows).
  m.def("_aspp_branches_forward(Tensor x, Tensor[] weights, int[] rates, Tensor scale, Tensor shift, "
        "bool relu) -> Tensor");
}
