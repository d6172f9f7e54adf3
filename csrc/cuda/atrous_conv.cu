// CUDA kernels for fastaspp::_atrous_conv2d_{forward,grad_input,grad_weight}.
//
// Pure CUDA (no torch headers): `nvcc -c` builds it anywhere; the binding in
// atrous_conv_cuda.cpp prepares NHWC tensors and calls the C launchers of atrous_conv.h.
//
// Tiling and its invariants
// -------------------------
// forward and grad_input share one implicit GEMM ("conv") kernel; only the gather differs.
//   dst pixels (M) x dst channels (N), reduced over (taps x src channels) (K).
//   forward:    dst = y  [N,Ho,Wo,Cout], src = x    [N,H,W,Cin],  weight [KH,KW,Cin,Cout],
//               dst pixel r reads src row r*s + k*d - p.
//   grad_input: dst = dx [N,H,W,Cin],    src = grad [N,Ho,Wo,Cout], weight [KH,KW,Cout,Cin],
//               dst pixel i reads src row (i + p - k*d) / s, only when that divides exactly.
// * A CTA owns a 2-D patch of BM = 64 dst pixels of one image (rows x cols, cols a power of
//   two chosen per launch to waste the least area: common/conv_tiling.h) and BN = 64 dst
//   channels.
// * Taps are visited in order; a tap is skipped outright (no loads, no MMAs) unless it is
//   live along BOTH axes for the patch (patch_tap_live, common/conv_tiling.h). Live taps
//   loop over src channels in chunks of BK; the A tile (gathered pixels, zero where a pixel
//   reads padding or lies past the map, or past the channel count) and the B tile (weight
//   rows of that tap, zero past the channel counts) are staged in shared memory. Zero-filling
//   BOTH operands' K tails keeps stale shared memory (possibly NaN) out of the sum.
// * The (tap, chunk) sequence depends only on blockIdx and the arguments, so every thread of
//   the CTA walks the same sequence and each __syncthreads() is reached uniformly.
// * Double-buffered shared memory with register staging: iteration i writes buffer i&1, syncs
//   once, issues the global loads of step i+1 into registers, then multiplies buffer i&1.
//   Buffer i&1 is rewritten only at iteration i+2, after the sync of iteration i+1, which no
//   thread passes before finishing its multiply of iteration i: one barrier per step is enough.
// * fp16 / bf16: WMMA 16x16x16 with fp32 accumulators, 4 warps as 2x2, 32x32 per warp, BK=32.
//   fp32 / fp64 (and fp16 / bf16 on GPUs without the needed tensor cores): SIMT, 256
//   threads as 16x16, 4x4 outputs per thread strided by 16, BK=16, fp32 / fp64 accumulation.
// * Epilogue: acc * scale[co] + shift[co] (forward only), optional ReLU, convert, store NHWC
//   with per-element bounds checks (the patch may overhang the map, the channel block the
//   channel count). dst pixel p, channel co lives at dst[p * dst_pixel_stride +
//   dst_channel_offset + co]: the forward can write a channel slice [off, off + Cout) of a
//   wider NHWC buffer (pixel stride Ctot), e.g. one ASPP branch of the shared concat buffer.
//   Plain NHWC is stride = Cout, offset = 0 (grad_input always uses stride = Cin, offset 0).
//   Only the store moves; the gather, the tiling and the dead-tap skipping do not change.
// * Known costs: grad_input with stride > 1 gathers a zero for the dst pixels of the wrong
//   phase (only 1/(sh*sw) of a live tap's rows are real), and there is no split over K, so a
//   small batch with few pixel tiles leaves SMs idle. Neither matters for ASPP (stride 1).
//
// grad_weight: per tap, a GEMM dW_tap[Cout, Cin] = G^T X over that tap's live output
// rectangle only (tap_live_range on both axes: every pixel in it is in range, none outside
// is), so dead taps cost no pixel loop. Grid = (tap x Cout block x Cin block, split); split s
// reduces pixels [s*P/S, (s+1)*P/S) of the rectangle flattened over (n, oh, ow), P its size.
// Each CTA writes its full 64x64 partial (zeros for a dead tap or an empty split) to
// workspace[S][KH*KW][Cout][Cin], so the workspace needs no zeroing; a second kernel sums the
// S partials in a fixed order and converts. S depends only on the shapes, never on the device:
// results are bitwise reproducible.
//
// Vector loads (16 bytes) are used when both channel counts are multiples of the vector width
// and the base pointers are 16-byte aligned, so a vector is either wholly inside or wholly
// outside the channel range; otherwise the same kernels load one element at a time.
// Shared memory is static and < 48 KB per kernel (sizes noted beside each kernel).
// WMMA pointers: every fragment pointer is 32-byte aligned and every ldm is a multiple of 8
// elements (16-bit types) or 4 (the fp32 staging tile); checked by static_asserts below.
// 64-bit indexing for every global offset; 32-bit only inside a tile.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <stdint.h>

#include <type_traits>

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

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  using Acc = float;
  static __device__ __forceinline__ float to_acc(float v) { return v; }
  static __device__ __forceinline__ float from_acc(float v) { return v; }
};

template <>
struct Elem<double> {
  using Acc = double;
  static __device__ __forceinline__ double to_acc(double v) { return v; }
  static __device__ __forceinline__ double from_acc(double v) { return v; }
};

template <>
struct Elem<__half> {
  using Acc = float;
  static __device__ __forceinline__ float to_acc(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half from_acc(float v) { return __float2half_rn(v); }
};

template <>
struct Elem<__nv_bfloat16> {
  using Acc = float;
  static __device__ __forceinline__ float to_acc(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 from_acc(float v) {
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

  Raw regs[kPerThread];

  template <typename RowPtr>
  __device__ __forceinline__ void load(RowPtr&& row_ptr, int64_t col0, int64_t col_limit) {
    if constexpr (kOneRow) {
      const int s0 = static_cast<int>(threadIdx.x) * kPerThread;
      const T* p = row_ptr(s0 / kVecPerRow);
      const int64_t c0 = col0 + s0 % kVecPerRow;
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        Raw v = Raw();
        if (p != nullptr && c0 + i < col_limit) v = *reinterpret_cast<const Raw*>(p + c0 + i);
        regs[i] = v;
      }
    } else {
#pragma unroll
      for (int i = 0; i < kPerThread; ++i) {
        const int s = static_cast<int>(threadIdx.x) + i * NT;
        Raw v = Raw();
        if (kSlots % NT == 0 || s < kSlots) {
          const int row = s / kVecPerRow;
          const int64_t col = col0 + (s % kVecPerRow) * V;
          const T* p = row_ptr(row);
          if (p != nullptr && col < col_limit) v = *reinterpret_cast<const Raw*>(p + col);
        }
        regs[i] = v;
      }
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
// Conv (forward / grad_input) arguments, in dst / src terms (see the note at the top).
struct ConvArgs {
  const void* src;
  const void* wt;     // [KH, KW, kc, nc]
  const void* scale;  // [nc], forward only
  const void* shift;  // [nc], forward only
  void* dst;          // pixel p, channel c at dst[p * dst_pixel_stride + dst_channel_offset + c]
  int64_t n, src_h, src_w, kc, dst_h, dst_w, nc, kh, kw;
  int64_t dst_pixel_stride, dst_channel_offset;  // elements; offset + nc <= stride
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  PatchTiling tiling;  // conv_tiling.h: the dst patch each CTA owns
  int relu;
};

__device__ __forceinline__ Patch cta_patch(const ConvArgs& a) {
  return patch_of(a.tiling, blockIdx.x, a.dst_h, a.dst_w);
}

// First tap >= tap that is live for the whole patch (or kh*kw when none is).
template <bool kDgrad>
__device__ int64_t next_live_tap(const ConvArgs& a, const Patch& t, int64_t tap) {
  const int64_t taps = a.kh * a.kw;
  for (; tap < taps; ++tap) {
    const int64_t kh = tap / a.kw, kw = tap % a.kw;
    if (patch_tap_live<kDgrad>(kh, a.src_h, a.dst_h, a.stride_h, a.pad_h, a.dil_h, t.r0, t.r1) &&
        patch_tap_live<kDgrad>(kw, a.src_w, a.dst_w, a.stride_w, a.pad_w, a.dil_w, t.c0, t.c1)) {
      break;
    }
  }
  return tap;
}

struct Step {
  int64_t tap;  // == kh*kw when the sequence is exhausted
  int64_t k0;   // first src channel of the chunk
};

template <bool kDgrad>
__device__ __forceinline__ Step first_step(const ConvArgs& a, const Patch& t) {
  Step s;
  s.tap = a.kc > 0 ? next_live_tap<kDgrad>(a, t, 0) : a.kh * a.kw;
  s.k0 = 0;
  return s;
}

template <bool kDgrad, int BK>
__device__ __forceinline__ Step next_step(const ConvArgs& a, const Patch& t, Step s) {
  s.k0 += BK;
  if (s.k0 >= a.kc) {
    s.k0 = 0;
    s.tap = next_live_tap<kDgrad>(a, t, s.tap + 1);
  }
  return s;
}

// Row m of the A tile: the src pixel that dst pixel m of the patch reads through tap
// (kh, kw), or nullptr when it reads padding / lies outside the map.
template <bool kDgrad, typename T>
__device__ __forceinline__ const T* gather_row(const ConvArgs& a, const Patch& t, int64_t kh,
                                               int64_t kw, int m, const T* src) {
  const int64_t r = t.r0 + (m >> a.tiling.tile_w_log2);
  const int64_t c = t.c0 + (m & ((1 << a.tiling.tile_w_log2) - 1));
  if (r >= t.r1 || c >= t.c1) return nullptr;
  int64_t sr, sc;
  if (!kDgrad) {
    sr = r * a.stride_h + kh * a.dil_h - a.pad_h;
    sc = c * a.stride_w + kw * a.dil_w - a.pad_w;
  } else {
    const int64_t nr = r + a.pad_h - kh * a.dil_h;
    const int64_t nc = c + a.pad_w - kw * a.dil_w;
    if (nr < 0 || nc < 0 || nr % a.stride_h != 0 || nc % a.stride_w != 0) return nullptr;
    sr = nr / a.stride_h;
    sc = nc / a.stride_w;
  }
  if (sr < 0 || sr >= a.src_h || sc < 0 || sc >= a.src_w) return nullptr;
  return src + ((t.img * a.src_h + sr) * a.src_w + sc) * a.kc;
}

// The shared main loop: walks the live (tap, chunk) steps of the patch, stages A [BM][LDA]
// and B [BK][LDB] into double-buffered shared memory and calls compute(A, B) per step.
template <typename T, int V, bool kDgrad, int BM, int BN, int BK, int NT, int LDA, int LDB,
          typename Compute>
__device__ __forceinline__ void conv_mainloop(const ConvArgs& a, const Patch& t, int64_t n0,
                                              T* As, T* Bs, Compute&& compute) {
  static_assert(BM == kTilePixels, "the patch is 64 pixels");
  const T* src = static_cast<const T*>(a.src);
  const T* wt = static_cast<const T*>(a.wt);
  const int64_t taps = a.kh * a.kw;
  TileLoader<T, BM, BK, V, NT> la;
  TileLoader<T, BK, BN, V, NT> lb;

  auto load = [&](const Step& st) {
    const int64_t kh = st.tap / a.kw, kw = st.tap % a.kw;
    la.load([&](int m) -> const T* { return gather_row<kDgrad, T>(a, t, kh, kw, m, src); },
            st.k0, a.kc);
    lb.load(
        [&](int k) -> const T* {
          const int64_t kk = st.k0 + k;
          return kk < a.kc ? wt + (st.tap * a.kc + kk) * a.nc : nullptr;
        },
        n0, a.nc);
  };

  Step s = first_step<kDgrad>(a, t);
  if (s.tap < taps) load(s);
  int buf = 0;
  while (s.tap < taps) {
    la.store(As + buf * (BM * LDA), LDA);
    lb.store(Bs + buf * (BK * LDB), LDB);
    __syncthreads();
    const Step nx = next_step<kDgrad, BK>(a, t, s);
    if (nx.tap < taps) load(nx);  // in flight during the math below
    compute(As + buf * (BM * LDA), Bs + buf * (BK * LDB));
    buf ^= 1;
    s = nx;
  }
}

// One output element: forward epilogue (scale, shift, ReLU) or plain store for grad_input.
template <typename T, bool kDgrad, typename Acc>
__device__ __forceinline__ void store_output(const ConvArgs& a, const Patch& t, int m,
                                             int64_t co, Acc v) {
  const int64_t r = t.r0 + (m >> a.tiling.tile_w_log2);
  const int64_t c = t.c0 + (m & ((1 << a.tiling.tile_w_log2) - 1));
  if (r >= t.r1 || c >= t.c1 || co >= a.nc) return;
  if (!kDgrad) {
    v = v * Elem<T>::to_acc(static_cast<const T*>(a.scale)[co]) +
        Elem<T>::to_acc(static_cast<const T*>(a.shift)[co]);
    if (a.relu && v < Acc(0)) v = Acc(0);  // comparison, not fmax: NaN propagates like torch
  }
  T* dst = static_cast<T*>(a.dst);
  dst[((t.img * a.dst_h + r) * a.dst_w + c) * a.dst_pixel_stride + a.dst_channel_offset + co] =
      Elem<T>::from_acc(v);
}

// fp16 / bf16 tensor-core conv. Shared memory: A 2x64x40, B 2x32x72 (16-bit) + C 64x68 fp32
// = 10240 + 9216 + 17408 = 36864 bytes.
template <typename T, int V, bool kDgrad>
__global__ void __launch_bounds__(128) conv_wmma_kernel(ConvArgs a) {
  if constexpr (tc_supported_here<T>()) {
    using namespace nvcuda;
    constexpr int BM = 64, BN = 64, BK = 32, NT = 128;
    constexpr int LDA = BK + 8, LDB = BN + 8, LDC = BN + 4;
    static_assert(LDA % 8 == 0 && LDB % 8 == 0 && LDC % 4 == 0, "wmma ldm (16-byte rows too)");
    // Fragment pointers: row offsets of 16 rows and column offsets of 16 elements must be
    // multiples of 32 bytes.
    static_assert((16 * LDA * 2) % 32 == 0 && (16 * LDB * 2) % 32 == 0 &&
                      (16 * LDC * 4) % 32 == 0,
                  "wmma alignment");
    constexpr int kABytes = 2 * BM * LDA * 2, kBBytes = 2 * BK * LDB * 2;
    static_assert(kABytes % 128 == 0 && kBBytes % 128 == 0, "buffer alignment");
    __shared__ __align__(128) unsigned char smem[kABytes + kBBytes + BM * LDC * 4];
    T* As = reinterpret_cast<T*>(smem);
    T* Bs = reinterpret_cast<T*>(smem + kABytes);
    float* Cs = reinterpret_cast<float*>(smem + kABytes + kBBytes);

    const Patch t = cta_patch(a);
    const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
    const int warp = static_cast<int>(threadIdx.x) >> 5;
    const int wm = warp >> 1, wn = warp & 1;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    conv_mainloop<T, V, kDgrad, BM, BN, BK, NT, LDA, LDB>(
        a, t, n0, As, Bs, [&](const T* A, const T* B) {
#pragma unroll
          for (int kk = 0; kk < BK; kk += 16) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa[2];
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
            for (int i = 0; i < 2; ++i)
              wmma::load_matrix_sync(fa[i], A + (wm * 32 + i * 16) * LDA + kk, LDA);
#pragma unroll
            for (int j = 0; j < 2; ++j)
              wmma::load_matrix_sync(fb[j], B + kk * LDB + wn * 32 + j * 16, LDB);
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
              for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
          }
        });

    // Cs is not aliased with the operand buffers, so no barrier is needed before writing it.
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j], LDC,
                                wmma::mem_row_major);
    __syncthreads();
    // Consecutive threads take consecutive channels: coalesced NHWC stores.
    for (int e = static_cast<int>(threadIdx.x); e < BM * BN; e += NT) {
      const int m = e / BN, j = e % BN;
      store_output<T, kDgrad, float>(a, t, m, n0 + j, Cs[m * LDC + j]);
    }
  } else {
    __trap();  // launcher never selects this kernel on such a GPU
  }
}

// SIMT conv (fp32 / fp64, and the 16-bit fallback). Shared memory, fp64 worst case:
// A 2x64x18 + B 2x16x66 doubles = 18432 + 16896 = 35328 bytes.
template <typename T, int V, bool kDgrad>
__global__ void __launch_bounds__(256) conv_simt_kernel(ConvArgs a) {
  using Acc = typename Elem<T>::Acc;
  constexpr int BM = 64, BN = 64, BK = 16, NT = 256;
  constexpr int kPad = 16 / static_cast<int>(sizeof(T));  // one 16-byte vector
  constexpr int LDA = BK + kPad, LDB = BN + kPad;
  static_assert((LDA * sizeof(T)) % 16 == 0 && (LDB * sizeof(T)) % 16 == 0, "vector stores");
  constexpr int kABytes = 2 * BM * LDA * static_cast<int>(sizeof(T));
  constexpr int kBBytes = 2 * BK * LDB * static_cast<int>(sizeof(T));
  static_assert(kABytes % 16 == 0, "buffer alignment");
  __shared__ __align__(16) unsigned char smem[kABytes + kBBytes];
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = reinterpret_cast<T*>(smem + kABytes);

  const Patch t = cta_patch(a);
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * BN;
  const int tx = static_cast<int>(threadIdx.x) & 15, ty = static_cast<int>(threadIdx.x) >> 4;

  // Thread owns rows ty + 16i and columns tx + 16j: A reads broadcast within a half-warp,
  // B reads hit 16 consecutive words, so neither conflicts on banks.
  Acc acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = Acc(0);

  conv_mainloop<T, V, kDgrad, BM, BN, BK, NT, LDA, LDB>(
      a, t, n0, As, Bs, [&](const T* A, const T* B) {
#pragma unroll
        for (int k = 0; k < BK; ++k) {
          Acc av[4], bv[4];
#pragma unroll
          for (int i = 0; i < 4; ++i) av[i] = Elem<T>::to_acc(A[(ty + 16 * i) * LDA + k]);
#pragma unroll
          for (int j = 0; j < 4; ++j) bv[j] = Elem<T>::to_acc(B[k * LDB + tx + 16 * j]);
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
        }
      });

#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      store_output<T, kDgrad, Acc>(a, t, ty + 16 * i, n0 + tx + 16 * j, acc[i][j]);
    }
}

// ---------------------------------------------------------------------------------------
// grad_weight

struct GwArgs {
  const void* x;     // [N, H, W, Cin]
  const void* g;     // [N, Ho, Wo, Cout]
  void* ws;          // [splits][KH*KW][Cout][Cin] partial sums, Acc type
  int64_t n, h, w, cin, ho, wo, cout, kh, kw;
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  int64_t co_blocks, ci_blocks;
  int splits;
};

struct GwTile {
  int64_t tap, co0, ci0, split;
};

__device__ __forceinline__ GwTile make_gw_tile(const GwArgs& a) {
  const int64_t b = blockIdx.x;
  const int64_t per_tap = a.co_blocks * a.ci_blocks;
  GwTile t;
  t.tap = b / per_tap;
  t.co0 = ((b % per_tap) / a.ci_blocks) * 64;
  t.ci0 = ((b % per_tap) % a.ci_blocks) * 64;
  t.split = blockIdx.y;
  return t;
}

// Main loop over this CTA's slice of the tap's live output rectangle. Stages
// G [BK pixels][LDA] (Cout columns) and X [BK pixels][LDB] (Cin columns).
template <typename T, int V, int BM, int BN, int BK, int NT, int LDA, int LDB, typename Compute>
__device__ __forceinline__ void gw_mainloop(const GwArgs& a, const GwTile& t, T* As, T* Bs,
                                            Compute&& compute) {
  const T* x = static_cast<const T*>(a.x);
  const T* g = static_cast<const T*>(a.g);
  const int64_t kh = t.tap / a.kw, kw = t.tap % a.kw;
  const LiveRange lh = tap_live_range(kh, a.h, a.ho, a.stride_h, a.pad_h, a.dil_h);
  const LiveRange lw = tap_live_range(kw, a.w, a.wo, a.stride_w, a.pad_w, a.dil_w);
  const int64_t live_w = lw.size();
  const int64_t area = lh.size() * live_w;
  const int64_t total = a.n * area;  // 0 for a dead tap
  const int64_t p_begin = total * t.split / a.splits;
  const int64_t p_end = total * (t.split + 1) / a.splits;
  const int64_t off_h = tap_offset(kh, a.dil_h, a.pad_h);
  const int64_t off_w = tap_offset(kw, a.dil_w, a.pad_w);

  TileLoader<T, BK, BM, V, NT> lg;
  TileLoader<T, BK, BN, V, NT> lx;

  auto load = [&](int64_t p0) {
    // Pixel p of the rectangle, flattened over (n, oh, ow); only called when area > 0.
    auto decode = [&](int64_t p, int64_t& img, int64_t& oh, int64_t& ow) {
      img = p / area;
      const int64_t rem = p - img * area;
      const int64_t q = rem / live_w;
      oh = lh.lo + q;
      ow = lw.lo + (rem - q * live_w);
    };
    lg.load(
        [&](int k) -> const T* {
          const int64_t p = p0 + k;
          if (p >= p_end) return nullptr;
          int64_t img, oh, ow;
          decode(p, img, oh, ow);
          return g + ((img * a.ho + oh) * a.wo + ow) * a.cout;
        },
        t.co0, a.cout);
    lx.load(
        [&](int k) -> const T* {
          const int64_t p = p0 + k;
          if (p >= p_end) return nullptr;
          int64_t img, oh, ow;
          decode(p, img, oh, ow);
          // In range by construction of the live rectangle.
          return x + ((img * a.h + oh * a.stride_h + off_h) * a.w + ow * a.stride_w + off_w) *
                         a.cin;
        },
        t.ci0, a.cin);
  };

  if (p_begin < p_end) load(p_begin);
  int buf = 0;
  for (int64_t p0 = p_begin; p0 < p_end; p0 += BK) {
    lg.store(As + buf * (BK * LDA), LDA);
    lx.store(Bs + buf * (BK * LDB), LDB);
    __syncthreads();
    if (p0 + BK < p_end) load(p0 + BK);
    compute(As + buf * (BK * LDA), Bs + buf * (BK * LDB));
    buf ^= 1;
  }
}

template <typename Acc>
__device__ __forceinline__ void store_partial(const GwArgs& a, const GwTile& t, int m, int j,
                                              Acc v) {
  const int64_t co = t.co0 + m, ci = t.ci0 + j;
  if (co >= a.cout || ci >= a.cin) return;
  const int64_t taps = a.kh * a.kw;
  static_cast<Acc*>(a.ws)[((t.split * taps + t.tap) * a.cout + co) * a.cin + ci] = v;
}

// fp16 / bf16 tensor-core grad_weight. G tile is read as a col-major A (Cout x pixels),
// X tile as a row-major B (pixels x Cin). Shared memory: 2x32x72 + 2x32x72 (16-bit) +
// 64x68 fp32 = 9216 + 9216 + 17408 = 35840 bytes.
template <typename T, int V>
__global__ void __launch_bounds__(128) grad_weight_wmma_kernel(GwArgs a) {
  if constexpr (tc_supported_here<T>()) {
    using namespace nvcuda;
    constexpr int BM = 64, BN = 64, BK = 32, NT = 128;
    constexpr int LDA = BM + 8, LDB = BN + 8, LDC = BN + 4;
    static_assert(LDA % 8 == 0 && LDB % 8 == 0 && LDC % 4 == 0, "wmma ldm (16-byte rows too)");
    static_assert((16 * LDA * 2) % 32 == 0 && (16 * LDB * 2) % 32 == 0 &&
                      (16 * LDC * 4) % 32 == 0,
                  "wmma alignment");
    constexpr int kABytes = 2 * BK * LDA * 2, kBBytes = 2 * BK * LDB * 2;
    static_assert(kABytes % 128 == 0 && kBBytes % 128 == 0, "buffer alignment");
    __shared__ __align__(128) unsigned char smem[kABytes + kBBytes + BM * LDC * 4];
    T* As = reinterpret_cast<T*>(smem);
    T* Bs = reinterpret_cast<T*>(smem + kABytes);
    float* Cs = reinterpret_cast<float*>(smem + kABytes + kBBytes);

    const GwTile t = make_gw_tile(a);
    const int warp = static_cast<int>(threadIdx.x) >> 5;
    const int wm = warp >> 1, wn = warp & 1;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    gw_mainloop<T, V, BM, BN, BK, NT, LDA, LDB>(a, t, As, Bs, [&](const T* A, const T* B) {
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
          wmma::load_matrix_sync(fa[i], A + kk * LDA + wm * 32 + i * 16, LDA);
#pragma unroll
        for (int j = 0; j < 2; ++j)
          wmma::load_matrix_sync(fb[j], B + kk * LDB + wn * 32 + j * 16, LDB);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    });

#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j], LDC,
                                wmma::mem_row_major);
    __syncthreads();
    for (int e = static_cast<int>(threadIdx.x); e < BM * BN; e += NT) {
      const int m = e / BN, j = e % BN;
      store_partial<float>(a, t, m, j, Cs[m * LDC + j]);
    }
  } else {
    __trap();  // launcher never selects this kernel on such a GPU
  }
}

// SIMT grad_weight. Shared memory, fp64 worst case: 2 x (2x16x66) doubles = 33792 bytes.
template <typename T, int V>
__global__ void __launch_bounds__(256) grad_weight_simt_kernel(GwArgs a) {
  using Acc = typename Elem<T>::Acc;
  constexpr int BM = 64, BN = 64, BK = 16, NT = 256;
  constexpr int kPad = 16 / static_cast<int>(sizeof(T));
  constexpr int LDA = BM + kPad, LDB = BN + kPad;
  static_assert((LDA * sizeof(T)) % 16 == 0 && (LDB * sizeof(T)) % 16 == 0, "vector stores");
  constexpr int kABytes = 2 * BK * LDA * static_cast<int>(sizeof(T));
  constexpr int kBBytes = 2 * BK * LDB * static_cast<int>(sizeof(T));
  static_assert(kABytes % 16 == 0, "buffer alignment");
  __shared__ __align__(16) unsigned char smem[kABytes + kBBytes];
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = reinterpret_cast<T*>(smem + kABytes);

  const GwTile t = make_gw_tile(a);
  const int tx = static_cast<int>(threadIdx.x) & 15, ty = static_cast<int>(threadIdx.x) >> 4;

  Acc acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = Acc(0);

  gw_mainloop<T, V, BM, BN, BK, NT, LDA, LDB>(a, t, As, Bs, [&](const T* A, const T* B) {
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      Acc av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = Elem<T>::to_acc(A[k * LDA + ty + 16 * i]);
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = Elem<T>::to_acc(B[k * LDB + tx + 16 * j]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
  });

#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) store_partial<Acc>(a, t, ty + 16 * i, tx + 16 * j, acc[i][j]);
}

// Second pass: dW[co, ci, kh, kw] = sum over splits (fixed order) of the partials.
template <typename T>
__global__ void __launch_bounds__(256) grad_weight_finalize_kernel(const void* ws_v, void* dw_v,
                                                                   int64_t cout, int64_t cin,
                                                                   int64_t taps, int splits) {
  using Acc = typename Elem<T>::Acc;
  const Acc* ws = static_cast<const Acc*>(ws_v);
  T* dw = static_cast<T*>(dw_v);
  const int64_t total = cout * cin * taps;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += step) {
    const int64_t tap = idx % taps;
    const int64_t rest = idx / taps;
    const int64_t ci = rest % cin, co = rest / cin;
    Acc s = Acc(0);
    for (int sp = 0; sp < splits; ++sp) s += ws[((sp * taps + tap) * cout + co) * cin + ci];
    dw[idx] = Elem<T>::from_acc(s);
  }
}

// ---------------------------------------------------------------------------------------
// Host side

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

int64_t div_up(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T>
constexpr bool is_16bit() {
  return std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;
}

// Whether a tensor-core kernel for T has its real body on the current device. The body was
// compiled for __CUDA_ARCH__ = ptxVersion * 10 of the image the driver picked, so asking the
// kernel (not the device) also covers builds whose arch list lacks the device's own arch.
template <typename T>
bool tc_usable(const void* kernel) {
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    (void)cudaGetLastError();  // not sticky; the SIMT launch reports any real problem
    return false;
  }
  return attr.ptxVersion >= (std::is_same<T, __half>::value ? 70 : 80);
}

bool valid_geometry(int64_t n, int64_t c_in, int64_t h, int64_t w, int64_t c_out, int64_t kh,
                    int64_t kw, int64_t h_out, int64_t w_out, int64_t stride_h, int64_t stride_w,
                    int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w) {
  if (n < 0 || c_in < 0 || h < 0 || w < 0 || c_out < 0 || kh < 1 || kw < 1) return false;
  const ConvGeometry g{{stride_h, stride_w}, {pad_h, pad_w}, {dil_h, dil_w}};
  return g.valid() && h_out >= 0 && w_out >= 0 && h_out == g.out_size(0, h, kh) &&
         w_out == g.out_size(1, w, kw);
}

// 16-bit types: tensor cores when the kernel image has them, else SIMT; 16-byte vector loads
// when the channel counts and pointers allow.
template <typename T, bool kDgrad>
void launch_conv_t(const ConvArgs& a, dim3 grid, cudaStream_t stream) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  const bool vec = a.kc % V == 0 && a.nc % V == 0 && aligned16(a.src) && aligned16(a.wt);
  if constexpr (is_16bit<T>()) {
    void (*k)(ConvArgs) = vec ? conv_wmma_kernel<T, V, kDgrad> : conv_wmma_kernel<T, 1, kDgrad>;
    if (tc_usable<T>(reinterpret_cast<const void*>(k))) {
      k<<<grid, 128, 0, stream>>>(a);
      return;
    }
  }
  void (*k)(ConvArgs) = vec ? conv_simt_kernel<T, V, kDgrad> : conv_simt_kernel<T, 1, kDgrad>;
  k<<<grid, 256, 0, stream>>>(a);
}

// Fills the tiling fields of a and launches the dtype's kernel.
template <bool kDgrad>
cudaError_t launch_conv(ConvArgs a, int dtype, cudaStream_t stream) {
  a.tiling = patch_tiling(a.dst_h, a.dst_w);
  const int64_t grid_x = a.n * a.tiling.tiles_per_img;
  const int64_t grid_y = div_up(a.nc, 64);
  if (grid_x > 0x7fffffff || grid_y > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));

  switch (dtype) {
    case FASTASPP_DTYPE_FLOAT32:
      launch_conv_t<float, kDgrad>(a, grid, stream);
      break;
    case FASTASPP_DTYPE_FLOAT64:
      launch_conv_t<double, kDgrad>(a, grid, stream);
      break;
    case FASTASPP_DTYPE_FLOAT16:
      launch_conv_t<__half, kDgrad>(a, grid, stream);
      break;
    case FASTASPP_DTYPE_BFLOAT16:
      launch_conv_t<__nv_bfloat16, kDgrad>(a, grid, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

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

// Pixel splits of the grad_weight reduction: enough CTAs to fill a large GPU (~1024), at
// least ~1024 pixels per split, at most 64. Shapes only: reproducible across devices.
int64_t grad_weight_splits(int64_t n, int64_t c_in, int64_t c_out, int64_t taps, int64_t h_out,
                           int64_t w_out) {
  const int64_t base = taps * div_up(c_out, 64) * div_up(c_in, 64);
  int64_t s = base > 0 ? div_up(1024, base) : 1;
  const int64_t by_pixels = div_up(n * h_out * w_out, 1024);
  if (s > by_pixels) s = by_pixels;
  if (s > 64) s = 64;
  if (s < 1) s = 1;
  return s;
}

template <typename T>
void launch_grad_weight_t(const GwArgs& a, dim3 grid, cudaStream_t stream) {
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  const bool vec = a.cin % V == 0 && a.cout % V == 0 && aligned16(a.x) && aligned16(a.g);
  if constexpr (is_16bit<T>()) {
    void (*k)(GwArgs) = vec ? grad_weight_wmma_kernel<T, V> : grad_weight_wmma_kernel<T, 1>;
    if (tc_usable<T>(reinterpret_cast<const void*>(k))) {
      k<<<grid, 128, 0, stream>>>(a);
      return;
    }
  }
  void (*k)(GwArgs) = vec ? grad_weight_simt_kernel<T, V> : grad_weight_simt_kernel<T, 1>;
  k<<<grid, 256, 0, stream>>>(a);
}

template <typename T>
void launch_grad_weight_finalize(const GwArgs& a, void* dw, cudaStream_t stream) {
  const int64_t taps = a.kh * a.kw;
  const int64_t total = a.cout * a.cin * taps;
  int64_t blocks = div_up(total, 256);
  if (blocks > 4096) blocks = 4096;  // grid-stride loop covers the rest
  grad_weight_finalize_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      a.ws, dw, a.cout, a.cin, taps, a.splits);
}

}  // namespace
}  // namespace atrous_cuda
}  // namespace fastaspp

// ---------------------------------------------------------------------------------------
// C launchers

using namespace fastaspp::atrous_cuda;

extern "C" cudaError_t fastaspp_atrous_conv2d_forward_strided_cuda(
    const void* x, const void* weight_hwio, const void* scale, const void* shift, void* y,
    int64_t y_pixel_stride, int64_t y_channel_offset, int dtype, int64_t n, int64_t c_in,
    int64_t h, int64_t w, int64_t c_out, int64_t kh, int64_t kw, int64_t h_out, int64_t w_out,
    int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
    int64_t dil_w, int relu, cudaStream_t stream) {
  if (acc_bytes(dtype) < 0 ||
      !valid_geometry(n, c_in, h, w, c_out, kh, kw, h_out, w_out, stride_h, stride_w, pad_h,
                      pad_w, dil_h, dil_w)) {
    return cudaErrorInvalidValue;
  }
  // The slice must lie inside each pixel's run of y_pixel_stride elements, so that no two
  // (pixel, channel) pairs share an address.
  if (y_channel_offset < 0 || y_pixel_stride < c_out ||
      y_channel_offset > y_pixel_stride - c_out) {
    return cudaErrorInvalidValue;
  }
  if (n == 0 || c_out == 0 || h_out == 0 || w_out == 0) return cudaSuccess;
  if (y == nullptr || scale == nullptr || shift == nullptr ||
      (c_in > 0 && (x == nullptr || weight_hwio == nullptr))) {
    return cudaErrorInvalidValue;
  }
  ConvArgs a{};
  a.src = x;
  a.wt = weight_hwio;
  a.scale = scale;
  a.shift = shift;
  a.dst = y;
  a.dst_pixel_stride = y_pixel_stride;
  a.dst_channel_offset = y_channel_offset;
  a.n = n;
  a.src_h = h;
  a.src_w = w;
  a.kc = c_in;
  a.dst_h = h_out;
  a.dst_w = w_out;
  a.nc = c_out;
  a.kh = kh;
  a.kw = kw;
  a.stride_h = stride_h;
  a.stride_w = stride_w;
  a.pad_h = pad_h;
  a.pad_w = pad_w;
  a.dil_h = dil_h;
  a.dil_w = dil_w;
  a.relu = relu != 0;
  return launch_conv<false>(a, dtype, stream);
}

extern "C" cudaError_t fastaspp_atrous_conv2d_forward_cuda(
    const void* x, const void* weight_hwio, const void* scale, const void* shift, void* y,
    int dtype, int64_t n, int64_t c_in, int64_t h, int64_t w, int64_t c_out, int64_t kh,
    int64_t kw, int64_t h_out, int64_t w_out, int64_t stride_h, int64_t stride_w,
    int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w, int relu,
    cudaStream_t stream) {
  // Dense NHWC y: the slice is the whole pixel.
  return fastaspp_atrous_conv2d_forward_strided_cuda(
      x, weight_hwio, scale, shift, y, c_out, 0, dtype, n, c_in, h, w, c_out, kh, kw, h_out,
      w_out, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, relu, stream);
}

extern "C" cudaError_t fastaspp_atrous_conv2d_grad_input_cuda(
    const void* grad, const void* weight_hwoi, void* grad_input, int dtype, int64_t n,
    int64_t c_in, int64_t h, int64_t w, int64_t c_out, int64_t kh, int64_t kw, int64_t h_out,
    int64_t w_out, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dil_h, int64_t dil_w, cudaStream_t stream) {
  if (acc_bytes(dtype) < 0 ||
      !valid_geometry(n, c_in, h, w, c_out, kh, kw, h_out, w_out, stride_h, stride_w, pad_h,
                      pad_w, dil_h, dil_w)) {
    return cudaErrorInvalidValue;
  }
  if (n == 0 || c_in == 0 || h == 0 || w == 0) return cudaSuccess;
  // With an empty grad every tap is dead and the kernel writes zeros without reading it.
  const bool empty_src = c_out == 0 || h_out == 0 || w_out == 0;
  if (grad_input == nullptr || (!empty_src && (grad == nullptr || weight_hwoi == nullptr))) {
    return cudaErrorInvalidValue;
  }
  ConvArgs a{};
  a.src = grad;
  a.wt = weight_hwoi;
  a.dst = grad_input;
  a.dst_pixel_stride = c_in;  // dense NHWC
  a.dst_channel_offset = 0;
  a.n = n;
  a.src_h = h_out;
  a.src_w = w_out;
  a.kc = c_out;
  a.dst_h = h;
  a.dst_w = w;
  a.nc = c_in;
  a.kh = kh;
  a.kw = kw;
  a.stride_h = stride_h;
  a.stride_w = stride_w;
  a.pad_h = pad_h;
  a.pad_w = pad_w;
  a.dil_h = dil_h;
  a.dil_w = dil_w;
  return launch_conv<true>(a, dtype, stream);
}

extern "C" int64_t fastaspp_atrous_conv2d_grad_weight_cuda_workspace_bytes(
    int dtype, int64_t n, int64_t c_in, int64_t h, int64_t w, int64_t c_out, int64_t kh,
    int64_t kw, int64_t h_out, int64_t w_out) {
  const int64_t eb = acc_bytes(dtype);
  if (eb < 0 || n < 0 || c_in < 0 || h < 0 || w < 0 || c_out < 0 || kh < 1 || kw < 1 ||
      h_out < 0 || w_out < 0) {
    return -1;
  }
  const int64_t taps = kh * kw;
  return grad_weight_splits(n, c_in, c_out, taps, h_out, w_out) * taps * c_out * c_in * eb;
}

extern "C" cudaError_t fastaspp_atrous_conv2d_grad_weight_cuda(
    const void* x, const void* grad, void* grad_weight, void* workspace,
    int64_t workspace_bytes, int dtype, int64_t n, int64_t c_in, int64_t h, int64_t w,
    int64_t c_out, int64_t kh, int64_t kw, int64_t h_out, int64_t w_out, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
    cudaStream_t stream) {
  if (acc_bytes(dtype) < 0 ||
      !valid_geometry(n, c_in, h, w, c_out, kh, kw, h_out, w_out, stride_h, stride_w, pad_h,
                      pad_w, dil_h, dil_w)) {
    return cudaErrorInvalidValue;
  }
  if (c_out == 0 || c_in == 0) return cudaSuccess;  // dW is empty
  const int64_t need =
      fastaspp_atrous_conv2d_grad_weight_cuda_workspace_bytes(dtype, n, c_in, h, w, c_out, kh,
                                                              kw, h_out, w_out);
  // With no pixels (n == 0 or an empty output) the kernels never read x or grad and the
  // result is zeros, still written through the same two passes.
  const bool no_pixels = n == 0 || h_out == 0 || w_out == 0;
  if (grad_weight == nullptr || workspace == nullptr || workspace_bytes < need ||
      (!no_pixels && (x == nullptr || grad == nullptr))) {
    return cudaErrorInvalidValue;
  }

  GwArgs a{};
  a.x = x;
  a.g = grad;
  a.ws = workspace;
  a.n = n;
  a.h = h;
  a.w = w;
  a.cin = c_in;
  a.ho = h_out;
  a.wo = w_out;
  a.cout = c_out;
  a.kh = kh;
  a.kw = kw;
  a.stride_h = stride_h;
  a.stride_w = stride_w;
  a.pad_h = pad_h;
  a.pad_w = pad_w;
  a.dil_h = dil_h;
  a.dil_w = dil_w;
  a.co_blocks = div_up(c_out, 64);
  a.ci_blocks = div_up(c_in, 64);
  a.splits = static_cast<int>(grad_weight_splits(n, c_in, c_out, kh * kw, h_out, w_out));
  const int64_t grid_x = kh * kw * a.co_blocks * a.ci_blocks;
  if (grid_x > 0x7fffffff) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(a.splits));

  switch (dtype) {
    case FASTASPP_DTYPE_FLOAT32:
      launch_grad_weight_t<float>(a, grid, stream);
      break;
    case FASTASPP_DTYPE_FLOAT64:
      launch_grad_weight_t<double>(a, grid, stream);
      break;
    case FASTASPP_DTYPE_FLOAT16:
      launch_grad_weight_t<__half>(a, grid, stream);
      break;
    case FASTASPP_DTYPE_BFLOAT16:
      launch_grad_weight_t<__nv_bfloat16>(a, grid, stream);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  switch (dtype) {
    case FASTASPP_DTYPE_FLOAT32:
      launch_grad_weight_finalize<float>(a, grad_weight, stream);
      break;
    case FASTASPP_DTYPE_FLOAT64:
      launch_grad_weight_finalize<double>(a, grad_weight, stream);
      break;
    case FASTASPP_DTYPE_FLOAT16:
      launch_grad_weight_finalize<__half>(a, grad_weight, stream);
      break;
    default:
      launch_grad_weight_finalize<__nv_bfloat16>(a, grad_weight, stream);
      break;
  }
  return cudaGetLastError();
}
