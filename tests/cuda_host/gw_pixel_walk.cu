// Host check of GwPixelWalk (csrc/cuda/grad_weight_common.cuh), run by tests/test_cuda_host_programs.py
// without a GPU: the CuTe weight-gradient kernel moves each thread's pixel BK = 32 pixels on per
// step without dividing; every pixel it reaches in [begin, end) must have the grad and x rows that
// GwPixels::rows decodes directly, for every tap, split and starting lane of random convs (maps
// narrower and wider than 32 columns, rectangles of fewer than 32 pixels, strides, dilations).
// Prints one line per failed check and "ok" when every check passes.
#include <cstdio>
#include <random>
#include <vector>

#include "../../csrc/cuda/grad_weight_common.cuh"

using namespace fastaspp;
using namespace fastaspp::atrous_cuda;

static int failures = 0;

static void expect(bool ok, const char* what, long long a, long long b) {
  if (!ok && failures++ < 20) std::printf("FAILED %s at (%lld, %lld)\n", what, a, b);
}

int main() {
  constexpr int kStride = 32;  // the kernel's BK
  using T = __nv_bfloat16;
  std::mt19937_64 rng(2026);
  auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  long long pixels = 0;
  for (int c = 0; c < 400; ++c) {
    GwArgs a{};
    a.n = pick(1, 3);
    a.h = pick(1, 40);
    a.w = c % 4 == 0 ? pick(33, 100) : pick(1, 40);
    a.cin = 8 * pick(1, 4);
    a.cout = 8 * pick(1, 4);
    a.kh = pick(1, 3);
    a.kw = pick(1, 3);
    a.stride_h = pick(1, 3);
    a.stride_w = pick(1, 3);
    a.dil_h = pick(1, 8);
    a.dil_w = pick(1, 8);
    a.pad_h = pick(0, a.dil_h * (a.kh - 1));
    a.pad_w = pick(0, a.dil_w * (a.kw - 1));
    a.ho = conv_out_size(a.h, a.kh, a.stride_h, a.pad_h, a.dil_h);
    a.wo = conv_out_size(a.w, a.kw, a.stride_w, a.pad_w, a.dil_w);
    if (a.ho <= 0 || a.wo <= 0) continue;
    a.splits = static_cast<int>(pick(1, 5));
    std::vector<T> g(a.n * a.ho * a.wo * a.cout), x(a.n * a.h * a.w * a.cin);
    a.g = g.data();
    a.x = x.data();
    for (int64_t tap = 0; tap < a.kh * a.kw; ++tap) {
      for (int split = 0; split < a.splits; ++split) {
        GwTile t{tap, 8 * pick(0, 3), 8 * pick(0, 3), split};
        const GwPixels px(a, t);
        for (int lane = 0; lane < kStride; ++lane) {
          GwPixelWalk<T, kStride> walk(a, px, t, px.begin + lane);
          for (int64_t p = px.begin + lane; p < px.end; p += kStride, walk.advance()) {
            const T *g_row, *x_row;
            px.rows(a, p, g_row, x_row);
            expect(walk.p == p, "walk's pixel", c, p);
            expect(walk.g_row == g_row + t.co0, "grad row", c, p);
            expect(walk.x_row == x_row + t.ci0, "x row", c, p);
            ++pixels;
          }
        }
      }
    }
  }
  expect(pixels > 100000, "pixels walked", pixels, 0);
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
