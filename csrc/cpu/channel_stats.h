// Per-channel statistics of [P, C] matrices (P pixels, C channels) on the cpu backend: the
// batch-norm statistics of a training forward and the channel sums of a backward. Both reduce in
// fixed blocks of pixels merged in order, so the bits do not depend on the thread count.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <utility>
#include <vector>

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

// Per-channel mean and biased variance from per-block statistics of `pixels` pixels in blocks of
// `block` (the last may be shorter): part holds, per block, mean[C] then M2[C]; merged in order.
template <typename acc_t>
void merge_block_stats(const std::vector<double>& part, int64_t channels, int64_t pixels, int64_t block,
                       acc_t* mean_out, acc_t* var_out) {
  const int64_t blocks = (pixels + block - 1) / block;
  for (int64_t c = 0; c < channels; ++c) {
    double count = 0.0, m = 0.0, m2 = 0.0;
    for (int64_t b = 0; b < blocks; ++b)
      chan_merge(count, m, m2, static_cast<double>(std::min(block, pixels - b * block)), part[b * 2 * channels + c],
                 part[b * 2 * channels + channels + c]);
    mean_out[c] = static_cast<acc_t>(m);
    var_out[c] = static_cast<acc_t>(m2 / count);
  }
}

// Per-channel sums of a_2d ([P, C] contiguous, fp32 or fp64), in fixed blocks of pixels merged in
// order: the same bits whatever the thread count.
at::Tensor channel_sums(const at::Tensor& a_2d);

}  // namespace fastaspp
