// One channel's BN batch statistics over one conv patch (docs/design.md §6), as the cuda
// backend's epilogue computes them from the unrounded accumulators: the count, the sum and the
// sum of squares about the patch's own mean (M2). The host merges the patches of a channel with
// Chan et al.'s formula, in a fixed order: no E[z²] − E[z]² cancellation, no atomics.
//
// Plain C++ with optional __host__ __device__ (tap_geometry.h), so that a host program
// (tests/cuda_host/patch_stats.cu) checks the same definition the kernels use.
#pragma once

#include "conv_tiling.h"

namespace fastaspp {

template <typename Acc>
struct PatchStats {
  Acc count, sum, m2;
};

// The statistics of the values col[m * ld] for every m (< kTilePixels) whose bit is set in
// `pixels`, in order of m: the same bits for the same inputs, whichever thread runs it.
template <typename Acc>
FASTASPP_HOST_DEVICE PatchStats<Acc> column_stats(const Acc* col, int64_t ld, uint64_t pixels) {
  PatchStats<Acc> s{Acc(0), Acc(0), Acc(0)};
  for (int m = 0; m < kTilePixels; ++m) {
    if ((pixels >> m) & 1u) {
      s.count += Acc(1);
      s.sum += col[m * ld];
    }
  }
  const Acc mean = s.count > Acc(0) ? s.sum / s.count : Acc(0);
  for (int m = 0; m < kTilePixels; ++m) {
    if ((pixels >> m) & 1u) {
      const Acc d = col[m * ld] - mean;
      s.m2 += d * d;
    }
  }
  return s;
}

}  // namespace fastaspp
