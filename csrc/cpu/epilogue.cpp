// The per-channel affine and ReLU that follow a conv on the cpu backend (declared in epilogue.h):
// from the GEMMs' NHWC accumulators into the output, in place on oneDNN's output, and the ReLU's
// gradient mask in the backward.
#include "epilogue.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>

#include "../affine.h"
#include "simd.h"
#include "tap_gemm.h"

namespace fastaspp {

namespace {

template <typename scalar_t, typename acc_t>
void bn_relu_epilogue_impl(const at::Tensor& acc, const at::Tensor& scale, const at::Tensor& shift,
                      bool relu, at::Tensor& y) {
  const int64_t channels = acc.size(3);
  const int64_t pixels_per_image = acc.size(1) * acc.size(2);
  const int64_t pixels = acc.size(0) * pixels_per_image;
  const acc_t* a = acc.data_ptr<acc_t>();
  const acc_t* s = scale.data_ptr<acc_t>();
  const acc_t* b = shift.data_ptr<acc_t>();
  scalar_t* out = y.data_ptr<scalar_t>();
  const bool nhwc_out = y.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::parallel_for(0, pixels, 1024, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const acc_t* row = a + p * channels;
      // NCHW: channel c of pixel p sits at (n * C + c) * HW + pixel-in-image.
      const int64_t n = p / pixels_per_image;
      const int64_t q = p - n * pixels_per_image;
      for (int64_t c = 0; c < channels; ++c) {
        acc_t v = row[c] * s[c] + b[c];
        if (relu && v < acc_t(0)) v = acc_t(0);  // not !(v > 0): NaN stays NaN, as in torch.relu
        const int64_t dst = nhwc_out ? p * channels + c : (n * channels + c) * pixels_per_image + q;
        out[dst] = static_cast<scalar_t>(v);
      }
    }
  });
}

}  // namespace

void bn_relu_epilogue(const at::Tensor& acc, const at::Tensor& scale, const at::Tensor& shift, bool relu,
                      at::Tensor& y) {
  const at::Tensor s = scale.to(acc.scalar_type()).contiguous();
  const at::Tensor b = shift.to(acc.scalar_type()).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, y.scalar_type(), "bn_relu_epilogue", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    bn_relu_epilogue_impl<scalar_t, acc_t>(acc, s, b, relu, y);
  });
}

namespace {

// One row of affine_relu_inplace, v = act(v * a + b): a and b per element (an NHWC pixel) or one
// pair for the row (an NCHW plane). Branch-free loops, so that they vectorise.
template <typename scalar_t, bool kRelu>
FASTASPP_INLINE scalar_t affine_act(scalar_t v, scalar_t a, scalar_t b) {
  const scalar_t out = v * a + b;
  return kRelu && out < scalar_t(0) ? scalar_t(0) : out;  // not !(out > 0): NaN stays NaN, as torch.relu
}

template <typename scalar_t, bool kRelu>
void affine_pixel(scalar_t* __restrict__ v, const scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                  int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = affine_act<scalar_t, kRelu>(v[i], a[i], b[i]);
}

template <typename scalar_t, bool kRelu>
void affine_plane(scalar_t* __restrict__ v, scalar_t a, scalar_t b, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = affine_act<scalar_t, kRelu>(v[i], a, b);
}

}  // namespace

void affine_relu_inplace(at::Tensor& y, const at::Tensor& alpha, const at::Tensor& beta, bool relu) {
  if (!alpha.defined() && !beta.defined() && !relu) return;
  const bool nhwc = y.is_contiguous(at::MemoryFormat::ChannelsLast);
  TORCH_CHECK(nhwc || y.is_contiguous(), "fastaspp: affine_relu_inplace wants a dense NCHW or NHWC tensor");
  const int64_t channels = y.size(1), plane = y.size(2) * y.size(3);
  // Rows of one channel each (NCHW: a (n, c) plane) or of every channel (NHWC: a pixel).
  const int64_t rows = nhwc ? y.size(0) * plane : y.size(0) * channels, row = nhwc ? channels : plane;
  // Missing factors as ones and zeros, so that every row runs the same branch-free loop.
  const auto [a, b] = dense_affine({alpha, beta}, channels, y.options());
  AT_DISPATCH_FLOATING_TYPES(y.scalar_type(), "affine_relu_inplace", [&] {
    scalar_t* p = y.data_ptr<scalar_t>();
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* bp = b.data_ptr<scalar_t>();
    at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / std::max<int64_t>(1, row)), [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        scalar_t* v = p + r * row;
        if (nhwc) {
          relu ? affine_pixel<scalar_t, true>(v, ap, bp, row) : affine_pixel<scalar_t, false>(v, ap, bp, row);
        } else {
          const int64_t c = r % channels;
          relu ? affine_plane<scalar_t, true>(v, ap[c], bp[c], row)
               : affine_plane<scalar_t, false>(v, ap[c], bp[c], row);
        }
      }
    });
  });
}

at::Tensor masked_nhwc(const at::Tensor& grad, const at::Tensor& out, at::ScalarType dtype) {
  if (!out.defined()) return to_nhwc(grad, dtype);
  TORCH_CHECK(out.sizes() == grad.sizes(), "fastaspp: out has shape ", out.sizes(), " but grad has ", grad.sizes());
  const int64_t batch = grad.size(0), channels = grad.size(1), height = grad.size(2), width = grad.size(3);
  at::Tensor g = at::empty({batch, height, width, channels}, grad.options().dtype(dtype));
  if (g.numel() == 0) return g;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "masked_nhwc", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const at::Tensor o = out.to(grad.scalar_type());
    const scalar_t* gp = grad.data_ptr<scalar_t>();
    const scalar_t* op = o.data_ptr<scalar_t>();
    acc_t* dst = g.data_ptr<acc_t>();
    const int64_t gs[4] = {grad.stride(0), grad.stride(1), grad.stride(2), grad.stride(3)};
    const int64_t os[4] = {o.stride(0), o.stride(1), o.stride(2), o.stride(3)};
    at::parallel_for(0, batch * height, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width * channels)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const int64_t n = r / height, h = r - n * height;
        for (int64_t w = 0; w < width; ++w) {
          acc_t* row = dst + (r * width + w) * channels;
          const scalar_t* gpix = gp + n * gs[0] + h * gs[2] + w * gs[3];
          const scalar_t* opix = op + n * os[0] + h * os[2] + w * os[3];
          for (int64_t c = 0; c < channels; ++c)
            row[c] = opix[c * os[1]] <= scalar_t(0) ? acc_t(0) : static_cast<acc_t>(gpix[c * gs[1]]);
        }
      }
    });
  });
  return g;
}

}  // namespace fastaspp
