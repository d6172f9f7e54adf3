// The FASTASPP_* run-time switches (README, "Environment variables"): read when a call needs them, so they may change
// between calls, and parsed strictly: a value that is none of a switch's choices, or not a whole
// number, is reported as invalid rather than read as the default. Pure C++ (the .cu files read
// FASTASPP_CUDA_CONV and FASTASPP_CUDA_SPLIT_K with it); the torch side turns an invalid value into
// an error that names the variable and what it accepts (checked_switch in checks.h), before any
// kernel runs.
#pragma once

#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace fastaspp {

constexpr int kSwitchUnset = -1, kSwitchInvalid = -2;

// A switch with a fixed set of values.
struct ChoiceSwitch {
  const char* name;
  const char* const* choices;
  int count;

  // The index of the variable's value among `choices`, kSwitchUnset when it is unset or empty,
  // kSwitchInvalid otherwise.
  int read() const {
    const char* value = std::getenv(name);
    if (value == nullptr || *value == '\0') return kSwitchUnset;
    for (int i = 0; i < count; ++i)
      if (std::strcmp(value, choices[i]) == 0) return i;
    return kSwitchInvalid;
  }
};

// A switch holding a whole decimal number of at least `min`.
struct IntegerSwitch {
  const char* name;
  int64_t fallback;  // when unset or empty
  int64_t min;

  // False when the value is not such a number (out untouched).
  bool read(int64_t& out) const {
    const char* value = std::getenv(name);
    if (value == nullptr || *value == '\0') {
      out = fallback;
      return true;
    }
    char* end = nullptr;
    errno = 0;
    const long long v = std::strtoll(value, &end, 10);
    if (errno != 0 || end == value || *end != '\0' || v < min) return false;
    out = static_cast<int64_t>(v);
    return true;
  }
};

inline constexpr const char* kOffOn[] = {"0", "1"};
constexpr int kSwitchOff = 0, kSwitchOn = 1;  // kOffOn's choices
inline constexpr const char* kCudaConvKernels[] = {"sm80", "wmma", "wgmma_wide", "wgmma_deep", "wgmma_tma"};

// cpu: "0" never uses torch's (oneDNN's) conv, "1" always does, in the direct loops' range the
// forward too (conv_paths.cpp).
inline constexpr ChoiceSwitch kCpuOnednn{"FASTASPP_CPU_ONEDNN", kOffOn, 2};
// cpu: "0" turns Winograd off, "1" runs it wherever it can (winograd.cpp).
inline constexpr ChoiceSwitch kCpuWinograd{"FASTASPP_CPU_WINOGRAD", kOffOn, 2};
// cuda, 16-bit: "sm80" keeps the CuTe kernels on mma.sync, "wmma" runs the WMMA kernels,
// "wgmma_wide" runs the conv on the 128 x 256 wgmma tile where it can, "wgmma_deep" on the 64 x 128
// one with 8 stages (conv_cute.cuh), "wgmma_tma" the stride-1 convs on the 128 x 256 tile fed by TMA
// (conv_tma.cuh).
inline constexpr ChoiceSwitch kCudaConv{"FASTASPP_CUDA_CONV", kCudaConvKernels, 5};
inline constexpr int kCudaConvSm80 = 0, kCudaConvWmma = 1, kCudaConvWgmmaWide = 2, kCudaConvWgmmaDeep = 3,
                     kCudaConvWgmmaTma = 4;
// cuda, 16-bit: the most parts the CuTe conv on a 64 x 128 tile splits its K loop into where its
// grid leaves SMs idle (common/k_split.h); 1, the default, never splits.
inline constexpr IntegerSwitch kCudaSplitK{"FASTASPP_CUDA_SPLIT_K", 1, 1};

}  // namespace fastaspp
