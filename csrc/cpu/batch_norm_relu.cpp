// The cpu backend's training batch norm, with the ReLU after it when asked:
//   y = act((z - mean) * invstd * weight + bias), mean and biased variance per channel over the batch,
// and its backward; what nn.BatchNorm2d then nn.ReLU compute in a training step, in two passes over z
// forward (statistics, then the normalisation) and two backward (the gradient sums, then dz), with one
// autograd node instead of two and the ReLU's mask recomputed from z rather than saved. Dense NCHW and
// channels_last, every float dtype (half types compute in fp32). Every reduction runs in fixed blocks
// merged in order, so the bits do not depend on the thread count. Called by fastaspp.nn's conv + BN
// blocks in eager training on CPU tensors (csrc/eager_calls.cpp; docs/design.md §6).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "../common/rules.h"
#include "../common/tap_geometry.h"
#include "batch_norm_relu.h"
#include "channel_stats.h"
#include "simd.h"

namespace fastaspp {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// z as dense NHWC (pixels of `channels` contiguous values) or NCHW (planes of `plane` values).
struct Dense {
  bool nhwc;
  int64_t batch, channels, plane;
};

Dense dense_of(const at::Tensor& z) {
  return {z.is_contiguous(at::MemoryFormat::ChannelsLast) && !z.is_contiguous(), z.size(0), z.size(1),
          z.size(2) * z.size(3)};
}

// Elements per task of a parallel loop: small maps run on the calling thread.
constexpr int64_t kGrainElements = 32768;
// Pixels per block of the NHWC statistics and gradient sums.
constexpr int64_t kSumBlock = 256;

template <typename acc_t>
acc_t invstd_of(acc_t var, double eps) {  // one formula for the forward and the backward
  return acc_t(1) / std::sqrt(var + static_cast<acc_t>(eps));
}

// The accumulator-dtype partials of every sum take at most kFlush terms each before they are added,
// in order, into fp64: a sum's rounding stays that of kFlush terms (tests/test_train_bn.py's bounds),
// while the loops run in the accumulator dtype, which vectorises.
constexpr int64_t kFlush = 16;
constexpr int64_t kLanes = 8;  // an NCHW plane's partials: value i goes to lane i % kLanes

// out[c] += sum of f(z, c) over `pixels` NHWC pixels of `channels` values.
template <typename scalar_t, typename acc_t, typename F>
void add_pixels(const scalar_t* __restrict__ z, int64_t pixels, int64_t channels, acc_t* __restrict__ partial,
                double* __restrict__ out, F f) {
  for (int64_t p0 = 0; p0 < pixels; p0 += kFlush) {
    std::fill(partial, partial + channels, acc_t(0));
    for (int64_t p = p0; p < std::min(pixels, p0 + kFlush); ++p)
      for (int64_t c = 0; c < channels; ++c) partial[c] += f(static_cast<acc_t>(z[p * channels + c]), c);
    for (int64_t c = 0; c < channels; ++c) out[c] += partial[c];
  }
}

// The sum of f(z) over n values of one NCHW plane.
template <typename scalar_t, typename acc_t, typename F>
double plane_sum(const scalar_t* __restrict__ z, int64_t n, F f) {
  double total = 0.0;
  for (int64_t i0 = 0; i0 < n; i0 += kLanes * kFlush) {
    acc_t lanes[kLanes] = {};
    const int64_t stop = std::min(n, i0 + kLanes * kFlush);
    int64_t i = i0;
    for (; i + kLanes <= stop; i += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) lanes[l] += f(static_cast<acc_t>(z[i + l]));
    for (int64_t l = 0; i < stop; ++i, ++l) lanes[l] += f(static_cast<acc_t>(z[i]));
    for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  }
  return total;
}

// Per-channel mean and biased variance over the batch: each block's (NHWC: kSumBlock pixels; NCHW:
// one plane) mean, then its centred sum of squares about that mean (two passes while the block is in
// cache: no E[z^2] - E[z]^2 cancellation), the blocks merged in order.
template <typename scalar_t, typename acc_t>
void batch_stats(const scalar_t* z, const Dense& d, acc_t* mean_out, acc_t* var_out) {
  const int64_t channels = d.channels;
  if (d.nhwc) {
    const int64_t pixels = d.batch * d.plane, blocks = ceil_div(pixels, kSumBlock);
    std::vector<double> part(blocks * 2 * channels, 0.0);  // per block: mean[C], then M2[C]
    at::parallel_for(0, blocks, std::max<int64_t>(1, kGrainElements / (kSumBlock * std::max<int64_t>(1, channels))),
                     [&](int64_t begin, int64_t end) {
      std::vector<acc_t> partial(channels), centre(channels);
      for (int64_t b = begin; b < end; ++b) {
        const int64_t n = std::min(kSumBlock, pixels - b * kSumBlock);
        const scalar_t* block = z + b * kSumBlock * channels;
        double* m = part.data() + b * 2 * channels;
        add_pixels(block, n, channels, partial.data(), m, [](acc_t v, int64_t) { return v; });
        for (int64_t c = 0; c < channels; ++c) {
          m[c] /= static_cast<double>(n);
          centre[c] = static_cast<acc_t>(m[c]);
        }
        const acc_t* mc = centre.data();
        add_pixels(block, n, channels, partial.data(), m + channels, [mc](acc_t v, int64_t c) {
          const acc_t e = v - mc[c];
          return e * e;
        });
      }
    });
    merge_block_stats(part, channels, pixels, kSumBlock, mean_out, var_out);
    return;
  }
  at::parallel_for(0, channels, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, d.batch * d.plane)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double count = 0.0, m = 0.0, m2 = 0.0;
      for (int64_t n = 0; n < d.batch; ++n) {
        const scalar_t* p = z + (n * channels + c) * d.plane;
        const double plane_mean = plane_sum<scalar_t, acc_t>(p, d.plane, [](acc_t v) { return v; }) / d.plane;
        const acc_t centre = static_cast<acc_t>(plane_mean);
        const double plane_m2 = plane_sum<scalar_t, acc_t>(p, d.plane, [centre](acc_t v) {
          const acc_t e = v - centre;
          return e * e;
        });
        chan_merge(count, m, m2, static_cast<double>(d.plane), plane_mean, plane_m2);
      }
      mean_out[c] = static_cast<acc_t>(m);
      var_out[c] = static_cast<acc_t>(m2 / count);
    }
  });
}

// Per-channel constants of the normalisation: y = act((z - mean) * alpha + beta).
template <typename acc_t>
struct Affine {
  std::vector<acc_t> mean, invstd, alpha, beta;
};

template <typename acc_t>
Affine<acc_t> affine_of(const at::Tensor& mean, const at::Tensor& var, const std::optional<at::Tensor>& weight,
                        const std::optional<at::Tensor>& bias, double eps) {
  const int64_t channels = mean.size(0);
  const auto dtype = mean.scalar_type();
  const at::Tensor w = weight.has_value() && weight->defined() ? weight->to(dtype).contiguous() : at::Tensor();
  const at::Tensor b = bias.has_value() && bias->defined() ? bias->to(dtype).contiguous() : at::Tensor();
  Affine<acc_t> a{std::vector<acc_t>(mean.data_ptr<acc_t>(), mean.data_ptr<acc_t>() + channels),
                  std::vector<acc_t>(channels), std::vector<acc_t>(channels), std::vector<acc_t>(channels, acc_t(0))};
  const acc_t* v = var.data_ptr<acc_t>();
  for (int64_t c = 0; c < channels; ++c) {
    a.invstd[c] = invstd_of(v[c], eps);
    a.alpha[c] = w.defined() ? a.invstd[c] * w.data_ptr<acc_t>()[c] : a.invstd[c];
    if (b.defined()) a.beta[c] = b.data_ptr<acc_t>()[c];
  }
  return a;
}

// Runs f(offset, channel, count) over z's dense storage, in parallel: NHWC pixels (count values, one
// per channel from channel 0) or NCHW planes (count values of one channel).
template <typename F>
void for_each_row(const Dense& d, F&& f) {
  const int64_t rows = d.nhwc ? d.batch * d.plane : d.batch * d.channels;
  const int64_t row = d.nhwc ? d.channels : d.plane;
  at::parallel_for(0, rows, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, row)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r * row, d.nhwc ? 0 : r % d.channels, row);
  });
}

// The gradient through the ReLU of the stored output: zero where that output is <= 0 (NaN keeps
// its gradient, as with torch's threshold_backward).
template <typename scalar_t, typename acc_t>
FASTASPP_INLINE acc_t masked(acc_t grad, acc_t pre, bool relu) {
  return relu && static_cast<acc_t>(static_cast<scalar_t>(pre)) <= acc_t(0) ? acc_t(0) : grad;
}

// The per-channel constants a row reads: arrays indexed by the value's channel (an NHWC pixel,
// kPixel) or one channel's (an NCHW plane: index 0 throughout). The row loops below take them as
// separate __restrict__ parameters and are branch-free, so that the compiler vectorises them (a
// struct's or a closure's pointers carry no __restrict__: those loops stayed scalar).
template <typename acc_t>
struct Row {
  const acc_t* mean;
  const acc_t* alpha;
  const acc_t* beta;
  const acc_t* invstd;
};

template <typename acc_t>
Row<acc_t> row_of(const Affine<acc_t>& a, int64_t channel) {
  return {a.mean.data() + channel, a.alpha.data() + channel, a.beta.data() + channel, a.invstd.data() + channel};
}

template <typename scalar_t, typename acc_t, bool kPixel>
FASTASPP_INLINE void normalize_row_impl(const scalar_t* __restrict__ z, scalar_t* __restrict__ y, int64_t n,
                                        const acc_t* __restrict__ mean, const acc_t* __restrict__ alpha,
                                        const acc_t* __restrict__ beta, bool relu) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = kPixel ? i : 0;
    acc_t v = (static_cast<acc_t>(z[i]) - mean[c]) * alpha[c] + beta[c];
    if (relu && v < acc_t(0)) v = acc_t(0);  // not !(v > 0): NaN stays NaN, as in torch.relu
    y[i] = static_cast<scalar_t>(v);
  }
}

// g += masked gradient, gx += g * xhat over n values of a row, in the accumulator dtype: lane i % kLanes
// of a plane (one channel) or channel i of a pixel.
template <typename scalar_t, typename acc_t, bool kPixel>
FASTASPP_INLINE void sums_row_impl(const scalar_t* __restrict__ z, const scalar_t* __restrict__ grad, int64_t n,
                                   const acc_t* __restrict__ mean, const acc_t* __restrict__ alpha,
                                   const acc_t* __restrict__ beta, const acc_t* __restrict__ invstd, bool relu,
                                   acc_t* __restrict__ g, acc_t* __restrict__ gx) {
  if constexpr (kPixel) {
    for (int64_t c = 0; c < n; ++c) {
      const acc_t centred = static_cast<acc_t>(z[c]) - mean[c];
      const acc_t gv = masked<scalar_t>(static_cast<acc_t>(grad[c]), centred * alpha[c] + beta[c], relu);
      g[c] += gv;
      gx[c] += gv * (centred * invstd[c]);
    }
  } else {
    int64_t i = 0;
    for (; i + kLanes <= n; i += kLanes)
      for (int64_t l = 0; l < kLanes; ++l) {
        const acc_t centred = static_cast<acc_t>(z[i + l]) - mean[0];
        const acc_t gv = masked<scalar_t>(static_cast<acc_t>(grad[i + l]), centred * alpha[0] + beta[0], relu);
        g[l] += gv;
        gx[l] += gv * (centred * invstd[0]);
      }
    for (int64_t l = 0; i < n; ++i, ++l) {
      const acc_t centred = static_cast<acc_t>(z[i]) - mean[0];
      const acc_t gv = masked<scalar_t>(static_cast<acc_t>(grad[i]), centred * alpha[0] + beta[0], relu);
      g[l] += gv;
      gx[l] += gv * (centred * invstd[0]);
    }
  }
}

// dz = alpha * g - offset - centred * slope over a row (per-channel offset and slope as Row's).
template <typename scalar_t, typename acc_t, bool kPixel>
FASTASPP_INLINE void dz_row_impl(const scalar_t* __restrict__ z, const scalar_t* __restrict__ grad,
                                 scalar_t* __restrict__ dz, int64_t n, const acc_t* __restrict__ mean,
                                 const acc_t* __restrict__ alpha, const acc_t* __restrict__ beta,
                                 const acc_t* __restrict__ offset, const acc_t* __restrict__ slope, bool relu) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = kPixel ? i : 0;
    const acc_t centred = static_cast<acc_t>(z[i]) - mean[c];
    const acc_t g = masked<scalar_t>(static_cast<acc_t>(grad[i]), centred * alpha[c] + beta[c], relu);
    dz[i] = static_cast<scalar_t>(alpha[c] * g - offset[c] - centred * slope[c]);
  }
}

// float storage runs the rows above through entry points cloned for AVX2 (simd.h: no FMA, so both
// clones round alike); the other dtypes inline them.
FASTASPP_AVX2_CLONES void normalize_row_f32(const float* z, float* y, int64_t n, const Row<float>& r, bool relu,
                                            bool pixel) {
  pixel ? normalize_row_impl<float, float, true>(z, y, n, r.mean, r.alpha, r.beta, relu)
        : normalize_row_impl<float, float, false>(z, y, n, r.mean, r.alpha, r.beta, relu);
}

FASTASPP_AVX2_CLONES void sums_row_f32(const float* z, const float* grad, int64_t n, const Row<float>& r, bool relu,
                                       float* g, float* gx, bool pixel) {
  pixel ? sums_row_impl<float, float, true>(z, grad, n, r.mean, r.alpha, r.beta, r.invstd, relu, g, gx)
        : sums_row_impl<float, float, false>(z, grad, n, r.mean, r.alpha, r.beta, r.invstd, relu, g, gx);
}

FASTASPP_AVX2_CLONES void dz_row_f32(const float* z, const float* grad, float* dz, int64_t n, const Row<float>& r,
                                     const float* offset, const float* slope, bool relu, bool pixel) {
  pixel ? dz_row_impl<float, float, true>(z, grad, dz, n, r.mean, r.alpha, r.beta, offset, slope, relu)
        : dz_row_impl<float, float, false>(z, grad, dz, n, r.mean, r.alpha, r.beta, offset, slope, relu);
}

template <typename scalar_t, typename acc_t, bool kPixel>
void normalize_row(const scalar_t* z, scalar_t* y, int64_t n, const Row<acc_t>& r, bool relu) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    normalize_row_f32(z, y, n, r, relu, kPixel);
  } else {
    normalize_row_impl<scalar_t, acc_t, kPixel>(z, y, n, r.mean, r.alpha, r.beta, relu);
  }
}

template <typename scalar_t, typename acc_t, bool kPixel>
void sums_row(const scalar_t* z, const scalar_t* grad, int64_t n, const Row<acc_t>& r, bool relu, acc_t* g, acc_t* gx) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    sums_row_f32(z, grad, n, r, relu, g, gx, kPixel);
  } else {
    sums_row_impl<scalar_t, acc_t, kPixel>(z, grad, n, r.mean, r.alpha, r.beta, r.invstd, relu, g, gx);
  }
}

template <typename scalar_t, typename acc_t, bool kPixel>
void dz_row(const scalar_t* z, const scalar_t* grad, scalar_t* dz, int64_t n, const Row<acc_t>& r,
            const acc_t* offset, const acc_t* slope, bool relu) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    dz_row_f32(z, grad, dz, n, r, offset, slope, relu, kPixel);
  } else {
    dz_row_impl<scalar_t, acc_t, kPixel>(z, grad, dz, n, r.mean, r.alpha, r.beta, offset, slope, relu);
  }
}

template <typename scalar_t, typename acc_t>
void normalize(const scalar_t* z, scalar_t* y, const Dense& d, const Affine<acc_t>& a, bool relu) {
  for_each_row(d, [&](int64_t offset, int64_t channel, int64_t count) {
    const Row<acc_t> r = row_of(a, channel);
    d.nhwc ? normalize_row<scalar_t, acc_t, true>(z + offset, y + offset, count, r, relu)
           : normalize_row<scalar_t, acc_t, false>(z + offset, y + offset, count, r, relu);
  });
}

// Per channel: sum of g and of g * xhat (xhat = (z - mean) * invstd), g the masked gradient, in
// fixed blocks (NHWC: kSumBlock pixels; NCHW: one plane) added in order, so that the bits do not
// depend on the thread count.
template <typename scalar_t, typename acc_t>
void gradient_sums(const scalar_t* grad, const scalar_t* z, const Dense& d, const Affine<acc_t>& a, bool relu,
                   std::vector<double>& sum_g, std::vector<double>& sum_gx) {
  const int64_t channels = d.channels;
  if (d.nhwc) {
    const int64_t pixels = d.batch * d.plane, blocks = ceil_div(pixels, kSumBlock);
    std::vector<double> part(blocks * 2 * channels, 0.0);
    const Row<acc_t> r = row_of(a, 0);
    at::parallel_for(0, blocks, std::max<int64_t>(1, kGrainElements / (kSumBlock * std::max<int64_t>(1, channels))),
                     [&](int64_t begin, int64_t end) {
      std::vector<acc_t> g(channels), gx(channels);
      for (int64_t b = begin; b < end; ++b) {
        double* g_part = part.data() + b * 2 * channels;
        double* gx_part = g_part + channels;
        const int64_t stop = std::min(pixels, (b + 1) * kSumBlock);
        for (int64_t p0 = b * kSumBlock; p0 < stop; p0 += kFlush) {
          std::fill(g.begin(), g.end(), acc_t(0));
          std::fill(gx.begin(), gx.end(), acc_t(0));
          for (int64_t p = p0; p < std::min(stop, p0 + kFlush); ++p)
            sums_row<scalar_t, acc_t, true>(z + p * channels, grad + p * channels, channels, r, relu, g.data(),
                                            gx.data());
          for (int64_t c = 0; c < channels; ++c) {
            g_part[c] += g[c];
            gx_part[c] += gx[c];
          }
        }
      }
    });
    for (int64_t b = 0; b < blocks; ++b)
      for (int64_t c = 0; c < channels; ++c) {
        sum_g[c] += part[b * 2 * channels + c];
        sum_gx[c] += part[b * 2 * channels + channels + c];
      }
    return;
  }
  at::parallel_for(0, channels, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, d.batch * d.plane)),
                   [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      const Row<acc_t> r = row_of(a, c);
      for (int64_t n = 0; n < d.batch; ++n) {
        const int64_t offset = (n * channels + c) * d.plane;
        for (int64_t i0 = 0; i0 < d.plane; i0 += kLanes * kFlush) {
          acc_t g[kLanes] = {}, gx[kLanes] = {};
          sums_row<scalar_t, acc_t, false>(z + offset + i0, grad + offset + i0,
                                           std::min(kLanes * kFlush, d.plane - i0), r, relu, g, gx);
          for (int64_t l = 0; l < kLanes; ++l) {
            sum_g[c] += g[l];
            sum_gx[c] += gx[l];
          }
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_train_forward_cpu(
    const at::Tensor& z_in, const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias, double eps,
    bool relu) {
  TORCH_CHECK(z_in.dim() == 4, "fastaspp: z must be a 4-D tensor [N, C, H, W], got shape ", z_in.sizes());
  TORCH_CHECK(z_in.size(0) * z_in.size(2) * z_in.size(3) > 0, "fastaspp: z must hold a value per channel, got shape ",
              z_in.sizes());
  const at::Tensor z = z_in.contiguous(result_format(z_in));
  const Dense d = dense_of(z);
  const auto acc = accumulator_dtype(z.scalar_type());
  at::Tensor y = at::empty_like(z);
  at::Tensor mean = at::empty({d.channels}, z.options().dtype(acc));
  at::Tensor var = at::empty({d.channels}, z.options().dtype(acc));
  if (d.channels == 0) return {y, mean, var};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "batch_norm_relu_train_forward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    batch_stats<scalar_t, acc_t>(z.data_ptr<scalar_t>(), d, mean.data_ptr<acc_t>(), var.data_ptr<acc_t>());
    const Affine<acc_t> a = affine_of<acc_t>(mean, var, weight, bias, eps);
    normalize<scalar_t, acc_t>(z.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), d, a, relu);
  });
  return {y, mean, var};
}

// A [C] tensor of `dtype` holding fp64 sums (a direct fill: a tensor from the vector and a
// conversion would be two more ATen calls on every backward).
at::Tensor from_sums(const std::vector<double>& sums, at::ScalarType dtype) {
  at::Tensor out = at::empty({static_cast<int64_t>(sums.size())}, at::TensorOptions().dtype(dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "batch_norm_relu_sums", [&] {
    scalar_t* p = out.data_ptr<scalar_t>();
    for (size_t c = 0; c < sums.size(); ++c) p[c] = static_cast<scalar_t>(sums[c]);
  });
  return out;
}

// With g the gradient masked by the ReLU and M = N*H*W: dbias = sum(g), dweight = sum(g * xhat),
// dz = weight * invstd * (g - dbias / M - xhat * dweight / M).
std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_train_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& z_in, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias, const at::Tensor& mean, const at::Tensor& var, double eps, bool relu,
    std::array<bool, 3> output_mask) {
  TORCH_CHECK(grad_in.sizes() == z_in.sizes(), "fastaspp: grad has shape ", grad_in.sizes(), " but z has ",
              z_in.sizes());
  const at::Tensor z = z_in.contiguous(result_format(z_in));
  const at::Tensor grad = grad_in.to(z.scalar_type()).contiguous(result_format(z_in));
  const Dense d = dense_of(z);
  const int64_t channels = d.channels;
  const double count = static_cast<double>(d.batch * d.plane);
  std::vector<double> sum_g(channels, 0.0), sum_gx(channels, 0.0);
  at::Tensor dz;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "batch_norm_relu_train_backward", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const Affine<acc_t> a = affine_of<acc_t>(mean, var, weight, bias, eps);
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    gradient_sums<scalar_t, acc_t>(gp, zp, d, a, relu, sum_g, sum_gx);
    if (!output_mask[0]) return;
    // dz = k * g - k * mean_g - centred * invstd * k * mean_gx, k = weight * invstd (alpha).
    std::vector<acc_t> offset(channels), slope(channels);
    for (int64_t c = 0; c < channels; ++c) {
      offset[c] = static_cast<acc_t>(a.alpha[c] * (sum_g[c] / count));
      slope[c] = static_cast<acc_t>(a.alpha[c] * a.invstd[c] * (sum_gx[c] / count));
    }
    dz = at::empty_like(z);
    scalar_t* dzp = dz.data_ptr<scalar_t>();
    for_each_row(d, [&](int64_t start, int64_t channel, int64_t n) {
      const Row<acc_t> r = row_of(a, channel);
      d.nhwc ? dz_row<scalar_t, acc_t, true>(zp + start, gp + start, dzp + start, n, r, offset.data() + channel,
                                             slope.data() + channel, relu)
             : dz_row<scalar_t, acc_t, false>(zp + start, gp + start, dzp + start, n, r, offset.data() + channel,
                                              slope.data() + channel, relu);
    });
  });
  at::Tensor dweight = output_mask[1] ? from_sums(sum_gx, weight->scalar_type()) : at::Tensor();
  at::Tensor dbias = output_mask[2] ? from_sums(sum_g, bias->scalar_type()) : at::Tensor();
  return {dz, dweight, dbias};
}

// ---------------------------------------------------------------- autograd (AutogradCPU)
const auto& forward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastaspp::_batch_norm_relu_train_forward", "")
                             .typed<decltype(batch_norm_relu_train_forward_cpu)>();
  return op;
}

const auto& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastaspp::_batch_norm_relu_train_backward", "")
                             .typed<decltype(batch_norm_relu_train_backward_cpu)>();
  return op;
}

using Optional = std::optional<at::Tensor>;

// The backward's kernel, as a function of its own under create_graph=True, so that differentiating
// the gradients again raises instead of giving second derivatives without this node's terms.
class BatchNormReluCpuBackward : public torch::autograd::Function<BatchNormReluCpuBackward> {
 public:
  static variable_list forward(AutogradContext* /*ctx*/, const at::Tensor& grad, const at::Tensor& z,
                               const Optional& weight, const Optional& bias, const at::Tensor& mean,
                               const at::Tensor& var, double eps, bool relu, std::array<bool, 3> output_mask) {
    variable_list requested;
    for (const at::Tensor& t : run(grad, z, weight, bias, mean, var, eps, relu, output_mask))
      if (t.defined()) requested.push_back(t);
    return requested;
  }

  static variable_list backward(AutogradContext* /*ctx*/, const variable_list& /*grads*/) {
    TORCH_CHECK(false,
                "fastaspp: the training batch norm + ReLU on the cpu backend has no double backward (a gradient "
                "of its gradients); use eager nn.BatchNorm2d and nn.ReLU for higher-order gradients");
  }

  // (dz, dweight, dbias), undefined where output_mask says no.
  static variable_list run(const at::Tensor& grad, const at::Tensor& z, const Optional& weight, const Optional& bias,
                           const at::Tensor& mean, const at::Tensor& var, double eps, bool relu,
                           std::array<bool, 3> output_mask) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [dz, dweight, dbias] = backward_op().call(grad, z, weight, bias, mean, var, eps, relu, output_mask);
    return {dz, dweight, dbias};
  }
};

class BatchNormReluCpu : public torch::autograd::Function<BatchNormReluCpu> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& z, const Optional& weight, const Optional& bias,
                               double eps, bool relu) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [y, mean, var] = forward_op().call(z, weight, bias, eps, relu);
    ctx->save_for_backward({z, weight.value_or(at::Tensor()), bias.value_or(at::Tensor()), mean, var});
    ctx->saved_data["eps"] = eps;
    ctx->saved_data["relu"] = relu;
    ctx->saved_data["given"] = std::vector<bool>{weight.has_value() && weight->defined(),
                                                 bias.has_value() && bias->defined()};
    ctx->mark_non_differentiable({mean, var});
    return {y, mean, var};
  }

  static variable_list backward(AutogradContext* ctx, const variable_list& grads) {
    const variable_list saved = ctx->get_saved_variables();
    const std::vector<bool> given = ctx->saved_data["given"].toBoolList().vec();
    // output_mask in the backward's order (z, weight, bias); needs_input_grad counts given tensors.
    std::array<bool, 3> output_mask{};
    size_t edge = 0;
    for (size_t i = 0; i < output_mask.size(); ++i) {
      if (i >= 1 && !given[i - 1]) continue;
      output_mask[i] = ctx->needs_input_grad(edge++);
    }
    variable_list result(3);
    if (grads[0].defined()) {
      const auto optional = [](const at::Tensor& t) { return t.defined() ? Optional(t) : std::nullopt; };
      const double eps = ctx->saved_data["eps"].toDouble();
      const bool relu = ctx->saved_data["relu"].toBool();
      if (at::GradMode::is_enabled()) {  // create_graph=True
        const variable_list requested = BatchNormReluCpuBackward::apply(
            grads[0], saved[0], optional(saved[1]), optional(saved[2]), saved[3], saved[4], eps, relu, output_mask);
        size_t next = 0;
        for (size_t i = 0; i < output_mask.size(); ++i)
          if (output_mask[i]) result[i] = requested[next++];
      } else {
        result = BatchNormReluCpuBackward::run(grads[0], saved[0], optional(saved[1]), optional(saved[2]), saved[3],
                                               saved[4], eps, relu, output_mask);
      }
    }
    result.resize(5);  // one gradient per forward argument: none for eps and relu
    return result;
  }
};

std::tuple<at::Tensor, at::Tensor, at::Tensor> batch_norm_relu_train_forward_autograd(
    const at::Tensor& z, const Optional& weight, const Optional& bias, double eps, bool relu) {
  const variable_list out = BatchNormReluCpu::apply(z, weight, bias, eps, relu);
  return {out[0], out[1], out[2]};
}

}  // namespace

void move_running_stat(const at::Tensor& running, const at::Tensor& batch, double scale, double factor) {
  if (!running.is_contiguous() || running.dim() != 1 || running.size(0) != batch.size(0)) {  // nn.BatchNorm2d's ops
    running.mul_(1.0 - factor).add_(batch.mul(scale).to(running.scalar_type()), factor);
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "move_running_stat", [&] {
    using running_t = scalar_t;
    running_t* r = running.data_ptr<running_t>();
    AT_DISPATCH_FLOATING_TYPES(batch.scalar_type(), "move_running_stat", [&] {
      const scalar_t* b = batch.data_ptr<scalar_t>();  // the batch's dtype (this dispatch's scalar_t)
      for (int64_t c = 0; c < running.size(0); ++c) {
        const double moved = static_cast<double>(r[c]) * (1.0 - factor) + static_cast<double>(b[c]) * scale * factor;
        r[c] = static_cast<running_t>(moved);
      }
    });
  });
}

TORCH_LIBRARY_IMPL(fastaspp, CPU, m) {
  m.impl("_batch_norm_relu_train_forward", &batch_norm_relu_train_forward_cpu);
  m.impl("_batch_norm_relu_train_backward", &batch_norm_relu_train_backward_cpu);
}

TORCH_LIBRARY_IMPL(fastaspp, AutogradCPU, m) {
  m.impl("_batch_norm_relu_train_forward", &batch_norm_relu_train_forward_autograd);
}

}  // namespace fastaspp
