// The Hopper (sm_90a) instruction set for the cuda backend's CuTe kernels (conv_cute.cuh,
// grad_weight_cute.cuh): one warpgroup's wgmma.mma_async reading both operands from shared memory,
// fed by the same multistage cp.async schedule as the sm80 path (sm80_common.cuh). Pure CUDA with
// CuTe headers, included only by .cu files.
//
// * One 64 x 128 x 16 wgmma atom covers the CTA's 64 x 128 tile (the conv's pixels x channels, the
//   weight gradient's Cout x Cin): the 128 threads are one warpgroup, each holding 64 fp32
//   accumulators, and no operand passes through registers. The conv's 128 x 256 tile
//   (Sm90WideConfig) stacks two warpgroups along M, each on a 64 x 256 x 16 atom (128
//   accumulators a thread) over one patch, both reading the same B stage.
// * Shared memory in wgmma's canonical swizzled layouts: the conv's A (pixels, k) K-major with
//   64-byte rows (BK = 32 16-bit values), the weight gradient's A (co, pixels) MN-major, and both
//   B (n, k) MN-major, in 128-byte runs; 16-byte chunks stay contiguous
//   (tests/cuda_host/sm80_layouts.cu checks these layouts too). wgmma reads through the
//   async proxy, so each thread fences its own writes (the cp.async copies and the projection
//   prologue's rewrites) into it before the barrier that publishes a stage.
// * Each step's wgmma is waited for one step late (warpgroup_wait<1>), so it runs while the
//   warpgroup waits for and issues the next step: 4 stages (48 KB, the static limit; the conv's
//   wide and deep tiles take 6 and 8, in dynamic shared memory), copies stages - 2 steps ahead,
//   and a stage is refilled only after the barrier that follows the wait for the wgmma that read
//   it (sm80_common.cuh's PipelineShape).
// * The bodies exist only in an sm_90a image (TORCH_CUDA_ARCH_LIST "9.0a"); sm90_kernel_usable asks
//   the loaded image whether it is one (sm90a_image_marker), so a plain sm_90 build falls to the
//   sm80 path instead of reaching the trap.
#pragma once

#include "sm80_common.cuh"

namespace fastaspp {
namespace atrous_cuda {
namespace {  // internal linkage, as kernel_common.cuh

// Whether this compilation pass has wgmma (an sm_90a device pass).
__host__ __device__ constexpr bool sm90a_here() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  return true;
#else
  return false;
#endif
}

// The 64 x N x 16 atom (N = 128 or 256) with both operands in shared memory, fp32 accumulators:
// A K-major (the conv's gathered pixels) or MN-major (the weight gradient's grad rows), B MN-major
// (N contiguous) in both kernels. CuTe's selector picks the widest atom that divides N: N itself.
template <typename T, cute::GMMA::Major MajorA, int N>
using Sm90MmaAtom = decltype(cute::GMMA::ss_op_selector<typename Sm80Traits<T>::Value, typename Sm80Traits<T>::Value,
                                                        float, cute::Shape<cute::_64, cute::Int<N>, cute::_16>,
                                                        MajorA, cute::GMMA::Major::MN>());

// WarpGroupsM warpgroups stacked along M, each running one 64 x N atom on its 64 rows.
template <typename T, cute::GMMA::Major MajorA = cute::GMMA::Major::K, int N = 128, int WarpGroupsM = 1>
using Sm90TiledMma =
    decltype(cute::make_tiled_mma(Sm90MmaAtom<T, MajorA, N>{},
                                  cute::Layout<cute::Shape<cute::Int<WarpGroupsM>, cute::_1, cute::_1>>{}));

// 4 stages, each step's wgmma still running while the next step is issued.
using Sm90Pipeline = PipelineShape<4, 1>;

// (Rows, BK, stages) layouts: K-major (64-byte swizzle: a row is BK = 32 16-bit values; the conv's
// A) and MN-major (128-byte swizzle: 64 rows of one k; the conv's B, both weight-gradient operands).
template <typename T, int Rows, int Stages = Sm90Pipeline::kStages>
using Sm90KMajor = decltype(cute::tile_to_shape(
    cute::GMMA::Layout_K_SW64_Atom<typename Sm80Traits<T>::Value>{},
    cute::Shape<cute::Int<Rows>, cute::Int<Sm80Tile::kBK>, cute::Int<Stages>>{}));
template <typename T, int Rows, int Stages = Sm90Pipeline::kStages>
using Sm90MnMajor = decltype(cute::tile_to_shape(
    cute::GMMA::Layout_MN_SW128_Atom<typename Sm80Traits<T>::Value>{},
    cute::Shape<cute::Int<Rows>, cute::Int<Sm80Tile::kBK>, cute::Int<Stages>>{}));

// Makes this thread's generic-proxy writes to shared memory visible to wgmma's async proxy.
__device__ __forceinline__ void fence_for_wgmma() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// The main loop of the wgmma path: sm80_common.cuh's cp.async schedule, with each thread's
// writes fenced into the async proxy before a stage's barrier and one wgmma batch per step into
// acc (zeroed by the caller), waited for at the end of the next step; the last one before the
// loop returns (the epilogue reads acc, and may reuse the stages' shared memory).
template <class Pipeline, typename TiledMma, typename TensorA, typename TensorB, typename Accum,
          typename LoadNext, typename Landed>
__device__ __forceinline__ void sm90_mainloop(const TiledMma& mma, const TensorA& sA, const TensorB& sB,
                                              Accum& acc, int64_t steps, LoadNext&& load_next, Landed&& landed) {
  using namespace cute;
  auto thr_mma = mma.get_slice(threadIdx.x);
  Tensor tCrA = thr_mma.make_fragment_A(thr_mma.partition_A(sA));  // (MMA, MMA_M, MMA_K, S) descriptors
  Tensor tCrB = thr_mma.make_fragment_B(thr_mma.partition_B(sB));  // (MMA, MMA_N, MMA_K, S) descriptors
  cp_async_pipeline<Pipeline>(steps, load_next, landed, [] { fence_for_wgmma(); }, [&](int stage) {
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    gemm(mma, tCrA(_, _, _, stage), tCrB(_, _, _, stage), acc);
    warpgroup_commit_batch();
    // The previous step's batch is done: its stage is free for the copy issued after the next barrier.
    warpgroup_wait<Pipeline::kMmasInFlight>();
    warpgroup_fence_operand(acc);
  });
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);
}

// Never launched: only an sm_90a pass gives it shared memory, so the static shared memory of its
// loaded image says whether this translation unit's kernels (whose images the runtime picks
// together, one per module and device) have their wgmma bodies here. The kernels cannot tell it
// themselves: the 128 x 256 conv kernel's shared memory is dynamic.
__global__ void sm90a_image_marker(int* out) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  __shared__ volatile int mark;
  mark = static_cast<int>(threadIdx.x);
  __syncthreads();
  *out = mark;
#else
  (void)out;
#endif
}

// Whether the loaded image of this translation unit is an sm_90a one (see sm90a_image_marker).
inline bool sm90a_image_loaded() {
  return kernel_image(reinterpret_cast<const void*>(sm90a_image_marker)).static_smem_bytes > 0;
}

// Whether a wgmma kernel may run: FASTASPP_CUDA_CONV (`choice`, as sm80_kernel_usable) unset or
// naming a wgmma kernel (`sm80` and `wmma` keep launches on those kernels), and an sm_90a image
// loaded. A kernel with kOnlyFor set (the conv's wide and deep tiles, conv_cute.cuh) runs only where
// FASTASPP_CUDA_CONV asks for it by that value.
template <int kOnlyFor>
bool sm90_kernel_usable(int choice) {
  if (choice == kCudaConvWmma || choice == kCudaConvSm80) return false;
  if (kOnlyFor != kSwitchUnset && choice != kOnlyFor) return false;
  return sm90a_image_loaded();
}

// The wgmma instruction set of a CuTe kernel config (the configs derive from it), as
// Sm80Instructions: where its body exists, its main loop over Pipeline's stages, its launch rule
// (kOnlyFor: the FASTASPP_CUDA_CONV value it waits for, or kSwitchUnset).
template <class Pipeline_ = Sm90Pipeline, int kOnlyFor = kSwitchUnset>
struct Sm90Instructions {
  using Pipeline = Pipeline_;
  static __host__ __device__ constexpr bool body_here() { return sm90a_here(); }
  template <typename... Args>
  static __device__ __forceinline__ void mainloop(Args&&... args) {
    sm90_mainloop<Pipeline>(static_cast<Args&&>(args)...);
  }
  static bool usable(const void*, int choice) { return sm90_kernel_usable<kOnlyFor>(choice); }
};

}  // namespace
}  // namespace atrous_cuda
}  // namespace fastaspp
