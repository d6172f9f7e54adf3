// How the cuda backend's implicit-GEMM conv kernels tile the dst pixels, and which taps each tile
// visits (host and device; csrc/cuda/atrous_conv.cu).
//
// A CTA owns a 2-D patch of kTilePixels dst pixels of one image, rows x cols with cols a power of
// two, and skips every tap that feeds none of the patch's pixels (docs/design.md §2). Liveness is
// separable: a tap (kh, kw) is live for a patch when kh is live for its rows and kw for its
// columns. The input gradient of a strided conv tiles each stride phase of its dst map apart (a
// patch's pixels are then every stride-th row and column from its phase): a tap then reaches every
// pixel of a patch or none, so a CTA gathers no row of the wrong phase. Plain C++ on
// tap_geometry.h, so that the cpu extension exposes it to tests (_conv_patch_taps,
// tests/test_conv_tiling.py checks it against fastaspp/geometry.py) and the CUDA kernels include
// the same definitions.
#pragma once

#include "tap_geometry.h"

namespace fastaspp {

constexpr int kTilePixels = 64;  // BM of the conv kernels: dst pixels per CTA

// The patches of a dst map: (kTilePixels >> tile_w_log2) rows x (1 << tile_w_log2) columns each,
// tiles_w across, tiles_per_img per image; patch b is patch b % tiles_per_img of image
// b / tiles_per_img, row-major (a kernel with one patch per CTA runs patch b in CTA b).
// With phases_h x phases_w phases (the input gradient of a strided conv: its stride; else 1 x 1),
// the map's rows ph, ph + phases_h, ... and columns pw, pw + phases_w, ... form phase (ph, pw)'s
// sub-map; each phase's sub-map is tiled as a map of its own, phase-major (an image's patches are
// phase 0's rows of patches, then phase 1's, ...), every phase on the grid of the largest.
struct PatchTiling {
  int tile_w_log2;
  int64_t tiles_w, tiles_per_img;
  int64_t phases_h = 1, phases_w = 1;
  FASTASPP_HOST_DEVICE int64_t rows() const { return kTilePixels >> tile_w_log2; }
  FASTASPP_HOST_DEVICE int64_t cols() const { return int64_t(1) << tile_w_log2; }
};

// The patch shape that wastes the least area on a dst_h x dst_w map; ties go to the squarest
// patch, which lets more taps die per patch.
inline int pick_tile_w_log2(int64_t dst_h, int64_t dst_w) {
  static const int kOrder[] = {3, 4, 2, 5, 1, 6, 0};
  int best = 3;
  int64_t best_area = -1;
  for (int lg : kOrder) {
    const int64_t rows = kTilePixels >> lg, cols = int64_t(1) << lg;
    const int64_t area = ceil_div(dst_h, rows) * rows * (ceil_div(dst_w, cols) * cols);
    if (best_area < 0 || area < best_area) {
      best_area = area;
      best = lg;
    }
  }
  return best;
}

// The rows (or columns) of phase `phase` of a dst axis of `size` in `phases` phases.
FASTASPP_HOST_DEVICE int64_t phase_size(int64_t size, int64_t phase, int64_t phases) {
  return size > phase ? ceil_div(size - phase, phases) : 0;
}

inline PatchTiling patch_tiling(int64_t dst_h, int64_t dst_w, int64_t phases_h = 1, int64_t phases_w = 1) {
  PatchTiling t;
  t.phases_h = phases_h;
  t.phases_w = phases_w;
  const int64_t sub_h = phase_size(dst_h, 0, phases_h), sub_w = phase_size(dst_w, 0, phases_w);  // the largest
  t.tile_w_log2 = pick_tile_w_log2(sub_h, sub_w);
  t.tiles_w = ceil_div(sub_w, t.cols());
  t.tiles_per_img = phases_h * phases_w * ceil_div(sub_h, t.rows()) * t.tiles_w;
  return t;
}

// The patches of a conv's dst map as the kernels tile it: the input gradient (dgrad) of a strided
// conv in its stride's phases, so that every tap reaches all of a patch's pixels or none; the
// forward (and a stride-1 input gradient) in one phase.
inline PatchTiling conv_patch_tiling(int64_t dst_h, int64_t dst_w, bool dgrad, int64_t stride_h, int64_t stride_w) {
  return dgrad ? patch_tiling(dst_h, dst_w, stride_h, stride_w) : patch_tiling(dst_h, dst_w);
}

// Rows [r0, r1) and columns [c0, c1) of phase (ph, pw)'s sub-map of image img: one patch, clipped
// to that sub-map (empty where the phase has fewer rows or columns than the largest). Its pixel
// (r, c) is dst pixel (ph + phases_h * r, pw + phases_w * c); with one phase, the same.
struct Patch {
  int64_t img, r0, c0, r1, c1;
  int64_t ph = 0, pw = 0;
};

FASTASPP_HOST_DEVICE Patch patch_of(const PatchTiling& t, int64_t block, int64_t dst_h, int64_t dst_w) {
  const int64_t i = block % t.tiles_per_img;
  const int64_t per_phase = t.tiles_per_img / (t.phases_h * t.phases_w);
  const int64_t phase = i / per_phase, j = i % per_phase;
  Patch p;
  p.img = block / t.tiles_per_img;
  p.ph = phase / t.phases_w;
  p.pw = phase % t.phases_w;
  const int64_t sub_h = phase_size(dst_h, p.ph, t.phases_h), sub_w = phase_size(dst_w, p.pw, t.phases_w);
  p.r0 = (j / t.tiles_w) * t.rows();
  p.c0 = (j % t.tiles_w) * t.cols();
  p.r1 = p.r0 + t.rows() < sub_h ? p.r0 + t.rows() : sub_h;
  p.c1 = p.c0 + t.cols() < sub_w ? p.c0 + t.cols() : sub_w;
  return p;
}

// The patches of one CTA of a kernel that owns `per_cta` (1 or 2) of them: horizontally adjacent
// patches of one patch row (the last CTA of a row owns fewer when tiles_w is not a multiple), so
// slot j holds patch first + j, `cover` spans them all, and slot j is cover's columns from
// c0 + j * cols on. The taps live for any of the patches are exactly the taps live for the cover
// (liveness is separable, and the patches share their rows), so the CTA walks the cover's live
// taps. A slot's statistics row is its patch index, whichever kernel ran it
// (tests/cuda_host/patch_groups.cu checks these claims).
constexpr int kMaxPatchesPerCta = 2;
struct CtaPatches {
  Patch cover;
  int64_t first;  // the patch index of slot 0
  int64_t cols;   // the tiling's patch width
  int count;      // slots [0, count) hold patches
  FASTASPP_HOST_DEVICE Patch slot(int j) const {
    Patch p = cover;
    p.c0 = cover.c0 + j * cols;
    p.c1 = p.c0 + cols < cover.c1 ? p.c0 + cols : cover.c1;
    return p;
  }
  FASTASPP_HOST_DEVICE int64_t index(int j) const { return first + j; }
};

// CTAs per image of a kernel owning per_cta patches each: the grid's x extent is n times this.
FASTASPP_HOST_DEVICE int64_t ctas_per_img(const PatchTiling& t, int per_cta) {
  return t.tiles_per_img / t.tiles_w * ceil_div(t.tiles_w, int64_t(per_cta));
}

FASTASPP_HOST_DEVICE CtaPatches cta_patches_of(const PatchTiling& t, int per_cta, int64_t cta, int64_t dst_h,
                                               int64_t dst_w) {
  const int64_t ctas_w = ceil_div(t.tiles_w, int64_t(per_cta));
  const int64_t per_img = t.tiles_per_img / t.tiles_w * ctas_w;
  const int64_t img = cta / per_img, i = cta % per_img, col0 = (i % ctas_w) * per_cta;
  CtaPatches g;
  g.first = img * t.tiles_per_img + (i / ctas_w) * t.tiles_w + col0;
  g.cols = t.cols();
  g.count = t.tiles_w - col0 < per_cta ? static_cast<int>(t.tiles_w - col0) : per_cta;
  g.cover = patch_of(t, g.first, dst_h, dst_w);
  const int64_t end = g.cover.c0 + g.count * g.cols, sub_w = phase_size(dst_w, g.cover.pw, t.phases_w);
  g.cover.c1 = end < sub_w ? end : sub_w;
  return g;
}

// Bit m set when dst pixel m of patch p (row m >> tile_w_log2, column m & (cols - 1)) lies in
// the map: the pixels whose outputs are stored, and the ones the BN statistics count.
FASTASPP_HOST_DEVICE uint64_t patch_pixel_mask(const PatchTiling& t, const Patch& p) {
  const int64_t rows = p.r1 - p.r0, cols = p.c1 - p.c0;  // cols <= t.cols() <= 64
  if (rows <= 0 || cols <= 0) return 0;  // a phase's patch past its sub-map
  const uint64_t row_bits = cols >= 64 ? ~uint64_t(0) : (uint64_t(1) << cols) - 1;
  uint64_t mask = 0;
  for (int64_t r = 0; r < rows; ++r) mask |= row_bits << (r << t.tile_w_log2);
  return mask;
}

// Whether tap k (one axis) feeds any of the patch's dst coordinates, phase + phases * u for u in
// [t0, t1) (phases is 1, or the input gradient's stride s).
// forward: dst = the output axis (dst_size outputs), src = the input axis; the live outputs are
//   tap_live_range itself.
// grad_input (kDgrad): dst = the input axis, src = the output axis. The inputs tap k touches are
//   o*s + off for o in tap_live_range(k, in = dst_size, out = src_size): intersect the o whose
//   input lands in [t0, t1), or with phases = s, the o = u + (phase - off) / s of u in [t0, t1)
//   when phase - off is a multiple of s (else the tap reaches none of the phase's inputs).
template <bool kDgrad>
FASTASPP_HOST_DEVICE bool patch_tap_live(int64_t k, int64_t src_size, int64_t dst_size, int64_t s, int64_t p,
                                         int64_t d, int64_t t0, int64_t t1, int64_t phase = 0, int64_t phases = 1) {
  if (!kDgrad) {
    const LiveRange r = tap_live_range(k, src_size, dst_size, s, p, d);
    return (r.lo > t0 ? r.lo : t0) < (r.hi < t1 ? r.hi : t1);
  }
  const LiveRange r = tap_live_range(k, dst_size, src_size, s, p, d);
  const int64_t off = tap_offset(k, d, p);
  if (phases > 1) {
    const int64_t q = floor_div(phase - off, s);
    if (q * s != phase - off) return false;
    return (r.lo > t0 + q ? r.lo : t0 + q) < (r.hi < t1 + q ? r.hi : t1 + q);
  }
  const int64_t lo_t = ceil_div(t0 - off, s);
  const int64_t hi_t = floor_div(t1 - 1 - off, s) + 1;
  return (r.lo > lo_t ? r.lo : lo_t) < (r.hi < hi_t ? r.hi : hi_t);
}

}  // namespace fastaspp
