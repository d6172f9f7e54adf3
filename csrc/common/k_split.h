// The split of a conv launch's K loop (FASTASPP_CUDA_SPLIT_K; csrc/cuda/conv_cute.cuh): how many
// parts, and which of a CTA's steps each part walks. Plain C++ (host and device), so that a host
// program checks it (tests/cuda_host/conv_walk.cu).
//
// A launch whose grid leaves SMs idle (the ASPP at batch 1: 25 patches x 2 channel blocks of a
// 33 x 33 map for 132 SMs) gives each CTA a share of its K steps instead: grid.z runs over the
// parts, each writes its fp32 tile to a workspace, and a second kernel sums the parts in a fixed
// order (deterministic) and runs the epilogue. Worth it only while the parts keep enough steps to
// hide the pipeline's fill and drain, and the partial tiles' traffic stays small beside the steps'.
#pragma once

#include <cstdint>

#include "tap_geometry.h"

namespace fastaspp {

// The fewest K steps a part should walk: below this the pipeline's fill and drain and the partial
// tile's write and read cost about what the part saves (64 x 128 fp32 = 32 KB a part, about as
// many bytes as 3 steps' operands).
constexpr int64_t kMinStepsPerSplit = 8;

// The parts a launch of `ctas` CTAs splits into: at most `cap` (the switch; 1 never splits), no
// more than fill one wave of `sms` SMs at `ctas_per_sm` CTAs each, and no more than keep
// kMinStepsPerSplit of the `steps` a CTA walks without dead taps (the most any CTA walks).
FASTASPP_HOST_DEVICE int k_split_count(int64_t ctas, int64_t sms, int64_t ctas_per_sm, int64_t steps, int64_t cap) {
  if (cap <= 1 || ctas <= 0) return 1;
  int64_t parts = sms * ctas_per_sm / ctas;
  if (parts > cap) parts = cap;
  if (parts > steps / kMinStepsPerSplit) parts = steps / kMinStepsPerSplit;
  return parts > 1 ? static_cast<int>(parts) : 1;
}

// Steps [begin, end) of a CTA's `steps` that part `part` of `parts` walks: consecutive, in order,
// their sizes differing by at most one, together every step once.
struct StepRange {
  int64_t begin, end;
};
FASTASPP_HOST_DEVICE StepRange k_split_range(int64_t steps, int part, int parts) {
  return StepRange{steps * part / parts, steps * (part + 1) / parts};
}

}  // namespace fastaspp
