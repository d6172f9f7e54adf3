// Tap liveness for dilated/strided convolution: the index math every backend shares.
//
// For one kernel tap at index k (0 <= k < K) along one spatial axis, the input
// coordinate read by output coordinate o is  i = o * stride + k * dilation - padding.
// The tap is live for o only when 0 <= i < in_size. The live outputs form one
// contiguous range [lo, hi); an empty range (lo >= hi) means the tap reads only
// padding for every output pixel and is skipped entirely (docs/design.md §2).
//
// Also the one description of a conv's geometry (ConvGeometry: stride, padding, dilation per
// axis, their valid ranges, and the output size they give); the torch bindings check their
// arguments against it in checks.h.
//
// Pure C++ with optional __host__ __device__ so that CPU code and CUDA kernels
// include the same definitions.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define FASTASPP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTASPP_HOST_DEVICE inline
#endif

namespace fastaspp {

// floor(a / b) for b > 0 and any sign of a.
FASTASPP_HOST_DEVICE int64_t floor_div(int64_t a, int64_t b) {
  int64_t q = a / b;
  return (a % b != 0 && a < 0) ? q - 1 : q;
}

// ceil(a / b) for b > 0 and any sign of a.
FASTASPP_HOST_DEVICE int64_t ceil_div(int64_t a, int64_t b) {
  return -floor_div(-a, b);
}

// Output size of a convolution along one axis (may be <= 0 for invalid configs).
FASTASPP_HOST_DEVICE int64_t conv_out_size(int64_t in_size, int64_t kernel, int64_t stride,
                                           int64_t padding, int64_t dilation) {
  return floor_div(in_size + 2 * padding - dilation * (kernel - 1) - 1, stride) + 1;
}

// Stride, padding and dilation of a 2-D convolution, index 0 the row axis, 1 the column axis.
struct ConvGeometry {
  // The least value each takes; every kernel assumes these.
  static constexpr int64_t kMinStride = 1, kMinPadding = 0, kMinDilation = 1;

  int64_t stride[2];
  int64_t padding[2];
  int64_t dilation[2];

  FASTASPP_HOST_DEVICE bool valid() const {
    return stride[0] >= kMinStride && stride[1] >= kMinStride && padding[0] >= kMinPadding &&
           padding[1] >= kMinPadding && dilation[0] >= kMinDilation && dilation[1] >= kMinDilation;
  }
  // Output size along `axis` of an input of in_size by a kernel of `kernel` taps.
  FASTASPP_HOST_DEVICE int64_t out_size(int axis, int64_t in_size, int64_t kernel) const {
    return conv_out_size(in_size, kernel, stride[axis], padding[axis], dilation[axis]);
  }
};

// The geometry of an ASPP branch: stride 1 and padding = dilation = rate, so that the output is
// the input's size; rate 0 is the 1x1 branch (no padding, dilation 1).
FASTASPP_HOST_DEVICE ConvGeometry aspp_branch_geometry(int64_t rate) {
  const int64_t dilation = rate > 0 ? rate : 1;
  return ConvGeometry{{1, 1}, {rate, rate}, {dilation, dilation}};
}

// Offset of tap k in input coordinates relative to o * stride.
FASTASPP_HOST_DEVICE int64_t tap_offset(int64_t k, int64_t dilation, int64_t padding) {
  return k * dilation - padding;
}

struct LiveRange {
  int64_t lo;  // first live output coordinate
  int64_t hi;  // one past the last live output coordinate
  FASTASPP_HOST_DEVICE bool empty() const { return lo >= hi; }
  FASTASPP_HOST_DEVICE int64_t size() const { return hi > lo ? hi - lo : 0; }
};

// Live output range of tap k along one axis: o with 0 <= o*stride + offset < in_size.
FASTASPP_HOST_DEVICE LiveRange tap_live_range(int64_t k, int64_t in_size, int64_t out_size,
                                              int64_t stride, int64_t padding, int64_t dilation) {
  const int64_t off = tap_offset(k, dilation, padding);
  int64_t lo = ceil_div(-off, stride);
  int64_t hi = floor_div(in_size - 1 - off, stride) + 1;
  if (lo < 0) lo = 0;
  if (hi > out_size) hi = out_size;
  LiveRange r;
  r.lo = lo;
  r.hi = hi;
  return r;
}

}  // namespace fastaspp
