// The rules every backend shares, stated once for C++; fastaspp/_rules.py states them for Python
// and says why (docs/design.md §12, §14). Pure CUDA files (.cu), which cannot include ATen, follow
// the accumulator rule in their element traits.
#pragma once

#include <ATen/ATen.h>

namespace fastaspp {

// The dtype sums, statistics and folded BN parameters are computed in: fp64 for fp64, fp32 for
// every other floating type (_rules.accumulator_dtype).
inline at::ScalarType accumulator_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// The memory format of a result computed from `like` (_rules.result_format).
inline at::MemoryFormat result_format(const at::Tensor& like) { return like.suggest_memory_format(); }

// Whether a copy derived from `weight` may be kept between calls (_rules.keepable); a kept copy is
// valid while the weight is the same TensorImpl with the same data pointer and version
// (_rules.version_stamp), which kept.cpp checks.
inline bool keepable(const at::Tensor& weight) { return !weight.requires_grad() && !weight.is_inference(); }

}  // namespace fastaspp
