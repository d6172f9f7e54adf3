// What the cuda backend's CuTe kernels share (conv_cute.cuh: forward and input gradient, on this
// path or on sm90_common.cuh's wgmma; grad_weight_cute.cuh: weight gradient, likewise): the 16-bit value
// types and MMA atoms, the CTA's warp layout, the swizzled shared-memory layouts, the multistage
// cp.async main loop, and the launch rule. sm80 instructions (cp.async, ldmatrix, mma.sync), which
// Hopper runs too. Pure CUDA with CuTe headers, included only by .cu files.
//
// * 4 warps as 2 x 2 over SM80_16x8x16_F32{F16,BF16}_TN atoms with fp32 accumulators; the
//   32 x 32 x 16 MMA tile lets one ldmatrix.x4 feed a warp.
// * K steps of BK = 32 move from global to shared memory by 16-byte cp.async, PipelineShape::kAhead
//   steps ahead of the math; a chunk that reads padding or lies past a tensor is zero-filled by the copy
//   itself (src-size 0), so no stale shared memory enters the sum.
// * Shared memory is swizzled for conflict-free ldmatrix: K-major operands (rows of 32 K values)
//   are read by ldmatrix, MN-major ones (runs of 64 M or N values per K) by the transposing
//   ldmatrix. 8-element chunks stay contiguous and 16-byte aligned under both swizzles
//   (tests/cuda_host/sm80_layouts.cu checks it).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "../common/switches.h"
#include "kernel_common.cuh"

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
  static constexpr int kBK = 32, kThreads = 128;
  // Both CuTe kernels' __launch_bounds__ occupancy: 3 CTAs per SM (36 KB of shared memory each on
  // the mma.sync path, so A100 and H100 hold 3, and sm_86 / sm_89 parts, with 100 KB, hold 2
  // whatever the registers; 48 KB on wgmma, 3 on H100). It caps registers at 168, which they fit
  // without spilling (.ci/check_ptxas.py checks every CI build).
  static constexpr int kCtasPerSm = 3;
  static constexpr int kChunk = 8;  // 16-bit elements per 16-byte cp.async
};

// The stage arithmetic of cp_async_pipeline (host-callable: tests/cuda_host/sm80_layouts.cu runs
// it): kStages shared-memory stages; when a step's copies are issued, the MMAs of up to
// kMmasInFlight earlier steps may still be reading their stages (0 for mma.sync, whose operands are
// in registers once a step returns; 1 for wgmma waited on one step late). So the copies run
// kAhead = kStages - 1 - kMmasInFlight steps ahead: step it reads stage it % kStages, and the
// copy issued during it fills (it + kAhead) % kStages, the stage read at step
// it - 1 - kMmasInFlight, whose MMAs every thread has waited for before the barrier of step it.
template <int kStages_, int kMmasInFlight_>
struct PipelineShape {
  static constexpr int kStages = kStages_, kMmasInFlight = kMmasInFlight_;
  static constexpr int kAhead = kStages - 1 - kMmasInFlight;
  static_assert(kMmasInFlight >= 0 && kAhead >= 1, "at least one step of copies in flight");
  // The stage after `stage`: counters that wrap, not a 64-bit remainder per step.
  static __host__ __device__ constexpr int next(int stage) { return stage + 1 == kStages ? 0 : stage + 1; }
};

// The mma.sync path's pipeline: 3 stages, each step's MMAs done when it returns.
using Sm80Pipeline = PipelineShape<3, 0>;

template <typename T>
using Sm80TiledMma = decltype(cute::make_tiled_mma(typename Sm80Traits<T>::MmaAtom{},
                                                   cute::Layout<cute::Shape<cute::_2, cute::_2, cute::_1>>{},
                                                   cute::Tile<cute::_32, cute::_32, cute::_16>{}));

// (Rows, BK, stages) shared-memory layouts: K-major (each row's 32 K values contiguous) and
// MN-major (each K's run of rows contiguous, in 64-row atoms).
template <int Rows>
using Sm80KMajor = decltype(cute::tile_to_shape(
    cute::composition(cute::Swizzle<2, 3, 3>{},
                      cute::Layout<cute::Shape<cute::_8, cute::Int<Sm80Tile::kBK>>,
                                   cute::Stride<cute::Int<Sm80Tile::kBK>, cute::_1>>{}),
    cute::Shape<cute::Int<Rows>, cute::Int<Sm80Tile::kBK>, cute::Int<Sm80Pipeline::kStages>>{}));
template <int Rows>
using Sm80MnMajor = decltype(cute::tile_to_shape(
    cute::composition(cute::Swizzle<3, 3, 3>{},
                      cute::Layout<cute::Shape<cute::_64, cute::_8>, cute::Stride<cute::_1, cute::_64>>{}),
    cute::Shape<cute::Int<Rows>, cute::Int<Sm80Tile::kBK>, cute::Int<Sm80Pipeline::kStages>>{}));

// What both CuTe kernels' copies rely on: in a (rows, BK, kStages) shared tensor, stage s lies s
// stage sizes past stage 0, swizzle included (each stage spans whole swizzle periods;
// tests/cuda_host/sm80_layouts.cu checks it of every layout). So a thread works out its chunks'
// places once, for stage 0 (stage0_offset), and a K step adds them to its stage's start.
template <class SmemTensor>
__device__ __forceinline__ int stage0_offset(SmemTensor& s, int row, int k) {
  return static_cast<int>(&s(row, k, 0) - &s(0, 0, 0));
}
template <class SmemTensor>
__device__ __forceinline__ auto* stage_start(SmemTensor& s, int stage) {
  using Layout = typename SmemTensor::layout_type;
  constexpr int kStageSize = cute::cosize_v<Layout> / decltype(cute::size<2>(Layout{}))::value;
  return &s(0, 0, 0) + stage * kStageSize;
}

// One 16-byte cp.async of `live ? src : nothing` into dst (zero-filled when not live; src must
// still be a valid address, so callers pass a tensor's base then).
template <typename T, typename V>
__device__ __forceinline__ void copy_chunk(const T* src, V* dst, bool live) {
  cute::SM80_CP_ASYNC_CACHEGLOBAL_ZFILL<cute::uint128_t>::copy(
      *reinterpret_cast<const cute::uint128_t*>(src), *reinterpret_cast<cute::uint128_t*>(dst), live);
}

// The multistage cp.async schedule of both CuTe main loops (this file's mma.sync one and
// sm90_common.cuh's wgmma one) over `steps` K steps, the same count on every thread, so the
// barriers are uniform. load_next(stage) issues this thread's cp.async chunks of the next step into
// that stage, Shape::kAhead steps ahead; landed(step, stage) runs once this thread's chunks of
// `step` have landed (the projection's prologue rewrites them there), then publish() (what the
// MMA's reads need of this thread's writes), then the barrier that publishes the stage to every
// thread; compute(stage) runs the step's MMAs, and when it returns, at most Shape::kMmasInFlight
// steps' MMAs (its own included) may still read their stages. Returns with every copy complete
// (the caller waits for MMAs still in flight).
template <class Shape, typename LoadNext, typename Landed, typename Publish, typename Compute>
__device__ __forceinline__ void cp_async_pipeline(int64_t steps, LoadNext&& load_next, Landed&& landed,
                                                  Publish&& publish, Compute&& compute) {
  int64_t issued = 0;
  CUTE_UNROLL
  for (int stage = 0; stage < Shape::kAhead; ++stage) {
    if (issued < steps) {
      load_next(stage);
      ++issued;
    }
    cute::cp_async_fence();  // one group per step, empty or not: the wait below counts groups
  }
  int stage = 0, refill = Shape::kAhead;
  for (int64_t it = 0; it < steps; ++it) {
    cute::cp_async_wait<Shape::kAhead - 1>();  // step it has landed (this thread's copies)...
    landed(it, stage);
    publish();
    __syncthreads();  // ...everyone's, and every MMA that read stage `refill` is done
    if (issued < steps) {
      load_next(refill);
      ++issued;
    }
    cute::cp_async_fence();
    compute(stage);
    stage = Shape::next(stage);
    refill = Shape::next(refill);
  }
  cute::cp_async_wait<0>();
}

// The main loop of the mma.sync path (the conv's Sm80Config, the weight gradient): the schedule
// above with ldmatrix + mma.sync per step into acc. sA is (M, BK, S), sB (N, BK, S); CopyOpA /
// CopyOpB the ldmatrix atoms their majorness needs.
template <typename CopyOpA, typename CopyOpB, typename TiledMma, typename TensorA, typename TensorB,
          typename Accum, typename LoadNext, typename Landed>
__device__ __forceinline__ void sm80_mainloop(const TiledMma& mma, const TensorA& sA, const TensorB& sB,
                                              Accum& acc, int64_t steps, LoadNext&& load_next,
                                              Landed&& landed) {
  using namespace cute;
  using V = typename TensorA::value_type;
  const int tid = static_cast<int>(threadIdx.x);
  ThrMMA thr_mma = mma.get_slice(tid);
  Tensor tCrA = thr_mma.partition_fragment_A(sA(_, _, 0));  // (MMA, MMA_M, MMA_K)
  Tensor tCrB = thr_mma.partition_fragment_B(sB(_, _, 0));  // (MMA, MMA_N, MMA_K)
  auto s2r_a = make_tiled_copy_A(Copy_Atom<CopyOpA, V>{}, mma);
  auto s2r_b = make_tiled_copy_B(Copy_Atom<CopyOpB, V>{}, mma);
  ThrCopy s2r_thr_a = s2r_a.get_slice(tid);
  ThrCopy s2r_thr_b = s2r_b.get_slice(tid);
  Tensor tXsA = s2r_thr_a.partition_S(sA);  // (CPY, MMA_M, MMA_K, S)
  Tensor tXrA = s2r_thr_a.retile_D(tCrA);
  Tensor tXsB = s2r_thr_b.partition_S(sB);  // (CPY, MMA_N, MMA_K, S)
  Tensor tXrB = s2r_thr_b.retile_D(tCrB);

  cp_async_pipeline<Sm80Pipeline>(steps, load_next, landed, [] {}, [&](int stage) {
    CUTE_UNROLL
    for (int kb = 0; kb < size<2>(tCrA); ++kb) {
      copy(s2r_a, tXsA(_, _, kb, stage), tXrA(_, _, kb));
      copy(s2r_b, tXsB(_, _, kb, stage), tXrB(_, _, kb));
      gemm(mma, tCrA(_, _, kb), tCrB(_, _, kb), acc);
    }
  });
}

// A CTA's fp32 accumulator tile into shared memory at cs[m * ldc + n] (BM x BN), each accumulator's
// (m, n) from an identity tensor partitioned as they are, between two barriers: the first waits
// until every warp is done reading the operand stages that cs overwrites, the second publishes the
// tile. The CuTe kernels' epilogues start from it, after their main loop returned; every thread
// that holds accumulators calls it, and Sync is their barrier (the whole CTA, or conv_tma.cuh's
// consumer warpgroups).
template <int BM, int BN, typename Sync = CtaBarrier, typename TiledMma, typename Accum>
__device__ __forceinline__ void stage_accumulators(const TiledMma& mma, const Accum& acc, float* cs, int ldc) {
  using namespace cute;
  Tensor coord = mma.get_slice(threadIdx.x).partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
  Sync{}();
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) cs[get<0>(coord(i)) * ldc + get<1>(coord(i))] = acc(i);
  Sync{}();
}

// Whether a CuTe kernel may run: FASTASPP_CUDA_CONV (`choice`, read once per launch:
// common/switches.h; the bindings have rejected invalid values) not `wmma` (which keeps every launch
// on the WMMA kernels, to compare the two on a device) and the kernel's image built for sm80 or later.
inline bool sm80_kernel_usable(const void* kernel, int choice) {
  if (choice == kCudaConvWmma) return false;
  return kernel_image(kernel).ptx_version >= 80;
}

// The mma.sync instruction set of a CuTe kernel config (the configs derive from it): where its body
// exists, its main loop with the ldmatrix atoms its operands' majorness needs, its launch rule.
template <typename CopyOpA, typename CopyOpB>
struct Sm80Instructions {
  static __host__ __device__ constexpr bool body_here() { return FASTASPP_CUDA_ARCH >= 800; }
  template <typename... Args>
  static __device__ __forceinline__ void mainloop(Args&&... args) {
    sm80_mainloop<CopyOpA, CopyOpB>(static_cast<Args&&>(args)...);
  }
  static bool usable(const void* kernel, int choice) { return sm80_kernel_usable(kernel, choice); }
};

}  // namespace
}  // namespace atrous_cuda
}  // namespace fastaspp
