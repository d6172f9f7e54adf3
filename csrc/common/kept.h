// Weight preparations kept between calls: a re-layout or transform of a weight is made once per
// weight version, not once per call. Used by the cpu kernels and the cuda bindings alike.
//
// The rule is keepable() of common/rules.h (fastaspp/_rules.py says why): a copy is kept while
// every weight it came from is the same tensor with the same storage and version (kept.cpp's stamp).
// Eval modules pass detached views of their parameters, which are keepable.
#pragma once

#include <ATen/ATen.h>

#include "rules.h"

#include <functional>
#include <vector>

namespace fastaspp {

// What a kept copy is: the first element of its tag.
enum KeptKind : int64_t {
  kDirectForwardLayout = 1,  // direct_conv.cpp: [KH*KW, Cin, Cout]
  kDirectGradInputLayout,    // direct_conv.cpp: [KH*KW, Cout, Cin]
  kTapMatrices,              // tap_gemm.h: tap_matrices
  kWinogradWeights,          // winograd.cpp: the transformed weights
  kCentreTaps,               // aspp.cpp: every direct branch's centre tap, concatenated
  kOnednnFoldedWeights,      // onednn_fused.cpp: the weight times the BN scale, in oneDNN's layout
  kCudaForwardLayout,        // cuda bindings: [KH, KW, Cin, Cout] (binding_utils.h weight_hwio)
  kCudaGradInputLayout,      // cuda bindings: [KH, KW, Cout, Cin]
};

// make(), kept under (weights, tag) while the rule above holds; `tag` names the derivation (its
// layout, dtype, tile sizes). Kept copies beyond a budget per device type, FASTASPP_CPU_KEPT_MB or
// FASTASPP_CUDA_KEPT_MB (default 1024 each), are dropped least recently used first. When any weight
// is not keepable, make() runs every call.
at::Tensor kept(at::TensorList weights, const std::vector<int64_t>& tag, const std::function<at::Tensor()>& make);

// Bytes the kept copies on devices of this type hold now (entries of weights that have died since
// the last kept() call included; that call drops them).
int64_t kept_bytes(c10::DeviceType device);

// Megabytes from environment variable `name` (fallback when unset; an error unless a whole number >= 0), in bytes.
int64_t env_megabytes(const char* name, int64_t fallback);

}  // namespace fastaspp
