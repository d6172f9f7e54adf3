// Per-channel reductions of [P, C] matrices on the cpu backend (declared in channel_stats.h): the
// batch-norm statistics of a training forward and the channel sums of a backward, both in fixed
// blocks of pixels so that the bits do not depend on the thread count.
#include "channel_stats.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "../common/tap_geometry.h"

namespace fastaspp {

// Statistics in fixed blocks of pixels: each block's mean and centred sum of squares (two
// passes over the block while it is in cache, so no E[x^2] - E[x]^2 cancellation), then the
// blocks merged in order with Chan's formula. Blocks do not depend on the thread count, so
// neither do the results. Sums and merges are in fp64 (cheap next to reading the block).
namespace {

constexpr int64_t kStatsBlock = 256;

template <typename acc_t>
void channel_stats_impl(const at::Tensor& acc_2d, at::Tensor& mean, at::Tensor& var) {
  const int64_t pixels = acc_2d.size(0), channels = acc_2d.size(1);
  const int64_t blocks = ceil_div(pixels, kStatsBlock);
  const acc_t* a = acc_2d.data_ptr<acc_t>();
  std::vector<double> part(blocks * 2 * channels, 0.0);  // per block: mean[C], then M2[C]
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t p0 = b * kStatsBlock, n = std::min(kStatsBlock, pixels - p0);
      double* m = part.data() + b * 2 * channels;
      double* m2 = m + channels;
      for (int64_t p = p0; p < p0 + n; ++p)
        for (int64_t c = 0; c < channels; ++c) m[c] += a[p * channels + c];
      for (int64_t c = 0; c < channels; ++c) m[c] /= static_cast<double>(n);
      for (int64_t p = p0; p < p0 + n; ++p)
        for (int64_t c = 0; c < channels; ++c) {
          const double d = a[p * channels + c] - m[c];
          m2[c] += d * d;
        }
    }
  });
  merge_block_stats(part, channels, pixels, kStatsBlock, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
}

}  // namespace

std::pair<at::Tensor, at::Tensor> channel_stats(const at::Tensor& acc_2d) {
  TORCH_CHECK(acc_2d.dim() == 2 && acc_2d.is_contiguous() && acc_2d.size(0) > 0,
              "fastaspp: channel_stats needs a non-empty contiguous [P, C] matrix, got ", acc_2d.sizes());
  at::Tensor mean = at::empty({acc_2d.size(1)}, acc_2d.options());
  at::Tensor var = at::empty({acc_2d.size(1)}, acc_2d.options());
  AT_DISPATCH_FLOATING_TYPES(acc_2d.scalar_type(), "channel_stats",
                             [&] { channel_stats_impl<scalar_t>(acc_2d, mean, var); });
  return {mean, var};
}

namespace {

constexpr int64_t kSumBlock = 256;  // pixels per block of channel_sums

template <typename acc_t>
void channel_sums_impl(const at::Tensor& a_2d, at::Tensor& sums) {
  const int64_t pixels = a_2d.size(0), channels = a_2d.size(1);
  const int64_t blocks = ceil_div(pixels, kSumBlock);
  const acc_t* a = a_2d.data_ptr<acc_t>();
  std::vector<double> part(blocks * channels, 0.0);
  at::parallel_for(0, blocks, std::max<int64_t>(1, 64 / std::max<int64_t>(1, channels / 64)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      double* s = part.data() + b * channels;
      for (int64_t p = b * kSumBlock; p < std::min(pixels, (b + 1) * kSumBlock); ++p)
        for (int64_t c = 0; c < channels; ++c) s[c] += a[p * channels + c];
    }
  });
  acc_t* out = sums.data_ptr<acc_t>();
  for (int64_t c = 0; c < channels; ++c) {
    double total = 0.0;
    for (int64_t b = 0; b < blocks; ++b) total += part[b * channels + c];
    out[c] = static_cast<acc_t>(total);
  }
}

}  // namespace

at::Tensor channel_sums(const at::Tensor& a_2d) {
  TORCH_CHECK(a_2d.dim() == 2 && a_2d.is_contiguous(), "fastaspp: channel_sums needs a contiguous [P, C] matrix, got ",
              a_2d.sizes());
  at::Tensor sums = at::empty({a_2d.size(1)}, a_2d.options());
  AT_DISPATCH_FLOATING_TYPES(a_2d.scalar_type(), "channel_sums", [&] { channel_sums_impl<scalar_t>(a_2d, sums); });
  return sums;
}

}  // namespace fastaspp
