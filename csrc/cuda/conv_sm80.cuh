// The cuda backend's fp16 / bf16 conv kernel on CUTLASS's CuTe (sm80 instructions, which Hopper
// runs too): a multistage cp.async pipeline feeding mma.sync through ldmatrix, for the forward and
// grad_input of atrous_conv.cu (same ConvArgs, patch tiling, dead-tap walk and epilogue:
// conv_common.cuh).
//
// * CTA tile: BM = 64 dst pixels (one conv_tiling.h patch) x BN = 128 dst channels, BK = 32 src
//   channels per step, 4 warps as 2 x 2, each 32 x 64 of the tile through
//   SM80_16x8x16_F32{F16,BF16}_TN atoms with fp32 accumulators.
// * The K loop walks the live (tap, chunk) steps of the patch, as the other kernels do. Each
//   step's A tile (the gathered src pixels) and B tile (the tap's weight rows) travel straight
//   from global to shared memory by 16-byte cp.async, kStages - 1 steps ahead of the math; a
//   chunk that reads padding, lies past the map or past a channel count is zero-filled by the
//   copy itself (src-size 0), so no stale shared memory enters the sum.
// * Shared memory, swizzled for conflict-free ldmatrix: A is (BM, BK) K-major, B is (BN, BK)
//   N-major (the weight's [tap, k, n] rows), read with the transposing ldmatrix.
//   3 stages x (64 x 32 + 128 x 32) x 2 bytes = 36864 bytes, static. When the launch wants BN
//   statistics, the fp32 tile (64 x 132 floats, 33792 bytes) is staged over them afterwards.
// * The training projection's prologue (ConvArgs::src_scale) rewrites each thread's own A chunks
//   of a step in shared memory once they land, before the barrier that publishes them.
// * Requires both channel counts to be multiples of 8 and 16-byte aligned src and weight (one
//   chunk is wholly inside or outside a channel range); conv_sm80_usable says whether a launch
//   qualifies, and atrous_conv.cu routes the rest to the WMMA kernel.
#pragma once

#include <cstdlib>
#include <cstring>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "conv_common.cuh"

namespace fastaspp {
namespace atrous_cuda {
namespace {  // internal linkage, as kernel_common.cuh

// CUTLASS's 16-bit value types (same bits as CUDA's), which CuTe's MMA atoms are written for.
template <typename T>
struct Sm80Traits;
template <>
struct Sm80Traits<__half> {
  using Value = cutlass::half_t;
  using MmaAtom = cute::SM80_16x8x16_F32F16F16F32_TN;
};
template <>
struct Sm80Traits<__nv_bfloat16> {
  using Value = cutlass::bfloat16_t;
  using MmaAtom = cute::SM80_16x8x16_F32BF16BF16F32_TN;
};

struct Sm80Tile {
  static constexpr int kBM = kTilePixels, kBN = 128, kBK = 32, kStages = 3, kThreads = 128;
  static constexpr int kChunk = 8;  // 16-bit elements per 16-byte cp.async
};

// The kernel's shared-memory layouts and thread mappings, at namespace scope so that a host
// program checks them (tests/cuda_host/sm80_layouts.cu: bijective layouts, 16-byte chunks
// contiguous, every accumulator of the tile owned by exactly one thread).
template <typename T>
struct Sm80Config {
  static constexpr int BM = Sm80Tile::kBM, BN = Sm80Tile::kBN, BK = Sm80Tile::kBK, S = Sm80Tile::kStages;
  static_assert(BM == 64 && BK == 32, "the swizzle atoms below are sized for these");
  // (BM, BK, S), K-major, and (BN, BK, S), N-major; 8-element chunks stay contiguous under both
  // swizzles (they permute 16-byte units only).
  using LayoutA = decltype(cute::tile_to_shape(
      cute::composition(cute::Swizzle<2, 3, 3>{},
                        cute::Layout<cute::Shape<cute::_8, cute::Int<BK>>, cute::Stride<cute::Int<BK>, cute::_1>>{}),
      cute::Shape<cute::Int<BM>, cute::Int<BK>, cute::Int<S>>{}));
  using LayoutB = decltype(cute::tile_to_shape(
      cute::composition(cute::Swizzle<3, 3, 3>{},
                        cute::Layout<cute::Shape<cute::_64, cute::_8>, cute::Stride<cute::_1, cute::_64>>{}),
      cute::Shape<cute::Int<BN>, cute::Int<BK>, cute::Int<S>>{}));
  // 4 warps as 2 x 2 over m16n8k16 atoms; the 32 x 32 x 16 tile lets one ldmatrix.x4 feed a warp.
  using TiledMma = decltype(cute::make_tiled_mma(typename Sm80Traits<T>::MmaAtom{},
                                                 cute::Layout<cute::Shape<cute::_2, cute::_2, cute::_1>>{},
                                                 cute::Tile<cute::_32, cute::_32, cute::_16>{}));
};

template <typename T, bool kDgrad>
__global__ void __launch_bounds__(Sm80Tile::kThreads) conv_sm80_kernel(ConvArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace cute;
  using V = typename Sm80Traits<T>::Value;
  using Config = Sm80Config<T>;
  constexpr int BM = Config::BM, BN = Config::BN, BK = Config::BK, S = Config::S;
  constexpr int NT = Sm80Tile::kThreads, CH = Sm80Tile::kChunk;
  using LayoutA = typename Config::LayoutA;
  using LayoutB = typename Config::LayoutB;
  // One buffer: the operand stages, then (for the BN statistics) the fp32 tile staged over them.
  constexpr int kABytes = cosize_v<LayoutA> * int(sizeof(V)), kBBytes = cosize_v<LayoutB> * int(sizeof(V));
  constexpr int LDC = BN + 4, kCBytes = BM * LDC * int(sizeof(float));
  static_assert(kABytes % 128 == 0, "B stays 128-byte aligned");
  __shared__ __align__(128) unsigned char smem[kABytes + kBBytes > kCBytes ? kABytes + kBBytes : kCBytes];
  Tensor sA = make_tensor(make_smem_ptr(reinterpret_cast<V*>(smem)), LayoutA{});
  Tensor sB = make_tensor(make_smem_ptr(reinterpret_cast<V*>(smem + kABytes)), LayoutB{});

  const Patch t = cta_patch(a);
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int64_t taps = a.kh * a.kw;
  const T* src = static_cast<const T*>(a.src);
  const T* wt = static_cast<const T*>(a.wt);
  const int tid = static_cast<int>(threadIdx.x);

  // One step's tiles into stage `stage`, 8 channels a chunk: A chunk (m, kc) holds src channels
  // k0 + kc .. k0 + kc + 7 of the pixel that dst pixel m reads through the step's tap; B chunk
  // (k, nc) holds weight row k0 + k, dst channels n0 + nc .. n0 + nc + 7.
  auto load = [&](const Step& st, int stage) {
    const int64_t kh = st.tap / a.kw, kw = st.tap % a.kw;
    constexpr int kAChunks = BM * (BK / CH), kBChunks = BK * (BN / CH);
    static_assert(kAChunks % NT == 0 && kBChunks % NT == 0, "whole chunks per thread");
    CUTE_UNROLL
    for (int i = 0; i < kAChunks / NT; ++i) {
      const int s = tid + i * NT, m = s / (BK / CH), kc = (s % (BK / CH)) * CH;
      const T* row = gather_row<kDgrad, T>(a, t, kh, kw, m, src);
      const bool live = row != nullptr && st.k0 + kc < a.kc;
      SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(
          *reinterpret_cast<const uint128_t*>(live ? row + st.k0 + kc : src),
          *reinterpret_cast<uint128_t*>(&sA(m, kc, stage)), live);
    }
    CUTE_UNROLL
    for (int i = 0; i < kBChunks / NT; ++i) {
      const int s = tid + i * NT, k = s / (BN / CH), nc = (s % (BN / CH)) * CH;
      const bool live = st.k0 + k < a.kc && n0 + nc < a.nc;
      const T* p = wt + (st.tap * a.kc + st.k0 + k) * a.nc + n0 + nc;
      SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<uint128_t>::copy(*reinterpret_cast<const uint128_t*>(live ? p : wt),
                                                       *reinterpret_cast<uint128_t*>(&sB(nc, k, stage)), live);
    }
  };

  typename Config::TiledMma mma;
  ThrMMA thr_mma = mma.get_slice(tid);
  Tensor acc = partition_fragment_C(mma, Shape<Int<BM>, Int<BN>>{});  // fp32
  clear(acc);
  Tensor tCrA = thr_mma.partition_fragment_A(sA(_, _, 0));  // (MMA, MMA_M, MMA_K)
  Tensor tCrB = thr_mma.partition_fragment_B(sB(_, _, 0));  // (MMA, MMA_N, MMA_K)
  auto s2r_a = make_tiled_copy_A(Copy_Atom<SM75_U32x4_LDSM_N, V>{}, mma);
  auto s2r_b = make_tiled_copy_B(Copy_Atom<SM75_U16x8_LDSM_T, V>{}, mma);
  ThrCopy s2r_thr_a = s2r_a.get_slice(tid);
  ThrCopy s2r_thr_b = s2r_b.get_slice(tid);
  Tensor tXsA = s2r_thr_a.partition_S(sA);  // (CPY, MMA_M, MMA_K, S)
  Tensor tXrA = s2r_thr_a.retile_D(tCrA);
  Tensor tXsB = s2r_thr_b.partition_S(sB);  // (CPY, MMA_N, MMA_K, S)
  Tensor tXrB = s2r_thr_b.retile_D(tCrB);

  // Every thread walks the same (tap, chunk) sequence: the barriers below are uniform.
  int64_t steps = 0;
  if (a.kc > 0) {
    for (int64_t tap = next_live_tap<kDgrad>(a, t, 0); tap < taps; tap = next_live_tap<kDgrad>(a, t, tap + 1))
      steps += ceil_div(a.kc, int64_t(BK));
  }
  Step next = first_step<kDgrad>(a, t);
  CUTE_UNROLL
  for (int stage = 0; stage < S - 1; ++stage) {
    if (next.tap < taps) {
      load(next, stage);
      next = next_step<kDgrad, BK>(a, t, next);
    }
    cp_async_fence();  // one group per stage, empty or not: the wait below counts groups
  }
  for (int64_t it = 0; it < steps; ++it) {
    cp_async_wait<S - 2>();  // step it has landed (this thread's copies)...
    if constexpr (!kDgrad) {
      // The projection's prologue on this thread's own A chunks of the step, in place. A 1x1
      // conv without padding has one live tap, so step it reads src channels it * BK onwards.
      if (a.src_scale != nullptr) {
        CUTE_UNROLL
        for (int i = 0; i < BM * (BK / CH) / NT; ++i) {
          const int s = tid + i * NT, m = s / (BK / CH), kc = (s % (BK / CH)) * CH;
          const int64_t k = it * BK + kc;
          if (k < a.kc && gather_row<kDgrad, T>(a, t, 0, 0, m, src) != nullptr)
            prologue_chunk<T>(a, k, &sA(m, kc, static_cast<int>(it % S)));
        }
      }
    }
    __syncthreads();  // ...everyone's, and everyone is done reading stage (it - 1) % S
    if (next.tap < taps) {
      load(next, static_cast<int>((it + S - 1) % S));
      next = next_step<kDgrad, BK>(a, t, next);
    }
    cp_async_fence();
    const int stage = static_cast<int>(it % S);
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tCrA); ++kb) {
      copy(s2r_a, tXsA(_, _, kb, stage), tXrA(_, _, kb));
      copy(s2r_b, tXsB(_, _, kb, stage), tXrB(_, _, kb));
      gemm(mma, tCrA(_, _, kb), tCrB(_, _, kb), acc);
    }
  }
  cp_async_wait<0>();

  // Each accumulator's (m, n) in the tile comes from an identity tensor partitioned like them.
  Tensor coord = thr_mma.partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
  if constexpr (!kDgrad) {
    if (a.stats != nullptr) {  // uniform: stage the tile for the per-channel statistics
      float* cs = reinterpret_cast<float*>(smem);
      __syncthreads();  // every warp is done reading the last stage
      CUTE_UNROLL
      for (int i = 0; i < size(acc); ++i) cs[get<0>(coord(i)) * LDC + get<1>(coord(i))] = acc(i);
      __syncthreads();
      staged_epilogue<T, kDgrad, BN, NT>(a, t, n0, cs, LDC);
      return;
    }
  }
  // Otherwise straight from registers.
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) {
    store_output<T, kDgrad, float>(a, t, get<0>(coord(i)), n0 + get<1>(coord(i)), acc(i));
  }
#else
  __trap();  // conv_sm80_usable never selects this kernel for an image below sm80
#endif
}

// Whether a launch can run conv_sm80_kernel: channel counts in whole 16-byte chunks, aligned
// operands, a kernel image built for sm80 or later, and FASTASPP_CUDA_CONV not set to `wmma`
// (the previous kernel, kept for the launches this one cannot take).
template <typename T, bool kDgrad>
bool conv_sm80_usable(const ConvArgs& a) {
  const char* choice = std::getenv("FASTASPP_CUDA_CONV");
  if (choice != nullptr && std::strcmp(choice, "wmma") == 0) return false;
  if (a.kc % Sm80Tile::kChunk != 0 || a.nc % Sm80Tile::kChunk != 0 || !aligned16(a.src) || !aligned16(a.wt))
    return false;
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, reinterpret_cast<const void*>(conv_sm80_kernel<T, kDgrad>)) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky; the other kernel's launch reports any real problem
    return false;
  }
  return attr.ptxVersion >= 80;
}

template <typename T, bool kDgrad>
cudaError_t launch_conv_sm80(const ConvArgs& a, cudaStream_t stream) {
  const int64_t grid_x = a.n * a.tiling.tiles_per_img, grid_y = div_up(a.nc, Sm80Tile::kBN);
  if (grid_x > 0x7fffffff || grid_y > 65535) return cudaErrorInvalidValue;
  conv_sm80_kernel<T, kDgrad>
      <<<dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y)), Sm80Tile::kThreads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace
}  // namespace atrous_cuda
}  // namespace fastaspp
