// Helpers shared by the torch bindings of the CUDA launchers (atrous_conv_cuda.cpp,
// aspp_cuda.cpp, aspp_project_cuda.cpp): dtype codes, argument checks with messages naming the
// argument, the kept weight re-layouts, the current stream, the launchers' scratch memory, the
// launcher error check and the merge of the epilogues' BN statistics.
//
// Host-only (torch headers); never included from a .cu file. Everything is inline in
// fastaspp::cuda_binding so that several translation units can include it.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>

#include <exception>
#include <string>
#include <tuple>
#include <vector>

#include <cuda_runtime_api.h>

#include "../common/checks.h"
#include "../common/kept.h"
#include "atrous_conv.h"

namespace fastaspp {
namespace cuda_binding {

// The launchers' dtype code of t, or -1 when no launcher takes it.
inline int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return FASTASPP_DTYPE_FLOAT32;
    case at::kDouble:
      return FASTASPP_DTYPE_FLOAT64;
    case at::kHalf:
      return FASTASPP_DTYPE_FLOAT16;
    case at::kBFloat16:
      return FASTASPP_DTYPE_BFLOAT16;
    default:
      return -1;
  }
}

// t is defined, on a CUDA device, `dim`-D and of a dtype the launchers take.
inline void check_tensor(const char* op, const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must be ", dim, "-D, got ", t.dim(),
              "-D with shape ", t.sizes());
  TORCH_CHECK(dtype_code(t.scalar_type()) >= 0, op, ": ", name,
              " must be float32, float64, float16 or bfloat16, got ", t.scalar_type());
}

// t is on the device and has the dtype of ref.
inline void check_same(const char* op, const at::Tensor& ref, const char* ref_name,
                       const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " is on ", t.device(), " but ",
              ref_name, " is on ", ref.device());
  TORCH_CHECK(t.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ",
              t.scalar_type(), " but ", ref_name, " has dtype ", ref.scalar_type());
}

// A weight re-layout kept per weight version for keepable weights (common/kept.h: an eval call
// costs no re-layout kernel), and per stream: the copy is made by a kernel queued on the current
// stream and freed into that stream's pool, so only launches on that stream may read it without
// further ordering (another stream gets its own copy).
template <typename Make>
at::Tensor kept_layout(const at::Tensor& weight, KeptKind kind, Make&& make) {
  const int64_t stream = c10::cuda::getCurrentCUDAStream(weight.device().index()).id();
  return kept({weight}, {kind, static_cast<int64_t>(weight.scalar_type()), stream}, make);
}

// nn.Conv2d weight [Cout, Cin, KH, KW] -> the forward launcher's [KH, KW, Cin, Cout].
inline at::Tensor weight_hwio(const at::Tensor& weight) {
  return kept_layout(weight, kCudaForwardLayout, [&] { return weight.permute({2, 3, 1, 0}).contiguous(); });
}

// The same for the grad_input launcher: [KH, KW, Cout, Cin].
inline at::Tensor weight_hwoi(const at::Tensor& weight) {
  return kept_layout(weight, kCudaGradInputLayout, [&] { return weight.permute({2, 3, 0, 1}).contiguous(); });
}

// FASTASPP_CUDA_CONV and FASTASPP_CUDA_SPLIT_K, which the launchers read (common/switches.h), hold
// valid values: each binding checks them before it launches anything, so a misspelt value is an
// error, not the default.
inline void check_conv_switch() {
  checked_switch(kCudaConv);
  checked_switch(kCudaSplitK);
}

// The current torch stream of t's device (launchers are asynchronous on it).
inline cudaStream_t current_stream(const at::Tensor& t) {
  return c10::cuda::getCurrentCUDAStream(t.device().index()).stream();
}

// Turns a launcher's status into a torch error naming the kernel, with the launcher's own detail
// where it has one.
inline void check_launch(cudaError_t err, const char* kernel) {
  if (err == cudaSuccess) return;
  const std::string detail = fastaspp_cuda_take_failure_detail();
  TORCH_CHECK(false, "fastaspp CUDA kernel ", kernel, " failed: ", cudaGetErrorString(err),
              detail.empty() ? "" : " (", detail, detail.empty() ? "" : ")");
}

// The FastasppScratch a launcher asks for workspace through (a split K loop's partial tiles): byte
// tensors from torch's caching allocator on the device of `like`, held until this object goes, after
// the launch is queued (the allocator orders any reuse of the memory after the work queued on the
// current stream). An allocation error (out of memory) is kept and rethrown by check_launch below,
// instead of crossing the C launcher.
class Scratch {
 public:
  explicit Scratch(const at::Tensor& like) : options_(like.options().dtype(at::kByte)) {}
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  const FastasppScratch* get() {
    scratch_ = FastasppScratch{&Scratch::allocate, this};
    return &scratch_;
  }
  void rethrow() const {
    if (error_) std::rethrow_exception(error_);
  }

 private:
  static void* allocate(void* self, int64_t bytes) {
    auto* s = static_cast<Scratch*>(self);
    try {
      s->buffers_.push_back(at::empty({bytes}, s->options_));
      return s->buffers_.back().data_ptr();
    } catch (...) {
      s->error_ = std::current_exception();
      return nullptr;
    }
  }
  at::TensorOptions options_;
  std::vector<at::Tensor> buffers_;
  std::exception_ptr error_;
  FastasppScratch scratch_{};
};

// check_launch for a launch that had `scratch`: its allocation error first, if it had one.
inline void check_launch(cudaError_t err, const char* kernel, const Scratch& scratch) {
  scratch.rethrow();
  check_launch(err, kernel);
}

// (mean, biased variance) per channel from the conv epilogues' per-patch planes [3, patches, C]
// (count, sum, M2 about the patch mean; FastasppForwardOptions::stats): Chan et al.'s combination,
// M2 = sum of the patch M2s + sum of count * (patch mean - mean)^2, as torch reductions over the
// patch axis (a fixed order: reproducible). The triton backend's merge_stats is the same formula.
inline std::tuple<at::Tensor, at::Tensor> merge_patch_stats(const at::Tensor& planes) {
  const at::Tensor count = planes[0], total = planes[1], m2 = planes[2];
  // Counted in fp64: a channel's pixel count passes 2^24 (fp32's exact integers) at large batches.
  const at::Tensor pixels = count.sum(0, /*keepdim=*/false, at::kDouble).clamp_min(1).to(planes.scalar_type());
  const at::Tensor mean = total.sum(0) / pixels;
  const at::Tensor spread = (count * (total / count.clamp_min(1) - mean).square()).sum(0);
  return {mean, (m2.sum(0) + spread) / pixels};
}

}  // namespace cuda_binding
}  // namespace fastaspp
