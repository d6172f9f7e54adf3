// Shared pieces of the CPU kernels: live-tap geometry, weight and pixel re-layout, the
// per-kernel-column GEMM loop, the BN/ReLU epilogue and the BN statistics (declared in tap_gemm.h).
#include "tap_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <type_traits>

#include "../affine.h"
#include "simd.h"

namespace fastaspp {

ConvGeometry make_geometry(at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation) {
  TORCH_CHECK(stride.size() == 2, "fastaspp: stride must have 2 elements, got ", stride.size());
  TORCH_CHECK(padding.size() == 2, "fastaspp: padding must have 2 elements, got ", padding.size());
  TORCH_CHECK(dilation.size() == 2, "fastaspp: dilation must have 2 elements, got ",
              dilation.size());
  ConvGeometry g;
  for (int i = 0; i < 2; ++i) {
    TORCH_CHECK(stride[i] >= 1, "fastaspp: stride must be >= 1, got ", stride);
    TORCH_CHECK(dilation[i] >= 1, "fastaspp: dilation must be >= 1, got ", dilation);
    TORCH_CHECK(padding[i] >= 0, "fastaspp: padding must be >= 0, got ", padding);
    g.stride[i] = stride[i];
    g.padding[i] = padding[i];
    g.dilation[i] = dilation[i];
  }
  return g;
}

std::vector<LiveTap> live_taps(int64_t kernel_h, int64_t kernel_w, int64_t in_h, int64_t in_w,
                               int64_t out_h, int64_t out_w, const ConvGeometry& g) {
  std::vector<LiveTap> taps;
  for (int64_t kh = 0; kh < kernel_h; ++kh) {
    const LiveRange rows = tap_live_range(kh, in_h, out_h, g.stride[0], g.padding[0], g.dilation[0]);
    if (rows.empty()) continue;
    for (int64_t kw = 0; kw < kernel_w; ++kw) {
      const LiveRange cols =
          tap_live_range(kw, in_w, out_w, g.stride[1], g.padding[1], g.dilation[1]);
      if (cols.empty()) continue;
      LiveTap t;
      t.kh = kh;
      t.kw = kw;
      t.rows = rows;
      t.cols = cols;
      t.in_row0 = rows.lo * g.stride[0] + tap_offset(kh, g.dilation[0], g.padding[0]);
      t.in_col0 = cols.lo * g.stride[1] + tap_offset(kw, g.dilation[1], g.padding[1]);
      taps.push_back(t);
    }
  }
  return taps;
}

at::ScalarType compute_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

// [N, H, W, C] view of an NCHW-shaped tensor, in the compute dtype.
at::Tensor to_nhwc(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1});
}

// Weights as one [Cout, Cin] matrix per tap, returned as a [KH, KW, Cout, Cin] view of the
// weights in channels_last storage: each tap matrix then has unit Cin stride and row stride
// KH*KW*Cin, which BLAS reads in place. channels_last weights (a model converted with
// .to(memory_format=torch.channels_last)) need no copy at all; others are re-laid out by
// channels_last_weights below.
namespace {

template <typename scalar_t>
void copy_to_channels_last(const at::Tensor& w, at::Tensor& out) {
  const int64_t out_ch = w.size(0), in_ch = w.size(1), kernel_h = w.size(2), kernel_w = w.size(3);
  const int64_t s_co = w.stride(0), s_ci = w.stride(1), s_kh = w.stride(2), s_kw = w.stride(3);
  const int64_t taps = kernel_h * kernel_w;
  const scalar_t* src = w.data_ptr<scalar_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  // One output channel at a time: its [Cin, KH*KW] block is small enough to stay in cache
  // while it is transposed to [KH*KW, Cin] (ATen's generic permute-copy is ~5x slower).
  at::parallel_for(0, out_ch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t co = begin; co < end; ++co) {
      scalar_t* block = dst + co * taps * in_ch;
      for (int64_t kh = 0; kh < kernel_h; ++kh)
        for (int64_t kw = 0; kw < kernel_w; ++kw) {
          const scalar_t* in = src + co * s_co + kh * s_kh + kw * s_kw;
          scalar_t* row = block + (kh * kernel_w + kw) * in_ch;
          for (int64_t ci = 0; ci < in_ch; ++ci) row[ci] = in[ci * s_ci];
        }
    }
  });
}

}  // namespace

at::Tensor tap_matrices(const at::Tensor& weight, at::ScalarType dtype) {
  at::Tensor w = weight.to(dtype);
  if (!w.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    at::Tensor cl = at::empty(w.sizes(), w.options().memory_format(at::MemoryFormat::ChannelsLast));
    AT_DISPATCH_FLOATING_TYPES(dtype, "channels_last_weights", [&] { copy_to_channels_last<scalar_t>(w, cl); });
    w = cl;
  }
  return w.permute({2, 3, 0, 1});
}

// The input pixels (NHWC) read by a tap's output rectangle: [N, rows, cols, C].
at::Tensor input_rect(const at::Tensor& nhwc, const LiveTap& t, const ConvGeometry& g) {
  return nhwc.slice(1, t.in_row0, t.in_row0 + (t.rows.size() - 1) * g.stride[0] + 1, g.stride[0])
      .slice(2, t.in_col0, t.in_col0 + (t.cols.size() - 1) * g.stride[1] + 1, g.stride[1]);
}

// The tap's output rectangle (NHWC): [N, rows, cols, C].
at::Tensor output_rect(const at::Tensor& nhwc, const LiveTap& t) {
  return nhwc.slice(1, t.rows.lo, t.rows.hi).slice(2, t.cols.lo, t.cols.hi);
}

// Rectangles are strided NHWC views [N, rows, cols, C] with unit channel stride. ATen's
// generic strided copy/add run far below memory bandwidth on these (up to 60% on top of
// the GEMM), so rows are moved with plain loops: one contiguous run of C (or cols*C) each.
namespace {

template <typename scalar_t, typename RowOp>
void for_each_rect_row(const at::Tensor& rect, RowOp op) {
  const int64_t rows = rect.size(0) * rect.size(1), cols = rect.size(2);
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t n = r / rect.size(1), h = r - n * rect.size(1);
      op(r * cols, n * rect.stride(0) + h * rect.stride(1));
    }
  });
}

}  // namespace

// A [N*rows*cols, C] contiguous matrix of the rectangle's pixels (no copy when already dense).
at::Tensor gather_rect(const at::Tensor& rect) {
  const int64_t channels = rect.size(3), cols = rect.size(2), col_stride = rect.stride(2);
  if (rect.is_contiguous()) return rect.view({rect.size(0) * rect.size(1) * cols, channels});
  at::Tensor out = at::empty({rect.size(0) * rect.size(1) * cols, channels}, rect.options());
  AT_DISPATCH_FLOATING_TYPES(rect.scalar_type(), "gather_rect", [&] {
    const scalar_t* src = rect.data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    for_each_rect_row<scalar_t>(rect, [&](int64_t dst_pixel, int64_t src_offset) {
      if (col_stride == channels) {
        std::memcpy(dst + dst_pixel * channels, src + src_offset, sizeof(scalar_t) * cols * channels);
        return;
      }
      for (int64_t c = 0; c < cols; ++c)
        std::memcpy(dst + (dst_pixel + c) * channels, src + src_offset + c * col_stride,
                    sizeof(scalar_t) * channels);
    });
  });
  return out;
}

// rect += values, values a [N*rows*cols, C] contiguous matrix.
void add_to_rect(const at::Tensor& rect, const at::Tensor& values) {
  const int64_t channels = rect.size(3), cols = rect.size(2), col_stride = rect.stride(2);
  AT_DISPATCH_FLOATING_TYPES(rect.scalar_type(), "add_to_rect", [&] {
    scalar_t* dst = rect.data_ptr<scalar_t>();
    const scalar_t* src = values.data_ptr<scalar_t>();
    for_each_rect_row<scalar_t>(rect, [&](int64_t src_pixel, int64_t dst_offset) {
      for (int64_t c = 0; c < cols; ++c) {
        scalar_t* d = dst + dst_offset + c * col_stride;
        const scalar_t* v = src + (src_pixel + c) * channels;
        for (int64_t k = 0; k < channels; ++k) d[k] += v[k];
      }
    });
  });
}

// rect += a @ b, writing straight into rect when it is the whole contiguous buffer.
void accumulate_gemm(const at::Tensor& rect, const at::Tensor& a, const at::Tensor& b) {
  if (rect.is_contiguous()) {
    rect.view({-1, b.size(1)}).addmm_(a, b);
  } else {
    add_to_rect(rect, at::mm(a, b));
  }
}

// The input columns one kernel column reads, for every row of image n: [S, ceil(H/S), cols, C]
// with rows regrouped by phase (row % S, S the row stride), so that the rows any tap reads
// form one contiguous block. With stride 1 and all columns, it is the image itself (no copy).
at::Tensor column_slab(const at::Tensor& nhwc, int64_t n, int64_t col0, int64_t cols,
                       int64_t col_step, int64_t row_step) {
  const int64_t rows = nhwc.size(1), width = nhwc.size(2), channels = nhwc.size(3);
  const at::Tensor image = nhwc[n];
  if (row_step == 1 && col_step == 1 && col0 == 0 && cols == width) return image.unsqueeze(0);
  at::Tensor slab = at::empty({row_step, ceil_div(rows, row_step), cols, channels}, nhwc.options());
  AT_DISPATCH_FLOATING_TYPES(nhwc.scalar_type(), "column_slab", [&] {
    const scalar_t* src = image.data_ptr<scalar_t>();
    scalar_t* dst = slab.data_ptr<scalar_t>();
    const int64_t per_phase = slab.size(1);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* in = src + (r * width + col0) * channels;
        scalar_t* out = dst + ((r % row_step) * per_phase + r / row_step) * cols * channels;
        if (col_step == 1) {
          std::memcpy(out, in, sizeof(scalar_t) * cols * channels);
          continue;
        }
        for (int64_t c = 0; c < cols; ++c)
          std::memcpy(out + c * channels, in + c * col_step * channels, sizeof(scalar_t) * channels);
      }
    });
  });
  return slab;
}

// acc[n] += conv(x[n]) over live taps. Taps are grouped by kernel column: the input columns
// of one kernel column are gathered once (column_slab) and every live tap of that column is
// then one GEMM between contiguous row blocks, accumulated in place (addmm_). A column whose
// live outputs span the full width accumulates straight into acc; a narrower one into a
// scratch block added to acc once.
void forward_image(const at::Tensor& xh, const at::Tensor& w_taps, const ConvGeometry& g, int64_t n,
                   const at::Tensor& acc, bool skip_centre) {
  const int64_t in_h = xh.size(1), in_w = xh.size(2);
  const int64_t out_h = acc.size(1), out_w = acc.size(2), out_ch = acc.size(3);
  const int64_t kernel_h = w_taps.size(0), kernel_w = w_taps.size(1);
  for (int64_t kw = 0; kw < kernel_w; ++kw) {
    const LiveRange cols = tap_live_range(kw, in_w, out_w, g.stride[1], g.padding[1], g.dilation[1]);
    if (cols.empty()) continue;
    const int64_t in_col0 = cols.lo * g.stride[1] + tap_offset(kw, g.dilation[1], g.padding[1]);
    const at::Tensor slab = column_slab(xh, n, in_col0, cols.size(), g.stride[1], g.stride[0]);
    const bool full_width = cols.size() == out_w;
    at::Tensor block = full_width ? acc[n] : at::zeros({out_h, cols.size(), out_ch}, acc.options());
    for (int64_t kh = 0; kh < kernel_h; ++kh) {
      if (skip_centre && 2 * kh + 1 == kernel_h && 2 * kw + 1 == kernel_w) continue;
      const LiveRange rows =
          tap_live_range(kh, in_h, out_h, g.stride[0], g.padding[0], g.dilation[0]);
      if (rows.empty()) continue;
      const int64_t in_row0 = rows.lo * g.stride[0] + tap_offset(kh, g.dilation[0], g.padding[0]);
      const int64_t phase = in_row0 % g.stride[0], q0 = in_row0 / g.stride[0];
      // Explicit row counts: with 0 input channels a view of [-1, 0] is ambiguous.
      const at::Tensor a = slab[phase].slice(0, q0, q0 + rows.size()).view({rows.size() * slab.size(2), slab.size(3)});
      block.slice(0, rows.lo, rows.hi).view({-1, out_ch}).addmm_(a, w_taps[kh][kw].t());
    }
    if (!full_width) {
      add_to_rect(acc.slice(0, n, n + 1).slice(2, cols.lo, cols.hi), block.view({-1, out_ch}));
    }
  }
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

void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastaspp cpu backend: ", name,
              " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fastaspp cpu backend: ", name,
              " must be floating point, got ", t.scalar_type());
}

void check_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "fastaspp: ", name, " must be 4-D, got ", t.dim(), "-D");
}

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
          relu ? affine_plane<scalar_t, true>(v, ap[c], bp[c], row) : affine_plane<scalar_t, false>(v, ap[c], bp[c], row);
        }
      }
    });
  });
}

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
  // Merge block after block: (n_a, m_a, M2_a) + (n_b, m_b, M2_b) with delta = m_b - m_a gives
  // m = m_a + delta * n_b / n and M2 = M2_a + M2_b + delta^2 * n_a * n_b / n.
  std::vector<double> m(part.begin(), part.begin() + channels);
  std::vector<double> m2(part.begin() + channels, part.begin() + 2 * channels);
  double count = static_cast<double>(std::min(kStatsBlock, pixels));
  for (int64_t b = 1; b < blocks; ++b) {
    const double nb = static_cast<double>(std::min(kStatsBlock, pixels - b * kStatsBlock));
    const double total = count + nb;
    const double* mb = part.data() + b * 2 * channels;
    const double* m2b = mb + channels;
    for (int64_t c = 0; c < channels; ++c) {
      const double delta = mb[c] - m[c];
      m[c] += delta * (nb / total);
      m2[c] += m2b[c] + delta * delta * (count * nb / total);
    }
    count = total;
  }
  acc_t* mean_out = mean.data_ptr<acc_t>();
  acc_t* var_out = var.data_ptr<acc_t>();
  for (int64_t c = 0; c < channels; ++c) {
    mean_out[c] = static_cast<acc_t>(m[c]);
    var_out[c] = static_cast<acc_t>(m2[c] / count);
  }
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

}  // namespace fastaspp
