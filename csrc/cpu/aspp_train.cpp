// CPU kernels of fastaspp::_affine_relu_project_{forward,backward}, the training-mode ASPP
// projection: y = weight @ relu((z - centre) * scale + shift) + image_bias[n] per pixel, with the
// batch-norm statistics of y. The branches' BN + ReLU is the prologue of the projection GEMM,
// applied one chunk of pixels at a time, so the normalised z ([N*H*W, K], K = 1024 in
// DeepLabV3) never exists whole: only a chunk of it, built just before the GEMM reads it. The
// backward is one call with two GEMMs and two elementwise passes (the Python formula it replaces
// on this backend, fastaspp/ops/aspp_train.py's _project_backward, took some fifteen op calls).
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
#include <vector>
#include <type_traits>

#include "../common/checks.h"
#include "channel_stats.h"
#include "tap_gemm.h"

namespace fastaspp {
namespace {

// Most pixels per chunk (a chunk may span images). Smaller chunks keep the [P, K] operand in
// a faster cache level but cost GEMM efficiency: at DeepLabV3's K and Cout, chunks of a quarter
// of this run clearly below one whole GEMM, chunks of this size only a little. Chunks are
// balanced (1089 pixels: two of 545 and 544, not 1024 + 65, whose small GEMM would run far below
// peak).
constexpr int64_t kChunk = 1024;

void check_operand(const at::Tensor& t, const char* name, const at::Tensor& z, at::IntArrayRef shape) {
  TORCH_CHECK(t.device().is_cpu(), "fastaspp cpu backend: ", name, " must be a CPU tensor, got device ",
              t.device());
  TORCH_CHECK(t.scalar_type() == z.scalar_type(), "fastaspp: ", name, " must have z's dtype ", z.scalar_type(),
              ", got ", t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, "fastaspp: ", name, " must have shape ", shape, ", got ", t.sizes());
}

// out[c] = relu((in[c] - centre[c]) * scale[c] + shift[c]) for one pixel's k channels: the
// normalised operand row of the projection GEMM, forward and backward alike.
template <typename scalar_t, typename acc_t>
inline void affine_relu_row(const scalar_t* in, const acc_t* centre, const acc_t* scale, const acc_t* shift,
                            int64_t k, acc_t* out) {
  for (int64_t c = 0; c < k; ++c) {
    const acc_t v = (static_cast<acc_t>(in[c]) - centre[c]) * scale[c] + shift[c];
    out[c] = v < acc_t(0) ? acc_t(0) : v;  // not !(v > 0): NaN stays NaN, as in torch.relu
  }
}

// out ([P, Cout], acc_t) = relu((z - centre) * scale + shift) @ w_t + bias[image], chunk by chunk.
// Per chunk, one parallel pass builds its operand rows and presets its output rows to their
// image's bias; one BLAS GEMM (multithreaded itself) then accumulates onto them.
template <typename scalar_t, typename acc_t>
void project(const at::Tensor& zh, const at::Tensor& centre, const at::Tensor& scale, const at::Tensor& shift,
             const at::Tensor& w_t, const at::Tensor& bias, int64_t pixels_per_image, at::Tensor& out) {
  const int64_t pixels = zh.size(0), k = zh.size(1), out_ch = out.size(1);
  const scalar_t* z = zh.data_ptr<scalar_t>();
  const acc_t* m = centre.data_ptr<acc_t>();
  const acc_t* s = scale.data_ptr<acc_t>();
  const acc_t* b = shift.data_ptr<acc_t>();
  const acc_t* bi = bias.data_ptr<acc_t>();
  acc_t* o = out.data_ptr<acc_t>();
  const int64_t chunk = ceil_div(pixels, ceil_div(pixels, kChunk));
  at::Tensor a = at::empty({chunk, k}, out.options());
  acc_t* ad = a.data_ptr<acc_t>();
  for (int64_t p0 = 0; p0 < pixels; p0 += chunk) {
    const int64_t rows = std::min(chunk, pixels - p0);
    at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        affine_relu_row(z + (p0 + r) * k, m, s, b, k, ad + r * k);
        const acc_t* image_bias = bi + ((p0 + r) / pixels_per_image) * out_ch;
        std::copy(image_bias, image_bias + out_ch, o + (p0 + r) * out_ch);
      }
    });
    out.narrow(0, p0, rows).addmm_(a.narrow(0, 0, rows), w_t);
  }
}

// The operands both directions share: z [N, K, H, W] on CPU in a floating dtype; centre, scale,
// shift [K] and weight [Cout, K] in z's dtype. Returns Cout.
int64_t check_projection(const at::Tensor& z, const at::Tensor& centre, const at::Tensor& scale,
                         const at::Tensor& shift, const at::Tensor& weight) {
  check_4d(z, "z");
  check_cpu_float(z, "z");
  const int64_t k = z.size(1);
  check_operand(centre, "centre", z, {k});
  check_operand(scale, "scale", z, {k});
  check_operand(shift, "shift", z, {k});
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == k, "fastaspp: weight must have shape [Cout, ", k,
              "] (2-D, K = z.size(1)), got ", weight.sizes());
  check_operand(weight, "weight", z, {weight.size(0), k});
  return weight.size(0);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_relu_project_forward_cpu(
    const at::Tensor& z, const at::Tensor& centre, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& weight, const at::Tensor& image_bias) {
  const int64_t out_ch = check_projection(z, centre, scale, shift, weight);
  const int64_t batch = z.size(0), k = z.size(1), height = z.size(2), width = z.size(3);
  check_operand(image_bias, "image_bias", z, {batch, out_ch});

  const auto dtype = accumulator_dtype(z.scalar_type());
  const auto cl = z.options().memory_format(at::MemoryFormat::ChannelsLast);
  const int64_t pixels = batch * height * width;
  if (pixels == 0 || out_ch == 0) {
    const at::Tensor zeros = at::zeros({out_ch}, z.options().dtype(dtype));
    return {at::empty({batch, out_ch, height, width}, cl), zeros, zeros.clone()};
  }
  // z stays in its own dtype (a half z is widened chunk by chunk, not copied whole to fp32).
  const at::Tensor zh = z.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).reshape({pixels, k});
  at::Tensor acc = at::empty({batch, height, width, out_ch}, z.options().dtype(dtype));
  at::Tensor acc_2d = acc.view({pixels, out_ch});
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "affine_relu_project", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    project<scalar_t, acc_t>(zh.contiguous(), centre.to(dtype).contiguous(), scale.to(dtype).contiguous(),
                             shift.to(dtype).contiguous(), weight.to(dtype).t(), image_bias.to(dtype).contiguous(),
                             height * width, acc_2d);
  });
  auto [mean, var] = channel_stats(acc_2d);
  // acc is y in channels_last storage already; half types need a rounded copy.
  at::Tensor y = acc.permute({0, 3, 1, 2});
  if (dtype != z.scalar_type()) y = at::empty({batch, out_ch, height, width}, cl).copy_(y);
  return {y, mean, var};
}

// With pre = (z - centre) * scale + shift recomputed per element (not saved): a = relu(pre) for
// dweight = g^T a; then dpre = (g W) * [pre > 0] in place of g W, dz = dpre * scale, and
// centred * dpre into `a` for dscale's sums.
template <typename scalar_t, typename acc_t>
void project_grads(const at::Tensor& zh, const at::Tensor& centre, const at::Tensor& scale, const at::Tensor& shift,
                   const at::Tensor& g_2d, const at::Tensor& w, at::Tensor& a, at::Tensor& dpre, at::Tensor& dz_2d,
                   at::Tensor& dweight) {
  const int64_t pixels = zh.size(0), k = zh.size(1);
  const scalar_t* z = zh.data_ptr<scalar_t>();
  const acc_t* m = centre.data_ptr<acc_t>();
  const acc_t* s = scale.data_ptr<acc_t>();
  const acc_t* b = shift.data_ptr<acc_t>();
  acc_t* ad = a.data_ptr<acc_t>();
  at::parallel_for(0, pixels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) affine_relu_row(z + r * k, m, s, b, k, ad + r * k);
  });
  at::mm_out(dweight, g_2d.t(), a);
  at::mm_out(dpre, g_2d, w);
  acc_t* dp = dpre.data_ptr<acc_t>();
  scalar_t* dzd = dz_2d.data_ptr<scalar_t>();
  at::parallel_for(0, pixels, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r)
      for (int64_t c = 0; c < k; ++c) {
        const int64_t i = r * k + c;
        const acc_t centred = static_cast<acc_t>(z[i]) - m[c];
        const acc_t live = centred * s[c] + b[c] > acc_t(0) ? acc_t(1) : acc_t(0);
        const acc_t d = dp[i] * live;  // a product, as the formula's: inf * 0 stays NaN
        dp[i] = d;
        dzd[i] = static_cast<scalar_t>(d * s[c]);
        ad[i] = d * centred;
      }
  });
}

using SixTensors = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

SixTensors affine_relu_project_backward_cpu(
    const at::Tensor& g, const at::Tensor& z, const at::Tensor& centre, const at::Tensor& scale,
    const at::Tensor& shift, const at::Tensor& weight) {
  const int64_t out_ch = check_projection(z, centre, scale, shift, weight);
  const int64_t batch = z.size(0), k = z.size(1), height = z.size(2), width = z.size(3);
  const auto dtype = accumulator_dtype(z.scalar_type());
  const std::vector<int64_t> g_shape = {batch, out_ch, height, width};
  TORCH_CHECK(g.device().is_cpu() && g.scalar_type() == dtype && g.sizes() == at::IntArrayRef(g_shape),
              "fastaspp: g must be a CPU tensor of dtype ", dtype, " and shape ", at::IntArrayRef(g_shape), ", got ",
              g.scalar_type(), " ", g.sizes());
  const int64_t pixels = batch * height * width;
  const at::Tensor g_2d = g.permute({0, 2, 3, 1}).reshape({pixels, out_ch});  // free for channels_last g
  at::Tensor dz = at::empty({batch, height, width, k}, z.options());
  at::Tensor dweight = at::empty({out_ch, k}, z.options().dtype(dtype));  // written whole by its GEMM
  at::Tensor dshift, dscale;
  if (pixels > 0 && k > 0) {
    const at::Tensor zh = z.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).reshape({pixels, k});
    at::Tensor a = at::empty({pixels, k}, dweight.options()), dpre = at::empty({pixels, k}, dweight.options());
    at::Tensor dz_2d = dz.view({pixels, k});
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, z.scalar_type(), "affine_relu_project_grads", [&] {
      using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
      project_grads<scalar_t, acc_t>(zh.contiguous(), centre.to(dtype).contiguous(), scale.to(dtype).contiguous(),
                                     shift.to(dtype).contiguous(), g_2d, weight.to(dtype), a, dpre, dz_2d, dweight);
    });
    dshift = channel_sums(dpre);
    dscale = channel_sums(a);
  } else {  // nothing to sum over
    dz.zero_();
    dweight.zero_();
    dshift = at::zeros({k}, dweight.options());
    dscale = at::zeros({k}, dweight.options());
  }
  const at::Tensor dcentre = -dshift * scale.to(dtype);
  at::Tensor dbias = at::zeros({batch, out_ch}, dweight.options());  // per image, in fixed blocks too
  for (int64_t n = 0; pixels > 0 && n < batch; ++n)
    dbias[n].copy_(channel_sums(g_2d.narrow(0, n * height * width, height * width)));
  return {dz.permute({0, 3, 1, 2}), dcentre.to(centre.scalar_type()), dscale.to(scale.scalar_type()),
          dshift.to(shift.scalar_type()), dweight.to(weight.scalar_type()), dbias.to(z.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastaspp, CPU, m) {
  m.impl("_affine_relu_project_forward", &affine_relu_project_forward_cpu);
  m.impl("_affine_relu_project_backward", &affine_relu_project_backward_cpu);
}

}  // namespace fastaspp
