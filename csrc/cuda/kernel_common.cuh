// What the cuda backend's kernel files share (atrous_conv.cu: forward and grad_input;
// grad_weight.cu): element traits, the shared-memory tile loader and the host-side helpers.
// Pure CUDA (no torch headers), included only by .cu files. Conventions of every kernel:
//
// Vector loads (16 bytes) are used when both channel counts are multiples of the vector width
// and the base pointers are 16-byte aligned, so a vector is either wholly inside or wholly
// outside the channel range; otherwise the same kernels load one element at a time.
// Shared memory is static and < 48 KB per kernel (sizes noted beside each kernel).
// WMMA pointers: every fragment pointer is 32-byte aligned and every ldm is a multiple of 8
// elements (16-bit types) or 4 (the fp32 staging tile); checked by static_asserts in the kernels.
// 64-bit indexing for every global offset; 32-bit only inside a tile.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <stdint.h>

#include <cstring>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <type_traits>
#include <utility>

#include "../common/conv_tiling.h"
#include "../common/tap_geometry.h"
#include "atrous_conv.h"
namespace fastaspp {
namespace atrous_cuda {
namespace {  // internal linkage: nothing here is visible to other translation units

#if defined(__CUDA_ARCH__)
#define FASTASPP_CUDA_ARCH __CUDA_ARCH__
#else
#define FASTASPP_CUDA_ARCH 0
#endif

// ---------------------------------------------------------------------------------------
// Element traits: accumulator type and explicit conversions (the build may define
// __CUDA_NO_HALF_CONVERSIONS__ / __CUDA_NO_BFLOAT16_CONVERSIONS__).

// Whether p may be read or written 16 bytes at a time (null counts: nothing is read through it).
__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using Acc = float;
  static __host__ __device__ __forceinline__ float to_acc(float v) { return v; }
  static __host__ __device__ __forceinline__ float from_acc(float v) { return v; }
};

template <>
struct Elem<double> {
  using Acc = double;
  static __host__ __device__ __forceinline__ double to_acc(double v) { return v; }
  static __host__ __device__ __forceinline__ double from_acc(double v) { return v; }
};

template <>
struct Elem<__half> {
  using Acc = float;
  static __host__ __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
  static __host__ __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
};

template <>
struct Elem<__nv_bfloat16> {
  using Acc = float;
  static __host__ __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __host__ __device__ __forceinline__ __nv_bfloat16 from_acc(float v) {
    return __float2bfloat16_rn(v);
  }
};

// Tensor-core support for T on the architecture being compiled (0 in the host pass).
template <typename T>
__host__ __device__ constexpr bool tc_supported_here() {
  return std::is_same<T, __half>::value ? FASTASPP_CUDA_ARCH >= 700
                                        : (std::is_same<T, __nv_bfloat16>::value &&
                                           FASTASPP_CUDA_ARCH >= 800);
}

// Raw bit container of V elements, so loaders move bits without touching the value types.
template <int kBytes>
struct RawBits;
template <>
struct RawBits<2> {
  using type = unsigned short;
};
template <>
struct RawBits<4> {
  using type = unsigned int;
};
template <>
struct RawBits<8> {
  using type = unsigned long long;
};
template <>
struct RawBits<16> {
  using type = uint4;
};

// ---------------------------------------------------------------------------------------
// Tile loader: ROWS x COLS elements, each row a contiguous run of COLS elements starting at
// row_ptr(row)[col0] (row_ptr returns nullptr for rows that read zeros); columns at or past
// col_limit read zeros. Global -> registers (load) and registers -> shared (store) are split
// so the next step's loads overlap the current step's math.
// Requires blockDim.x == NT and, when V > 1, col0 and col_limit multiples of V.
template <typename T, int ROWS, int COLS, int V, int NT>
struct TileLoader {
  using Raw = typename RawBits<static_cast<int>(sizeof(T)) * V>::type;
  static_assert(COLS % V == 0, "tile width must be a multiple of the vector width");
  static constexpr int kVecPerRow = COLS / V;
  static constexpr int kSlots = ROWS * kVecPerRow;
  static constexpr int kPerThread = (kSlots + NT - 1) / NT;
  // Vector loads: slot tid + i*NT, so a warp reads whole rows (coalesced). Scalar loads
  // (odd channel counts): a thread takes kPerThread consecutive elements of ONE row, so it
  // evaluates row_ptr once instead of kPerThread times (the gather math dominates there).
  static constexpr bool kOneRow =
      V == 1 && kSlots % NT == 0 && kVecPerRow % kPerThread == 0;
  static_assert(kPerThread <= 32, "one bit of `loaded` per register slot");

  Raw regs[kPerThread];
  uint32_t loaded;  // bit i: regs[i] was read from memory (else it is a zero fill)
  int64_t col0;     // the last load's first column, for apply()

  template <typename RowPtr>
  __device__ __forceinline__ void load(RowPtr&& row_ptr, int64_t first_col, int64_t col_limit) {
    col0 = first_col;
    loaded = 0;
    if constexpr (kOneRow) {
      const T* p = row_ptr(static_cast<int>(threadIdx.x) * kPerThread / kVecPerRow);
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const int64_t col = slot_col(i);
        Raw v = Raw();
        if (p != nullptr && col < col_limit) {
          v = *reinterpret_cast<const Raw*>(p + col);
          loaded |= 1u << i;
        }
        regs[i] = v;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const int s = static_cast<int>(threadIdx.x) + i * NT;
        Raw v = Raw();
        if (kSlots % NT == 0 || s < kSlots) {
          const int64_t col = slot_col(i);
          const T* p = row_ptr(s / kVecPerRow);
          if (p != nullptr && col < col_limit) {
            v = *reinterpret_cast<const Raw*>(p + col);
            loaded |= 1u << i;
          }
        }
        regs[i] = v;
      }
    }
  }

  // Column of register slot i's first element in the last load.
  __device__ __forceinline__ int64_t slot_col(int i) const {
    if constexpr (kOneRow) return col0 + (static_cast<int>(threadIdx.x) * kPerThread) % kVecPerRow + i;
    return col0 + ((static_cast<int>(threadIdx.x) + i * NT) % kVecPerRow) * V;
  }

  // v = f(col, v) for each element the last load read from memory (zero fills stay zero): a
  // prologue applied in registers between load and store.
  template <typename F>
  __device__ __forceinline__ void apply(F&& f) {
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      if (!((loaded >> i) & 1u)) continue;
      T v[V];
      memcpy(v, &regs[i], sizeof(Raw));
      const int64_t col = slot_col(i);
#pragma unroll
      for (int e = 0; e < V; ++e) v[e] = f(col + e, v[e]);
      memcpy(&regs[i], v, sizeof(Raw));
    }
  }

  __device__ __forceinline__ void store(T* smem, int ld) const {
    if constexpr (kOneRow) {
      const int s0 = static_cast<int>(threadIdx.x) * kPerThread;
      Raw* dst = reinterpret_cast<Raw*>(smem + (s0 / kVecPerRow) * ld + s0 % kVecPerRow);
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) dst[i] = regs[i];
    } else {
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const int s = static_cast<int>(threadIdx.x) + i * NT;
        if (kSlots % NT == 0 || s < kSlots) {
          *reinterpret_cast<Raw*>(smem + (s / kVecPerRow) * ld + (s % kVecPerRow) * V) =
              regs[i];
        }
      }
    }
  }
};

// ---------------------------------------------------------------------------------------
// Host side

int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
constexpr bool is_16bit() {
  return std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;
}

// The barrier of the threads that run an epilogue together: the whole CTA, or the first kThreads
// threads (conv_tma.cuh's consumer warpgroups, whose producer warpgroup has left) on named barrier
// kId (0 is __syncthreads's).
struct CtaBarrier {
  __device__ __forceinline__ void operator()() const { __syncthreads(); }
};
template <int kThreads, int kId>
struct NamedBarrier {
  static_assert(kId > 0 && kId < 16 && kThreads % 32 == 0, "a named barrier of whole warps");
  __device__ __forceinline__ void operator()() const {
    asm volatile("bar.sync %0, %1;\n" ::"n"(kId), "n"(kThreads) : "memory");
  }
};

// What the image the driver picked for `kernel` on the current device holds: its PTX version (the
// body was compiled for __CUDA_ARCH__ = ptx_version * 10), the body's static shared memory (0 for a
// body that is only a trap) and its registers a thread, or zeros when it cannot say. Asking the
// kernel (not the device) also covers builds whose arch list lacks the device's own arch. Looked up
// once per (kernel, device): launches pay a lock and a map lookup, not a driver call.
struct KernelImage {
  int ptx_version;
  size_t static_smem_bytes;
  int registers;
};

KernelImage kernel_image(const void* kernel) {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky; the launch reports any real problem
    return KernelImage{0, 0, 0};
  }
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, KernelImage> images;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(kernel, device);
  const auto found = images.find(key);
  if (found != images.end()) return found->second;
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky; the fallback kernel's launch reports any real problem
    return KernelImage{0, 0, 0};  // not remembered: the next launch asks again
  }
  const KernelImage image{attr.ptxVersion, attr.sharedSizeBytes, attr.numRegs};
  images.emplace(key, image);
  return image;
}

// The current device's SM count (1 when it cannot be read: the launch reports any real problem),
// asked of the driver once per device.
int sm_count() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return 1;
  }
  static std::mutex mutex;
  static std::map<int, int> counts;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = counts.find(device);
  if (found != counts.end()) return found->second;
  int sms = 0;
  if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1) {
    (void)cudaGetLastError();
    return 1;  // not remembered: the next launch asks again
  }
  counts.emplace(device, sms);
  return sms;
}

// Lets `kernel` launch with `bytes` of dynamic shared memory on the current device (past the 48 KB
// that needs no opt-in): the driver call once per (kernel, device, size), then a lock and a lookup.
cudaError_t allow_dynamic_smem(const void* kernel, int bytes) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static std::mutex mutex;
  static std::set<std::tuple<const void*, int, int>> allowed;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(kernel, device, bytes);
  if (allowed.count(key) != 0) return cudaSuccess;
  err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess) allowed.insert(key);
  return err;
}

// Whether a tensor-core kernel for T has its real body on the current device.
template <typename T>
bool tc_usable(const void* kernel) {
  return kernel_image(kernel).ptx_version >= (std::is_same<T, __half>::value ? 70 : 80);
}

bool valid_geometry(int64_t n, int64_t c_in, int64_t h, int64_t w, int64_t c_out, int64_t kh,
                    int64_t kw, int64_t h_out, int64_t w_out, int64_t stride_h, int64_t stride_w,
                    int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w) {
  if (n < 0 || c_in < 0 || h < 0 || w < 0 || c_out < 0 || kh < 1 || kw < 1) return false;
  const ConvGeometry g{{stride_h, stride_w}, {pad_h, pad_w}, {dil_h, dil_w}};
  return g.valid() && h_out >= 0 && w_out >= 0 && h_out == g.out_size(0, h, kh) &&
         w_out == g.out_size(1, w, kw);
}


// launch(T()) with T the element type of dtype (one of the FASTASPP_DTYPE_* codes), its
// cudaError_t returned; cudaErrorInvalidValue for an unknown dtype. The launchers' one dtype switch.
template <typename Launch>
cudaError_t with_element_type(int dtype, Launch&& launch) {
  switch (dtype) {
    case FASTASPP_DTYPE_FLOAT32:
      return launch(float());
    case FASTASPP_DTYPE_FLOAT64:
      return launch(double());
    case FASTASPP_DTYPE_FLOAT16:
      return launch(__half());
    case FASTASPP_DTYPE_BFLOAT16:
      return launch(__nv_bfloat16());
    default:
      return cudaErrorInvalidValue;
  }
}

// Bytes of the accumulator of dtype (fp64 for fp64, fp32 for the rest), or -1 for an unknown dtype.
int64_t acc_bytes(int dtype) {
  switch (dtype) {
    case FASTASPP_DTYPE_FLOAT64:
      return 8;
    case FASTASPP_DTYPE_FLOAT32:
    case FASTASPP_DTYPE_FLOAT16:
    case FASTASPP_DTYPE_BFLOAT16:
      return 4;
    default:
      return -1;
  }
}

}  // namespace
}  // namespace atrous_cuda
}  // namespace fastaspp
