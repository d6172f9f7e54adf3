// Per-channel statistics of [P, C] matrices (P pixels, C channels) on the cpu backend: the
// batch-norm statistics of a training forward and the channel sums of a backward. Both reduce in
// fixed blocks of pixels merged in order, so the bits do not depend on the thread count.
#pragma once

#include <ATen/ATen.h>

#include <utility>

namespace fastaspp {

// Per-channel mean and biased variance of acc_2d ([P, C] contiguous, fp32 or fp64; P > 0), in
// its dtype: the batch-norm training statistics. Deterministic whatever the thread count.
std::pair<at::Tensor, at::Tensor> channel_stats(const at::Tensor& acc_2d);

// Chan et al.'s merge of a running (count, mean, M2) with a block's (n, block_mean, block_m2), in
// fp64: delta = block_mean - mean gives mean += delta * n / total and M2 += block_m2 + delta^2 *
// count * n / total. The first block (count 0) is taken as it is.
inline void chan_merge(double& count, double& mean, double& m2, double n, double block_mean, double block_m2) {
  if (count == 0.0) {
    count = n, mean = block_mean, m2 = block_m2;
    return;
  }
  const double total = count + n, delta = block_mean - mean;
  mean += delta * (n / total);
  m2 += block_m2 + delta * delta * (count * n / total);
  count = total;
}

// Per-channel sums of a_2d ([P, C] contiguous, fp32 or fp64), in fixed blocks of pixels merged in
// order: the same bits whatever the thread count.
at::Tensor channel_sums(const at::Tensor& a_2d);

}  // namespace fastaspp
