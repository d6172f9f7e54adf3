// Direct convolution for small problems (see direct_conv.h). Every loop nest runs in the compute
// dtype (fp32; fp64 for fp64). The channels a loop vectorises over are taken B at a time, B fixed
// at compile time, so that B accumulators stay in registers across the whole tap and channel
// reduction; the kept weight layouts are padded with zeros to a multiple of B. Pixel loops are
// split across threads only in chunks of at least kGrainMacs. Each output element is summed by one
// thread in a fixed order: results do not depend on the thread count.
#include "direct_conv.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "../common/checks.h"
#include "../common/tap_geometry.h"
#include "../common/kept.h"
#include "simd.h"

namespace fastaspp {
namespace {

// Multiply-adds per thread chunk: below this, starting a parallel region costs more than it saves.
constexpr int64_t kGrainMacs = 1 << 17;

// 32 bytes of acc_t (one AVX2 register, two SSE ones) as a GCC vector, and B lanes as B / kLanes of
// them: arithmetic on these stays in registers as SIMD in each clone (the loop form `acc[j] += v * w[j]`
// over a local array was kept in B scalar registers; one 64-byte vector went through the stack).
template <typename acc_t>
struct Vec {
  typedef acc_t type __attribute__((vector_size(32)));
  static constexpr int kLanes = 32 / sizeof(acc_t);
};

template <typename acc_t, int B>
struct Block {
  using V = typename Vec<acc_t>::type;
  static constexpr int kRegs = B / Vec<acc_t>::kLanes;
  V r[kRegs];

  FASTASPP_INLINE void zero() {
    for (int i = 0; i < kRegs; ++i) r[i] = V{};
  }
  // this += v * p[0 .. B)
  FASTASPP_INLINE void axpy(acc_t v, const acc_t* p) {
    for (int i = 0; i < kRegs; ++i) {
      V w;
      std::memcpy(&w, p + i * Vec<acc_t>::kLanes, sizeof(V));  // an unaligned vector load
      r[i] += v * w;
    }
  }
  FASTASPP_INLINE void add(const Block& other) {
    for (int i = 0; i < kRegs; ++i) r[i] += other.r[i];
  }
  FASTASPP_INLINE void store(acc_t* out) const { std::memcpy(out, r, sizeof(r)); }
};

// sum += sum over k < count of v(k) * row(k)[0 .. B), as two interleaved partial sums: twice the
// independent add chains, so the adds' latency is hidden (a fixed order: the same bits every call).
template <typename acc_t, int B, typename Value, typename Row>
FASTASPP_INLINE void dot_rows(Block<acc_t, B>& sum, int64_t count, Value v, Row row) {
  Block<acc_t, B> odd;
  odd.zero();
  int64_t k = 0;
  for (; k + 1 < count; k += 2) {
    sum.axpy(v(k), row(k));
    odd.axpy(v(k + 1), row(k + 1));
  }
  if (k < count) sum.axpy(v(k), row(k));
  sum.add(odd);
}

// Channels per register block: one, two or four AVX2 registers (8, 16 or 32 floats; 4, 8 or 16
// doubles), the fewest that cover the channels (padding is wasted work).
template <typename acc_t>
int64_t block_for(int64_t channels) {
  constexpr int64_t lanes = 32 / sizeof(acc_t);  // one register
  return channels <= lanes ? lanes : channels <= 2 * lanes ? 2 * lanes : 4 * lanes;
}

// The weights tap-major in the compute dtype, the vectorised channels padded to a multiple of
// `block`, kept (common/kept.h): [KH*KW, Cin, Cout_pad] for the forward (vectorised over Cout),
// [KH*KW, Cout, Cin_pad] for the input gradient (over Cin).
at::Tensor tap_major(const at::Tensor& weight, at::ScalarType dtype, KeptKind layout, int64_t block) {
  return kept({weight}, {layout, static_cast<int64_t>(dtype), block}, [&] {
    const at::Tensor t = layout == kDirectForwardLayout ? weight.to(dtype).permute({2, 3, 1, 0})
                                                        : weight.to(dtype).permute({2, 3, 0, 1});
    const int64_t pad = ceil_div(t.size(3), block) * block - t.size(3);
    return at::constant_pad_nd(t, {0, pad}).contiguous();
  });
}

int64_t grain(int64_t macs_per_item) { return std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, macs_per_item)); }

struct Shape {
  int64_t cin, h, w, cout, kh, kw, ho, wo;
  ConvGeometry g;
};

template <typename acc_t>
struct ForwardArgs {
  Shape s;
  const acc_t* x;
  int64_t xs[4];
  const acc_t* wt;     // [KH*KW, Cin, Cout_pad]
  int64_t cout_pad;
  const acc_t* alpha;  // [Cout] or nullptr for 1
  const acc_t* beta;   // [Cout] or nullptr for 0
  bool relu;
  acc_t* y;
  int64_t ys[4];
};

template <typename acc_t, int B>
FASTASPP_INLINE void forward_pixels_impl(const ForwardArgs<acc_t>& a, int64_t p0, int64_t p1) {
  const Shape& s = a.s;
  const int64_t cin = s.cin, cpad = a.cout_pad;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n = p / (s.ho * s.wo), rem = p - n * s.ho * s.wo, oh = rem / s.wo, ow = rem - oh * s.wo;
    acc_t* yp = a.y + n * a.ys[0] + oh * a.ys[2] + ow * a.ys[3];
    for (int64_t c0 = 0; c0 < s.cout; c0 += B) {
      Block<acc_t, B> sum;
      sum.zero();
      for (int64_t kh = 0; kh < s.kh; ++kh) {
        const int64_t ih = oh * s.g.stride[0] + tap_offset(kh, s.g.dilation[0], s.g.padding[0]);
        if (ih < 0 || ih >= s.h) continue;
        for (int64_t kw = 0; kw < s.kw; ++kw) {
          const int64_t iw = ow * s.g.stride[1] + tap_offset(kw, s.g.dilation[1], s.g.padding[1]);
          if (iw < 0 || iw >= s.w) continue;
          const acc_t* xp = a.x + n * a.xs[0] + ih * a.xs[2] + iw * a.xs[3];
          const acc_t* wp = a.wt + (kh * s.kw + kw) * cin * cpad + c0;
          const int64_t xc = a.xs[1];
          dot_rows(sum, cin, [&](int64_t ci) { return xp[ci * xc]; }, [&](int64_t ci) { return wp + ci * cpad; });
        }
      }
      acc_t acc[B];
      sum.store(acc);
      const int64_t valid = std::min<int64_t>(B, s.cout - c0);
      for (int64_t j = 0; j < valid; ++j) {
        const int64_t co = c0 + j;
        acc_t v = acc[j];
        if (a.alpha != nullptr) v *= a.alpha[co];
        if (a.beta != nullptr) v += a.beta[co];
        if (a.relu && v < acc_t(0)) v = acc_t(0);  // not !(v > 0): NaN stays NaN, as in torch.relu
        yp[co * a.ys[1]] = v;
      }
    }
  }
}

template <typename acc_t>
struct GradInputArgs {
  Shape s;
  const acc_t* g;      // [N, Ho, Wo, Cout], g_pixel elements from one pixel to the next
  int64_t g_pixel;
  const acc_t* wt;     // [KH*KW, Cout, Cin_pad]
  int64_t cin_pad;
  const acc_t* scale;  // [Cout] or nullptr
  acc_t* dx;
  int64_t ds[4];
  bool accumulate;     // dx += instead of dx =
};

template <typename acc_t, int B>
FASTASPP_INLINE void grad_input_pixels_impl(const GradInputArgs<acc_t>& a, int64_t p0, int64_t p1) {
  const Shape& s = a.s;
  const int64_t cout = s.cout, cpad = a.cin_pad;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t n = p / (s.h * s.w), rem = p - n * s.h * s.w, ih = rem / s.w, iw = rem - ih * s.w;
    acc_t* dp = a.dx + n * a.ds[0] + ih * a.ds[2] + iw * a.ds[3];
    for (int64_t c0 = 0; c0 < s.cin; c0 += B) {
      Block<acc_t, B> sum;
      sum.zero();
      for (int64_t kh = 0; kh < s.kh; ++kh) {
        // Output row oh reads input row ih through tap kh when oh * stride = ih - offset.
        const int64_t th = ih - tap_offset(kh, s.g.dilation[0], s.g.padding[0]);
        if (th < 0 || th % s.g.stride[0] != 0 || th / s.g.stride[0] >= s.ho) continue;
        const int64_t oh = th / s.g.stride[0];
        for (int64_t kw = 0; kw < s.kw; ++kw) {
          const int64_t tw = iw - tap_offset(kw, s.g.dilation[1], s.g.padding[1]);
          if (tw < 0 || tw % s.g.stride[1] != 0 || tw / s.g.stride[1] >= s.wo) continue;
          const int64_t ow = tw / s.g.stride[1];
          const acc_t* gp = a.g + ((n * s.ho + oh) * s.wo + ow) * a.g_pixel;
          const acc_t* wp = a.wt + (kh * s.kw + kw) * cout * cpad + c0;
          if (a.scale != nullptr) {
            const acc_t* sc = a.scale;
            dot_rows(
                sum, cout, [&](int64_t co) { return gp[co] * sc[co]; }, [&](int64_t co) { return wp + co * cpad; });
          } else {
            dot_rows(sum, cout, [&](int64_t co) { return gp[co]; }, [&](int64_t co) { return wp + co * cpad; });
          }
        }
      }
      acc_t acc[B];
      sum.store(acc);
      const int64_t valid = std::min<int64_t>(B, s.cin - c0);
      if (a.accumulate) {
        for (int64_t j = 0; j < valid; ++j) dp[(c0 + j) * a.ds[1]] += acc[j];
      } else {
        for (int64_t j = 0; j < valid; ++j) dp[(c0 + j) * a.ds[1]] = acc[j];
      }
    }
  }
}

template <typename acc_t>
struct GradWeightArgs {
  Shape s;
  int64_t n;
  const acc_t* x;  // [N, H, W, Cin]
  const acc_t* g;  // [N, Ho, Wo, Cout], g_pixel elements from one pixel to the next
  int64_t g_pixel;
  acc_t* dw;       // [Cout, Cin, KH*KW] (nn.Conv2d's layout), zeroed: dead taps are not written
};

// One live tap's weight gradient for B input channels from c0 (fewer at the end), summed over the
// tap's live output rectangle in a fixed order.
template <typename acc_t, int B>
FASTASPP_INLINE void grad_weight_block_impl(const GradWeightArgs<acc_t>& a, int64_t tap, int64_t co, int64_t c0,
                                            const LiveRange& rows, const LiveRange& cols) {
  const Shape& s = a.s;
  const int64_t cin = s.cin, taps = s.kh * s.kw, kh = tap / s.kw, kw = tap - kh * s.kw;
  const int64_t valid = std::min<int64_t>(B, cin - c0);
  Block<acc_t, B> sum;
  sum.zero();
  acc_t acc[B] = {};  // the last, partial block
  for (int64_t n = 0; n < a.n; ++n)
    for (int64_t oh = rows.lo; oh < rows.hi; ++oh) {
      const int64_t ih = oh * s.g.stride[0] + tap_offset(kh, s.g.dilation[0], s.g.padding[0]);
      for (int64_t ow = cols.lo; ow < cols.hi; ++ow) {
        const int64_t iw = ow * s.g.stride[1] + tap_offset(kw, s.g.dilation[1], s.g.padding[1]);
        const acc_t* xp = a.x + ((n * s.h + ih) * s.w + iw) * cin + c0;
        const acc_t v = a.g[((n * s.ho + oh) * s.wo + ow) * a.g_pixel + co];
        if (valid == B) {
          sum.axpy(v, xp);
        } else {
          for (int64_t j = 0; j < valid; ++j) acc[j] += v * xp[j];
        }
      }
    }
  if (valid == B) sum.store(acc);
  acc_t* out = a.dw + (co * cin + c0) * taps + tap;  // straight into nn.Conv2d's layout
  for (int64_t j = 0; j < valid; ++j) out[j * taps] = acc[j];
}

// Rows r0 .. r1 of the weight gradient, r = co * taps + tap (one output channel's taps together, so
// its strided stores stay in cache); dead taps are skipped (their zeros are already there).
template <typename acc_t, int B>
FASTASPP_INLINE void grad_weight_rows_impl(const GradWeightArgs<acc_t>& a, int64_t r0, int64_t r1) {
  const Shape& s = a.s;
  const int64_t taps = s.kh * s.kw, blocks = ceil_div(s.cin, B);
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t co = r / taps, tap = r - co * taps, kh = tap / s.kw, kw = tap - kh * s.kw;
    const LiveRange rows = tap_live_range(kh, s.h, s.ho, s.g.stride[0], s.g.padding[0], s.g.dilation[0]);
    const LiveRange cols = tap_live_range(kw, s.w, s.wo, s.g.stride[1], s.g.padding[1], s.g.dilation[1]);
    if (rows.empty() || cols.empty()) continue;
    for (int64_t b = 0; b < blocks; ++b) grad_weight_block_impl<acc_t, B>(a, tap, co, b * B, rows, cols);
  }
}

// The vector-cloned entry points (simd.h): one per compute dtype and block.
#define FASTASPP_DIRECT_ENTRIES(acc_t, B)                                                                      \
  FASTASPP_AVX2_CLONES void forward_pixels_##acc_t##_##B(const ForwardArgs<acc_t>& a, int64_t p0, int64_t p1) { \
    forward_pixels_impl<acc_t, B>(a, p0, p1);                                                                  \
  }                                                                                                            \
  FASTASPP_AVX2_CLONES void grad_input_pixels_##acc_t##_##B(const GradInputArgs<acc_t>& a, int64_t p0,         \
                                                           int64_t p1) {                                       \
    grad_input_pixels_impl<acc_t, B>(a, p0, p1);                                                               \
  }                                                                                                            \
  FASTASPP_AVX2_CLONES void grad_weight_rows_##acc_t##_##B(const GradWeightArgs<acc_t>& a, int64_t r0,         \
                                                          int64_t r1) {                                        \
    grad_weight_rows_impl<acc_t, B>(a, r0, r1);                                                                \
  }

FASTASPP_DIRECT_ENTRIES(float, 8)
FASTASPP_DIRECT_ENTRIES(float, 16)
FASTASPP_DIRECT_ENTRIES(float, 32)
FASTASPP_DIRECT_ENTRIES(double, 4)
FASTASPP_DIRECT_ENTRIES(double, 8)
FASTASPP_DIRECT_ENTRIES(double, 16)
#undef FASTASPP_DIRECT_ENTRIES

// name(args, block, i0, i1): the entry for a block size (block_for), per compute dtype.
#define FASTASPP_BY_BLOCK(name, Args)                                                                         \
  void name(const Args<float>& a, int64_t block, int64_t i0, int64_t i1) {                                    \
    block == 8 ? name##_float_8(a, i0, i1) : block == 16 ? name##_float_16(a, i0, i1) : name##_float_32(a, i0, i1); \
  }                                                                                                           \
  void name(const Args<double>& a, int64_t block, int64_t i0, int64_t i1) {                                   \
    block == 4 ? name##_double_4(a, i0, i1) : block == 8 ? name##_double_8(a, i0, i1) : name##_double_16(a, i0, i1); \
  }

FASTASPP_BY_BLOCK(forward_pixels, ForwardArgs)
FASTASPP_BY_BLOCK(grad_input_pixels, GradInputArgs)
FASTASPP_BY_BLOCK(grad_weight_rows, GradWeightArgs)
#undef FASTASPP_BY_BLOCK

void strides_of(const at::Tensor& t, int64_t* out) {
  for (int i = 0; i < 4; ++i) out[i] = t.stride(i);
}

// The distance between pixels of g ([N, Ho, Wo, C] with unit channel stride and evenly spaced
// pixels: a dense NHWC tensor, or a channel slice of a wider one).
int64_t pixel_stride(const at::Tensor& g) {
  // The step between consecutive pixels, read off the innermost pixel dimension longer than 1.
  const int64_t step = g.size(2) > 1 ? g.stride(2)
                       : g.size(1) > 1 ? g.stride(1)
                       : g.size(0) > 1 ? g.stride(0) : g.size(3);
  TORCH_CHECK(g.size(3) <= 1 || g.stride(3) == 1, "fastaspp: the direct kernels want a unit channel stride");
  TORCH_CHECK(step >= g.size(3) && (g.size(1) <= 1 || g.stride(1) == step * g.size(2)) &&
                  (g.size(0) <= 1 || g.stride(0) == step * g.size(2) * g.size(1)),
              "fastaspp: the direct kernels want evenly spaced pixels, got strides ", g.strides());
  return step;
}

}  // namespace

int64_t live_pairs(at::IntArrayRef x_size, at::IntArrayRef weight_size, int64_t out_h, int64_t out_w,
                   const ConvGeometry& g) {
  int64_t live[2] = {0, 0};
  const int64_t in[2] = {x_size[2], x_size[3]}, out[2] = {out_h, out_w};
  for (int axis = 0; axis < 2; ++axis)
    for (int64_t k = 0; k < weight_size[2 + axis]; ++k)
      live[axis] += tap_live_range(k, in[axis], out[axis], g.stride[axis], g.padding[axis], g.dilation[axis]).size();
  return live[0] * live[1];
}

int64_t live_macs(at::IntArrayRef x_size, at::IntArrayRef weight_size, int64_t out_h, int64_t out_w,
                  const ConvGeometry& g) {
  return x_size[0] * live_pairs(x_size, weight_size, out_h, out_w, g) * x_size[1] * weight_size[0];
}

bool use_direct(int64_t macs) {
  // -1: never (README's knobs).
  return macs <= checked_switch(IntegerSwitch{"FASTASPP_CPU_DIRECT_MAX_MACS", kDirectMaxMacs, -1});
}

void direct_forward(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& alpha, const at::Tensor& beta,
                    bool relu, const ConvGeometry& g, at::Tensor& y) {
  const auto dtype = accumulator_dtype(x.scalar_type());
  const at::Tensor xa = x.to(dtype);  // fp32/fp64 read in place, with their strides
  at::Tensor ya = y.scalar_type() == dtype ? y : at::empty_like(y, y.options().dtype(dtype));
  const Shape s{x.size(1), x.size(2), x.size(3), weight.size(0), weight.size(2), weight.size(3),
                y.size(2), y.size(3), g};
  const int64_t pixels = y.size(0) * s.ho * s.wo;
  const int64_t per_pixel = std::max<int64_t>(1, live_macs(x.sizes(), weight.sizes(), s.ho, s.wo, g) /
                                                     std::max<int64_t>(1, pixels));
  AT_DISPATCH_FLOATING_TYPES(dtype, "direct_forward", [&] {
    const int64_t block = block_for<scalar_t>(s.cout);
    const at::Tensor wt = tap_major(weight, dtype, kDirectForwardLayout, block);
    ForwardArgs<scalar_t> a{s, xa.data_ptr<scalar_t>(), {}, wt.data_ptr<scalar_t>(), wt.size(3),
                            alpha.defined() ? alpha.data_ptr<scalar_t>() : nullptr,
                            beta.defined() ? beta.data_ptr<scalar_t>() : nullptr, relu, ya.data_ptr<scalar_t>(), {}};
    strides_of(xa, a.xs);
    strides_of(ya, a.ys);
    at::parallel_for(0, pixels, grain(per_pixel),
                     [&](int64_t begin, int64_t end) { forward_pixels(a, block, begin, end); });
  });
  if (!ya.is_same(y)) y.copy_(ya);
}

void direct_grad_input(const at::Tensor& gm, const at::Tensor& weight, const at::Tensor& scale,
                       const ConvGeometry& g, at::Tensor& dx, bool accumulate) {
  const auto dtype = gm.scalar_type();
  TORCH_CHECK(!accumulate || dx.scalar_type() == dtype, "fastaspp: direct_grad_input accumulates in the compute dtype");
  const int64_t g_pixel = pixel_stride(gm);
  at::Tensor da = dx.scalar_type() == dtype ? dx : at::empty_like(dx, dx.options().dtype(dtype));
  const Shape s{dx.size(1), dx.size(2), dx.size(3), weight.size(0), weight.size(2), weight.size(3), gm.size(1),
                gm.size(2), g};
  const int64_t pixels = dx.size(0) * s.h * s.w;
  const int64_t per_pixel = std::max<int64_t>(1, s.kh * s.kw * s.cin * s.cout / (g.stride[0] * g.stride[1]));
  AT_DISPATCH_FLOATING_TYPES(dtype, "direct_grad_input", [&] {
    const int64_t block = block_for<scalar_t>(s.cin);
    const at::Tensor wt = tap_major(weight, dtype, kDirectGradInputLayout, block);
    GradInputArgs<scalar_t> a{s, gm.data_ptr<scalar_t>(), g_pixel, wt.data_ptr<scalar_t>(), wt.size(3),
                              scale.defined() ? scale.data_ptr<scalar_t>() : nullptr, da.data_ptr<scalar_t>(), {},
                              accumulate};
    strides_of(da, a.ds);
    at::parallel_for(0, pixels, grain(per_pixel),
                     [&](int64_t begin, int64_t end) { grad_input_pixels(a, block, begin, end); });
  });
  if (!da.is_same(dx)) dx.copy_(da);
}

at::Tensor direct_grad_weight(const at::Tensor& xh, const at::Tensor& gm, int64_t kernel_h, int64_t kernel_w,
                              const ConvGeometry& g) {
  const Shape s{xh.size(3), xh.size(1), xh.size(2), gm.size(3), kernel_h, kernel_w, gm.size(1), gm.size(2), g};
  at::Tensor dw = at::zeros({s.cout, s.cin, kernel_h, kernel_w}, xh.options());
  const int64_t rows = kernel_h * kernel_w * s.cout;  // one (output channel, tap) row of dw each
  const int64_t per_row = xh.size(0) * s.ho * s.wo * s.cin;  // at most: a live tap's rectangle
  AT_DISPATCH_FLOATING_TYPES(xh.scalar_type(), "direct_grad_weight", [&] {
    GradWeightArgs<scalar_t> a{s, xh.size(0), xh.data_ptr<scalar_t>(), gm.data_ptr<scalar_t>(), pixel_stride(gm),
                               dw.data_ptr<scalar_t>()};
    const int64_t block = block_for<scalar_t>(s.cin);
    at::parallel_for(0, rows, grain(per_row),
                     [&](int64_t begin, int64_t end) { grad_weight_rows(a, block, begin, end); });
  });
  return dw;
}

}  // namespace fastaspp
