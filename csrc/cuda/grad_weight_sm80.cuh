// The cuda backend's fp16 / bf16 weight-gradient kernel on CuTe: per tap, the partial
// dW_tap[Cout, Cin] = G^T X of one split of the tap's live output rectangle (grad_weight_common.cuh),
// through the multistage cp.async pipeline of sm80_common.cuh.
//
// * CTA tile: BM = 64 output channels x BN = 128 input channels, BK = 32 pixels per step.
// * Both operands are MN-major in memory: a pixel's grad row holds its Cout values, its x row its
//   Cin values. A step copies BK pixels' 64-channel and 128-channel runs in 16-byte chunks into
//   (BM, BK) and (BN, BK) MN-major shared tiles, read with the transposing ldmatrix; pixels past
//   the split's end and channels past the counts are zero-filled in both operands.
// * Shared memory: 3 stages x (64 x 32 + 128 x 32) x 2 bytes = 36864 bytes, static.
// * The fp32 partial tile is stored per element to the workspace (store_partial); the split count,
//   the workspace layout and the fixed-order second pass are the WMMA kernel's.
// * Requires both channel counts to be multiples of 8 and 16-byte aligned x and grad;
//   grad_weight_sm80_usable says whether a launch qualifies.
#pragma once

#include "grad_weight_common.cuh"
#include "sm80_common.cuh"

namespace fastaspp {
namespace atrous_cuda {
namespace {  // internal linkage, as kernel_common.cuh

// The kernel's tile and shared-memory layouts, checked on the host by tests/cuda_host/sm80_layouts.cu.
template <typename T>
struct Sm80GwConfig {
  static constexpr int BM = 64, BN = 128, BK = Sm80Tile::kBK;
  using LayoutA = Sm80MnMajor<BM>;  // (co, pixel, stage)
  using LayoutB = Sm80MnMajor<BN>;  // (ci, pixel, stage)
  using TiledMma = Sm80TiledMma<T>;
};

template <typename T>
__global__ void __launch_bounds__(Sm80Tile::kThreads) grad_weight_sm80_kernel(GwArgs a) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using namespace cute;
  using V = typename Sm80Traits<T>::Value;
  using Config = Sm80GwConfig<T>;
  constexpr int BM = Config::BM, BN = Config::BN, BK = Config::BK;
  constexpr int NT = Sm80Tile::kThreads, CH = Sm80Tile::kChunk;
  __shared__ __align__(128) V smem_a[cosize_v<typename Config::LayoutA>];
  __shared__ __align__(128) V smem_b[cosize_v<typename Config::LayoutB>];
  Tensor sA = make_tensor(make_smem_ptr(smem_a), typename Config::LayoutA{});
  Tensor sB = make_tensor(make_smem_ptr(smem_b), typename Config::LayoutB{});

  const GwTile t = make_gw_tile<BM, BN>(a);
  const GwPixels px(a, t);
  const T* x = static_cast<const T*>(a.x);
  const T* g = static_cast<const T*>(a.g);
  const int tid = static_cast<int>(threadIdx.x);

  // The next step's BK pixels into `stage`: A chunk (mc, k) holds grad channels co0 + mc ..
  // co0 + mc + 7 of pixel p0 + k, B chunk (nc, k) x channels ci0 + nc .. ci0 + nc + 7 of the
  // pixel it reads through the tap.
  int64_t p0 = px.begin;
  auto load_next = [&](int stage) {
    constexpr int kAChunks = BK * (BM / CH), kBChunks = BK * (BN / CH);
    static_assert(kAChunks % NT == 0 && kBChunks % NT == 0, "whole chunks per thread");
    CUTE_UNROLL
    for (int i = 0; i < kAChunks / NT; ++i) {
      const int s = tid + i * NT, k = s / (BM / CH), mc = (s % (BM / CH)) * CH;
      const bool live = p0 + k < px.end && t.co0 + mc < a.cout;
      const T *g_row = g, *x_row = x;
      if (live) px.rows(a, p0 + k, g_row, x_row);
      copy_chunk(live ? g_row + t.co0 + mc : g, &sA(mc, k, stage), live);
    }
    CUTE_UNROLL
    for (int i = 0; i < kBChunks / NT; ++i) {
      const int s = tid + i * NT, k = s / (BN / CH), nc = (s % (BN / CH)) * CH;
      const bool live = p0 + k < px.end && t.ci0 + nc < a.cin;
      const T *g_row = g, *x_row = x;
      if (live) px.rows(a, p0 + k, g_row, x_row);
      copy_chunk(live ? x_row + t.ci0 + nc : x, &sB(nc, k, stage), live);
    }
    p0 += BK;
  };

  typename Config::TiledMma mma;
  Tensor acc = partition_fragment_C(mma, Shape<Int<BM>, Int<BN>>{});  // fp32
  clear(acc);
  const int64_t steps = ceil_div(px.end - px.begin, int64_t(BK));  // 0 for a dead tap or empty split
  sm80_mainloop<SM75_U16x8_LDSM_T, SM75_U16x8_LDSM_T>(mma, sA, sB, acc, steps, load_next,
                                                       [](int64_t, int) {});

  // The whole partial tile, zeros included (the workspace is not zeroed).
  Tensor coord = mma.get_slice(tid).partition_C(make_identity_tensor(Shape<Int<BM>, Int<BN>>{}));
  CUTE_UNROLL
  for (int i = 0; i < size(acc); ++i) store_partial<float>(a, t, get<0>(coord(i)), get<1>(coord(i)), acc(i));
#else
  __trap();  // grad_weight_sm80_usable never selects this kernel for an image below sm80
#endif
}

// Whether a launch can run grad_weight_sm80_kernel: channel counts in whole 16-byte chunks,
// aligned operands, and sm80_kernel_usable (else the WMMA kernel).
template <typename T>
bool grad_weight_sm80_usable(const GwArgs& a) {
  if (a.cin % Sm80Tile::kChunk != 0 || a.cout % Sm80Tile::kChunk != 0 || !aligned16(a.x) || !aligned16(a.g))
    return false;
  return sm80_kernel_usable(reinterpret_cast<const void*>(grad_weight_sm80_kernel<T>));
}

}  // namespace
}  // namespace atrous_cuda
}  // namespace fastaspp
