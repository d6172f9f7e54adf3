// Winograd 3x3 atrous conv on CPU (see winograd.h).
//
// Per axis, output o of a sub-grid reads its neighbours o-1, o, o+1 (zero outside the map):
// y_o = w0 x_(o-1) + w1 x_o + w2 x_(o+1). A tile of m outputs is computed as
// y = P ((Mw w) * (Mx d)) from its m + 2 inputs d (one halo pixel each side): "points"
// products instead of 3m. In 2D the transforms apply along both axes and the products over
// input channels become one GEMM per (point_h, point_w) pair, batched with at::bmm:
//   V = Mx_h d Mx_w^T (input transform), U = Mw_h w Mw_w^T (weights, kept), Y = V @ U^T,
//   out = P_h Y P_w^T (output transform).
#include "winograd.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../common/checks.h"
#include "../common/kept.h"
#include "../common/tap_geometry.h"
#include "simd.h"
#include "tap_gemm.h"

namespace fastaspp {
namespace {

using Matrix = std::vector<std::vector<double>>;

// Toom-Cook points; infinity is always the last one. Small, exact in binary, symmetric: they
// keep F(6,3)'s fp32 error near 1e-5 of the output's scale.
constexpr double kPoints[] = {0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5};
constexpr int64_t kMaxTile = 6;           // F(6,3) needs all of kPoints
constexpr double kMaxProductShare = 0.8;  // vs the tap GEMMs: above it the transforms' traffic eats the gain
// Against oneDNN (fp32; benchmarks/results/cpu-winograd-crossover-*.json at 1 and 2 threads, docs/design.md
// §9). A tile costs Cin * Cout per point in the GEMMs and about Cin + Cout in the transforms, so the
// channel depth Cin * Cout / (Cin + Cout) says how much of the work is products. Depth 32 (64
// channels) lost at 2 threads (though it gained at 1: left out); depth 64 and 128 gained at a share
// of 0.25-0.31 and lost at 0.48; depth 256 still gained at 0.46-0.5.
constexpr double kMinDepthVsOnednn = 48, kWideDepthVsOnednn = 192;
constexpr double kNarrowShareVsOnednn = 0.32, kWideShareVsOnednn = 0.5;
// The per-point GEMMs have one row per tile: convs of 16 or 25 tiles lost at 2 threads at shares
// that won with 36 tiles and more.
constexpr int64_t kMinTilesVsOnednn = 32;
constexpr int64_t kChannelBlock = 256;    // channels per pass of a transform (stays in L1/L2)

Matrix zeros(int64_t rows, int64_t cols) { return Matrix(rows, std::vector<double>(cols, 0.0)); }

Matrix transpose(const Matrix& a) {
  Matrix t = zeros(a[0].size(), a.size());
  for (size_t i = 0; i < a.size(); ++i)
    for (size_t j = 0; j < a[0].size(); ++j) t[j][i] = a[i][j];
  return t;
}

// Gauss-Jordan with partial pivoting (the Vandermonde-like matrices here are at most 8x8).
Matrix inverse(Matrix a) {
  const size_t n = a.size();
  Matrix inv = zeros(n, n);
  for (size_t i = 0; i < n; ++i) inv[i][i] = 1.0;
  for (size_t col = 0; col < n; ++col) {
    size_t pivot = col;
    for (size_t r = col + 1; r < n; ++r)
      if (std::abs(a[r][col]) > std::abs(a[pivot][col])) pivot = r;
    std::swap(a[col], a[pivot]);
    std::swap(inv[col], inv[pivot]);
    const double d = a[col][col];
    for (size_t j = 0; j < n; ++j) a[col][j] /= d, inv[col][j] /= d;
    for (size_t r = 0; r < n; ++r) {
      if (r == col || a[r][col] == 0.0) continue;
      const double f = a[r][col];
      for (size_t j = 0; j < n; ++j) a[r][j] -= f * a[col][j], inv[r][j] -= f * inv[col][j];
    }
  }
  return inv;
}

// [points, coeffs]: a polynomial's coefficients -> its values at the points (and at infinity,
// where the value is the leading coefficient).
Matrix evaluation(int64_t points, int64_t coeffs) {
  Matrix e = zeros(points, coeffs);
  for (int64_t i = 0; i + 1 < points; ++i) {
    double power = 1.0;
    for (int64_t j = 0; j < coeffs; ++j, power *= kPoints[i]) e[i][j] = power;
  }
  e[points - 1][coeffs - 1] = 1.0;
  return e;
}

// F(m, r): y_i = sum_k g_k d_(i+k), i < m, as AT ((G g) * (BT d)) with m + r - 1 products: the
// transpose of polynomial multiplication by evaluation and interpolation.
struct ToomCook {
  Matrix at, g, bt;  // [m, a], [a, r], [a, a]
};

ToomCook toom_cook(int64_t m, int64_t r) {
  const int64_t a = m + r - 1;
  return {transpose(evaluation(a, m)), evaluation(a, r), transpose(inverse(evaluation(a, a)))};
}

// One axis of the sub-grids: tiles of m outputs, each y = output_t ((weight_t w) * (input_t d)).
struct AxisPlan {
  int64_t m, tiles, points;
  Matrix weight_t, input_t, output_t;  // [points, 3], [points, m + 2], [m, points]
};

AxisPlan axis_plan(int64_t s) {
  if (s == 1) {  // only the centre tap is live
    return {1, 1, 1, {{0.0, 1.0, 0.0}}, {{0.0, 1.0, 0.0}}, {{1.0}}};
  }
  if (s == 2) {
    // [y0, y1] = [[w1, w2], [w0, w1]] [x0, x1]; reversed, a correlation of the data (w0, w1, w2)
    // with the filter (x0, x1): F(2,2) with the roles swapped, 3 products instead of 4.
    const ToomCook f = toom_cook(2, 2);
    Matrix input_t = zeros(3, 4);
    for (int i = 0; i < 3; ++i) input_t[i][1] = f.g[i][0], input_t[i][2] = f.g[i][1];
    return {2, 1, 3, f.bt, input_t, {f.at[1], f.at[0]}};
  }
  // Above kMaxTile every length takes tiles of kMaxTile outputs (the last one padded), so that one
  // kept weight transform serves every map size: a plan per length would keep a transform per size,
  // and multi-scale eval would evict and rebuild them on every call.
  const int64_t m = std::min(s, kMaxTile);
  const ToomCook f = toom_cook(m, 3);
  return {m, ceil_div(s, m), m + 2, f.g, f.bt, f.at};
}

// dst += coef * src, the transforms' inner loop (cloned for AVX2: simd.h).
FASTASPP_AVX2_CLONES void axpy(float* dst, const float* src, float coef, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] += coef * src[c];
}

FASTASPP_AVX2_CLONES void axpy(double* dst, const double* src, double coef, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] += coef * src[c];
}

FASTASPP_AVX2_CLONES void scale(float* dst, const float* src, float coef, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] = coef * src[c];
}

FASTASPP_AVX2_CLONES void scale(double* dst, const double* src, double coef, int64_t n) {
  for (int64_t c = 0; c < n; ++c) dst[c] = coef * src[c];
}

// A transform's row: dst = sum of coef * src over the non-zero coefficients whose src exists
// (a null src is a pixel off the map, i.e. zero); the first term assigns, so dst needs no clearing.
template <typename T>
void combine(T* dst, const T* coef, const T* const* src, int64_t terms, int64_t n) {
  bool written = false;
  for (int64_t k = 0; k < terms; ++k) {
    if (coef[k] == T(0) || src[k] == nullptr) continue;
    written ? axpy(dst, src[k], coef[k], n) : scale(dst, src[k], coef[k], n);
    written = true;
  }
  if (!written) std::fill(dst, dst + n, T(0));
}

template <typename T>
std::vector<T> flat(const Matrix& a) {
  std::vector<T> out;
  for (const auto& row : a) out.insert(out.end(), row.begin(), row.end());
  return out;
}

int64_t live_pairs(int64_t size, int64_t rate) {
  int64_t live = 0;
  for (int64_t k = 0; k < 3; ++k) live += tap_live_range(k, size, size, 1, rate, rate).size();
  return live;
}

// Tiles and products along one axis: every sub-grid (at most `rate` of them) padded to whole
// tiles of the axis' plan, which is built once for both.
struct AxisWork {
  int64_t tiles, products;
};

AxisWork axis_work(int64_t size, int64_t rate) {
  const AxisPlan p = axis_plan(ceil_div(size, rate));
  const int64_t grids = std::min(rate, size);
  return {grids * p.tiles, grids * p.tiles * p.points};
}

// Where each tile's rows start: pixel coordinate of sub-grid index k along an axis, or -1 off
// the map.
struct Tiling {
  int64_t batch, in_h, in_w, rate, res_h, res_w;
  AxisPlan h, w;
  int64_t tiles() const { return batch * res_h * res_w * h.tiles * w.tiles; }
  // tile t -> (n, residue_h, residue_w, tile_h, tile_w)
  void decode(int64_t t, int64_t& n, int64_t& a, int64_t& b, int64_t& th, int64_t& tw) const {
    tw = t % w.tiles, t /= w.tiles;
    th = t % h.tiles, t /= h.tiles;
    b = t % res_w, t /= res_w;
    a = t % res_h, n = t / res_h;
  }
  static int64_t pixel(int64_t k, int64_t residue, int64_t rate, int64_t size) {
    const int64_t p = k * rate + residue;
    return k >= 0 && p < size ? p : -1;
  }
};

// V[p * Pw + q, t - t0, :] = (Mx_h d Mx_w^T)[p, q] for tiles t0 <= t < t1; d read from xh.
template <typename T>
void input_transform(const T* x, const Tiling& g, int64_t channels, int64_t t0, int64_t t1, T* v) {
  const int64_t mh = g.h.m + 2, mw = g.w.m + 2, ph = g.h.points, pw = g.w.points, rows = t1 - t0;
  const std::vector<T> bh = flat<T>(g.h.input_t), bw = flat<T>(g.w.input_t);
  at::parallel_for(t0, t1, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> tmp(ph * mw * kChannelBlock);
    std::vector<int64_t> row(mh), col(mw);
    std::vector<const T*> pixels(mh), rows_of_p(mw);
    for (int64_t t = begin; t < end; ++t) {
      int64_t n, a, b, th, tw;
      g.decode(t, n, a, b, th, tw);
      for (int64_t i = 0; i < mh; ++i) row[i] = Tiling::pixel(th * g.h.m + i - 1, a, g.rate, g.in_h);
      for (int64_t j = 0; j < mw; ++j) col[j] = Tiling::pixel(tw * g.w.m + j - 1, b, g.rate, g.in_w);
      for (int64_t c0 = 0; c0 < channels; c0 += kChannelBlock) {
        const int64_t cb = std::min(kChannelBlock, channels - c0);
        // tmp[p, j] = sum_i Mx_h[p, i] d[i, j] (pixels off the map are zero)
        for (int64_t j = 0; j < mw; ++j) {
          if (col[j] < 0) continue;
          for (int64_t i = 0; i < mh; ++i)
            pixels[i] = row[i] < 0 ? nullptr : x + ((n * g.in_h + row[i]) * g.in_w + col[j]) * channels + c0;
          for (int64_t p = 0; p < ph; ++p)
            combine(tmp.data() + (p * mw + j) * kChannelBlock, bh.data() + p * mh, pixels.data(), mh, cb);
        }
        // V[p, q] = sum_j tmp[p, j] Mx_w[q, j]
        for (int64_t p = 0; p < ph; ++p) {
          for (int64_t j = 0; j < mw; ++j)
            rows_of_p[j] = col[j] < 0 ? nullptr : tmp.data() + (p * mw + j) * kChannelBlock;
          for (int64_t q = 0; q < pw; ++q)
            combine(v + ((p * pw + q) * rows + (t - t0)) * channels + c0, bw.data() + q * mw, rows_of_p.data(), mw,
                    cb);
        }
      }
    }
  });
}

// out[pixels of tile t] = (P_h Y[:, :, t - t0] P_w^T), for the tile's outputs on the map.
template <typename T>
void output_transform(const T* y, const Tiling& g, int64_t channels, int64_t t0, int64_t t1, T* out,
                      const int64_t* out_strides) {
  const int64_t mh = g.h.m, mw = g.w.m, ph = g.h.points, pw = g.w.points, rows = t1 - t0;
  const std::vector<T> ah = flat<T>(g.h.output_t), aw = flat<T>(g.w.output_t);
  at::parallel_for(t0, t1, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> tmp(pw * kChannelBlock);
    std::vector<const T*> products(ph), tmp_rows(pw);
    for (int64_t q = 0; q < pw; ++q) tmp_rows[q] = tmp.data() + q * kChannelBlock;
    for (int64_t t = begin; t < end; ++t) {
      int64_t n, a, b, th, tw;
      g.decode(t, n, a, b, th, tw);
      for (int64_t c0 = 0; c0 < channels; c0 += kChannelBlock) {
        const int64_t cb = std::min(kChannelBlock, channels - c0);
        for (int64_t i = 0; i < mh; ++i) {
          const int64_t r = Tiling::pixel(th * mh + i, a, g.rate, g.in_h);
          if (r < 0) continue;
          // tmp[q] = sum_p P_h[i, p] Y[p, q]
          for (int64_t q = 0; q < pw; ++q) {
            for (int64_t p = 0; p < ph; ++p) products[p] = y + ((p * pw + q) * rows + (t - t0)) * channels + c0;
            combine(tmp.data() + q * kChannelBlock, ah.data() + i * ph, products.data(), ph, cb);
          }
          // out[i, j] = sum_q tmp[q] P_w[j, q]
          for (int64_t j = 0; j < mw; ++j) {
            const int64_t col = Tiling::pixel(tw * mw + j, b, g.rate, g.in_w);
            if (col < 0) continue;
            combine(out + n * out_strides[0] + r * out_strides[1] + col * out_strides[2] + c0, aw.data() + j * pw,
                    tmp_rows.data(), pw, cb);
          }
        }
      }
    }
  });
}

// U [Ph * Pw, Cout, Cin] = Mw_h w Mw_w^T per (Cout, Cin) pair, from the tap matrices
// taps [3, 3, Cout, Cin] (unit Cin stride): one output channel per task, vectorised over Cin.
// Each U row (one point, one output channel) is written whole: the rows of one output channel
// lie Cout*Cin apart, and interleaving short writes to them thrashed the cache.
template <typename T>
void weight_transform(const at::Tensor& taps, const AxisPlan& h, const AxisPlan& w, at::Tensor& u) {
  const int64_t out_ch = taps.size(2), in_ch = taps.size(3), ph = h.points, pw = w.points;
  const int64_t s_kh = taps.stride(0), s_kw = taps.stride(1), s_co = taps.stride(2);
  const T* src = taps.data_ptr<T>();
  T* dst = u.data_ptr<T>();
  const std::vector<T> gh = flat<T>(h.weight_t), gw = flat<T>(w.weight_t);
  at::parallel_for(0, out_ch, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> tmp(ph * 3 * in_ch);  // [p, kw, ci]: Mw_h applied along kh
    for (int64_t co = begin; co < end; ++co) {
      for (int64_t p = 0; p < ph; ++p)
        for (int64_t kw = 0; kw < 3; ++kw) {
          T* t = tmp.data() + (p * 3 + kw) * in_ch;
          const T* k0 = src + co * s_co + kw * s_kw;
          const T g0 = gh[p * 3], g1 = gh[p * 3 + 1], g2 = gh[p * 3 + 2];
          for (int64_t c = 0; c < in_ch; ++c) t[c] = g0 * k0[c] + g1 * k0[s_kh + c] + g2 * k0[2 * s_kh + c];
        }
      for (int64_t p = 0; p < ph; ++p)
        for (int64_t q = 0; q < pw; ++q) {
          const T* t = tmp.data() + p * 3 * in_ch;
          const T g0 = gw[q * 3], g1 = gw[q * 3 + 1], g2 = gw[q * 3 + 2];
          T* out = dst + ((p * pw + q) * out_ch + co) * in_ch;
          for (int64_t c = 0; c < in_ch; ++c) out[c] = g0 * t[c] + g1 * t[in_ch + c] + g2 * t[2 * in_ch + c];
        }
    }
  });
}

at::Tensor make_transformed_weights(const at::Tensor& weight, at::ScalarType dtype, const AxisPlan& h,
                                    const AxisPlan& w) {
  const at::Tensor taps = tap_matrices(weight, dtype);
  at::Tensor u = at::empty({h.points * w.points, weight.size(0), weight.size(1)}, taps.options());
  AT_DISPATCH_FLOATING_TYPES(dtype, "winograd_weights", [&] { weight_transform<scalar_t>(taps, h, w, u); });
  return u;
}

// The transformed input of one chunk, kept per calling thread between calls: a fresh tens of
// MB would cost page faults on every conv.
at::Tensor workspace(int64_t numel, const at::TensorOptions& options) {
  thread_local at::Tensor buffer;
  if (!buffer.defined() || buffer.scalar_type() != options.dtype().toScalarType() || buffer.numel() < numel)
    buffer = at::empty({numel}, options);
  return buffer.narrow(0, 0, numel);
}

}  // namespace

bool use_winograd(int64_t batch, int64_t in_h, int64_t in_w, int64_t rate, const at::Tensor& weight,
                  at::ScalarType dtype, WinogradRival rival) {
  const int flag = checked_switch(kCpuWinograd);  // common/switches.h: off, or on wherever it can
  if (flag == kSwitchOff) return false;
  // Transforming the weights costs more than Winograd saves (mostly page faults on the fresh
  // tens of MB), so only kept weights qualify.
  if (!keepable(weight) || (dtype != at::kFloat && dtype != at::kDouble)) return false;  // common/kept.h
  if (flag == kSwitchOn) return true;  // forced, for measuring the crossovers
  const AxisWork h = axis_work(in_h, rate), w = axis_work(in_w, rate);
  const double products = static_cast<double>(h.products) * w.products;
  const double live = static_cast<double>(live_pairs(in_h, rate)) * live_pairs(in_w, rate);
  if (rival == WinogradRival::kTapGemms) return products <= kMaxProductShare * live;
  const double in_ch = static_cast<double>(weight.size(1)), out_ch = static_cast<double>(weight.size(0));
  const double depth = in_ch + out_ch > 0 ? in_ch * out_ch / (in_ch + out_ch) : 0.0;
  if (depth < kMinDepthVsOnednn || batch * h.tiles * w.tiles < kMinTilesVsOnednn)
    return false;
  return products <= (depth >= kWideDepthVsOnednn ? kWideShareVsOnednn : kNarrowShareVsOnednn) * live;
}

void winograd_conv3x3(const at::Tensor& xh, const at::Tensor& weight, int64_t rate, const at::Tensor& out) {
  TORCH_CHECK(xh.is_contiguous() && out.stride(3) == 1, "fastaspp: winograd_conv3x3 wants contiguous NHWC input");
  const int64_t in_ch = xh.size(3), out_ch = weight.size(0);
  Tiling g{xh.size(0), xh.size(1), xh.size(2), rate, std::min(rate, xh.size(1)), std::min(rate, xh.size(2)),
           axis_plan(ceil_div(xh.size(1), rate)), axis_plan(ceil_div(xh.size(2), rate))};
  // Kept per weight version (common/kept.h); the tile sizes name each axis' transforms (m = 2 is the
  // swapped F(2,2)).
  const at::Tensor u = kept({weight}, {kWinogradWeights, static_cast<int64_t>(xh.scalar_type()), g.h.m, g.w.m},
                            [&] { return make_transformed_weights(weight, xh.scalar_type(), g.h, g.w); });
  const int64_t points = g.h.points * g.w.points, tiles = g.tiles();
  // Tiles per chunk: the transformed input of a chunk stays within FASTASPP_CPU_WINOGRAD_WORKSPACE_MB.
  const int64_t tile_bytes = std::max<int64_t>(1, points * in_ch * xh.element_size());  // in_ch may be 0
  const int64_t budget = env_megabytes("FASTASPP_CPU_WINOGRAD_WORKSPACE_MB", 64);
  const int64_t chunk = std::clamp<int64_t>(budget / tile_bytes, 1, tiles);
  const int64_t out_strides[3] = {out.stride(0), out.stride(1), out.stride(2)};
  for (int64_t t0 = 0; t0 < tiles; t0 += chunk) {
    const int64_t t1 = std::min(tiles, t0 + chunk);
    at::Tensor v = workspace(points * (t1 - t0) * in_ch, xh.options()).view({points, t1 - t0, in_ch});
    AT_DISPATCH_FLOATING_TYPES(xh.scalar_type(), "winograd_input", [&] {
      input_transform<scalar_t>(xh.data_ptr<scalar_t>(), g, in_ch, t0, t1, v.data_ptr<scalar_t>());
    });
    const at::Tensor y = at::bmm(v, u.transpose(1, 2));  // [points, tiles, Cout]
    AT_DISPATCH_FLOATING_TYPES(xh.scalar_type(), "winograd_output", [&] {
      output_transform<scalar_t>(y.data_ptr<scalar_t>(), g, out_ch, t0, t1, out.data_ptr<scalar_t>(), out_strides);
    });
  }
}

}  // namespace fastaspp
