// What the cuda backend's TMA conv kernels (csrc/cuda/conv_tma.cuh) ask the Tensor Memory
// Accelerator to load: the global view each tensor map describes, the arguments it is encoded
// with, the box one K step loads, and where that box starts. Plain C++ (host and device),
// templated on the conv's argument struct, so that a host program checks that every box holds
// what the cp.async gather of the other CuTe kernels would, and that every map meets the driver's
// preconditions (tests/cuda_host/tma_boxes.cu).
//
// A TMA load copies a box of a tensor of up to 5 dims (dim 0 contiguous) into shared memory in
// box order (dim 0 fastest), every element whose coordinate lies outside [0, dims) read as zero.
// For a conv of stride 1 (forward, or the input gradient):
// * src (the A operand): the 4-D view (channel, column, row, image) of kc channels from
//   src_channel_offset on. One box is (BK, patch cols, patch rows, 1) from
//   (k0, column, row, image) of the patch's first pixel's src pixel through the tap: box row m is
//   pixel m of the patch (row m / cols, column m % cols), as the A tile's rows, and it reads zero
//   wherever the pixel reads padding and for channels past kc. Rows of pixels past the dst map
//   read whatever src lies there (the cp.async gather reads zeros): their outputs are never
//   stored, nor counted by the BN statistics.
// * weight [taps, kc, nc] (the B operand): the 3-D view (dst channel, src channel, tap); one box is
//   (kTmaWeightBoxN, BK, 1) from (n, k0, tap): kTmaWeightBoxN dst channels of BK weight rows, zero
//   past nc and past kc (not the next tap's rows). A 64-channel box is one 128-byte row of the
//   128-byte swizzle, the widest a swizzled box may be; a CTA's BN channels take BN / 64 boxes.
// A strided conv's boxes would need TMA's element strides (its input gradient, its phases): the
// kernel does not take those (tma_conv_ok).
#pragma once

#include "tap_geometry.h"

namespace fastaspp {

constexpr int kTmaMaxRank = 4;
constexpr int kTmaWeightBoxN = 64;
// The swizzles the kernel's tensor maps use (its shared-memory layouts are these swizzles' images):
// a src box row is BK = 32 16-bit channels (64 bytes), a weight box row 64 channels (128 bytes).
constexpr int kTmaSrcSwizzleBytes = 64, kTmaWeightSwizzleBytes = 128;
constexpr int64_t kTmaMaxTaps = 64;  // a conv's live taps are one 64-bit mask in the kernel
// Elements along one dim, and the reach of a box origin from 0: int32 coordinates with room (TMA's
// own limit on a dim is 2^32).
constexpr int64_t kTmaMaxDim = int64_t(1) << 30;
constexpr int64_t kTmaMaxStrideBytes = int64_t(1) << 40;  // bytes between neighbours along one dim

// A tensor map's view of a tensor: element (x0, x1, ...) at base + offset + sum(x_i * strides[i])
// elements, x_i in [0, dims[i]); strides[0] == 1. box: the elements one load copies per dim.
struct TmaView {
  int rank;
  int64_t offset;
  int64_t dims[kTmaMaxRank];
  int64_t strides[kTmaMaxRank];
  int box[kTmaMaxRank];
};

// The arguments cuTensorMapEncodeTiled takes for view v of a tensor of elem_bytes-byte elements at
// `base` (interleave none, element strides 1): the address of coordinate 0, dims, the strides of
// dims 1 on in bytes, the box. tma_encode_ok states the driver's documented preconditions, so that a
// host program checks them for every view a launch encodes (tests/cuda_host/tma_boxes.cu).
struct TmaEncodeArgs {
  int rank;
  uintptr_t address;
  uint64_t dims[kTmaMaxRank];
  uint64_t strides[kTmaMaxRank - 1];
  uint32_t box[kTmaMaxRank];
};
FASTASPP_HOST_DEVICE TmaEncodeArgs tma_encode_args(const TmaView& v, int elem_bytes, const void* base) {
  TmaEncodeArgs e{};
  e.rank = v.rank;
  e.address = reinterpret_cast<uintptr_t>(base) + static_cast<uintptr_t>(v.offset * elem_bytes);
  for (int i = 0; i < v.rank; ++i) {
    e.dims[i] = static_cast<uint64_t>(v.dims[i]);
    e.box[i] = static_cast<uint32_t>(v.box[i]);
    if (i > 0) e.strides[i - 1] = static_cast<uint64_t>(v.strides[i] * elem_bytes);
  }
  return e;
}

// The driver's preconditions (CUDA driver API, cuTensorMapEncodeTiled), for interleave none and a
// swizzle of swizzle_bytes (32, 64 or 128): rank 1 to 5; a 16-byte aligned address; dims from 1 to
// 2^32; strides multiples of 16 below 2^40; boxes of 1 to 256 elements, the innermost a multiple of
// 16 bytes and at most the swizzle's span.
FASTASPP_HOST_DEVICE bool tma_encode_ok(const TmaEncodeArgs& e, int elem_bytes, int swizzle_bytes) {
  if (e.rank < 1 || e.rank > 5 || e.address % 16 != 0) return false;
  for (int i = 0; i < e.rank; ++i) {
    if (e.dims[i] < 1 || e.dims[i] > (uint64_t(1) << 32) || e.box[i] < 1 || e.box[i] > 256) return false;
    if (i > 0 && (e.strides[i - 1] % 16 != 0 || e.strides[i - 1] >= (uint64_t(1) << 40))) return false;
  }
  const uint64_t inner = uint64_t(e.box[0]) * elem_bytes;
  return inner % 16 == 0 && inner <= uint64_t(swizzle_bytes);
}

// Whether a conv's launch may run on the TMA kernel: stride 1 (so its boxes are plain boxes), no
// projection prologue (it rewrites A chunks where the cp.async copies land them), at most
// kTmaMaxTaps taps, and views within TMA's limits (and coordinates within int32). Alignment (16
// bytes for the base, the strides and the box rows) follows from what every CuTe kernel requires
// already (conv_cute_operands_ok: channel counts, pixel stride and offset in chunks of 8 16-bit
// values, 16-byte aligned pointers).
template <class Conv>
FASTASPP_HOST_DEVICE bool tma_conv_ok(const Conv& a, int elem_bytes) {
  if (a.stride_h != 1 || a.stride_w != 1 || a.src_scale != nullptr || a.kh * a.kw > kTmaMaxTaps) return false;
  const int64_t src_dims[] = {a.kc, a.src_w, a.src_h, a.n}, wt_dims[] = {a.nc, a.kc, a.kh * a.kw};
  for (int64_t d : src_dims)
    if (d <= 0 || d >= kTmaMaxDim) return false;
  for (int64_t d : wt_dims)
    if (d <= 0 || d >= kTmaMaxDim) return false;
  // A box's origin (tma_src_origin) stays within int32, TMA's coordinates, for the int32 walk.
  const int64_t reach[] = {a.pad_h, a.pad_w, a.dil_h * (a.kh - 1), a.dil_w * (a.kw - 1), a.dst_h, a.dst_w};
  for (int64_t d : reach)
    if (d >= kTmaMaxDim) return false;
  const int64_t image_bytes = a.src_h * a.src_w * a.src_pixel_stride * elem_bytes;
  return image_bytes < kTmaMaxStrideBytes && a.kc * a.nc * elem_bytes < kTmaMaxStrideBytes;
}

// The src view, one box a patch of rows x cols pixels and bk channels.
template <class Conv>
FASTASPP_HOST_DEVICE TmaView tma_src_view(const Conv& a, int64_t rows, int64_t cols, int bk) {
  TmaView v{};
  v.rank = 4;
  v.offset = a.src_channel_offset;
  v.dims[0] = a.kc, v.dims[1] = a.src_w, v.dims[2] = a.src_h, v.dims[3] = a.n;
  v.strides[0] = 1, v.strides[1] = a.src_pixel_stride, v.strides[2] = a.src_w * a.src_pixel_stride;
  v.strides[3] = a.src_h * v.strides[2];
  v.box[0] = bk, v.box[1] = static_cast<int>(cols), v.box[2] = static_cast<int>(rows), v.box[3] = 1;
  return v;
}

// The weight view, one box kTmaWeightBoxN dst channels of bk rows of one tap.
template <class Conv>
FASTASPP_HOST_DEVICE TmaView tma_weight_view(const Conv& a, int bk) {
  TmaView v{};
  v.rank = 3;
  v.offset = 0;
  v.dims[0] = a.nc, v.dims[1] = a.kc, v.dims[2] = a.kh * a.kw;
  v.strides[0] = 1, v.strides[1] = a.nc, v.strides[2] = a.kc * a.nc;
  v.box[0] = kTmaWeightBoxN, v.box[1] = bk, v.box[2] = 1;
  return v;
}

// Where the src box of the patch whose first pixel is dst (row r0, column c0) of image img starts,
// for tap (kh, kw) and channels from k0: the src pixel that dst pixel reads through the tap
// (forward: r0 + kh * dil - pad; input gradient: r0 + pad - kh * dil; stride 1), which may lie
// outside the map (the box's padding then reads zeros).
struct TmaSrcOrigin {
  int32_t k, col, row, img;
};
template <bool kDgrad, class Conv>
FASTASPP_HOST_DEVICE TmaSrcOrigin tma_src_origin(const Conv& a, int64_t img, int64_t r0, int64_t c0, int64_t kh,
                                                 int64_t kw, int64_t k0) {
  const int64_t dr = kDgrad ? a.pad_h - kh * a.dil_h : kh * a.dil_h - a.pad_h;
  const int64_t dc = kDgrad ? a.pad_w - kw * a.dil_w : kw * a.dil_w - a.pad_w;
  return TmaSrcOrigin{static_cast<int32_t>(k0), static_cast<int32_t>(c0 + dc), static_cast<int32_t>(r0 + dr),
                      static_cast<int32_t>(img)};
}

}  // namespace fastaspp
