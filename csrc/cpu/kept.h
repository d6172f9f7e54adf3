// Weight preparations kept between calls: a re-layout or transform of a weight is made once per
// weight version, not once per call.
//
// The rule (the Python side's twin is kernels/atrous_conv.py:_kept): a derived copy is
// kept while every weight it came from lives with the same storage and version counter, so an
// in-place update (optimizer step, load_state_dict, copy_) or a reassignment (module.to())
// makes the next call prepare it again. Weights that take a gradient are not kept (they change
// every step, so a kept copy would only hold memory), nor are inference tensors (no version
// counter to check). Eval modules pass detached views of their parameters, which are kept.
#pragma once

#include <ATen/ATen.h>

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
};

// Whether derived copies of `weight` may be kept (see above).
bool keepable(const at::Tensor& weight);

// make(), kept under (weights, tag) while the rule above holds; `tag` names the derivation (its
// layout, dtype, tile sizes). Kept copies beyond FASTASPP_CPU_KEPT_MB (default 1024) in all are
// dropped least recently used first. When any weight is not keepable, make() runs every call.
at::Tensor kept(at::TensorList weights, const std::vector<int64_t>& tag, const std::function<at::Tensor()>& make);

// Megabytes from environment variable `name` (fallback when unset), in bytes.
int64_t env_megabytes(const char* name, int64_t fallback);

}  // namespace fastaspp
