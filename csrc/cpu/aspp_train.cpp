// CPU kernel of fastaspp::_affine_relu_project_forward, the training-mode ASPP projection:
// y = weight @ relu((z - centre) * scale + shift) + image_bias[n] per pixel, with the
// batch-norm statistics of y. The branches' BN + ReLU is the prologue of the projection GEMM,
// applied one chunk of pixels at a time, so the normalised z ([N*H*W, K], K = 1024 in
// DeepLabV3) never exists whole: only a chunk of it, built just before the GEMM reads it.
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <tuple>
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
        const scalar_t* in = z + (p0 + r) * k;
        acc_t* row = ad + r * k;
        for (int64_t c = 0; c < k; ++c) {
          const acc_t v = (static_cast<acc_t>(in[c]) - m[c]) * s[c] + b[c];
          row[c] = v < acc_t(0) ? acc_t(0) : v;  // not !(v > 0): NaN stays NaN, as in torch.relu
        }
        const acc_t* image_bias = bi + ((p0 + r) / pixels_per_image) * out_ch;
        std::copy(image_bias, image_bias + out_ch, o + (p0 + r) * out_ch);
      }
    });
    out.narrow(0, p0, rows).addmm_(a.narrow(0, 0, rows), w_t);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> affine_relu_project_forward_cpu(
    const at::Tensor& z, const at::Tensor& centre, const at::Tensor& scale, const at::Tensor& shift,
    const at::Tensor& weight, const at::Tensor& image_bias) {
  check_4d(z, "z");
  check_cpu_float(z, "z");
  const int64_t batch = z.size(0), k = z.size(1), height = z.size(2), width = z.size(3);
  check_operand(centre, "centre", z, {k});
  check_operand(scale, "scale", z, {k});
  check_operand(shift, "shift", z, {k});
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == k, "fastaspp: weight must have shape [Cout, ", k,
              "] (2-D, K = z.size(1)), got ", weight.sizes());
  const int64_t out_ch = weight.size(0);
  check_operand(weight, "weight", z, {out_ch, k});
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

}  // namespace

TORCH_LIBRARY_IMPL(fastaspp, CPU, m) {
  m.impl("_affine_relu_project_forward", &affine_relu_project_forward_cpu);
}

}  // namespace fastaspp
