// Winograd evaluation of a 3x3 atrous conv (stride 1, padding = dilation = rate) on CPU, used by
// the ASPP branches and single convs in eval. The pixels of equal residue mod rate form a sub-grid
// on which the atrous conv is a plain 3x3 conv with unit spacing; per axis, a sub-grid of s pixels
// then costs fewer products than its live taps (3s - 2): 3 for s = 2, s + 2 for 3 <= s <= 6 (F(s,3)).
// Measured ceiling and trade-offs: benchmarks/cpu_eval_ceiling.py, docs/design.md §9.
#pragma once

#include <ATen/ATen.h>

namespace fastaspp {

// The path Winograd would replace. Its per-point GEMMs (one at::bmm) must beat that path's rate,
// not only its product count.
enum class WinogradRival {
  kTapGemms,  // one GEMM per live tap: the ASPP branches, a single conv without oneDNN
  kOnednn,    // oneDNN's conv, which skips dead taps and runs its products faster than the bmm
};

// Whether winograd_conv3x3 runs this conv. FASTASPP_CPU_WINOGRAD=0: never. Otherwise the compute
// dtype must be fp32 or fp64 and the weight's transforms keepable between calls (it takes no
// gradient and is not an inference tensor: eval's folded weights). FASTASPP_CPU_WINOGRAD=1 stops
// there (to measure the crossovers); by default the conv's products must also be at most a share
// of its live (pixel, tap) pairs: 80% against the tap GEMMs; against oneDNN 50% for wide convs and
// 32% for narrow ones, with at least 32 tiles, and never for the narrowest (the measured
// crossovers: winograd.cpp, benchmarks/cpu_winograd_crossover.py, docs/design.md §9).
bool use_winograd(int64_t batch, int64_t in_h, int64_t in_w, int64_t rate, const at::Tensor& weight,
                  at::ScalarType dtype, WinogradRival rival);

// out = conv2d(x, weight, padding=rate, dilation=rate), overwriting out. xh: [N, H, W, Cin]
// NHWC, contiguous, in the compute dtype; weight: [Cout, Cin, 3, 3]; out: [N, H, W, Cout] with
// unit channel stride (a channel slice of a wider buffer). The transformed weights are kept
// while the weight lives and is unchanged (common/kept.h); the transformed input is made in chunks of at most
// FASTASPP_CPU_WINOGRAD_WORKSPACE_MB (default 64) in a buffer each calling thread keeps.
void winograd_conv3x3(const at::Tensor& xh, const at::Tensor& weight, int64_t rate, const at::Tensor& out);

}  // namespace fastaspp
