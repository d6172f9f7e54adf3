// Host-side checks of the cuda backend's C launchers' argument validation (csrc/cuda/atrous_conv.cu,
// atrous_conv.h), run by tests/test_cuda_host_programs.py without a GPU: every call below returns
// before touching the device, either rejecting its arguments or having nothing to compute. A check
// that failed to reject would go on to launch, and fail differently here (no device). Prints one
// line per failed check and "ok" when every check passes.
#include <cstdio>

#include "../../csrc/cuda/atrous_conv.cu"

static int failures = 0;

static void expect(cudaError_t got, cudaError_t want, const char* what) {
  if (got != want && failures++ < 20)
    std::printf("FAILED %s: got %s, want %s\n", what, cudaGetErrorName(got), cudaGetErrorName(want));
}

// Distinct non-null stand-ins: the calls below never dereference them.
static char buffer[64];
static void* const kX = buffer;
static void* const kW = buffer + 16;
static void* const kY = buffer + 32;

// A 3x3 conv, 16 -> 8 channels on 9 x 9, rate 2 ("same" size), into channels [off, off + 8) of a
// y of `stride` channels per pixel; n = 0 leaves nothing to compute.
static cudaError_t forward(int64_t n, int64_t off, int64_t stride, const FastasppForwardOptions* options,
                           int64_t k = 3, int64_t pad = 2) {
  return fastaspp_atrous_conv2d_forward_fused_cuda(kX, kW, kY, stride, off, FASTASPP_DTYPE_BFLOAT16, n, 16, 9, 9, 8,
                                                   k, k, 9, 9, 1, 1, pad, pad, 2, 2, options, nullptr, nullptr);
}

// An ASPP branch's geometry: the 1x1 branch for rate 0, else a 3x3 at padding = dilation = rate.
static FastasppBranchGeometry aspp_geometry(int64_t rate) {
  return rate == 0 ? FastasppBranchGeometry{1, 1, 0, 0, 1, 1} : FastasppBranchGeometry{3, 3, rate, rate, rate, rate};
}

static FastasppBranch branch(int64_t rate, int64_t off) {
  return FastasppBranch{kW, aspp_geometry(rate), off, FastasppForwardOptions{}};
}

static FastasppGradBranch grad_branch(int64_t rate, int64_t off) {
  return FastasppGradBranch{kW, aspp_geometry(rate), off};
}

int main() {
  const FastasppForwardOptions plain{};
  expect(forward(0, 0, 8, &plain), cudaSuccess, "empty forward");
  expect(forward(2, 0, 8, nullptr), cudaErrorInvalidValue, "no options");
  expect(forward(2, 1, 8, &plain), cudaErrorInvalidValue, "slice past the pixel's channels");
  expect(forward(2, -1, 16, &plain), cudaErrorInvalidValue, "negative channel offset");
  expect(forward(2, 0, 8, &plain, 3, 1), cudaErrorInvalidValue, "padding that does not give the output size");
  FastasppForwardOptions partial{};
  partial.x_centre = partial.x_scale = kX;  // no x_shift
  expect(forward(2, 0, 8, &partial, 1, 0), cudaErrorInvalidValue, "prologue missing a pointer");
  FastasppForwardOptions prologue = partial;
  prologue.x_shift = kX;
  expect(forward(2, 0, 8, &prologue), cudaErrorInvalidValue, "prologue on a 3x3 conv");
  expect(forward(0, 0, 8, &prologue, 1, 0), cudaSuccess, "empty 1x1 with a prologue");
  expect(fastaspp_atrous_conv2d_forward_fused_cuda(kX, kW, kY, 8, 0, 99, 2, 16, 9, 9, 8, 3, 3, 9, 9, 1, 1, 2, 2, 2,
                                                   2, &plain, nullptr, nullptr),
         cudaErrorInvalidValue, "unknown dtype");
  expect(fastaspp_atrous_conv2d_forward_strided_cuda(kX, kW, nullptr, kW, kY, 8, 0, FASTASPP_DTYPE_BFLOAT16, 2, 16,
                                                     9, 9, 8, 3, 3, 9, 9, 1, 1, 2, 2, 2, 2, 1, nullptr),
         cudaErrorInvalidValue, "strided forward without scale");

  // Branches: 4 of 8 channels into a 32-channel y.
  FastasppBranch branches[4] = {branch(0, 0), branch(2, 8), branch(4, 16), branch(6, 24)};
  auto run = [&](int64_t n, int count) {
    return fastaspp_atrous_conv2d_forward_branches_cuda(kX, kY, 32, FASTASPP_DTYPE_BFLOAT16, n, 16, 9, 9, 8, 9, 9, 1,
                                                        1, branches, count, nullptr, nullptr);
  };
  expect(run(0, 4), cudaSuccess, "empty branches");
  expect(run(2, 0), cudaSuccess, "no branches");
  expect(run(2, -1), cudaErrorInvalidValue, "negative branch count");
  branches[2].y_channel_offset = 12;  // overlaps branch 1's [8, 16)
  expect(run(2, 4), cudaErrorInvalidValue, "overlapping slices");
  branches[2].y_channel_offset = 16;
  branches[3].geometry.pad_h = 5;  // wrong output size for rate 6
  expect(run(0, 4), cudaErrorInvalidValue, "an invalid branch after an empty output");
  branches[3].geometry.pad_h = 6;
  branches[3].y_channel_offset = 28;  // [28, 36) past the 32 channels
  expect(run(2, 4), cudaErrorInvalidValue, "a slice past y's channels");

  // Input gradient of branches: 16 input channels, grad of 4 x 8 channels per pixel.
  FastasppGradBranch grads[FASTASPP_MAX_BRANCHES + 1];
  for (int i = 0; i <= FASTASPP_MAX_BRANCHES; ++i) grads[i] = grad_branch(i == 0 ? 0 : 2 * i, 8 * (i % 4));
  auto run_grad = [&](int64_t n, int count) {
    return fastaspp_atrous_conv2d_grad_input_branches_cuda(kY, 32, kX, FASTASPP_DTYPE_BFLOAT16, n, 16, 9, 9, 8, 9, 9,
                                                           1, 1, grads, count, nullptr, nullptr);
  };
  expect(run_grad(0, 4), cudaSuccess, "empty input gradient");
  expect(run_grad(2, 0), cudaErrorInvalidValue, "no gradient branches");
  expect(run_grad(2, FASTASPP_MAX_BRANCHES + 1), cudaErrorInvalidValue, "too many gradient branches");
  grads[1].grad_channel_offset = 28;  // [28, 36) past the 32 channels
  expect(run_grad(2, 4), cudaErrorInvalidValue, "a gradient slice past grad's channels");
  grads[1].grad_channel_offset = 8;
  grads[2].geometry.dil_w = 3;  // wrong output size for rate 4
  expect(run_grad(0, 4), cudaErrorInvalidValue, "an invalid gradient branch after an empty dx");

  expect(fastaspp_conv_patch_count(-1, 9, 9) == -1 ? cudaSuccess : cudaErrorUnknown, cudaSuccess,
         "patch count of negative sizes");
  const int64_t patches = fastaspp_conv_patch_count(2, 33, 33);
  expect(patches == 2 * fastaspp::patch_tiling(33, 33).tiles_per_img ? cudaSuccess : cudaErrorUnknown, cudaSuccess,
         "patch count: every image's patches");
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
