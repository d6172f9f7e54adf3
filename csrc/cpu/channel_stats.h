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

// Per-channel sums of a_2d ([P, C] contiguous, fp32 or fp64), in fixed blocks of pixels merged in
// order: the same bits whatever the thread count.
at::Tensor channel_sums(const at::Tensor& a_2d);

}  // namespace fastaspp
