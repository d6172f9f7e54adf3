// torch.ops.fastaspp._kept_bytes(device_type): the memory that the kept weight preparations
// (common/kept.h) hold on "cpu" or "cuda" devices, to size FASTASPP_CPU_KEPT_MB and
// FASTASPP_CUDA_KEPT_MB and to test what is kept or dropped (tests/test_kept_weights.py).
// Not used by any kernel path.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>

#include "common/kept.h"

namespace fastaspp {
namespace {

int64_t kept_bytes_of(const std::string& device_type) {
  TORCH_CHECK(device_type == "cpu" || device_type == "cuda",
              "fastaspp: _kept_bytes: device_type must be 'cpu' or 'cuda', got '", device_type, "'");
  return kept_bytes(device_type == "cpu" ? c10::DeviceType::CPU : c10::DeviceType::CUDA);
}

}  // namespace
}  // namespace fastaspp

TORCH_LIBRARY_FRAGMENT(fastaspp, m) {
  m.def("_kept_bytes(str device_type) -> int", &fastaspp::kept_bytes_of);
}
