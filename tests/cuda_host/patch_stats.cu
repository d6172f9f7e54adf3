// Host-side checks of what the cuda backend's BN-statistics epilogue computes per conv patch
// (csrc/common/patch_stats.h, patch_pixel_mask in csrc/common/conv_tiling.h), run by
// tests/test_cuda_host_programs.py without a GPU. Prints one line per failed check and "ok" when
// every check passes.
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../../csrc/common/patch_stats.h"

using namespace fastaspp;

static int failures = 0;

static void expect(bool ok, const char* what, double a, double b, double c) {
  if (!ok && failures++ < 20) std::printf("FAILED %s at (%g, %g, %g)\n", what, a, b, c);
}

// Every pixel of the map is in exactly one patch's mask (so the merged count is N*H*W), and bit m
// is set exactly when the pixel the kernels' epilogue derives from m lies in the map.
static void check_masks() {
  for (int64_t h = 1; h <= 70; ++h)
    for (int64_t w = 1; w <= 70; ++w) {
      for (int lg = 0; lg <= 6; ++lg) {  // every patch shape, not only the one patch_tiling picks
        PatchTiling t;
        t.tile_w_log2 = lg;
        t.tiles_w = ceil_div(w, t.cols());
        t.tiles_per_img = ceil_div(h, t.rows()) * t.tiles_w;
        std::vector<int> hits(h * w, 0);
        for (int64_t b = 0; b < t.tiles_per_img; ++b) {
          const Patch p = patch_of(t, b, h, w);
          const uint64_t mask = patch_pixel_mask(t, p);
          for (int m = 0; m < kTilePixels; ++m) {
            const int64_t r = p.r0 + (m >> lg), c = p.c0 + (m & ((1 << lg) - 1));
            const bool in_map = r < p.r1 && c < p.c1;
            expect(((mask >> m) & 1u) == (in_map ? 1u : 0u), "mask bit", h * 100 + w, lg, m);
            if (in_map) ++hits[r * w + c];
          }
        }
        for (int64_t i = 0; i < h * w; ++i) expect(hits[i] == 1, "pixel counted once", h * 100 + w, lg, i);
      }
    }
}

// column_stats against a long-double two-pass reference, on strided columns under random masks.
// Bounds: the float sum of k <= 64 terms is within k u sum|v| (u = 2^-24, Higham's gamma_k); M2 is
// checked against the exact centred sum with the error of the mean's rounding and of k terms.
template <typename Acc>
static void check_column_stats(double offset, const char* name) {
  std::mt19937_64 gen(7);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_int_distribution<int> bits(0, 1);
  const double u = std::is_same<Acc, float>::value ? std::ldexp(1.0, -24) : std::ldexp(1.0, -53);
  const int64_t ld = 5;
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<Acc> tile(kTilePixels * ld);
    for (auto& v : tile) v = static_cast<Acc>(offset + normal(gen));
    uint64_t mask = trial == 0 ? 0 : trial == 1 ? ~uint64_t(0) : 0;
    for (int m = 0; trial > 1 && m < kTilePixels; ++m) mask |= uint64_t(bits(gen)) << m;
    const PatchStats<Acc> s = column_stats(tile.data() + 2, ld, mask);
    long double count = 0, sum = 0, abs_sum = 0;
    for (int m = 0; m < kTilePixels; ++m)
      if ((mask >> m) & 1u) {
        count += 1;
        sum += tile[m * ld + 2];
        abs_sum += std::fabs(static_cast<long double>(tile[m * ld + 2]));
      }
    const long double mean = count > 0 ? sum / count : 0;
    long double m2 = 0, abs_dev = 0;
    for (int m = 0; m < kTilePixels; ++m)
      if ((mask >> m) & 1u) {
        const long double d = tile[m * ld + 2] - mean;
        m2 += d * d;
        abs_dev += std::fabs(d);
      }
    const double k = static_cast<double>(count);
    expect(s.count == static_cast<Acc>(count), name, trial, s.count, static_cast<double>(count));
    const double sum_err = std::fabs(static_cast<double>(s.sum - sum));
    expect(sum_err <= k * u * static_cast<double>(abs_sum), name, trial, sum_err, static_cast<double>(abs_sum));
    // The computed mean is off by at most (k + 1) u mean|v|; each centred term by that plus its
    // own rounding; M2 by 2 |d| times that per term, plus k roundings of the sum of squares.
    const double mean_err = count > 0 ? (k + 1) * u * static_cast<double>(abs_sum) / k : 0;
    const double m2_bound = 2 * static_cast<double>(abs_dev) * mean_err + 2 * k * mean_err * mean_err +
                            (k + 2) * u * static_cast<double>(m2) + 1e-300;
    const double m2_err = std::fabs(static_cast<double>(s.m2 - m2));
    expect(m2_err <= m2_bound, name, trial, m2_err, m2_bound);
  }
}

int main() {
  check_masks();
  check_column_stats<float>(0.0, "float stats");
  check_column_stats<double>(0.0, "double stats");
  // A mean far above the spread: E[v^2] - E[v]^2 in float would lose ~u * 3e4^2 = 54 to
  // cancellation against an M2 of about k; the centred sums stay within the bound.
  check_column_stats<float>(3e4, "float stats, large mean");
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
