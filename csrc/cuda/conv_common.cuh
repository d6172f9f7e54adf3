// What the cuda backend's implicit-GEMM conv kernels share (atrous_conv.cu: the WMMA and SIMT
// kernels; conv_sm80.cuh: the CuTe tensor-core kernel): their arguments in dst / src terms, the
// (live tap, channel chunk) walk of a CTA's patch, the gather of a dst pixel's src row and the
// epilogue of one output element. The tiling and its invariants are described at the top of
// atrous_conv.cu. Pure CUDA, included only by .cu files.
#pragma once

#include "kernel_common.cuh"

namespace fastaspp {
namespace atrous_cuda {
namespace {  // internal linkage, as kernel_common.cuh

// ---------------------------------------------------------------------------------------
// Conv (forward / grad_input) arguments, in dst / src terms (see the note at the top).
struct ConvArgs {
  const void* src;
  const void* wt;     // [KH, KW, kc, nc]
  const void* scale;  // [nc], forward only
  const void* shift;  // [nc], forward only
  void* dst;          // pixel p, channel c at dst[p * dst_pixel_stride + dst_channel_offset + c]
  int64_t n, src_h, src_w, kc, dst_h, dst_w, nc, kh, kw;
  int64_t dst_pixel_stride, dst_channel_offset;  // elements; offset + nc <= stride
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  PatchTiling tiling;  // conv_tiling.h: the dst patch each CTA owns
  int relu;
};

__device__ __forceinline__ Patch cta_patch(const ConvArgs& a) {
  return patch_of(a.tiling, blockIdx.x, a.dst_h, a.dst_w);
}

// First tap >= tap that is live for the whole patch (or kh*kw when none is).
template <bool kDgrad>
__device__ int64_t next_live_tap(const ConvArgs& a, const Patch& t, int64_t tap) {
  const int64_t taps = a.kh * a.kw;
  for (; tap < taps; ++tap) {
    const int64_t kh = tap / a.kw, kw = tap % a.kw;
    if (patch_tap_live<kDgrad>(kh, a.src_h, a.dst_h, a.stride_h, a.pad_h, a.dil_h, t.r0, t.r1) &&
        patch_tap_live<kDgrad>(kw, a.src_w, a.dst_w, a.stride_w, a.pad_w, a.dil_w, t.c0, t.c1)) {
      break;
    }
  }
  return tap;
}

struct Step {
  int64_t tap;  // == kh*kw when the sequence is exhausted
  int64_t k0;   // first src channel of the chunk
};

template <bool kDgrad>
__device__ __forceinline__ Step first_step(const ConvArgs& a, const Patch& t) {
  Step s;
  s.tap = a.kc > 0 ? next_live_tap<kDgrad>(a, t, 0) : a.kh * a.kw;
  s.k0 = 0;
  return s;
}

template <bool kDgrad, int BK>
__device__ __forceinline__ Step next_step(const ConvArgs& a, const Patch& t, Step s) {
  s.k0 += BK;
  if (s.k0 >= a.kc) {
    s.k0 = 0;
    s.tap = next_live_tap<kDgrad>(a, t, s.tap + 1);
  }
  return s;
}

// Row m of the A tile: the src pixel that dst pixel m of the patch reads through tap
// (kh, kw), or nullptr when it reads padding / lies outside the map.
template <bool kDgrad, typename T>
__device__ __forceinline__ const T* gather_row(const ConvArgs& a, const Patch& t, int64_t kh,
                                               int64_t kw, int m, const T* src) {
  const int64_t r = t.r0 + (m >> a.tiling.tile_w_log2);
  const int64_t c = t.c0 + (m & ((1 << a.tiling.tile_w_log2) - 1));
  if (r >= t.r1 || c >= t.c1) return nullptr;
  int64_t sr, sc;
  if (!kDgrad) {
    sr = r * a.stride_h + kh * a.dil_h - a.pad_h;
    sc = c * a.stride_w + kw * a.dil_w - a.pad_w;
  } else {
    const int64_t nr = r + a.pad_h - kh * a.dil_h;
    const int64_t nc = c + a.pad_w - kw * a.dil_w;
    if (nr < 0 || nc < 0 || nr % a.stride_h != 0 || nc % a.stride_w != 0) return nullptr;
    sr = nr / a.stride_h;
    sc = nc / a.stride_w;
  }
  if (sr < 0 || sr >= a.src_h || sc < 0 || sc >= a.src_w) return nullptr;
  return src + ((t.img * a.src_h + sr) * a.src_w + sc) * a.kc;
}

// One output element: forward epilogue (scale, shift, ReLU) or plain store for grad_input.
template <typename T, bool kDgrad, typename Acc>
__device__ __forceinline__ void store_output(const ConvArgs& a, const Patch& t, int m,
                                             int64_t co, Acc v) {
  const int64_t r = t.r0 + (m >> a.tiling.tile_w_log2);
  const int64_t c = t.c0 + (m & ((1 << a.tiling.tile_w_log2) - 1));
  if (r >= t.r1 || c >= t.c1 || co >= a.nc) return;
  if (!kDgrad) {
    v = v * Elem<T>::to_acc(static_cast<const T*>(a.scale)[co]) +
        Elem<T>::to_acc(static_cast<const T*>(a.shift)[co]);
    if (a.relu && v < Acc(0)) v = Acc(0);  // comparison, not fmax: NaN propagates like torch
  }
  T* dst = static_cast<T*>(a.dst);
  dst[((t.img * a.dst_h + r) * a.dst_w + c) * a.dst_pixel_stride + a.dst_channel_offset + co] =
      Elem<T>::from_acc(v);
}

}  // namespace
}  // namespace atrous_cuda
}  // namespace fastaspp
