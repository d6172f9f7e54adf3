// The live-tap GEMMs of the CPU kernels (declared in tap_gemm.h): live-tap geometry, weight and
// pixel re-layout, and the per-kernel-column GEMM loop.
#include "tap_gemm.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <cstring>

namespace fastaspp {

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

// [N, H, W, C] view of an NCHW-shaped tensor, in the compute dtype.
at::Tensor to_nhwc(const at::Tensor& t, at::ScalarType dtype) {
  return t.to(dtype).contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1});
}

at::Tensor in_layout_of(const at::Tensor& t, const at::Tensor& like) {
  bool same = t.sizes() == like.sizes();
  for (int64_t d = 0; same && d < t.dim(); ++d) same = t.size(d) == 1 || t.stride(d) == like.stride(d);
  return same ? t : at::empty_like(like, t.options()).copy_(t);
}

// Weights as one [Cout, Cin] matrix per tap, returned as a [KH, KW, Cout, Cin] view of the
// weights in channels_last storage: each tap matrix then has unit Cin stride and row stride
// KH*KW*Cin, which BLAS reads in place. channels_last weights (a model converted with
// .to(memory_format=torch.channels_last)) need no copy at all; others are re-laid out by
// copy_to_channels_last below.
namespace {

template <typename scalar_t>
void copy_to_channels_last(const at::Tensor& w, at::Tensor& out) {
  const int64_t out_ch = w.size(0), in_ch = w.size(1), kernel_h = w.size(2), kernel_w = w.size(3);
  const int64_t s_co = w.stride(0), s_ci = w.stride(1), s_kh = w.stride(2), s_kw = w.stride(3);
  const int64_t taps = kernel_h * kernel_w;
  const scalar_t* src = w.data_ptr<scalar_t>();
  scalar_t* dst = out.data_ptr<scalar_t>();
  // One output channel at a time: its [Cin, KH*KW] block is small enough to stay in cache
  // while it is transposed to [KH*KW, Cin] (ATen's generic permute-copy is several times slower).
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
// generic strided copy/add run far below memory bandwidth on these (a large share on top of
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

}  // namespace fastaspp
