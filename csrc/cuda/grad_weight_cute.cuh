// The cuda backend's fp16 / bf16 weight-gradient kernel on CuTe: per tap, the partial
// dW_tap[Cout, Cin] = G^T X of one split of the tap's live output rectangle (grad_weight_common.cuh),
// through the multistage cp.async schedule of sm80_common.cuh, in two instruction sets:
// Sm90GwConfig (one warpgroup's wgmma, sm90_common.cuh, for sm_90a images) and Sm80GwConfig
// (transposing ldmatrix + mma.sync).
//
// * CTA tile: BM = 64 output channels x BN = 128 input channels, BK = 32 pixels per step.
// * Both operands are MN-major in memory: a pixel's grad row holds its Cout values, its x row its
//   Cin values. A step copies BK pixels' 64-channel and 128-channel runs in 16-byte chunks into
//   (BM, BK) and (BN, BK) MN-major shared tiles; pixels past the split's end and channels past the
//   counts are zero-filled in both operands.
// * Shared memory: stages x (64 x 32 + 128 x 32) x 2 bytes (3 stages, 36864 bytes, for mma.sync; 4,
//   49152 bytes, for wgmma), static (the wgmma image test reads it) and 1024-byte aligned (the
//   wgmma swizzle's period).
// * The fp32 partial tile is staged over the stages and stored 4 columns at a time to the workspace
//   (store_partial_tile); the split count, the workspace layout and the fixed-order second pass
//   are the WMMA kernel's.
// * Requires both channel counts to be multiples of 8 and 16-byte aligned x and grad;
//   grad_weight_cute_usable says whether a launch qualifies for a config.
#pragma once

#include "grad_weight_common.cuh"
#include "sm80_common.cuh"
#include "sm90_common.cuh"

namespace fastaspp {
namespace atrous_cuda {
namespace {  // internal linkage, as kernel_common.cuh

// The kernel's tile, shared-memory layouts and MMA per instruction set, checked on the host by
// tests/cuda_host/sm80_layouts.cu.
template <typename T>
struct Sm80GwConfig : Sm80Instructions<cute::SM75_U16x8_LDSM_T, cute::SM75_U16x8_LDSM_T> {
  static constexpr int BM = 64, BN = 128, BK = Sm80Tile::kBK;
  using LayoutA = Sm80MnMajor<BM>;  // (co, pixel, stage)
  using LayoutB = Sm80MnMajor<BN>;  // (ci, pixel, stage)
  using TiledMma = Sm80TiledMma<T>;
};

template <typename T>
struct Sm90GwConfig : Sm90Instructions<> {
  static constexpr int BM = 64, BN = 128, BK = Sm80Tile::kBK;
  using LayoutA = Sm90MnMajor<T, BM>;  // (co, pixel, stage)
  using LayoutB = Sm90MnMajor<T, BN>;  // (ci, pixel, stage)
  using TiledMma = Sm90TiledMma<T, cute::GMMA::Major::MN>;
};

// Which chunks of a step's tiles a thread copies: every pixel of the step has kThreadsPerPixel
// threads, and its copy j takes chunk (of 8 channels) lane + kThreadsPerPixel * (j ^ (pixel & 1))
// of pixel tid / kThreadsPerPixel's grad run (BM channels) and x run (BN channels), lane = tid %
// kThreadsPerPixel. One pixel per thread and step serves all its copies (one walk, GwPixelWalk,
// instead of six pixel decodes), and kThreadsPerPixel consecutive threads copy 64 contiguous
// bytes; the odd pixels' copies in swapped order put 8 consecutive threads' chunks in 8 different
// 16-byte columns of the swizzled tiles (no bank conflict between the two pixels).
// tests/cuda_host/sm80_layouts.cu checks that each chunk has one owner.
struct GwChunks {
  static constexpr int kThreadsPerPixel = Sm80Tile::kThreads / Sm80Tile::kBK;
  static __host__ __device__ constexpr int pixel(int tid) { return tid / kThreadsPerPixel; }
  static __host__ __device__ constexpr int chunk(int tid, int j) {
    return tid % kThreadsPerPixel + kThreadsPerPixel * (j ^ (pixel(tid) & 1));
  }
};

template <typename T, typename Config>
__global__ void __launch_bounds__(Sm80Tile::kThreads, Sm80Tile::kCtasPerSm) grad_weight_cute_kernel(GwArgs a) {
  if constexpr (Config::body_here()) {
  using namespace cute;
  using V = typename Sm80Traits<T>::Value;
  constexpr int BM = Config::BM, BN = Config::BN, BK = Config::BK;
  constexpr int NT = Sm80Tile::kThreads, CH = Sm80Tile::kChunk;
  constexpr int kABytes = cosize_v<typename Config::LayoutA> * int(sizeof(V));
  constexpr int kBBytes = cosize_v<typename Config::LayoutB> * int(sizeof(V));
  static_assert(kABytes % 1024 == 0, "B stays 1024-byte aligned");
  constexpr int LDC = BN + 4;  // the fp32 tile staged over the stages for the epilogue
  static_assert(BM * LDC * int(sizeof(float)) <= kABytes + kBBytes, "the staged tile fits");
  __shared__ __align__(1024) unsigned char smem[kABytes + kBBytes];
  Tensor sA = make_tensor(make_smem_ptr(reinterpret_cast<V*>(smem)), typename Config::LayoutA{});
  Tensor sB = make_tensor(make_smem_ptr(reinterpret_cast<V*>(smem + kABytes)), typename Config::LayoutB{});

  const GwTile t = make_gw_tile<BM, BN>(a);
  const GwPixels px(a, t);
  const T* x = static_cast<const T*>(a.x);
  const T* g = static_cast<const T*>(a.g);
  const int tid = static_cast<int>(threadIdx.x);

  // The next step's BK pixels into `stage`: A chunk (mc, k) holds grad channels co0 + mc ..
  // co0 + mc + 7 of the step's pixel k, B chunk (nc, k) x channels ci0 + nc .. ci0 + nc + 7 of the
  // pixel it reads through the tap. A thread copies chunks of one pixel only (GwChunks), BK pixels
  // further on each step (GwPixelWalk: no division per step); its chunks' shared-memory offsets
  // are worked out once, for stage 0 (stage0_offset, sm80_common.cuh).
  constexpr int TPP = GwChunks::kThreadsPerPixel;
  constexpr int kAPer = BM / CH / TPP, kBPer = BN / CH / TPP;  // chunks per thread and step
  static_assert(NT == BK * TPP && kAPer * TPP * CH == BM && kBPer * TPP * CH == BN, "every chunk has one owner");
  static_assert(kAPer % 2 == 0 && kBPer % 2 == 0, "GwChunks swaps a thread's copies in pairs");
  const int k_own = GwChunks::pixel(tid);
  int a_slot[kAPer], b_slot[kBPer];  // stage0_offset of this thread's chunks
  CUTE_UNROLL
  for (int j = 0; j < kAPer; ++j) a_slot[j] = stage0_offset(sA, GwChunks::chunk(tid, j) * CH, k_own);
  CUTE_UNROLL
  for (int j = 0; j < kBPer; ++j) b_slot[j] = stage0_offset(sB, GwChunks::chunk(tid, j) * CH, k_own);
  // Channels of the CTA's tile that exist (the same every step), in 32 bits.
  const int co_room = static_cast<int>(cute::max(cute::min(a.cout - t.co0, int64_t(BM)), int64_t(0)));
  const int ci_room = static_cast<int>(cute::max(cute::min(a.cin - t.ci0, int64_t(BN)), int64_t(0)));
  GwPixelWalk<T, BK> pixel(a, px, t, px.begin + k_own);
  auto load_next = [&](int stage) {
    const bool pixel_live = pixel.p < px.end;
    V* const a_stage = stage_start(sA, stage);
    V* const b_stage = stage_start(sB, stage);
    CUTE_UNROLL
    for (int j = 0; j < kAPer; ++j) {
      const int mc = GwChunks::chunk(tid, j) * CH;
      const bool live = pixel_live && mc < co_room;
      copy_chunk(live ? pixel.g_row + mc : g, a_stage + a_slot[j], live);
    }
    CUTE_UNROLL
    for (int j = 0; j < kBPer; ++j) {
      const int nc = GwChunks::chunk(tid, j) * CH;
      const bool live = pixel_live && nc < ci_room;
      copy_chunk(live ? pixel.x_row + nc : x, b_stage + b_slot[j], live);
    }
    pixel.advance();
  };

  typename Config::TiledMma mma;
  Tensor acc = partition_fragment_C(mma, Shape<Int<BM>, Int<BN>>{});  // fp32
  clear(acc);
  const int64_t steps = ceil_div(px.end - px.begin, int64_t(BK));  // 0 for a dead tap or empty split
  Config::mainloop(mma, sA, sB, acc, steps, load_next, [](int64_t, int) {});

  // The whole partial tile, through shared memory, so that a thread then stores 4 columns of a row
  // at once.
  float* cs = reinterpret_cast<float*>(smem);
  stage_accumulators<BM, BN>(mma, acc, cs, LDC);
  store_partial_tile<BM, BN, NT>(a, t, cs, LDC);
  } else {
    __trap();  // grad_weight_cute_usable never selects a config whose body this image lacks
  }
}

// Whether a launch can run grad_weight_cute_kernel with Config: channel counts in whole 16-byte
// chunks, aligned operands, and the config's rule for FASTASPP_CUDA_CONV's `choice` and the image
// (else the next config, then WMMA).
template <typename T, typename Config>
bool grad_weight_cute_usable(const GwArgs& a, int choice) {
  if (a.cin % Sm80Tile::kChunk != 0 || a.cout % Sm80Tile::kChunk != 0 || !aligned16(a.x) || !aligned16(a.g))
    return false;
  return Config::usable(reinterpret_cast<const void*>(grad_weight_cute_kernel<T, Config>), choice);
}

}  // namespace
}  // namespace atrous_cuda
}  // namespace fastaspp
