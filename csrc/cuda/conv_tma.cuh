// The cuda backend's conv tiles fed by the Tensor Memory Accelerator, with warp specialisation
// (FASTASPP_CUDA_CONV=wgmma_tma; sm_90a images): the forward and input gradient of stride-1 convs,
// on the same patches, dead-tap walk, wgmma atoms and epilogue as Sm90WideConfig (128 x 256) and
// Sm90Config (64 x 128) of conv_cute.cuh, with the copies taken off the math warps.
//
// * Threads: a consumer warpgroup per patch (warps 0-7 on the 128 x 256 tile, each a 64 x 256 x 16
//   wgmma atom over one of the CTA's two patches; warps 0-3 on the 64 x 128 one) and a producer
//   warpgroup after them, which gives most of its registers to the consumers (setmaxnreg) and of
//   which one warp walks the steps: each conv's live taps (a bit mask per conv, worked out before
//   the roles split), each tap's channel chunks, as the other kernels' walk (count_steps). Its
//   lane 0 issues each K step as TMA loads (common/tma_boxes.h): one 4-D box of src per patch (its
//   64 pixels through the step's tap, BK channels; TMA reads zeros for padding and channels past
//   kc) and BN / 64 3-D boxes of the tap's weight rows. No thread computes an address per chunk,
//   and the consumers issue nothing but wgmma.
// * Pipeline: kStages shared-memory stages, each with a "full" mbarrier (the producer's
//   arrive.expect_tx of the stage's bytes; TMA completes the transaction) and an "empty" one (one
//   arrive per consumer warp once the wgmma that read the stage is done: each step's wgmma is
//   waited for one step late, so a stage is released one step after it was read). The producer
//   refills a stage once its empty barrier has completed the round before (StageRing). A wait
//   that never ends traps (tma_wait).
// * Shared memory: the stages in the layouts TMA's swizzles write (A: rows of BK = 32 16-bit values
//   under the 64-byte swizzle, which is wgmma's K-major SW64 atom; B: per 64-channel box, BK rows of
//   128 bytes under the 128-byte swizzle, wgmma's MN-major SW128 atom tiled k before n), 8 stages
//   in dynamic shared memory (of 24 KB on the 128 x 256 tile, one CTA per SM; of 12 KB on the
//   64 x 128 one, two CTAs per SM), the mbarriers and live-tap masks past them, and
//   the fp32 tile staged over the stages for staged_epilogue, which the consumers run (on a named
//   barrier: the producer warpgroup has left).
// * The tensor maps are encoded on the host per launch (cuTensorMapEncodeTiled, reached through the
//   runtime's driver entry point: no link against libcuda) and passed in the kernel's parameter
//   (TmaConvBatch, __grid_constant__), one src and one weight map per conv.
// * Which launches: every conv of the batch of stride 1, without the projection's prologue, at most
//   kTmaMaxConvs convs (tma_batch_ok); atrous_conv.cu sends the rest to the default CuTe tile. With
//   FASTASPP_CUDA_SPLIT_K, a launch whose 128 x 256 grid would not fill a wave runs on the 64 x 128
//   TMA tile (Sm90TmaNarrowConfig), whose K loop splits as the cp.async 64 x 128 tiles' do: the
//   producer walks its part's steps (walk_live_steps), the consumers store their fp32 tile for
//   conv_split_finalize_kernel.
#pragma once

#include <cuda.h>

#include <cstdio>

#include <cute/arch/copy_sm90_tma.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/arch/reg_reconfig.h>

#include "../common/tma_boxes.h"
#include "conv_cute.cuh"

namespace fastaspp {
namespace atrous_cuda {
namespace {  // internal linkage, as kernel_common.cuh

constexpr int kTmaMaxConvs = 4;  // the ASPP's four conv branches

// The TMA kernel's parameter: the batch, and conv i's src and weight tensor maps.
struct TmaConvBatch {
  ConvBatch batch;
  CUtensorMap src[kTmaMaxConvs];
  CUtensorMap wt[kTmaMaxConvs];
};
static_assert(sizeof(TmaConvBatch) <= 4096, "within the classic 4 KB kernel parameter limit");

// The TMA kernel's tile: kPatches patches of 64 pixels x 128 * kPatches channels, one consumer
// warpgroup per patch (each a 64 x BN x 16 wgmma atom, as Sm90Config and Sm90WideConfig), and the
// producer warpgroup. Two patches: the wide tile, one CTA per SM (8 stages of 24 KB). One patch: the
// 64 x 128 tile, two CTAs per SM (8 stages of 12 KB each), for grids below a wave, where it may
// split its K loop (FASTASPP_CUDA_SPLIT_K, as the cp.async 64 x 128 tiles).
template <typename T, int kPatches_ = 2>
struct Sm90TmaConfig {
  using V = typename Sm80Traits<T>::Value;
  static constexpr int kPatches = kPatches_, kStages = 8, kCtasPerSm = kPatches == 1 ? 2 : 1;
  static_assert(kPatches == 1 || kPatches == 2, "one or two patches a CTA");
  static_assert(kStages >= 2, "a stage is released a step after its read (tests/cuda_host/tma_pipeline.cu)");
  static constexpr int kMmaThreads = kPatches * Sm80Tile::kThreads;  // warps 0 on: the consumer warpgroups
  static constexpr int kThreads = kMmaThreads + 128;                  // and the producer warpgroup
  // Registers a thread after setmaxnreg: the producer's go to the consumers, whose BN / 2 fp32
  // accumulators a thread need them. At launch a thread has 65536 / (kThreads x kCtasPerSm),
  // rounded down to 8: 168 (wide: 128 x 40 + 256 x 232 = 384 x 168) or 128 (128 x 40 + 128 x 216).
  static constexpr int kLaunchRegisters = 65536 / (kThreads * kCtasPerSm) / 8 * 8;
  static constexpr int kProducerRegisters = 40, kConsumerRegisters = kPatches == 2 ? 232 : 216;
  // Whether the split fits a CTA launched with `regs` registers a thread: setmaxnreg.inc waits until
  // the CTA's pool holds the registers it asks for, so with fewer the consumers would wait forever.
  // ptxas gives the kernel what __launch_bounds__ allows (kLaunchRegisters; .ci/check_ptxas.py), and
  // launch_tma refuses an image with fewer (a -maxrregcount in the build flags, another ptxas).
  static constexpr bool registers_fit(int regs) {
    return 128 * kProducerRegisters + kMmaThreads * kConsumerRegisters <= kThreads * regs;
  }
  static_assert(registers_fit(kLaunchRegisters), "the CTA's registers");
  static constexpr int BM = kPatches * kTilePixels, BN = kPatches * 128, BK = Sm80Tile::kBK;
  using LayoutA = Sm90KMajor<T, BM, kStages>;  // (pixel, k, stage)
  // (n, k, stage): the 64-channel SW128 atoms of one n block k after k (TMA writes a box's BK rows
  // one after another), the n blocks one after another.
  using LayoutB = decltype(cute::tile_to_shape(cute::GMMA::Layout_MN_SW128_Atom<V>{},
                                               cute::Shape<cute::Int<BN>, cute::Int<BK>, cute::Int<kStages>>{},
                                               cute::Step<cute::_2, cute::_1, cute::_3>{}));
  using TiledMma = Sm90TiledMma<T, cute::GMMA::Major::K, BN, kPatches>;
  static constexpr int kABoxBytes = kTilePixels * BK * 2, kBBoxBytes = kTmaWeightBoxN * BK * 2;
  static constexpr int kStageBytes = kPatches * kABoxBytes + BN / kTmaWeightBoxN * kBBoxBytes;
  static constexpr int kABytes = int(cute::cosize_v<LayoutA>) * 2, kBBytes = int(cute::cosize_v<LayoutB>) * 2;
  static constexpr int kLdc = BN + 4;  // floats per row of the staged tile
  static constexpr int kBarrierOffset = kABytes + kBBytes;
  // full and empty barriers per stage, then a live-tap mask per conv
  static constexpr int kSmemBytes = kBarrierOffset + (2 * kStages + kTmaMaxConvs) * int(sizeof(uint64_t));
  static_assert(kABytes + kBBytes == kStages * kStageBytes, "a stage is exactly its boxes");
  static_assert(BM * kLdc * int(sizeof(float)) <= kBarrierOffset, "the staged tile fits over the stages");
  static_assert(kABytes % 1024 == 0 && kBBytes % 1024 == 0, "1024-byte aligned stages (the 128-byte swizzle)");
  static_assert(kCtasPerSm * kSmemBytes <= 227 * 1024, "its CTAs fit an SM's shared memory");
};
template <typename T>
using Sm90TmaNarrowConfig = Sm90TmaConfig<T, 1>;

// A producer's or consumer's place in the ring of S stages: step it uses stage it % S in round
// it / S. Each stage's full barrier completes one phase per round (its fill lands) and its empty
// barrier one per round (the consumers release it), so waiting for a round's completion is waiting
// on that round's parity (mbarrier.try_wait.parity). The producer refills a stage from round 1 on,
// after the release of the round before. Host and device: tests/cuda_host/tma_pipeline.cu runs the
// kernel's protocol on a model of mbarriers.
template <int S>
struct StageRing {
  int stage = 0;
  uint32_t round = 0;
  __host__ __device__ void advance() {
    if (++stage == S) stage = 0, ++round;
  }
  __host__ __device__ uint32_t full_parity() const { return round & 1; }  // this round's fill
  __host__ __device__ bool refill() const { return round > 0; }           // the stage held an earlier step
  __host__ __device__ uint32_t empty_parity() const { return (round - 1) & 1; }  // the round before's release
};

// An mbarrier wait that ends the kernel (a trap: the launch's stream reports an error) instead of
// hanging when the phase never completes (a box that never lands, a protocol fault): no legitimate
// wait lasts a second, and this kernel has not yet run on a device. The limit is wall-clock time
// (%globaltimer, in ns), not SM cycles, whose rate follows the clock the GPU runs at. The timer is
// read only once the first try has failed.
constexpr uint64_t kTmaWaitLimitNs = 2'000'000'000;
__device__ __forceinline__ uint64_t global_timer_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ void tma_wait(uint64_t* barrier, uint32_t parity) {
  using Barrier = cutlass::arch::ClusterBarrier;
  if (Barrier::try_wait(barrier, parity)) return;
  const uint64_t start = global_timer_ns();
  while (!Barrier::try_wait(barrier, parity))
    if (global_timer_ns() - start > kTmaWaitLimitNs) __trap();
}

// An L2 hint for the boxes: src rows are read by the CTAs of every channel block and weight rows by
// every CTA, so both stay (CUTLASS's EVICT_LAST encoding).
constexpr uint64_t kTmaCacheHint = uint64_t(cute::TMA::CacheHintSm90::EVICT_LAST);

template <typename T, bool kDgrad, typename Config>
__global__ void __launch_bounds__(Config::kThreads, Config::kCtasPerSm)
    conv_tma_kernel(const __grid_constant__ TmaConvBatch launch) {
  if constexpr (sm90a_here()) {
  using namespace cute;
  using V = typename Config::V;
  using Barrier = cutlass::arch::ClusterBarrier;
  using TxBarrier = cutlass::arch::ClusterTransactionBarrier;
  using ConsumerSync = NamedBarrier<Config::kMmaThreads, 1>;
  constexpr int BM = Config::BM, BN = Config::BN, BK = Config::BK, S = Config::kStages;
  constexpr int kMmaWarps = Config::kMmaThreads / 32;
  unsigned char* const smem = cta_smem<Config::kSmemBytes, true>();
  if (__cvta_generic_to_shared(smem) % 1024 != 0) __trap();  // the swizzles' period (see conv_cute_kernel)
  Tensor sA = make_tensor(make_smem_ptr(reinterpret_cast<V*>(smem)), typename Config::LayoutA{});
  Tensor sB = make_tensor(make_smem_ptr(reinterpret_cast<V*>(smem + Config::kABytes)), typename Config::LayoutB{});
  uint64_t* const full = reinterpret_cast<uint64_t*>(smem + Config::kBarrierOffset);
  uint64_t* const empty = full + S;

  const ConvBatch& batch = launch.batch;
  const ConvRange r = cta_convs(batch);
  const ConvArgs& a = batch.conv[r.first];
  // A split K loop (the one-patch tile only: its finalize kernel's) walks part blockIdx.z of the
  // walk; z past the conv's parts has nothing to do (uniform across the CTA, before any barrier).
  const int parts = Config::kPatches == 1 && batch.splits > 1 ? a.parts : 1;
  if (static_cast<int>(blockIdx.z) >= parts) return;
  const CtaPatches cp = cta_patches<Config::kPatches>(a);
  const Patch& t = cp.cover;
  const int64_t n0 = cta_n0<BN>(batch);
  const int warp = static_cast<int>(threadIdx.x) / 32, lane = static_cast<int>(threadIdx.x) % 32;
  // The live taps of each conv the CTA walks, as bits (at most kTmaMaxTaps taps a conv): worked out
  // here, where every thread still has its registers, so that the producer's walk needs no 64-bit
  // division (the liveness test's) in its 40.
  uint64_t* const live_taps = empty + S;
  if (threadIdx.x < static_cast<unsigned>(r.end - r.first)) {
    const int conv = r.first + static_cast<int>(threadIdx.x);
    live_taps[conv] = live_tap_bits<kDgrad>(batch.conv[conv], t);
  }
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      TxBarrier::init(&full[s], 1);
      Barrier::init(&empty[s], kMmaWarps);
    }
    cutlass::arch::fence_barrier_init();
  }
  __syncthreads();  // the last barrier of the whole CTA: the producer warpgroup leaves after its loop
  // The walk: each conv's live taps in order, each tap's channel chunks in order (count_steps's);
  // this CTA walks its steps [begin, end) (all of them unless the K loop is split).
  const int all_steps = count_live_steps<BK>(batch, r.first, r.end, live_taps);
  const StepRange part =
      parts > 1 ? k_split_range(all_steps, static_cast<int>(blockIdx.z), parts) : StepRange{0, all_steps};
  const int begin = static_cast<int>(part.begin), end = static_cast<int>(part.end);

  if (warp >= kMmaWarps) {
    cutlass::arch::warpgroup_reg_dealloc<Config::kProducerRegisters>();
    if (warp != kMmaWarps) return;
    // The producer warp walks the steps together (uniform waits); lane 0 issues them.
    const bool issuer = lane == 0;
    if (issuer) {
      for (int i = r.first; i < r.end; ++i) {
        prefetch_tma_descriptor(&launch.src[i]);
        prefetch_tma_descriptor(&launch.wt[i]);
      }
    }
    StageRing<S> ring;
    walk_live_steps<BK>(batch, r.first, r.end, live_taps, begin, end, [&](int conv, int tap, int k0) {
      const int stage = ring.stage;
      if (ring.refill()) tma_wait(&empty[stage], ring.empty_parity());  // its wgmma is done
      if (issuer) {
        const ConvArgs& c = batch.conv[conv];
        const int kw_taps = static_cast<int>(c.kw), kh = tap / kw_taps, kw = tap - kh * kw_taps;
        TxBarrier::arrive_and_expect_tx(&full[stage], Config::kStageBytes);
        V* const a_stage = stage_start(sA, stage);
        V* const b_stage = stage_start(sB, stage);
        CUTE_UNROLL
        for (int j = 0; j < Config::kPatches; ++j) {  // every slot, held or not: the stage's bytes are fixed
          const TmaSrcOrigin o = tma_src_origin<kDgrad>(c, t.img, t.r0, t.c0 + j * cp.cols, kh, kw, k0);
          SM90_TMA_LOAD_4D::copy(&launch.src[conv], &full[stage], kTmaCacheHint, a_stage + j * kTilePixels * BK, o.k,
                                 o.col, o.row, o.img);
        }
        CUTE_UNROLL
        for (int j = 0; j < BN / kTmaWeightBoxN; ++j) {
          SM90_TMA_LOAD_3D::copy(&launch.wt[conv], &full[stage], kTmaCacheHint, b_stage + j * kTmaWeightBoxN * BK,
                                 static_cast<int32_t>(n0) + j * kTmaWeightBoxN, k0, tap);
        }
      }
      ring.advance();
    });
    return;  // the consumers wait for every box it issued
  }

  cutlass::arch::warpgroup_reg_alloc<Config::kConsumerRegisters>();
  typename Config::TiledMma mma;
  Tensor acc = partition_fragment_C(mma, Shape<Int<BM>, Int<BN>>{});  // fp32
  auto thr_mma = mma.get_slice(threadIdx.x);
  Tensor tCrA = thr_mma.make_fragment_A(thr_mma.partition_A(sA));  // (MMA, MMA_M, MMA_K, S) descriptors
  Tensor tCrB = thr_mma.make_fragment_B(thr_mma.partition_B(sB));  // (MMA, MMA_N, MMA_K, S) descriptors
  clear(acc);
  StageRing<S> ring;
  int previous = 0;
  for (int it = 0; it < end - begin; ++it) {
    const int stage = ring.stage;
    tma_wait(&full[stage], ring.full_parity());
    warpgroup_fence_operand(acc);
    warpgroup_arrive();
    gemm(mma, tCrA(_, _, _, stage), tCrB(_, _, _, stage), acc);
    warpgroup_commit_batch();
    warpgroup_wait<1>();  // the previous step's wgmma is done: its stage goes back to the producer
    warpgroup_fence_operand(acc);
    if (it > 0 && lane == 0) Barrier::arrive(&empty[previous]);
    previous = stage;
    ring.advance();
  }
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc);

  // Every step's boxes have landed (this warpgroup waited for each) and been read: the tile goes
  // over the stages (the mbarriers lie past them), then the consumers run the epilogue.
  float* cs = reinterpret_cast<float*>(smem);
  stage_accumulators<BM, BN, ConsumerSync>(mma, acc, cs, Config::kLdc);
  if (parts > 1) {
    store_partial_tile<BM, BN, Config::kMmaThreads>(batch, cs, Config::kLdc);  // the finalize kernel's epilogue
  } else {
    staged_epilogue<T, kDgrad, BN, Config::kMmaThreads, Config::kPatches, ConsumerSync>(a, cp, n0, cs, Config::kLdc);
  }
  } else {
    __trap();  // tma_kernel_usable never selects it where this image lacks the body
  }
}

// Whether every conv of the batch suits the TMA kernel (common/tma_boxes.h), beside what every CuTe
// kernel needs (conv_cute_operands_ok).
template <typename T>
bool tma_batch_ok(const ConvBatch& b) {
  if (b.count > kTmaMaxConvs) return false;
  for (int i = 0; i < b.count; ++i)
    if (!conv_cute_operands_ok(b.conv[i]) || !tma_conv_ok(b.conv[i], int(sizeof(T)))) return false;
  return true;
}

// Why this thread's last TMA launch was refused, where its cudaError_t says less (the binding adds it
// to the error through fastaspp_cuda_take_failure_detail, which empties it).
thread_local char tma_failure_detail[200] = "";

template <typename... Args>
void note_tma_failure(const char* format, Args... args) {
  std::snprintf(tma_failure_detail, sizeof(tma_failure_detail), format, args...);
}

// cuTensorMapEncodeTiled, reached once through the runtime (null where the driver lacks it). Its
// type from cuda.h's declaration (CUTLASS includes cudaTypedefs.h inside its own namespace). The
// lookup by version exists from CUDA 12.5 on; CUDA 13 deprecates the unversioned one.
using TensorMapEncoder = decltype(&cuTensorMapEncodeTiled);
inline TensorMapEncoder tensor_map_encoder() {
  static const TensorMapEncoder encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    const cudaError_t err =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      (void)cudaGetLastError();
      return TensorMapEncoder(nullptr);
    }
    return reinterpret_cast<TensorMapEncoder>(fn);
  }();
  return encode;
}

// Whether the TMA kernel may run: FASTASPP_CUDA_CONV asks for it (`choice`), this translation unit's
// image is an sm_90a one, and the driver encodes tensor maps.
inline bool tma_kernel_usable(int choice) {
  return choice == kCudaConvWgmmaTma && sm90a_image_loaded() && tensor_map_encoder() != nullptr;
}

// A tensor map of the 16-bit tensor at `base` through view v with a swizzle of swizzle_bytes
// (tma_boxes.h: tma_encode_args, whose preconditions tma_encode_ok states), or an error (noted:
// `what` names the map).
template <typename T>
cudaError_t encode_tensor_map(CUtensorMap* map, const TmaView& v, const void* base, int swizzle_bytes,
                              const char* what, int conv) {
  static_assert(sizeof(T) == 2, "16-bit tensors");
  const TensorMapEncoder encode = tensor_map_encoder();
  if (encode == nullptr) return cudaErrorNotSupported;
  const TmaEncodeArgs e = tma_encode_args(v, int(sizeof(T)), base);
  if (!tma_encode_ok(e, int(sizeof(T)), swizzle_bytes)) {
    note_tma_failure("conv %d's %s tensor map breaks a precondition of cuTensorMapEncodeTiled", conv, what);
    return cudaErrorInvalidValue;
  }
  cuuint64_t dims[kTmaMaxRank], strides[kTmaMaxRank - 1];
  cuuint32_t box[kTmaMaxRank], unit[kTmaMaxRank];
  for (int i = 0; i < e.rank; ++i) {
    dims[i] = e.dims[i], box[i] = e.box[i], unit[i] = 1;
    if (i > 0) strides[i - 1] = e.strides[i - 1];
  }
  const CUtensorMapDataType type =
      std::is_same<T, __half>::value ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  const CUtensorMapSwizzle swizzle = swizzle_bytes == 128  ? CU_TENSOR_MAP_SWIZZLE_128B
                                     : swizzle_bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                                           : CU_TENSOR_MAP_SWIZZLE_32B;
  const CUresult res = encode(map, type, static_cast<cuuint32_t>(e.rank), reinterpret_cast<void*>(e.address), dims,
                              strides, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                              CU_TENSOR_MAP_L2_PROMOTION_L2_128B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res == CUDA_SUCCESS) return cudaSuccess;
  note_tma_failure("cuTensorMapEncodeTiled refused conv %d's %s tensor map (CUresult %d)", conv, what, int(res));
  return cudaErrorInvalidValue;
}

// The tensor maps of every conv of the batch (tma_batch_ok holds) into launch (its batch set).
template <typename T, int BK>
cudaError_t encode_tensor_maps(TmaConvBatch& launch) {
  for (int i = 0; i < launch.batch.count; ++i) {
    const ConvArgs& c = launch.batch.conv[i];
    const TmaView src = tma_src_view(c, c.tiling.rows(), c.tiling.cols(), BK);
    cudaError_t err = encode_tensor_map<T>(&launch.src[i], src, c.src, kTmaSrcSwizzleBytes, "source", i);
    if (err == cudaSuccess) {
      err = encode_tensor_map<T>(&launch.wt[i], tma_weight_view(c, BK), c.wt, kTmaWeightSwizzleBytes, "weight", i);
    }
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace
}  // namespace atrous_cuda
}  // namespace fastaspp
