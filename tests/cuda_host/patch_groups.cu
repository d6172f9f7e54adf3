// Host checks of how the conv kernels group dst patches into CTAs (cta_patches_of, ctas_per_img in
// csrc/common/conv_tiling.h), run by tests/test_cuda_host_programs.py without a GPU:
// * every patch of every image belongs to exactly one (CTA, slot), and a slot's index is that
//   patch's place in patch_of's order (the statistics row the host merges), for one and two
//   patches per CTA and every patch shape, and slot j holds that patch;
// * one patch per CTA is the old grid: CTA b owns patch b;
// * a CTA's patches are horizontally adjacent and its cover is the box they span;
// * a tap is live for the cover exactly when it is live for one of its patches (the CTA walks the
//   cover's live taps), forward and input gradient, over random geometries.
// Prints one line per failed check and "ok" when every check passes.
#include <cstdio>
#include <random>
#include <vector>

#include "../../csrc/common/conv_tiling.h"

using namespace fastaspp;

static int failures = 0;

static void expect(bool ok, const char* what, long long a, long long b, long long c) {
  if (!ok && failures++ < 20) std::printf("FAILED %s at (%lld, %lld, %lld)\n", what, a, b, c);
}

static PatchTiling tiling_with(int lg, int64_t h, int64_t w) {
  PatchTiling t;
  t.tile_w_log2 = lg;
  t.tiles_w = ceil_div(w, t.cols());
  t.tiles_per_img = ceil_div(h, t.rows()) * t.tiles_w;
  return t;
}

static bool same(const Patch& a, const Patch& b) {
  return a.img == b.img && a.r0 == b.r0 && a.c0 == b.c0 && a.r1 == b.r1 && a.c1 == b.c1;
}

static void check_ownership() {
  const int64_t n = 2;
  for (int64_t h = 1; h <= 40; ++h)
    for (int64_t w = 1; w <= 40; ++w)
      for (int lg = 0; lg <= 6; ++lg) {
        const PatchTiling t = tiling_with(lg, h, w);
        for (int per = 1; per <= kMaxPatchesPerCta; ++per) {
          const long long where = h * 100 + w;
          std::vector<int> hits(n * t.tiles_per_img, 0);
          for (int64_t cta = 0; cta < n * ctas_per_img(t, per); ++cta) {
            const CtaPatches g = cta_patches_of(t, per, cta, h, w);
            expect(g.count >= 1 && g.count <= per, "slot count", where, lg, g.count);
            for (int j = 0; j < g.count; ++j) {
              const int64_t i = g.index(j);
              expect(i >= 0 && i < n * t.tiles_per_img, "index in range", where, lg, i);
              if (i >= 0 && i < n * t.tiles_per_img) ++hits[i];
              expect(same(g.slot(j), patch_of(t, i, h, w)), "slot j holds patch_of(index(j))", where, lg, i);
              if (j > 0) {
                const Patch p = g.slot(j - 1), q = g.slot(j);
                expect(q.img == p.img && q.r0 == p.r0 && q.r1 == p.r1 && q.c0 == p.c1, "adjacent", where, lg, i);
              }
            }
            if (per == 1) expect(g.index(0) == cta, "one patch per CTA: CTA b owns patch b", where, lg, cta);
            const Patch first = g.slot(0), last = g.slot(g.count - 1);
            expect(g.cover.img == first.img && g.cover.r0 == first.r0 && g.cover.r1 == first.r1 &&
                       g.cover.c0 == first.c0 && g.cover.c1 == last.c1,
                   "cover spans the patches", where, lg, cta);
          }
          for (size_t i = 0; i < hits.size(); ++i) expect(hits[i] == 1, "patch owned once", where, lg, i);
        }
      }
}

template <bool kDgrad>
static bool tap_live(int64_t kh, int64_t kw, const Patch& p, int64_t src_h, int64_t src_w, int64_t dst_h,
                     int64_t dst_w, int64_t s, int64_t pad, int64_t d) {
  return patch_tap_live<kDgrad>(kh, src_h, dst_h, s, pad, d, p.r0, p.r1) &&
         patch_tap_live<kDgrad>(kw, src_w, dst_w, s, pad, d, p.c0, p.c1);
}

template <bool kDgrad>
static void check_cover_liveness(const char* name) {
  std::mt19937 gen(11);
  std::uniform_int_distribution<int> size(1, 80), kern(1, 5), stride(1, 3), dil(1, 40);
  for (int trial = 0; trial < 400; ++trial) {
    const int64_t in_h = size(gen), in_w = size(gen), k = kern(gen), s = stride(gen), d = dil(gen);
    const int64_t pad = std::uniform_int_distribution<int64_t>(0, d * (k - 1))(gen);
    const ConvGeometry geo{{s, s}, {pad, pad}, {d, d}};
    if (!geo.valid()) continue;
    const int64_t out_h = geo.out_size(0, in_h, k), out_w = geo.out_size(1, in_w, k);
    if (out_h <= 0 || out_w <= 0) continue;
    // forward: dst = the output map, src = the input; input gradient: the other way round.
    const int64_t dst_h = kDgrad ? in_h : out_h, dst_w = kDgrad ? in_w : out_w;
    const int64_t src_h = kDgrad ? out_h : in_h, src_w = kDgrad ? out_w : in_w;
    const PatchTiling t = patch_tiling(dst_h, dst_w);
    for (int64_t cta = 0; cta < ctas_per_img(t, 2); ++cta) {
      const CtaPatches g = cta_patches_of(t, 2, cta, dst_h, dst_w);
      for (int64_t kh = 0; kh < k; ++kh)
        for (int64_t kw = 0; kw < k; ++kw) {
          bool any = false;
          for (int j = 0; j < g.count; ++j)
            any = any || tap_live<kDgrad>(kh, kw, g.slot(j), src_h, src_w, dst_h, dst_w, s, pad, d);
          const bool cover = tap_live<kDgrad>(kh, kw, g.cover, src_h, src_w, dst_h, dst_w, s, pad, d);
          expect(any == cover, name, trial, cta, kh * k + kw);
        }
    }
  }
}

int main() {
  check_ownership();
  check_cover_liveness<false>("forward: cover live = some patch live");
  check_cover_liveness<true>("input gradient: cover live = some patch live");
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
