// The split of a conv launch's K loop (FASTASPP_CUDA_SPLIT_K; csrc/cuda/conv_cute.cuh): how many
// parts each conv's CTAs cut their step walk into, and which steps each part walks. Plain C++
// (host and device), so that a host program checks it (tests/cuda_host/conv_walk.cu).
//
// A launch whose grid leaves SMs idle (a 33 x 33 map at batch 1: 25 patches x 2 channel blocks a
// conv, for 132 SMs) gives a CTA's steps to several: grid.z runs over the parts, each writes its
// fp32 tile to a workspace, and a second kernel sums the parts in a fixed order (deterministic) and
// runs the epilogue. The parts are sized to spread the launch's steps over one wave, so a long walk
// is cut and a short one is not (the ASPP's 1x1 branch walks a ninth of a 3x3 branch's steps).
// Worth it only while a part keeps enough steps to hide the pipeline's fill and drain, and the
// partial tiles' traffic stays small beside the steps'.
#pragma once

#include <cstdint>

#include "tap_geometry.h"

namespace fastaspp {

// The fewest K steps a part should walk: below this the pipeline's fill and drain and the partial
// tile's write and read cost about what the part saves (64 x 128 fp32 = 32 KB a part, about as
// many bytes as 3 steps' operands).
constexpr int64_t kMinStepsPerSplit = 8;

// Whether a launch of `ctas` CTAs may split its K loops at all: the switch allows more than one
// part (cap) and the grid leaves part of a wave (sms x ctas_per_sm CTAs at once) idle.
FASTASPP_HOST_DEVICE bool k_split_may_help(int64_t ctas, int64_t sms, int64_t ctas_per_sm, int64_t cap) {
  return cap > 1 && ctas > 0 && ctas < sms * ctas_per_sm;
}

// The parts of each of `count` walks of a launch (parts[i]), and the most of them (the grid's z
// extent). Walk i is the longest K loop (live steps) of its ctas_per_walk CTAs: in grid mode one
// walk a conv, its CTAs' longest; in sum mode (every CTA walks every conv) one walk, the longest
// over all of them, whose parts every conv takes. The GPU runs sms x ctas_per_sm CTAs at once.
// * No split (1 everywhere) unless k_split_may_help.
// * Else the launch's walks spread over one wave give a target of at least kMinStepsPerSplit steps
//   a part, and a walk of s steps gets s / target parts (at least 1, at most cap): the CTAs of the
//   walks that split fill at most the wave.
FASTASPP_HOST_DEVICE int k_split_plan(const int64_t* walks, int count, int64_t ctas_per_walk, int64_t sms,
                                      int64_t ctas_per_sm, int64_t cap, int* parts) {
  int64_t total = 0;
  for (int i = 0; i < count; ++i) {
    parts[i] = 1;
    total += walks[i];
  }
  if (!k_split_may_help(ctas_per_walk * count, sms, ctas_per_sm, cap)) return 1;
  int64_t target = ceil_div(ctas_per_walk * total, sms * ctas_per_sm);
  if (target < kMinStepsPerSplit) target = kMinStepsPerSplit;
  int most = 1;
  for (int i = 0; i < count; ++i) {
    int64_t p = walks[i] / target;
    if (p > cap) p = cap;
    parts[i] = p > 1 ? static_cast<int>(p) : 1;
    if (parts[i] > most) most = parts[i];
  }
  return most;
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
