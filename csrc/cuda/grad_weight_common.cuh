// What the cuda backend's weight-gradient kernels share (grad_weight.cu: WMMA and SIMT;
// grad_weight_cute.cuh: CuTe): their arguments, which (tap, Cout block, Cin block, split) a CTA
// owns, the slice of the tap's live output rectangle it reduces, and the store of its partial sums.
// Pure CUDA, included only by .cu files.
//
// Per tap, dW_tap[Cout, Cin] = G^T X over that tap's live output rectangle only (tap_live_range
// on both axes: every pixel in it reads inside the map, none outside does), so dead taps cost no
// pixel loop. Split s of S reduces pixels [s*P/S, (s+1)*P/S) of the rectangle flattened over
// (n, oh, ow), P its size, and writes its whole partial tile (zeros for a dead tap or an empty
// split) to workspace[S][KH*KW][Cout][Cin]; a second kernel sums the S partials in a fixed order.
#pragma once

#include "kernel_common.cuh"

namespace fastaspp {
namespace atrous_cuda {
namespace {  // internal linkage, as kernel_common.cuh

struct GwArgs {
  const void* x;  // [N, H, W, Cin]
  const void* g;  // [N, Ho, Wo, Cout]
  void* ws;       // [splits][KH*KW][Cout][Cin] partial sums, Acc type
  int64_t n, h, w, cin, ho, wo, cout, kh, kw;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t co_blocks, ci_blocks;  // of the launched kernel's BM x BN tile
  int splits;
};

struct GwTile {
  int64_t tap, co0, ci0, split;
};

// CTA blockIdx.x = (tap, Cout block, Cin block) row-major, blockIdx.y = the split.
template <int BM, int BN>
__device__ __forceinline__ GwTile make_gw_tile(const GwArgs& a) {
  const int64_t b = blockIdx.x;
  const int64_t per_tap = a.co_blocks * a.ci_blocks;
  GwTile t;
  t.tap = b / per_tap;
  t.co0 = ((b % per_tap) / a.ci_blocks) * BM;
  t.ci0 = ((b % per_tap) % a.ci_blocks) * BN;
  t.split = blockIdx.y;
  return t;
}

// The pixels a CTA reduces: [begin, end) of its tap's live rectangle, flattened over (n, oh, ow).
struct GwPixels {
  int64_t begin, end;
  int64_t area, live_w, oh0, ow0;  // the rectangle: rows [oh0, oh0 + area / live_w), live_w columns
  int64_t off_h, off_w;            // the tap's input offset: ih = oh * stride_h + off_h

  __host__ __device__ __forceinline__ GwPixels(const GwArgs& a, const GwTile& t) {
    const int64_t kh = t.tap / a.kw, kw = t.tap % a.kw;
    const LiveRange lh = tap_live_range(kh, a.h, a.ho, a.stride_h, a.pad_h, a.dil_h);
    const LiveRange lw = tap_live_range(kw, a.w, a.wo, a.stride_w, a.pad_w, a.dil_w);
    live_w = lw.size();
    area = lh.size() * live_w;
    oh0 = lh.lo;
    ow0 = lw.lo;
    const int64_t total = a.n * area;  // 0 for a dead tap
    begin = total * t.split / a.splits;
    end = total * (t.split + 1) / a.splits;
    off_h = tap_offset(kh, a.dil_h, a.pad_h);
    off_w = tap_offset(kw, a.dil_w, a.pad_w);
  }

  // Pixel p's grad row (Cout values) and the x row (Cin values) it reads through the tap; in
  // range by construction of the live rectangle for begin <= p < end (past end, pointers that are
  // not to be read: GwPixelWalk starts a thread's walk there when the split has no pixel for it).
  template <typename T>
  __host__ __device__ __forceinline__ void rows(const GwArgs& a, int64_t p, const T*& g_row, const T*& x_row) const {
    const int64_t img = p / area;
    const int64_t rem = p - img * area;
    const int64_t q = rem / live_w;
    const int64_t oh = oh0 + q, ow = ow0 + (rem - q * live_w);
    g_row = static_cast<const T*>(a.g) + ((img * a.ho + oh) * a.wo + ow) * a.cout;
    x_row = static_cast<const T*>(a.x) +
            ((img * a.h + oh * a.stride_h + off_h) * a.w + ow * a.stride_w + off_w) * a.cin;
  }
};

// One thread's pixels p, p + kStride, p + 2 kStride, ... of a CTA's slice, with pointers into their
// grad and x rows, moved on without a division per step: the pixel's row q and column c in the
// live rectangle change by kStride's whole rows and its remainder, with at most one carry into the
// next row and (for a rectangle of fewer than kStride pixels, several) carries into the next image,
// each a fixed change of the two pointers. The divisions run once, in the constructor.
template <typename T, int kStride>
struct GwPixelWalk {
  int64_t p;            // the pixel, flattened over (n, oh, ow) of the rectangle
  int64_t q, c;         // its row and column in the rectangle
  const T* g_row;       // its grad row from channel co0 on (Cout values in all)
  const T* x_row;       // its x row from channel ci0 on (Cin values in all)
  // The rectangle's shape, and the changes of (q, c) and of the pointers (in elements): per step,
  // per carry into the next row, per carry into the next image.
  int64_t live_w, rows, dq, dc;
  int64_t g_step, x_step, g_row_carry, x_row_carry, g_img_carry, x_img_carry;

  // Starts at pixel p_first (>= 0) of the rectangle. For an empty one (a dead tap, whose CTAs take
  // no step) only p means anything. tests/cuda_host/gw_pixel_walk.cu checks the walk against rows().
  __host__ __device__ __forceinline__ GwPixelWalk(const GwArgs& a, const GwPixels& px, const GwTile& t, int64_t p_first)
      : p(p_first), q(0), c(0), g_row(static_cast<const T*>(a.g)), x_row(static_cast<const T*>(a.x)),
        live_w(px.live_w), rows(0), dq(0), dc(0), g_step(0), x_step(0), g_row_carry(0), x_row_carry(0),
        g_img_carry(0), x_img_carry(0) {
    if (px.area == 0) return;
    rows = px.area / live_w;
    const int64_t rem = p % px.area;
    q = rem / live_w;
    c = rem - q * live_w;
    px.rows(a, p, g_row, x_row);
    g_row += t.co0;
    x_row += t.ci0;
    // One column, one row, one image further on, in elements of each tensor.
    const int64_t g_col = a.cout, g_next_row = a.wo * a.cout, g_img = a.ho * a.wo * a.cout;
    const int64_t x_col = a.stride_w * a.cin, x_next_row = a.stride_h * a.w * a.cin, x_img = a.h * a.w * a.cin;
    dq = kStride / live_w;
    dc = kStride - dq * live_w;
    g_step = dq * g_next_row + dc * g_col;
    x_step = dq * x_next_row + dc * x_col;
    g_row_carry = g_next_row - live_w * g_col;  // column live_w is column 0 of the next row
    x_row_carry = x_next_row - live_w * x_col;
    g_img_carry = g_img - rows * g_next_row;  // row `rows` is row 0 of the next image
    x_img_carry = x_img - rows * x_next_row;
  }

  __host__ __device__ __forceinline__ void advance() {
    p += kStride;
    q += dq;
    c += dc;
    g_row += g_step;
    x_row += x_step;
    if (c >= live_w) {
      c -= live_w;
      ++q;
      g_row += g_row_carry;
      x_row += x_row_carry;
    }
    while (q >= rows && rows > 0) {  // once at most, unless the rectangle has fewer than kStride pixels
      q -= rows;
      g_row += g_img_carry;
      x_row += x_img_carry;
    }
  }
};

template <typename Acc>
__host__ __device__ __forceinline__ void store_partial(const GwArgs& a, const GwTile& t, int m, int j, Acc v) {
  const int64_t co = t.co0 + m, ci = t.ci0 + j;
  if (co >= a.cout || ci >= a.cin) return;
  const int64_t taps = a.kh * a.kw;
  static_cast<Acc*>(a.ws)[((t.split * taps + t.tap) * a.cout + co) * a.cin + ci] = v;
}

// store_partial for columns j .. j + 3 of row m, from the 16-byte aligned v, as one 16-byte store:
// for fp32 partials, a cin in whole chunks of 4 (so ci0 + j, a multiple of 4, has all 4 columns or
// none) and a 16-byte aligned workspace (partials_in_chunks).
__host__ __device__ __forceinline__ void store_partial4(const GwArgs& a, const GwTile& t, int m, int j,
                                                       const float* v) {
  const int64_t co = t.co0 + m, ci = t.ci0 + j;
  if (co >= a.cout || ci >= a.cin) return;
  const int64_t taps = a.kh * a.kw;
  *reinterpret_cast<float4*>(static_cast<float*>(a.ws) + ((t.split * taps + t.tap) * a.cout + co) * a.cin + ci) =
      *reinterpret_cast<const float4*>(v);
}
__host__ __device__ __forceinline__ bool partials_in_chunks(const GwArgs& a, int ldc) {
  return a.cin % 4 == 0 && ldc % 4 == 0 && aligned16(a.ws);
}

// The whole fp32 partial tile of a CTA, staged at cs[m * ldc + j] (BM x BN, 16-byte aligned), zeros
// included (the workspace is not zeroed): 4 columns per 16-byte store, consecutive threads along a
// row, where partials_in_chunks allows, else one value at a time. Starts after a barrier that made
// the tile visible; all NT threads must call it.
template <int BM, int BN, int NT>
__device__ __forceinline__ void store_partial_tile(const GwArgs& a, const GwTile& t, const float* cs, int ldc) {
  static_assert(BN % 4 == 0, "whole chunks of 4 columns");
  if (partials_in_chunks(a, ldc)) {  // uniform
    for (int e = static_cast<int>(threadIdx.x); e < BM * BN / 4; e += NT) {
      const int m = e / (BN / 4), j = (e % (BN / 4)) * 4;
      store_partial4(a, t, m, j, cs + m * ldc + j);
    }
  } else {
    for (int e = static_cast<int>(threadIdx.x); e < BM * BN; e += NT) {
      const int m = e / BN, j = e % BN;
      store_partial<float>(a, t, m, j, cs[m * ldc + j]);
    }
  }
}

}  // namespace
}  // namespace atrous_cuda
}  // namespace fastaspp
