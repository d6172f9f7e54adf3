// C launchers for the CUDA atrous (dilated) convolution kernels in atrous_conv.cu (forward,
// grad_input) and grad_weight.cu.
//
// Plain C interface (no torch types) so the kernels compile with nvcc alone; the torch
// binding (atrous_conv_cuda.cpp) owns every allocation and layout conversion.
//
// Layouts (all dense, row-major in the order written):
//   activations  NHWC: x [N, H, W, Cin], y / grad [N, Ho, Wo, Cout], grad_input [N, H, W, Cin]
//   forward weight      [KH, KW, Cin, Cout]   (= weight.permute(2, 3, 1, 0))
//   grad_input weight   [KH, KW, Cout, Cin]   (= weight.permute(2, 3, 0, 1))
//   grad_weight output  [Cout, Cin, KH, KW]   (the nn.Conv2d layout)
//   scale, shift        [Cout], same dtype as x
// The forward can also store into a channel slice of a wider NHWC buffer (see
// fastaspp_atrous_conv2d_forward_strided_cuda); every other output is dense.
// Every tensor has the dtype given by `dtype`. The launchers are asynchronous on `stream`
// and return cudaSuccess, cudaErrorInvalidValue for bad arguments, cudaErrorMemoryAllocation when
// scratch could not give memory, or the launch error.
#pragma once

#include <stdint.h>

#include <cuda_runtime_api.h>

#ifdef __cplusplus
extern "C" {
#endif

// Where a launcher gets device memory for a workspace it decides on itself: the 16-bit convs split
// their K loop where the grid leaves SMs idle (FASTASPP_CUDA_SPLIT_K), and keep the parts' fp32
// tiles there. allocate(context, bytes) returns memory that stays valid for work queued on the
// launch's stream (it need not be zeroed), or null on failure; a launcher calls it at most once per
// kernel launch it queues. A null scratch means no workspace: the launcher then never splits.
typedef struct {
  void* (*allocate)(void* context, int64_t bytes);
  void* context;
} FastasppScratch;

// dtype codes accepted by every launcher.
enum {
  FASTASPP_DTYPE_FLOAT32 = 0,
  FASTASPP_DTYPE_FLOAT64 = 1,
  FASTASPP_DTYPE_FLOAT16 = 2,
  FASTASPP_DTYPE_BFLOAT16 = 3
};

// y = act(conv2d(x, weight) * scale[co] + shift[co]), act = ReLU when relu != 0.
// Output pixel p = (n, oh, ow) (flattened NHWC pixel index (n * Ho + oh) * Wo + ow), channel
// co is stored at y[p * y_pixel_stride + y_channel_offset + co] (element offsets, y the base
// of the whole buffer): a slice [y_channel_offset, y_channel_offset + Cout) of an NHWC buffer
// of y_pixel_stride channels, e.g. one ASPP branch of the concat buffer. Requires
// 0 <= y_channel_offset and y_channel_offset + Cout <= y_pixel_stride (else
// cudaErrorInvalidValue); channels outside the slice are neither read nor written, so
// launches into disjoint slices of one buffer may run concurrently. y must not overlap x. Takes no
// scratch, so it never splits the K loop (fastaspp_atrous_conv2d_forward_fused_cuda can).
cudaError_t fastaspp_atrous_conv2d_forward_strided_cuda(
    const void* x, const void* weight_hwio, const void* scale, const void* shift, void* y,
    int64_t y_pixel_stride, int64_t y_channel_offset, int dtype, int64_t n, int64_t c_in,
    int64_t h, int64_t w, int64_t c_out, int64_t kh, int64_t kw, int64_t h_out, int64_t w_out,
    int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
    int64_t dil_w, int relu, cudaStream_t stream);

// The optional parts of a fused forward launch (fastaspp_atrous_conv2d_forward_fused_cuda), all in
// x's dtype; zero-initialise, then set what is used. Null pointers are left out of the formula
//   y = act(conv2d(x', weight) * scale[co] + shift[co] + image_bias[n, co]),  act = ReLU if relu,
// where x' = x, or with the src prologue x'[.., ci] = relu((x - x_centre[ci]) * x_scale[ci] +
// x_shift[ci]) (a training BN + ReLU of x applied as it is read; all three or none, and only for
// 1x1 kernels with stride 1 and no padding).
// stats: the BN batch statistics of the values y holds before they are rounded to its dtype, per
// conv patch, in the accumulator type (double for float64, else float): three planes
// [3][fastaspp_conv_patch_count(n, h_out, w_out)][y_pixel_stride] holding, for patch row and
// channel y_channel_offset + co, the count of its pixels in the map, their sum and their sum of
// squares about the patch mean. Every (patch, channel of the slice) is written; the caller merges
// the rows (Chan et al.), in a fixed order for reproducible results.
typedef struct {
  const void* scale;       // [Cout]
  const void* shift;       // [Cout]
  const void* image_bias;  // [N, Cout]
  const void* x_centre;    // [Cin]
  const void* x_scale;     // [Cin]
  const void* x_shift;     // [Cin]
  void* stats;
  int relu;
} FastasppForwardOptions;

// What the calling thread's last failed launcher call knows beyond its cudaError_t (a tensor map the
// driver refused, a TMA kernel built with too few registers), or "" when nothing; taking it empties
// it. The string stays valid until the thread's next call.
const char* fastaspp_cuda_take_failure_detail(void);

// Patches (rows of the stats planes) of an n x h_out x w_out output, or -1 for negative sizes.
int64_t fastaspp_conv_patch_count(int64_t n, int64_t h_out, int64_t w_out);

// The forward with options, into a channel slice of y as fastaspp_atrous_conv2d_forward_strided_cuda.
// cudaErrorInvalidValue also for a prologue with some of its pointers null or on another geometry.
cudaError_t fastaspp_atrous_conv2d_forward_fused_cuda(
    const void* x, const void* weight_hwio, void* y, int64_t y_pixel_stride,
    int64_t y_channel_offset, int dtype, int64_t n, int64_t c_in, int64_t h, int64_t w,
    int64_t c_out, int64_t kh, int64_t kw, int64_t h_out, int64_t w_out, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
    const FastasppForwardOptions* options, const FastasppScratch* scratch, cudaStream_t stream);

// A branch's kernel size, padding and dilation (its stride is the launch's).
typedef struct {
  int64_t kh, kw, pad_h, pad_w, dil_h, dil_w;
} FastasppBranchGeometry;

// One conv of a branch launch: its weight and geometry, its channel slice of y and its options.
typedef struct {
  const void* weight_hwio;  // [KH, KW, Cin, Cout]
  FastasppBranchGeometry geometry;
  int64_t y_channel_offset;
  FastasppForwardOptions options;
} FastasppBranch;

// Several convs of the same x into disjoint channel slices of one y (the ASPP's branches), all with
// the same stride and output size, in one launch (several past 8 branches): the CTAs of every
// branch run together, so a small batch still fills the GPU. Each branch as
// fastaspp_atrous_conv2d_forward_fused_cuda; cudaErrorInvalidValue when any branch is invalid or
// two slices overlap, before anything is launched.
cudaError_t fastaspp_atrous_conv2d_forward_branches_cuda(
    const void* x, void* y, int64_t y_pixel_stride, int dtype, int64_t n, int64_t c_in, int64_t h,
    int64_t w, int64_t c_out, int64_t h_out, int64_t w_out, int64_t stride_h, int64_t stride_w,
    const FastasppBranch* branches, int count, const FastasppScratch* scratch, cudaStream_t stream);

// The same into a dense NHWC y [N, Ho, Wo, Cout] (y_pixel_stride = Cout, y_channel_offset = 0).
cudaError_t fastaspp_atrous_conv2d_forward_cuda(
    const void* x, const void* weight_hwio, const void* scale, const void* shift, void* y,
    int dtype, int64_t n, int64_t c_in, int64_t h, int64_t w, int64_t c_out, int64_t kh,
    int64_t kw, int64_t h_out, int64_t w_out, int64_t stride_h, int64_t stride_w,
    int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int relu,
    cudaStream_t stream);

// grad_input = transposed conv of grad with weight (the input gradient of the forward conv).
cudaError_t fastaspp_atrous_conv2d_grad_input_cuda(
    const void* grad, const void* weight_hwoi, void* grad_input, int dtype, int64_t n,
    int64_t c_in, int64_t h, int64_t w, int64_t c_out, int64_t kh, int64_t kw, int64_t h_out,
    int64_t w_out, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dil_h, int64_t dil_w, const FastasppScratch* scratch, cudaStream_t stream);

// The most branches one fastaspp_atrous_conv2d_grad_input_branches_cuda call sums.
#define FASTASPP_MAX_BRANCHES 8

// One branch of an input-gradient sum: its weight and geometry, and where its gradient's channels
// start in each grad pixel.
typedef struct {
  const void* weight_hwoi;  // [KH, KW, Cout, Cin]
  FastasppBranchGeometry geometry;
  int64_t grad_channel_offset;
} FastasppGradBranch;

// grad_input = the sum over 1..FASTASPP_MAX_BRANCHES branches of their input gradients (the
// ASPP's: every branch reads the same x), branch i's gradient being channels
// [grad_channel_offset_i, + Cout) of each pixel of grad [N, Ho, Wo, grad_pixel_stride] (the
// branches' shared buffer, no slice copies). One launch: each CTA's K loop walks every branch's
// live taps into one accumulator, so dx is written once, with no additions in between.
cudaError_t fastaspp_atrous_conv2d_grad_input_branches_cuda(
    const void* grad, int64_t grad_pixel_stride, void* grad_input, int dtype, int64_t n,
    int64_t c_in, int64_t h, int64_t w, int64_t c_out, int64_t h_out, int64_t w_out,
    int64_t stride_h, int64_t stride_w, const FastasppGradBranch* branches, int count,
    const FastasppScratch* scratch, cudaStream_t stream);

// Bytes of scratch memory fastaspp_atrous_conv2d_grad_weight_cuda needs for these shapes
// (the per-split partial sums of the deterministic two-pass reduction). It need not be
// zeroed. Returns -1 for an unknown dtype or negative sizes.
int64_t fastaspp_atrous_conv2d_grad_weight_cuda_workspace_bytes(
    int dtype, int64_t n, int64_t c_in, int64_t h, int64_t w, int64_t c_out, int64_t kh,
    int64_t kw, int64_t h_out, int64_t w_out);

// grad_weight[co, ci, kh, kw] = sum over n and live output pixels o of
//   grad[n, o, co] * x[n, o * stride + (k * dilation - padding), ci].
// Deterministic: the result does not depend on the device or on scheduling.
cudaError_t fastaspp_atrous_conv2d_grad_weight_cuda(
    const void* x, const void* grad, void* grad_weight, void* workspace,
    int64_t workspace_bytes, int dtype, int64_t n, int64_t c_in, int64_t h, int64_t w,
    int64_t c_out, int64_t kh, int64_t kw, int64_t h_out, int64_t w_out, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
    cudaStream_t stream);

#ifdef __cplusplus
}  // extern "C"
#endif
