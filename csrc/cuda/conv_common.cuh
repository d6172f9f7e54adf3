// What the cuda backend's implicit-GEMM conv kernels share (atrous_conv.cu: the WMMA and SIMT
// kernels; conv_cute.cuh: the CuTe tensor-core kernel): their arguments in dst / src terms, the
// batches of convs a launch runs, the (conv, live tap, channel chunk) walk of a CTA's patch, the
// gather of a dst pixel's src row, the src prologue of the training projection, and the epilogue
// (one output element, or a whole tile staged in shared memory with the patch's BN statistics).
// The tiling and its invariants are described at the top of atrous_conv.cu. Pure CUDA, included
// only by .cu files.
#pragma once

#include <cstring>
#include <type_traits>

#include "../common/k_split.h"
#include "../common/patch_stats.h"
#include "kernel_common.cuh"

namespace fastaspp {
namespace atrous_cuda {
namespace {  // internal linkage, as kernel_common.cuh

// ---------------------------------------------------------------------------------------
// Conv (forward / grad_input) arguments, in dst / src terms (see the note at the top).
// The pointers marked "or null" are forward-only options (FastasppForwardOptions in atrous_conv.h).
struct ConvArgs {
  const void* src;
  const void* wt;          // [KH, KW, kc, nc]
  const void* scale;       // [nc], or null (1)
  const void* shift;       // [nc], or null (0)
  const void* image_bias;  // [N, nc], or null: added after shift, before the ReLU
  // The src prologue, all three or none (1x1, stride 1, no padding): src element (p, k) enters
  // the GEMM as relu((src - src_centre[k]) * src_scale[k] + src_shift[k]). Zero fills stay zero.
  const void* src_centre;
  const void* src_scale;
  const void* src_shift;
  void* stats;  // [3][patches][dst_pixel_stride] Acc, or null: count, sum, M2 per (patch, channel)
  int64_t stats_plane;  // patches * dst_pixel_stride
  void* dst;            // pixel p, channel c at dst[p * dst_pixel_stride + dst_channel_offset + c]
  int64_t n, src_h, src_w, kc, dst_h, dst_w, nc, kh, kw;
  int64_t dst_pixel_stride, dst_channel_offset;  // elements; offset + nc <= stride
  int64_t src_pixel_stride, src_channel_offset;  // src pixel q, channel k at src[q * stride + offset + k]
  int64_t stride_h, stride_w, pad_h, pad_w, dil_h, dil_w;
  PatchTiling tiling;  // conv_tiling.h: the dst patch each CTA owns (conv_patch_tiling)
  int relu;
  int parts;  // the parts of a split K loop this conv's CTAs walk (read only when ConvBatch::splits > 1)
};

// Up to kMaxConvs convs over the same dst map launched together; a single conv is a batch of one.
// Two modes:
// * grid (sum_convs = 0; the ASPP's forward branches, each into its channel slice): grid.y runs
//   over (conv, dst channel block), and a CTA computes its one conv;
// * sum (sum_convs = 1; the ASPP's input gradient, every branch's into the same dx): grid.y runs
//   over dst channel blocks, and a CTA's K loop walks every conv's live (tap, chunk) steps into one
//   accumulator; the epilogue is conv[0]'s, and every conv has conv[0]'s dst, nc and dst map.
// Kernels take it as a __grid_constant__ parameter, so a CTA reads the arguments in place (no
// copy of the array).
constexpr int kMaxConvs = 8;
// A launch may also split its CTAs' K loops (common/k_split.h; CuTe kernels with one patch a CTA
// only): grid.z runs over up to `splits` parts, the CTAs of a conv that splits (ConvArgs::parts > 1;
// in sum mode conv[0]'s) write their fp32 tiles to `partials` instead of running the epilogue, and
// conv_split_finalize_kernel (conv_cute.cuh) sums their parts and runs it; z past a conv's parts is
// no CTA of it.
struct ConvBatch {
  ConvArgs conv[kMaxConvs];
  int count;
  int blocks_per_conv;  // dst channel blocks per conv, of the launched kernel's BN
  int sum_convs;
  int splits;       // the most parts of any conv (grid.z), 1 (or 0) when no K loop is split
  float* partials;  // [splits][grid.y][grid.x][BM x BN] fp32 tiles, row-major; null when not split
};

// The convs [first, end) a CTA's K loop walks; `first` is also the conv whose epilogue it runs.
struct ConvRange {
  int first, end;
};
__device__ __forceinline__ ConvRange cta_convs(const ConvBatch& b) {
  if (b.sum_convs) return {0, b.count};
  const int conv = static_cast<int>(blockIdx.y) / b.blocks_per_conv;
  return {conv, conv + 1};
}
template <int BN>
__device__ __forceinline__ int64_t cta_n0(const ConvBatch& b) {
  return static_cast<int64_t>(blockIdx.y % b.blocks_per_conv) * BN;
}

// The patches this CTA owns, kPatches per CTA (conv_tiling.h's grouping; 1: CTA b owns patch b).
template <int kPatches>
__device__ __forceinline__ CtaPatches cta_patches(const ConvArgs& a) {
  if constexpr (kPatches == 1) {  // what cta_patches_of returns for one, without its divisions
    CtaPatches g;
    g.first = blockIdx.x;
    g.cols = a.tiling.cols();
    g.count = 1;
    g.cover = patch_of(a.tiling, blockIdx.x, a.dst_h, a.dst_w);
    return g;
  }
  return cta_patches_of(a.tiling, kPatches, blockIdx.x, a.dst_h, a.dst_w);
}

// Slot `slot`'s patch: the cover itself when a CTA owns one patch (the same box, known here).
template <int kPatches>
__host__ __device__ __forceinline__ Patch cta_slot(const CtaPatches& cp, int slot) {
  return kPatches == 1 ? cp.cover : cp.slot(slot);
}

// First tap >= tap that is live for the whole patch (or kh*kw when none is).
template <bool kDgrad>
__host__ __device__ int64_t next_live_tap(const ConvArgs& a, const Patch& t, int64_t tap) {
  const int64_t taps = a.kh * a.kw;
  for (; tap < taps; ++tap) {
    const int64_t kh = tap / a.kw, kw = tap % a.kw;
    if (patch_tap_live<kDgrad>(kh, a.src_h, a.dst_h, a.stride_h, a.pad_h, a.dil_h, t.r0, t.r1, t.ph,
                               a.tiling.phases_h) &&
        patch_tap_live<kDgrad>(kw, a.src_w, a.dst_w, a.stride_w, a.pad_w, a.dil_w, t.c0, t.c1, t.pw,
                               a.tiling.phases_w)) {
      break;
    }
  }
  return tap;
}

// One K step: src channels [k0, k0 + BK) of a live tap of a conv. The walk visits the convs of
// the range in order, each one's live taps in order, each tap's chunks in order; it depends only
// on blockIdx and the arguments, so every thread of a CTA walks the same steps.
struct Step {
  int conv;     // == the range's end when the walk is exhausted
  int64_t tap;
  int64_t k0;   // first src channel of the chunk
};

// The first step at or after conv `conv`'s first live tap.
template <bool kDgrad>
__host__ __device__ __forceinline__ Step first_step(const ConvBatch& b, int conv, int end, const Patch& t) {
  for (; conv < end; ++conv) {
    const ConvArgs& a = b.conv[conv];
    if (a.kc <= 0) continue;
    const int64_t tap = next_live_tap<kDgrad>(a, t, 0);
    if (tap < a.kh * a.kw) return Step{conv, tap, 0};
  }
  return Step{end, 0, 0};
}

template <bool kDgrad, int BK>
__host__ __device__ __forceinline__ Step next_step(const ConvBatch& b, int end, const Patch& t, Step s) {
  const ConvArgs& a = b.conv[s.conv];
  s.k0 += BK;
  if (s.k0 < a.kc) return s;
  s.k0 = 0;
  s.tap = next_live_tap<kDgrad>(a, t, s.tap + 1);
  if (s.tap < a.kh * a.kw) return s;
  return first_step<kDgrad>(b, s.conv + 1, end, t);
}

// The number of steps of the walk over [first, end) (the CuTe pipeline's trip count).
template <bool kDgrad, int BK>
__host__ __device__ int64_t count_steps(const ConvBatch& b, ConvRange r, const Patch& t) {
  int64_t steps = 0;
  for (int conv = r.first; conv < r.end; ++conv) {
    const ConvArgs& a = b.conv[conv];
    if (a.kc <= 0) continue;
    for (int64_t tap = next_live_tap<kDgrad>(a, t, 0); tap < a.kh * a.kw; tap = next_live_tap<kDgrad>(a, t, tap + 1))
      steps += ceil_div(a.kc, int64_t(BK));
  }
  return steps;
}

// Step `index` of the walk over [first, end) (index below count_steps; else the exhausted walk):
// where one part of a split K loop starts, possibly inside a tap. It skips whole taps by their step
// counts, one pass over the live taps as count_steps.
template <bool kDgrad, int BK>
__host__ __device__ Step step_at(const ConvBatch& b, ConvRange r, const Patch& t, int64_t index) {
  for (int conv = r.first; conv < r.end; ++conv) {
    const ConvArgs& a = b.conv[conv];
    if (a.kc <= 0) continue;
    const int64_t per_tap = ceil_div(a.kc, int64_t(BK));
    for (int64_t tap = next_live_tap<kDgrad>(a, t, 0); tap < a.kh * a.kw; tap = next_live_tap<kDgrad>(a, t, tap + 1)) {
      if (index < per_tap) return Step{conv, tap, index * BK};
      index -= per_tap;
    }
  }
  return Step{r.end, 0, 0};
}

// The taps along one axis of conv a (rows: kh, else columns: kw) live for dst rows (columns)
// [t0, t1) of phase `phase`: a patch's live taps are the pairs of its live rows and columns.
template <bool kDgrad>
__host__ int64_t axis_live_taps(const ConvArgs& a, bool rows, int64_t t0, int64_t t1, int64_t phase) {
  int64_t live = 0;
  for (int64_t k = 0, taps = rows ? a.kh : a.kw; k < taps; ++k) {
    live += rows ? patch_tap_live<kDgrad>(k, a.src_h, a.dst_h, a.stride_h, a.pad_h, a.dil_h, t0, t1, phase,
                                          a.tiling.phases_h)
                 : patch_tap_live<kDgrad>(k, a.src_w, a.dst_w, a.stride_w, a.pad_w, a.dil_w, t0, t1, phase,
                                          a.tiling.phases_w);
  }
  return live;
}

// Calls visit(t0, t1, phase) for each patch row (rows) or column of a dst map of `size` rows
// (columns) tiled by t, every phase: [t0, t1) are its rows (columns) of that phase's sub-map.
template <typename Visit>
__host__ void for_each_patch_line(const PatchTiling& t, bool rows, int64_t size, Visit&& visit) {
  const int64_t phases = rows ? t.phases_h : t.phases_w, extent = rows ? t.rows() : t.cols();
  const int64_t lines = rows ? t.tiles_per_img / (t.phases_h * t.phases_w) / t.tiles_w : t.tiles_w;
  for (int64_t phase = 0; phase < phases; ++phase) {
    const int64_t sub = phase_size(size, phase, phases);
    for (int64_t line = 0; line < lines; ++line) {
      const int64_t t0 = line * extent;
      visit(t0, t0 + extent < sub ? t0 + extent : sub, phase);
    }
  }
}

// The longest K loop (count_steps) of a launch's one-patch CTAs, which a split K loop's plan
// sizes its parts by (k_split_plan): in grid mode each conv's (walks[i], over its patches), in sum
// mode the walk over every conv (walks[0]); returns how many it wrote (b.count, or 1). Liveness is
// separable, so a patch walks (its row's live taps) x (its column's) x chunks steps of a conv: grid
// mode takes each axis' most, sum mode the most over the patches of their sums over the convs.
// Host only, before a launch: (patch rows + columns) x taps tests a conv, patches x kw in sum mode.
template <bool kDgrad, int BK>
__host__ int longest_walks(const ConvBatch& b, int64_t* walks) {
  const PatchTiling& tiling = b.conv[0].tiling;  // every conv has the same dst map, so the same patches
  const int64_t dst_h = b.conv[0].dst_h, dst_w = b.conv[0].dst_w;
  int64_t chunks[kMaxConvs];
  for (int i = 0; i < b.count; ++i) chunks[i] = b.conv[i].kc > 0 ? ceil_div(b.conv[i].kc, int64_t(BK)) : 0;
  if (b.sum_convs) {
    int64_t longest = 0;
    for_each_patch_line(tiling, true, dst_h, [&](int64_t r0, int64_t r1, int64_t ph) {
      int64_t live_rows[kMaxConvs];
      for (int i = 0; i < b.count; ++i) live_rows[i] = axis_live_taps<kDgrad>(b.conv[i], true, r0, r1, ph);
      for_each_patch_line(tiling, false, dst_w, [&](int64_t c0, int64_t c1, int64_t pw) {
        int64_t walk = 0;
        for (int i = 0; i < b.count; ++i) {
          if (live_rows[i] > 0 && chunks[i] > 0)
            walk += live_rows[i] * axis_live_taps<kDgrad>(b.conv[i], false, c0, c1, pw) * chunks[i];
        }
        longest = walk > longest ? walk : longest;
      });
    });
    walks[0] = longest;
    return 1;
  }
  for (int i = 0; i < b.count; ++i) {
    int64_t most_rows = 0, most_cols = 0;
    for_each_patch_line(tiling, true, dst_h, [&](int64_t r0, int64_t r1, int64_t ph) {
      const int64_t live = axis_live_taps<kDgrad>(b.conv[i], true, r0, r1, ph);
      most_rows = live > most_rows ? live : most_rows;
    });
    for_each_patch_line(tiling, false, dst_w, [&](int64_t c0, int64_t c1, int64_t pw) {
      const int64_t live = axis_live_taps<kDgrad>(b.conv[i], false, c0, c1, pw);
      most_cols = live > most_cols ? live : most_cols;
    });
    walks[i] = most_rows * most_cols * chunks[i];
  }
  return b.count;
}

// The taps of conv a live for patch t, as bits (bit tap; kh * kw <= 64): the TMA kernel's walk
// (conv_tma.cuh) reads them instead of testing liveness step by step.
template <bool kDgrad>
__host__ __device__ uint64_t live_tap_bits(const ConvArgs& a, const Patch& t) {
  uint64_t bits = 0;
  for (int64_t tap = next_live_tap<kDgrad>(a, t, 0); tap < a.kh * a.kw; tap = next_live_tap<kDgrad>(a, t, tap + 1))
    bits |= uint64_t(1) << tap;
  return bits;
}

// The index of the lowest set bit of bits (not 0).
__host__ __device__ __forceinline__ int lowest_bit(uint64_t bits) {
#if defined(__CUDA_ARCH__)
  return __ffsll(static_cast<long long>(bits)) - 1;
#else
  return __builtin_ctzll(bits);
#endif
}

// The steps of the walk over convs [first, last) whose live taps are live_taps[conv] (count_steps's
// count, from the masks).
template <int BK>
__host__ __device__ __forceinline__ int count_live_steps(const ConvBatch& b, int first, int last,
                                                         const uint64_t* live_taps) {
  int steps = 0;
  for (int conv = first; conv < last; ++conv) {
#if defined(__CUDA_ARCH__)
    const int taps = __popcll(static_cast<long long>(live_taps[conv]));
#else
    const int taps = __builtin_popcountll(live_taps[conv]);
#endif
    steps += taps * static_cast<int>((b.conv[conv].kc + BK - 1) / BK);
  }
  return steps;
}

// Steps [begin, end) of the walk over convs [first, last) whose live taps are live_taps[conv]
// (live_tap_bits), in order: visit(conv, tap, k0) per step, each conv's live taps in order, each
// tap's chunks of BK channels in order (the walk of first_step / next_step, and of step_at for a
// part that starts inside a tap). Taps wholly before begin are skipped by their step counts, in
// 32-bit arithmetic: the TMA kernel's producer walks it on 40 registers.
template <int BK, typename Visit>
__host__ __device__ __forceinline__ void walk_live_steps(const ConvBatch& b, int first, int last,
                                                         const uint64_t* live_taps, int begin, int end,
                                                         Visit&& visit) {
  int index = 0;  // the walk's step at hand
  for (int conv = first; conv < last && index < end; ++conv) {
    const ConvArgs& c = b.conv[conv];
    const int kc = static_cast<int>(c.kc), per_tap = (kc + BK - 1) / BK;
    for (uint64_t bits = live_taps[conv]; bits != 0 && index < end; bits &= bits - 1) {
      if (index + per_tap <= begin) {  // a tap wholly before the part
        index += per_tap;
        continue;
      }
      const int tap = lowest_bit(bits);
      const int skipped = index < begin ? begin - index : 0;  // the tap's chunks before the part
      index += skipped;
      for (int k0 = skipped * BK; k0 < kc && index < end; k0 += BK, ++index) visit(conv, tap, k0);
    }
  }
}

// The dst row and column of pixel m of patch t (row m >> tile_w_log2 of the patch, column
// m & (cols - 1), through its phase: conv_tiling.h's Patch), or false where the patch overhangs
// its (phase's) map.
__host__ __device__ __forceinline__ bool patch_pixel(const ConvArgs& a, const Patch& t, int m, int64_t& r,
                                                     int64_t& c) {
  const int64_t u = t.r0 + (m >> a.tiling.tile_w_log2);
  const int64_t v = t.c0 + (m & ((1 << a.tiling.tile_w_log2) - 1));
  if (u >= t.r1 || v >= t.c1) return false;
  r = t.ph + a.tiling.phases_h * u;
  c = t.pw + a.tiling.phases_w * v;
  return true;
}

// Row m of the A tile: the src row (kc channels) of the pixel that dst pixel m of the patch reads
// through tap (kh, kw), or nullptr when it reads padding / lies outside the map.
template <bool kDgrad, typename T>
__host__ __device__ __forceinline__ const T* gather_row(const ConvArgs& a, const Patch& t, int64_t kh,
                                               int64_t kw, int m) {
  int64_t r, c;
  if (!patch_pixel(a, t, m, r, c)) return nullptr;
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
  return static_cast<const T*>(a.src) + ((t.img * a.src_h + sr) * a.src_w + sc) * a.src_pixel_stride +
         a.src_channel_offset;
}

// Row m of the A tile of a CTA owning kPatches patches: the src row that pixel m % kTilePixels of
// slot m / kTilePixels's patch reads through tap (kh, kw), or nullptr where it reads padding, lies
// outside the map or the slot holds no patch (tests/cuda_host/conv_walk.cu runs it).
template <int kPatches, bool kDgrad, typename T>
__host__ __device__ __forceinline__ const T* tile_row_src(const ConvArgs& a, const CtaPatches& cp, int64_t kh,
                                                          int64_t kw, int m) {
  const int slot = m / kTilePixels;
  return slot < cp.count ? gather_row<kDgrad, T>(a, cta_slot<kPatches>(cp, slot), kh, kw, m % kTilePixels) : nullptr;
}

// 8 16-bit values from 16-byte aligned memory, and back.
template <typename T>
__host__ __device__ __forceinline__ void load8(T (&v)[8], const T* p) {
  static_assert(sizeof(T) == 2, "8 values per 16 bytes");
  const uint4 bits = *reinterpret_cast<const uint4*>(p);
  memcpy(v, &bits, sizeof(bits));
}
template <typename T>
__host__ __device__ __forceinline__ void store8(T* p, const T (&v)[8]) {
  static_assert(sizeof(T) == 2, "8 values per 16 bytes");
  unsigned int w[4];
  memcpy(w, v, sizeof(w));
#if defined(__CUDA_ARCH__)
  // One 16-byte store: nvcc split a plain uint4 store of these words into four 4-byte ones.
  asm volatile("st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
               : "memory");
#else
  memcpy(p, w, sizeof(w));
#endif
}

// The prologue's value of a src element v of a channel with that centre, scale and shift.
template <typename T>
__device__ __forceinline__ T prologue_math(T v, T centre, T scale, T shift) {
  using Acc = typename Elem<T>::Acc;
  Acc u = (Elem<T>::to_acc(v) - Elem<T>::to_acc(centre)) * Elem<T>::to_acc(scale) + Elem<T>::to_acc(shift);
  if (u < Acc(0)) u = Acc(0);  // comparison, not fmax: NaN propagates like torch.relu
  return Elem<T>::from_acc(u);
}

// The prologue's value of src element v of channel k (forward with a.src_scale only).
template <typename T>
__device__ __forceinline__ T prologue_value(const ConvArgs& a, int64_t k, T v) {
  return prologue_math(v, static_cast<const T*>(a.src_centre)[k], static_cast<const T*>(a.src_scale)[k],
                       static_cast<const T*>(a.src_shift)[k]);
}

// Whether prologue_chunk may read the prologue's three per-channel vectors 16 bytes at a time (the
// same for every chunk of a launch: a chunk's channels start at a multiple of 8).
__device__ __forceinline__ bool prologue_vectors_ok(const ConvArgs& a) {
  return aligned16(a.src_centre) && aligned16(a.src_scale) && aligned16(a.src_shift);
}

// The prologue over one 16-byte chunk of 16-bit src elements in shared memory, channels k..k+7
// (k a multiple of 8): the three per-channel vectors by 16-byte loads when `vectors`
// (prologue_vectors_ok), else one value at a time.
template <typename T>
__device__ __forceinline__ void prologue_chunk(const ConvArgs& a, int64_t k, bool vectors, void* chunk) {
  static_assert(sizeof(T) == 2, "8 elements per 16-byte chunk");
  // Explicit shared-memory accesses: through the generic pointer nvcc emitted generic ones.
  const unsigned int at = static_cast<unsigned int>(__cvta_generic_to_shared(chunk));
  unsigned int w[4];
  asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n" : "=r"(w[0]), "=r"(w[1]), "=r"(w[2]), "=r"(w[3]) : "r"(at));
  T v[8];
  memcpy(v, w, sizeof(w));
  if (vectors) {
    T c[8], s[8], h[8];
    load8(c, static_cast<const T*>(a.src_centre) + k);
    load8(s, static_cast<const T*>(a.src_scale) + k);
    load8(h, static_cast<const T*>(a.src_shift) + k);
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = prologue_math(v[e], c[e], s[e], h[e]);
  } else {
#pragma unroll
    for (int e = 0; e < 8; ++e) v[e] = prologue_value<T>(a, k + e, v[e]);
  }
  memcpy(w, v, sizeof(w));
  asm volatile("st.shared.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"r"(at), "r"(w[0]), "r"(w[1]), "r"(w[2]), "r"(w[3])
               : "memory");
}

// Where dst pixel m of the patch keeps its channel 0 (of the slice: dst_channel_offset included),
// or -1 where the patch overhangs the map. Both stores below address dst through it.
__host__ __device__ __forceinline__ int64_t dst_pixel_start(const ConvArgs& a, const Patch& t, int m) {
  int64_t r, c;
  if (!patch_pixel(a, t, m, r, c)) return -1;
  return ((t.img * a.dst_h + r) * a.dst_w + c) * a.dst_pixel_stride + a.dst_channel_offset;
}

// One output element: the forward epilogue (scale, shift, image bias, ReLU) or a plain store for
// grad_input. Returns the value before it is rounded to T (what the BN statistics see).
template <typename T, bool kDgrad, typename Acc>
__host__ __device__ __forceinline__ Acc store_output(const ConvArgs& a, const Patch& t, int m, int64_t co,
                                                     Acc v) {
  const int64_t at = dst_pixel_start(a, t, m);
  if (at < 0 || co >= a.nc) return v;
  if (!kDgrad) {
    if (a.scale != nullptr) v = v * Elem<T>::to_acc(static_cast<const T*>(a.scale)[co]);
    if (a.shift != nullptr) v = v + Elem<T>::to_acc(static_cast<const T*>(a.shift)[co]);
    if (a.image_bias != nullptr) {
      v = v + Elem<T>::to_acc(static_cast<const T*>(a.image_bias)[t.img * a.nc + co]);
    }
    if (a.relu && v < Acc(0)) v = Acc(0);  // comparison, not fmax: NaN propagates like torch
  }
  static_cast<T*>(a.dst)[at + co] = Elem<T>::from_acc(v);
  return v;
}

// store_output for row m of the tile of a CTA owning kPatches patches (pixel m % kTilePixels of slot
// m / kTilePixels's patch): staged_epilogue's per-value store (tests/cuda_host/conv_walk.cu runs it).
template <typename T, bool kDgrad, int kPatches, typename Acc>
__host__ __device__ __forceinline__ Acc store_tile_value(const ConvArgs& a, const CtaPatches& cp, int m, int64_t co,
                                                         Acc v) {
  return store_output<T, kDgrad, Acc>(a, cta_slot<kPatches>(cp, m / kTilePixels), m % kTilePixels, co, v);
}

// Whether the staged epilogue may move 8 channels of a pixel (16 bytes) at a time: 16-bit values,
// channel counts, the pixel stride and the slice's offset in whole chunks of 8 (so a chunk of the
// tile is wholly inside or outside the channels), 16-byte aligned dst and per-channel vectors, and
// tile rows (ldc floats) that keep 16-byte alignment. The same for every thread of a launch.
template <typename T>
__host__ __device__ __forceinline__ bool epilogue_chunks_ok(const ConvArgs& a, int ldc) {
  return sizeof(T) == 2 && ldc % 4 == 0 && a.nc % 8 == 0 && a.dst_pixel_stride % 8 == 0 &&
         a.dst_channel_offset % 8 == 0 && aligned16(a.dst) && aligned16(a.scale) && aligned16(a.shift) &&
         aligned16(a.image_bias);
}

// store_output for channels co .. co + 7 of dst pixel m (co a multiple of 8: all 8 exist or none),
// from the 8 fp32 accumulators at v (16-byte aligned): the same arithmetic per value, with 16-byte
// loads of the per-channel vectors and one 16-byte store. With `keep`, the values before rounding
// replace v's (what the BN statistics read). tests/cuda_host/epilogue_chunks.cu checks it against
// store_output bit for bit.
template <typename T, bool kDgrad>
__host__ __device__ __forceinline__ void store_output_chunk(const ConvArgs& a, const Patch& t, int m, int64_t co,
                                                            float* v, bool keep) {
  const int64_t at = dst_pixel_start(a, t, m);
  if (at < 0 || co >= a.nc) return;
  float x[8];
  const float4 lo = reinterpret_cast<const float4*>(v)[0], hi = reinterpret_cast<const float4*>(v)[1];
  x[0] = lo.x, x[1] = lo.y, x[2] = lo.z, x[3] = lo.w, x[4] = hi.x, x[5] = hi.y, x[6] = hi.z, x[7] = hi.w;
  if (!kDgrad) {
    T p[8];
    if (a.scale != nullptr) {
      load8(p, static_cast<const T*>(a.scale) + co);
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] = x[e] * Elem<T>::to_acc(p[e]);
    }
    if (a.shift != nullptr) {
      load8(p, static_cast<const T*>(a.shift) + co);
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] = x[e] + Elem<T>::to_acc(p[e]);
    }
    if (a.image_bias != nullptr) {
      load8(p, static_cast<const T*>(a.image_bias) + t.img * a.nc + co);
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] = x[e] + Elem<T>::to_acc(p[e]);
    }
    if (a.relu) {
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        if (x[e] < 0.0f) x[e] = 0.0f;  // comparison, not fmax: NaN propagates like torch
      }
    }
  }
  T out[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) out[e] = Elem<T>::from_acc(x[e]);
  store8(static_cast<T*>(a.dst) + at + co, out);
  if (keep) {
    reinterpret_cast<float4*>(v)[0] = make_float4(x[0], x[1], x[2], x[3]);
    reinterpret_cast<float4*>(v)[1] = make_float4(x[4], x[5], x[6], x[7]);
  }
}

// The epilogue of a CTA tile staged in shared memory, cs[m * ldc + j] holding row m of the tile
// and channel n0 + j (kTilePixels rows per patch slot of cp: row m is pixel m % kTilePixels of
// slot m / kTilePixels; BN columns): every element of the slots that hold patches is stored as
// store_output does and its value written back in place; with a.stats (forward only), each
// channel's statistics over each patch then go to the patch's row (its index) of the planes, at
// column dst_channel_offset + channel. Starts after a barrier that made the tile visible; all NT
// threads must call it; Sync is their barrier (the whole CTA, or conv_tma.cuh's consumer warpgroups).
template <typename T, bool kDgrad, int BN, int NT, int kPatches, typename Sync = CtaBarrier, typename Acc>
__device__ void staged_epilogue(const ConvArgs& a, const CtaPatches& cp, int64_t n0, Acc* cs, int ldc) {
  const int rows = kPatches == 1 ? kTilePixels : cp.count * kTilePixels;
  bool chunked = false;
  if constexpr (sizeof(T) == 2 && std::is_same<Acc, float>::value && BN % 8 == 0) {
    if (epilogue_chunks_ok<T>(a, ldc)) {  // uniform
      // 8 channels of a pixel per thread, consecutive threads along the pixel's channels: 16-byte,
      // coalesced NHWC stores and loads of the per-channel vectors.
      constexpr int kChunks = BN / 8;
      const bool keep = !kDgrad && a.stats != nullptr;
      for (int e = static_cast<int>(threadIdx.x); e < rows * kChunks; e += NT) {
        const int m = e / kChunks, j = (e % kChunks) * 8;
        store_output_chunk<T, kDgrad>(a, cta_slot<kPatches>(cp, m / kTilePixels), m % kTilePixels, n0 + j,
                                      cs + m * ldc + j, keep);
      }
      chunked = true;
    }
  }
  if (!chunked) {
    // Consecutive threads take consecutive channels: coalesced NHWC stores.
    for (int e = static_cast<int>(threadIdx.x); e < rows * BN; e += NT) {
      const int m = e / BN, j = e % BN;
      cs[m * ldc + j] = store_tile_value<T, kDgrad, kPatches, Acc>(a, cp, m, n0 + j, cs[m * ldc + j]);
    }
  }
  if constexpr (!kDgrad) {
    if (a.stats == nullptr) return;  // uniform across the CTA
    Sync{}();
    for (int e = static_cast<int>(threadIdx.x); e < rows / kTilePixels * BN; e += NT) {
      const int slot = e / BN, j = e % BN;
      const int64_t co = n0 + j;
      if (co >= a.nc) continue;
      const uint64_t pixels = patch_pixel_mask(a.tiling, cta_slot<kPatches>(cp, slot));
      const PatchStats<Acc> s = column_stats(cs + slot * kTilePixels * ldc + j, ldc, pixels);
      Acc* out = static_cast<Acc*>(a.stats) + cp.index(slot) * a.dst_pixel_stride + a.dst_channel_offset + co;
      out[0] = s.count;
      out[a.stats_plane] = s.sum;
      out[2 * a.stats_plane] = s.m2;
    }
  }
}

}  // namespace
}  // namespace atrous_cuda
}  // namespace fastaspp
