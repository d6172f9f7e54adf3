// The cuda backend's fp16 / bf16 conv kernel on CUTLASS's CuTe, for the forward and grad_input of
// atrous_conv.cu (same ConvBatch, patch tiling, dead-tap walk and epilogue: conv_common.cuh), in
// two instruction sets that share everything but the MMA and the shared-memory layouts:
// Sm90Config, Sm90DeepConfig and Sm90WideConfig (sm90_common.cuh: wgmma, for sm_90a images) and
// Sm80Config (sm80_common.cuh: ldmatrix + mma.sync, which Hopper also runs).
//
// * CTA tile: BM = 64 dst pixels per patch the CTA owns (conv_tiling.h's CtaPatches) x BN dst
//   channels, BK = 32 src channels per step:
//   - Sm80Config, Sm90Config: one patch x 128 channels, 128 threads (sm80: 4 warps as 2 x 2, each
//     32 x 64 of the tile; sm90: one warpgroup and one 64 x 128 x 16 wgmma atom);
//   - Sm90DeepConfig (FASTASPP_CUDA_CONV=wgmma_deep): Sm90Config with twice the stages;
//   - Sm90WideConfig (FASTASPP_CUDA_CONV=wgmma_wide): two horizontally adjacent patches x 256
//     channels, 256 threads as two warpgroups, one per patch, each on a 64 x 256 x 16 atom. Each
//     step moves 24 KB for 2 MFLOP where the 64 x 128 tile moves 12 KB for 0.5 MFLOP: half the
//     shared-memory and L2 traffic per FLOP, which bounds the 64 x 128 kernel on an H200
//     (benchmarks/results/GPU-NOTES.md). conv_tma.cuh runs the same tile with TMA copies.
// * The K loop walks the live (conv, tap, chunk) steps of the CTA's cover (the box its patches
//   span; a tap live for one patch only reads zeros for the other's rows), as the other kernels
//   do. Each step's A tile (the gathered src pixels) and B tile (the tap's weight rows) travel
//   straight from global to shared memory by 16-byte cp.async, zero-filled where a pixel reads
//   padding, lies past the map or a chunk past a channel count.
// * Shared memory: A is (BM, BK) K-major, B is (BN, BK) N-major (the weight's [tap, k, n] rows),
//   one buffer per stage, then the fp32 tile (BM x (BN + 4) floats) staged over them for the
//   epilogue's 16-byte stores and the BN statistics:
//   - mma.sync: 3 stages x (64 x 32 + 128 x 32) x 2 bytes = 36864 bytes, static;
//   - wgmma 64 x 128: 4 stages = 49152 bytes, static (the static limit); 8 stages = 98304 bytes,
//     dynamic (two CTAs per SM);
//   - wgmma 128 x 256: 6 stages of 24 KB = 147456 bytes, dynamic (one CTA per SM).
// * A launch whose grid leaves SMs idle may split its CTAs' K loops (FASTASPP_CUDA_SPLIT_K; the
//   64 x 128 tiles only: common/k_split.h, each conv's parts sized by its CTAs' longest live walk
//   to spread the launch's steps over one wave): grid.z runs over the parts, each CTA walks its
//   part's steps (step_at finds where it starts, possibly inside a tap) and writes its fp32 tile to
//   a workspace, and
//   conv_split_finalize_kernel sums the parts in a fixed order and runs the epilogue.
// * The training projection's prologue (ConvArgs::src_scale) rewrites each thread's own A chunks
//   of a step in shared memory once they land, before the barrier that publishes them.
// * Requires both channel counts (and the src pixel stride and channel offset) to be multiples
//   of 8 and 16-byte aligned src and weight (one chunk is wholly inside or outside a channel
//   range); conv_cute_operands_ok says whether a conv's operands qualify, conv_cute_config_usable
//   whether a config may run, and atrous_conv.cu routes the rest to the WMMA kernel.
#pragma once

#include "conv_common.cuh"
#include "sm80_common.cuh"
#include "sm90_common.cuh"

namespace fastaspp {
namespace atrous_cuda {
namespace {  // internal linkage, as kernel_common.cuh

// The kernel's tile, shared-memory layouts and MMA per instruction set, at namespace scope so that
// a host program checks them (tests/cuda_host/sm80_layouts.cu: bijective layouts, 16-byte chunks
// contiguous, every accumulator of the tile owned by exactly one thread). kPatches patches of
// kTilePixels rows make BM; kCtasPerSm is the __launch_bounds__ occupancy; kDynamicSmem puts the
// shared memory in the launch's dynamic allocation (past the 48 KB static limit).
template <typename T>
struct Sm80Config : Sm80Instructions<cute::SM75_U32x4_LDSM_N, cute::SM75_U16x8_LDSM_T> {
  static constexpr int kPatches = 1, kThreads = Sm80Tile::kThreads, kCtasPerSm = Sm80Tile::kCtasPerSm;
  static constexpr bool kDynamicSmem = false;
  static constexpr int BM = kTilePixels, BN = 128, BK = Sm80Tile::kBK;
  static_assert(BM == 64 && BK == 32, "the swizzle atoms of sm80_common.cuh are sized for these");
  using LayoutA = Sm80KMajor<BM>;   // (pixel, k, stage)
  using LayoutB = Sm80MnMajor<BN>;  // (n, k, stage)
  using TiledMma = Sm80TiledMma<T>;
};

template <typename T>
struct Sm90Config : Sm90Instructions<> {
  static constexpr int kPatches = 1, kThreads = Sm80Tile::kThreads, kCtasPerSm = Sm80Tile::kCtasPerSm;
  static constexpr bool kDynamicSmem = false;
  static constexpr int BM = kTilePixels, BN = 128, BK = Sm80Tile::kBK;
  using LayoutA = Sm90KMajor<T, BM>;   // (pixel, k, stage)
  using LayoutB = Sm90MnMajor<T, BN>;  // (n, k, stage)
  using TiledMma = Sm90TiledMma<T>;
};

// 6 stages: the copies run 4 steps ahead of the wgmma (the 64 x 128 kernel's 2 steps hid the
// latency of its smaller steps; not yet tuned on a device).
using Sm90WidePipeline = PipelineShape<6, 1>;

template <typename T>
struct Sm90WideConfig : Sm90Instructions<Sm90WidePipeline, kCudaConvWgmmaWide> {
  static constexpr int kPatches = 2, kThreads = 2 * Sm80Tile::kThreads, kCtasPerSm = 1;
  static constexpr bool kDynamicSmem = true;
  static constexpr int BM = kPatches * kTilePixels, BN = 256, BK = Sm80Tile::kBK;
  using LayoutA = Sm90KMajor<T, BM, Sm90WidePipeline::kStages>;   // (pixel, k, stage)
  using LayoutB = Sm90MnMajor<T, BN, Sm90WidePipeline::kStages>;  // (n, k, stage)
  using TiledMma = Sm90TiledMma<T, cute::GMMA::Major::K, BN, kPatches>;
};

// The 64 x 128 tile with 8 stages in dynamic shared memory (98304 bytes, 2 CTAs per SM): copies 6
// steps ahead instead of 2. At batch 1 a CTA has its SM to itself, and run 3's kernel time puts
// its 0.5-MFLOP steps at about a seventh of wgmma's rate (benchmarks/results/GPU-NOTES.md, "Next"):
// the latency of its copies, which more steps in flight should hide (not yet run on a device).
using Sm90DeepPipeline = PipelineShape<8, 1>;

template <typename T>
struct Sm90DeepConfig : Sm90Instructions<Sm90DeepPipeline, kCudaConvWgmmaDeep> {
  static constexpr int kPatches = 1, kThreads = Sm80Tile::kThreads, kCtasPerSm = 2;
  static constexpr bool kDynamicSmem = true;
  static constexpr int BM = kTilePixels, BN = 128, BK = Sm80Tile::kBK;
  using LayoutA = Sm90KMajor<T, BM, Sm90DeepPipeline::kStages>;   // (pixel, k, stage)
  using LayoutB = Sm90MnMajor<T, BN, Sm90DeepPipeline::kStages>;  // (n, k, stage)
  using TiledMma = Sm90TiledMma<T>;
};

// A config's shared memory: A's stages, then B's (1024-byte aligned: the period of the 128-byte
// swizzle, which wgmma's descriptors assume), or the fp32 tile staged over them, whichever is
// larger. Host and device: a kDynamicSmem config's launch asks for kBytes.
template <typename Config>
struct CuteSmem {
  static constexpr int kABytes = int(cute::cosize_v<typename Config::LayoutA>) * 2;  // 16-bit values
  static constexpr int kBBytes = int(cute::cosize_v<typename Config::LayoutB>) * 2;
  static constexpr int kLdc = Config::BN + 4;  // floats per row of the staged tile
  static constexpr int kCBytes = Config::BM * kLdc * int(sizeof(float));
  static constexpr int kBytes = kABytes + kBBytes > kCBytes ? kABytes + kBBytes : kCBytes;
  static_assert(kABytes % 1024 == 0, "B stays 1024-byte aligned");
};

// The CTA's shared buffer of `Bytes` bytes: a static array, or the launch's dynamic allocation.
template <int Bytes, bool kDynamic>
__device__ __forceinline__ unsigned char* cta_smem() {
  if constexpr (kDynamic) {
    extern __shared__ __align__(1024) unsigned char dynamic_smem[];
    return dynamic_smem;
  } else {
    __shared__ __align__(1024) unsigned char static_smem[Bytes];
    return static_smem;
  }
}

// Where part blockIdx.z of a split K loop keeps the tile of CTA (blockIdx.x, blockIdx.y): the
// partials of ConvBatch, one BM x BN fp32 tile a CTA, the parts' tiles planes apart.
template <int BM, int BN>
__device__ __forceinline__ float* partial_tile(const ConvBatch& b, unsigned part) {
  const size_t cta = (size_t(part) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  return b.partials + cta * (size_t(BM) * BN);
}

// The staged tile cs (rows of ldc floats, 16-byte aligned) into this part's partial tile, 16 bytes
// at a time, every row (those past the map hold zeros no one reads). All NT threads call it.
template <int BM, int BN, int NT>
__device__ __forceinline__ void store_partial_tile(const ConvBatch& b, const float* cs, int ldc) {
  static_assert(BN % 4 == 0, "whole float4s a row");
  float4* out = reinterpret_cast<float4*>(partial_tile<BM, BN>(b, blockIdx.z));
  for (int e = static_cast<int>(threadIdx.x); e < BM * BN / 4; e += NT) {
    const int m = e / (BN / 4), j = (e % (BN / 4)) * 4;
    out[e] = *reinterpret_cast<const float4*>(cs + m * ldc + j);
  }
}

template <typename T, bool kDgrad, typename Config>
__global__ void __launch_bounds__(Config::kThreads, Config::kCtasPerSm)
    conv_cute_kernel(const __grid_constant__ ConvBatch batch) {
  if constexpr (Config::body_here()) {
  using namespace cute;
  using V = typename Sm80Traits<T>::Value;
  constexpr int BM = Config::BM, BN = Config::BN, BK = Config::BK;
  constexpr int NT = Config::kThreads, CH = Sm80Tile::kChunk;
  static_assert(BM == Config::kPatches * kTilePixels, "kTilePixels rows of the tile per patch");
  using LayoutA = typename Config::LayoutA;
  using LayoutB = typename Config::LayoutB;
  using Smem = CuteSmem<Config>;
  constexpr int LDC = Smem::kLdc;
  unsigned char* const smem = cta_smem<Smem::kBytes, Config::kDynamicSmem>();
  if constexpr (Config::kDynamicSmem) {
    // The runtime places dynamic shared memory past any static one; wgmma's swizzled descriptors
    // need the 1024-byte alignment declared, which a mistake here would silently break.
    if (__cvta_generic_to_shared(smem) % 1024 != 0) __trap();
  }
  Tensor sA = make_tensor(make_smem_ptr(reinterpret_cast<V*>(smem)), LayoutA{});
  Tensor sB = make_tensor(make_smem_ptr(reinterpret_cast<V*>(smem + Smem::kABytes)), LayoutB{});

  const ConvRange r = cta_convs(batch);
  const ConvArgs& a = batch.conv[r.first];  // its epilogue (and its prologue: a 1x1 conv alone)
  const CtaPatches cp = cta_patches<Config::kPatches>(a);
  const Patch& t = cp.cover;  // the step walk's patch
  const int64_t n0 = cta_n0<BN>(batch);
  const int tid = static_cast<int>(threadIdx.x);

  // Every thread walks the same (conv, tap, chunk) sequence: the step count and barriers are uniform.
  // A split K loop (a.parts > 1 in a launch with batch.splits > 1) walks part blockIdx.z of it,
  // which may start inside a tap; z past the conv's parts has nothing to do.
  const int parts = batch.splits > 1 ? a.parts : 1;
  if (static_cast<int>(blockIdx.z) >= parts) return;  // uniform across the CTA, before any barrier
  const bool split = parts > 1;
  const int64_t all_steps = count_steps<kDgrad, BK>(batch, r, t);
  const StepRange part =
      split ? k_split_range(all_steps, static_cast<int>(blockIdx.z), parts) : StepRange{0, all_steps};
  const int64_t steps = part.end - part.begin;

  // The next step's tiles into `stage`, 8 channels a chunk: A chunk (m, kc) holds src channels
  // k0 + kc .. k0 + kc + 7 of the pixel that tile row m (pixel m % kTilePixels of slot
  // m / kTilePixels's patch; zeros where the slot holds none) reads through the step's tap; B chunk
  // (k, nc) holds weight row k0 + k, dst channels n0 + nc .. n0 + nc + 7. The per-step work is
  // kept to pointer additions and 32-bit compares:
  // * A tap's steps differ only in k0, so the gather of this thread's A rows (and the tap's
  //   division, and 64-bit index products) runs once per (conv, tap), when its first step (k0 == 0,
  //   the same step on every thread) is issued, or the part's first step wherever it starts; each
  //   step then moves the thread's A and B source pointers on by BK channels (BK weight rows).
  // * A chunk's place in shared memory is worked out (swizzle included) once, for stage 0
  //   (stage0_offset, sm80_common.cuh).
  constexpr int kAChunks = BM * (BK / CH), kBChunks = BK * (BN / CH);
  static_assert(kAChunks % NT == 0 && kBChunks % NT == 0, "whole chunks per thread");
  int a_slot[kAChunks / NT], b_slot[kBChunks / NT];  // stage0_offset of this thread's chunks
  CUTE_UNROLL
  for (int i = 0; i < kAChunks / NT; ++i) {
    const int s = tid + i * NT;
    a_slot[i] = stage0_offset(sA, s / (BK / CH), (s % (BK / CH)) * CH);
  }
  CUTE_UNROLL
  for (int i = 0; i < kBChunks / NT; ++i) {
    const int s = tid + i * NT;
    b_slot[i] = stage0_offset(sB, (s % (BN / CH)) * CH, s / (BN / CH));
  }
  // Chunk i of this thread is s = tid + i * NT: its A chunks share one channel offset a_kc, its B
  // chunks one dst channel offset b_nc, kBRowGap weight rows apart from row b_k on.
  static_assert(NT % (BK / CH) == 0 && NT % (BN / CH) == 0, "a thread's chunks share their channel offset");
  constexpr int kBRowGap = NT / (BN / CH);
  const int a_kc = (tid % (BK / CH)) * CH, b_k = tid / (BN / CH), b_nc = (tid % (BN / CH)) * CH;
  // Every conv a CTA walks has conv `a`'s nc (one conv, or the sum mode's shared dst), so the weight
  // row length, and whether this thread's B chunks hold dst channels at all, hold for the CTA.
  const int64_t b_row_step = BK * a.nc, b_gap = kBRowGap * a.nc;  // elements
  const bool b_n_live = n0 + b_nc < a.nc;
  const T* a_src[kAChunks / NT] = {};  // this thread's A chunks at the next step's k0
  bool a_row_live[kAChunks / NT] = {};  // whether each A row reads the map (not padding or past it)
  const T* a_any = nullptr;             // a valid address, read by no copy (both operands' zero fills)
  const T* b_src = nullptr;             // this thread's first B chunk at the next step's k0
  Step next = split ? step_at<kDgrad, BK>(batch, r, t, part.begin) : first_step<kDgrad>(batch, r.first, r.end, t);
  bool gathered = false;  // whether a step of this part has gathered its tap's rows yet
  auto load_next = [&](int stage) {
    const ConvArgs& c = batch.conv[next.conv];
    if (next.k0 == 0 || !gathered) {
      gathered = true;
      const int64_t kh = next.tap / c.kw, kw = next.tap % c.kw;
      a_any = static_cast<const T*>(c.src);
      CUTE_UNROLL
      for (int i = 0; i < kAChunks / NT; ++i) {
        const T* row = tile_row_src<Config::kPatches, kDgrad, T>(c, cp, kh, kw, (tid + i * NT) / (BK / CH));
        a_row_live[i] = row != nullptr;
        a_src[i] = a_row_live[i] ? row + next.k0 + a_kc : a_any;
      }
      b_src = static_cast<const T*>(c.wt) + (next.tap * c.kc + next.k0 + b_k) * c.nc + n0 + b_nc;
    }
    // Channels of the tap from k0 on, in 32 bits: a chunk exists where its offset is below them.
    const int k_room = static_cast<int>(cute::min(c.kc - next.k0, int64_t(BK)));
    V* const a_stage = stage_start(sA, stage);
    V* const b_stage = stage_start(sB, stage);
    CUTE_UNROLL
    for (int i = 0; i < kAChunks / NT; ++i) {
      const bool live = a_row_live[i] && a_kc < k_room;
      copy_chunk(live ? a_src[i] : a_any, a_stage + a_slot[i], live);
      a_src[i] += BK;
    }
    CUTE_UNROLL
    for (int i = 0; i < kBChunks / NT; ++i) {
      const bool live = b_n_live && b_k + i * kBRowGap < k_room;
      copy_chunk(live ? b_src + i * b_gap : a_any, b_stage + b_slot[i], live);
    }
    b_src += b_row_step;
    next = next_step<kDgrad, BK>(batch, r.end, t, next);
  };

  // The projection's prologue on this thread's own A chunks of a step, in place. It runs on a 1x1
  // conv without padding alone: one live tap, so step `step` of the part reads src channels
  // (part.begin + step) * BK onwards and a_row_live (set by the first load, before any step lands)
  // tells that tap's rows.
  const bool prologue_vectors = !kDgrad && a.src_scale != nullptr && prologue_vectors_ok(a);
  auto landed = [&](int64_t step, int stage) {
    if constexpr (!kDgrad) {
      if (a.src_scale == nullptr) return;
      CUTE_UNROLL
      for (int i = 0; i < kAChunks / NT; ++i) {
        const int s = tid + i * NT, m = s / (BK / CH), kc = (s % (BK / CH)) * CH;
        const int64_t k = (part.begin + step) * BK + kc;
        if (k < a.kc && a_row_live[i]) prologue_chunk<T>(a, k, prologue_vectors, &sA(m, kc, stage));
      }
    }
  };

  typename Config::TiledMma mma;
  Tensor acc = partition_fragment_C(mma, Shape<Int<BM>, Int<BN>>{});  // fp32
  clear(acc);
  Config::mainloop(mma, sA, sB, acc, steps, load_next, landed);

  // The tile goes through shared memory (stage_accumulators), so that a thread then stores 8
  // channels of a pixel at a time
  // (staged_epilogue: 16-byte coalesced stores, the per-channel vectors read once per chunk instead
  // of once per value), and the BN statistics, when wanted, read it there.
  float* cs = reinterpret_cast<float*>(smem);
  stage_accumulators<BM, BN>(mma, acc, cs, LDC);
  if (split) {
    store_partial_tile<BM, BN, NT>(batch, cs, LDC);  // conv_split_finalize_kernel runs the epilogue
  } else {
    staged_epilogue<T, kDgrad, BN, NT, Config::kPatches>(a, cp, n0, cs, LDC);
  }
  } else {
    __trap();  // conv_cute_config_usable never selects a config whose body this image lacks
  }
}

// The second kernel of a split K loop, over the first one's grid.x and grid.y: CTA (x, y) of a conv
// that split sums its tile's parts in a fixed order (part 0, then 1, ...: the result does not
// depend on scheduling) into shared memory and runs the epilogue conv_cute_kernel would have run
// on one part's tile (store, BN statistics); a conv that did not split has had its epilogue. For
// the configs with one 64-pixel patch a CTA.
constexpr int kSplitFinalizeThreads = 256;
template <typename T, bool kDgrad, int BM, int BN>
__global__ void __launch_bounds__(kSplitFinalizeThreads)
    conv_split_finalize_kernel(const __grid_constant__ ConvBatch batch) {
  static_assert(BM == kTilePixels, "one patch a CTA");
  constexpr int NT = kSplitFinalizeThreads, LDC = BN + 4;  // LDC as CuteSmem's: 16-byte rows
  __shared__ __align__(16) float cs[BM * LDC];
  const ConvRange r = cta_convs(batch);
  const ConvArgs& a = batch.conv[r.first];
  if (a.parts <= 1) return;
  const float4* part0 = reinterpret_cast<const float4*>(partial_tile<BM, BN>(batch, 0));
  const size_t plane = size_t(gridDim.x) * gridDim.y * (BM * BN / 4);  // float4s between parts
  for (int e = static_cast<int>(threadIdx.x); e < BM * BN / 4; e += NT) {
    float4 sum = part0[e];
    for (int p = 1; p < a.parts; ++p) {
      const float4 v = part0[p * plane + e];
      sum.x += v.x, sum.y += v.y, sum.z += v.z, sum.w += v.w;
    }
    const int m = e / (BN / 4), j = (e % (BN / 4)) * 4;
    *reinterpret_cast<float4*>(cs + m * LDC + j) = sum;
  }
  __syncthreads();
  staged_epilogue<T, kDgrad, BN, NT, 1>(a, cta_patches<1>(a), cta_n0<BN>(batch), cs, LDC);
}

// Whether a conv's operands suit every CuTe config: channel counts (and src stride and offset) in
// whole 16-byte chunks, aligned src and weight (else the WMMA kernel, kept for the launches these
// cannot take).
inline bool conv_cute_operands_ok(const ConvArgs& a) {
  constexpr int CH = Sm80Tile::kChunk;
  return a.kc % CH == 0 && a.nc % CH == 0 && a.src_pixel_stride % CH == 0 && a.src_channel_offset % CH == 0 &&
         aligned16(a.src) && aligned16(a.wt);
}

// Whether conv_cute_kernel with Config may run under the launch's FASTASPP_CUDA_CONV `choice` and
// the loaded image (else the next config).
template <typename T, bool kDgrad, typename Config>
bool conv_cute_config_usable(int choice) {
  return Config::usable(reinterpret_cast<const void*>(conv_cute_kernel<T, kDgrad, Config>), choice);
}

}  // namespace
}  // namespace atrous_cuda
}  // namespace fastaspp
