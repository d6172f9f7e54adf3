// Host emulation of the TMA conv kernels' loads (csrc/cuda/conv_tma.cuh, csrc/common/tma_boxes.h),
// run by tests/test_cuda_host_programs.py without a GPU. A TMA load is modelled as its
// documentation states it: the box's elements in box order (dim 0 fastest), each read through the
// tensor map's view, zero where a coordinate lies outside [0, dims). For every CTA of random
// stride-1 launches (forward and input gradient; src channel slices of wider pixels; channel counts
// with a K tail; convs with dead taps) on both tiles (two patches and 256 channels a CTA, one and
// 128), every step of its walk and every patch slot, the emulated
// src box must hold, row by row, what the cp.async gather of the other CuTe kernels puts in the A
// tile (tile_row_src, zero past kc) for every pixel whose output is stored, and the weight boxes
// what their B tile holds (zero past kc and nc); and the producer's walk of each part of a split K
// loop is the other kernels' walk; every map's arguments meet the driver's preconditions
// (tma_encode_ok). Also: which convs tma_conv_ok admits, and what tma_encode_ok refuses.
// Prints one line per failed check and "ok" when every check passes.
#include <cstdio>
#include <random>
#include <vector>

#include "../../csrc/common/tma_boxes.h"
#include "../../csrc/cuda/conv_common.cuh"

using namespace fastaspp;
using namespace fastaspp::atrous_cuda;

static int failures = 0;

static void expect(bool ok, const char* what, long long a, long long b, double c) {
  if (!ok && failures++ < 20) std::printf("FAILED %s at (%lld, %lld, %g)\n", what, a, b, c);
}

constexpr int kBK = 32;

// Element `at` of a box loaded through view v from `base` (TMA's zero fill outside the dims).
static double tma_read(const TmaView& v, const double* base, const int64_t (&at)[kTmaMaxRank]) {
  int64_t offset = v.offset;
  for (int i = 0; i < v.rank; ++i) {
    if (at[i] < 0 || at[i] >= v.dims[i]) return 0.0;
    offset += at[i] * v.strides[i];
  }
  return base[offset];
}

struct Launch {
  std::vector<double> src, wt;
  ConvArgs a;
};

// A random stride-1 conv (forward, or the input gradient), its src a channel slice of wider pixels.
static Launch random_launch(std::mt19937& gen, bool dgrad) {
  std::uniform_int_distribution<int> size(1, 21), kern(0, 2), dil(1, 9), batch(1, 2), chunks(1, 9), extra(0, 3);
  Launch l{};
  ConvArgs& a = l.a;
  for (;;) {
    const int64_t k = 2 * kern(gen) + 1, d = dil(gen), h = size(gen), w = size(gen);
    const int64_t p = std::uniform_int_distribution<int64_t>(0, d * (k - 1))(gen);
    const int64_t ho = conv_out_size(h, k, 1, p, d), wo = conv_out_size(w, k, 1, p, d);
    if (ho < 1 || wo < 1) continue;
    a.n = batch(gen), a.kh = a.kw = k, a.stride_h = a.stride_w = 1, a.pad_h = a.pad_w = p, a.dil_h = a.dil_w = d;
    a.kc = 8 * chunks(gen), a.nc = 8 * chunks(gen) + (gen() % 2) * 256;  // some with a second channel block
    // forward: src = x (h x w), dst = y; input gradient: src = grad (ho x wo), dst = dx (h x w).
    a.src_h = dgrad ? ho : h, a.src_w = dgrad ? wo : w, a.dst_h = dgrad ? h : ho, a.dst_w = dgrad ? w : wo;
    a.src_channel_offset = 8 * extra(gen), a.src_pixel_stride = a.src_channel_offset + a.kc + 8 * extra(gen);
    break;
  }
  a.tiling = conv_patch_tiling(a.dst_h, a.dst_w, dgrad, 1, 1);
  std::uniform_real_distribution<double> u(1.0, 2.0);  // never zero: a zero fill cannot pass for a value
  l.src.resize(a.n * a.src_h * a.src_w * a.src_pixel_stride);
  l.wt.resize(a.kh * a.kw * a.kc * a.nc);
  for (auto& e : l.src) e = u(gen);
  for (auto& e : l.wt) e = u(gen);
  a.src = l.src.data();
  a.wt = l.wt.data();
  return l;
}

// One launch on a tile of kPatches patches (the CTAs' patch slots) and BN channels.
template <bool kDgrad, int kPatches, int kBN>
static void check_launch(Launch& l) {
  ConvArgs& a = l.a;
  const TmaView sv = tma_src_view(a, a.tiling.rows(), a.tiling.cols(), kBK), wv = tma_weight_view(a, kBK);
  // The driver accepts both maps (at 16-byte aligned tensors, as the CuTe kernels require).
  const void* aligned = reinterpret_cast<const void*>(uintptr_t(1) << 20);
  expect(tma_encode_ok(tma_encode_args(sv, 2, aligned), 2, kTmaSrcSwizzleBytes), "the src map's arguments",
         a.src_pixel_stride, a.src_channel_offset, double(a.kc));
  expect(tma_encode_ok(tma_encode_args(wv, 2, aligned), 2, kTmaWeightSwizzleBytes), "the weight map's arguments",
         a.kc, a.nc, double(a.kh));
  expect(sv.box[1] * sv.box[2] == kTilePixels && sv.box[0] * 2 == 64 && wv.box[0] * 2 == 128,
         "boxes: one patch of 64-byte rows, 128-byte weight rows", sv.box[1], sv.box[2], wv.box[0]);
  ConvBatch b{};
  b.conv[0] = a;
  b.count = 1;
  const int64_t blocks = ceil_div(a.nc, int64_t(kBN));
  const int64_t ctas = a.n * ctas_per_img(a.tiling, kPatches);
  for (int64_t x = 0; x < ctas; ++x)
    for (int64_t y = 0; y < blocks; ++y) {
      const CtaPatches cp = cta_patches_of(a.tiling, kPatches, x, a.dst_h, a.dst_w);
      const Patch& t = cp.cover;
      const int64_t n0 = y * kBN;
      for (Step s = first_step<kDgrad>(b, 0, 1, t); s.conv < 1; s = next_step<kDgrad, kBK>(b, 1, t, s)) {
        const int64_t kh = s.tap / a.kw, kw = s.tap % a.kw;
        for (int j = 0; j < kPatches; ++j) {
          const TmaSrcOrigin o = tma_src_origin<kDgrad>(a, t.img, t.r0, t.c0 + j * cp.cols, kh, kw, s.k0);
          for (int m = 0; m < kTilePixels; ++m) {
            const int row = j * kTilePixels + m;
            int64_t pr, pc;
            if (j >= cp.count || !patch_pixel(a, cp.slot(j), m, pr, pc)) continue;  // never stored
            const double* gathered = tile_row_src<kPatches, kDgrad, double>(a, cp, kh, kw, row);
            for (int kk = 0; kk < kBK; ++kk) {
              // Box element (kk, m % cols, m / cols, 0), in box order.
              const int64_t at[kTmaMaxRank] = {o.k + kk, o.col + (m % sv.box[1]), o.row + (m / sv.box[1]), o.img};
              const double want = gathered != nullptr && s.k0 + kk < a.kc ? gathered[s.k0 + kk] : 0.0;
              expect(tma_read(sv, l.src.data(), at) == want, "src box row = gathered A row (cta, row, k)", x, row,
                     double(s.k0 + kk));
            }
          }
        }
        for (int j = 0; j < kBN / kTmaWeightBoxN; ++j)
          for (int n = 0; n < kTmaWeightBoxN; ++n)
            for (int kk = 0; kk < kBK; ++kk) {
              const int64_t co = n0 + j * kTmaWeightBoxN + n, k = s.k0 + kk;
              const int64_t at[kTmaMaxRank] = {co, k, s.tap, 0};
              const double want = k < a.kc && co < a.nc ? l.wt[(s.tap * a.kc + k) * a.nc + co] : 0.0;
              expect(tma_read(wv, l.wt.data(), at) == want, "weight box = B tile (cta, channel, k)", x, co, double(k));
            }
      }
    }
}

// The producer's walk (walk_live_steps over live_tap_bits) of each part of a split K loop visits
// exactly the steps the other kernels walk (step_at, then next_step), and the masks' step count
// (count_live_steps, which the kernel splits) is count_steps's, for batches of up to 4 convs
// summed into one walk (every conv's taps in one CTA, as the input gradient's sum mode), every CTA
// cover of the two-patch tiling, and 1 to 5 parts (parts that start inside a tap, empty parts).
template <bool kDgrad>
static void check_walk(std::mt19937& gen, const ConvArgs& base) {
  ConvBatch b{};
  b.count = 1 + static_cast<int>(gen() % 4);
  std::uniform_int_distribution<int> dil(1, 9), chunks(1, 9);
  for (int i = 0; i < b.count; ++i) {
    ConvArgs c = base;
    if (i > 0) {
      c.dil_h = c.dil_w = dil(gen), c.pad_h = c.pad_w = c.dil_h * (c.kh / 2), c.kc = 8 * chunks(gen);
      c.kh = c.kw = 1 + 2 * static_cast<int>(gen() % 2);
    }
    b.conv[i] = c;
  }
  const ConvRange r{0, b.count};
  uint64_t live[kMaxConvs] = {};
  const int64_t ctas = base.n * ctas_per_img(base.tiling, 2);
  for (int64_t x = 0; x < ctas; ++x) {
    const Patch t = cta_patches_of(base.tiling, 2, x, base.dst_h, base.dst_w).cover;
    for (int i = 0; i < b.count; ++i) live[i] = live_tap_bits<kDgrad>(b.conv[i], t);
    const int64_t steps = count_steps<kDgrad, kBK>(b, r, t);
    expect(count_live_steps<kBK>(b, 0, b.count, live) == steps, "the masks' step count is count_steps's", x,
           steps, double(count_live_steps<kBK>(b, 0, b.count, live)));
    for (int parts = 1; parts <= 5; ++parts)
      for (int part = 0; part < parts; ++part) {
        const StepRange range = k_split_range(steps, part, parts);
        Step want = step_at<kDgrad, kBK>(b, r, t, range.begin);
        int64_t visited = 0;
        walk_live_steps<kBK>(b, 0, b.count, live, int(range.begin), int(range.end), [&](int conv, int tap, int k0) {
          expect(conv == want.conv && tap == want.tap && k0 == want.k0,
                 "the producer walks the part's steps (cta, step, k0)", x, range.begin + visited, double(k0));
          want = next_step<kDgrad, kBK>(b, r.end, t, want);
          ++visited;
        });
        expect(visited == range.end - range.begin, "the producer walks every step of the part (cta, part, steps)", x,
               part, double(visited));
      }
  }
}

int main() {
  std::mt19937 gen(20261201);
  int dead = 0;  // launches with a patch whose walk skips a tap: the walk's dead-tap skipping is exercised
  for (int trial = 0; trial < 60; ++trial) {
    const bool dgrad = trial % 2 == 1;
    Launch l = random_launch(gen, dgrad);
    expect(tma_conv_ok(l.a, 2), "stride-1 convs suit the TMA kernel", trial, l.a.kc, double(l.a.nc));
    if (dgrad) {
      check_launch<true, 2, 256>(l);  // Sm90TmaConfig
      check_launch<true, 1, 128>(l);  // Sm90TmaNarrowConfig
    } else {
      check_launch<false, 2, 256>(l);
      check_launch<false, 1, 128>(l);
    }
    dead += l.a.dil_h * (l.a.kh - 1) >= l.a.dst_h;
    if (dgrad) {
      check_walk<true>(gen, l.a);
    } else {
      check_walk<false>(gen, l.a);
    }
  }
  expect(dead > 0, "some launches have dead taps", dead, 0, 0);
  // What the kernel does not take.
  std::mt19937 gen2(7);
  Launch l = random_launch(gen2, false);
  ConvArgs strided = l.a;
  strided.stride_w = 2;
  expect(!tma_conv_ok(strided, 2), "a strided conv is refused", 0, 0, 0);
  ConvArgs prologue = l.a;
  prologue.src_scale = l.src.data();
  expect(!tma_conv_ok(prologue, 2), "the projection's prologue is refused", 0, 0, 0);
  ConvArgs wide = l.a;
  wide.kh = 9, wide.kw = 9;
  expect(!tma_conv_ok(wide, 2), "more than 64 taps are refused", 0, 0, 0);
  ConvArgs huge = l.a;
  huge.src_w = int64_t(1) << 31;
  expect(!tma_conv_ok(huge, 2), "dims past int32 coordinates are refused", 0, 0, 0);
  // The encode's preconditions refuse what the driver would: an unaligned base or pixel stride, a
  // box row wider than its swizzle.
  const void* aligned = reinterpret_cast<const void*>(uintptr_t(1) << 20);
  const TmaView sv = tma_src_view(l.a, 8, 8, kBK);
  const void* unaligned = static_cast<const char*>(aligned) + 8;
  expect(tma_encode_ok(tma_encode_args(sv, 2, aligned), 2, 64), "a valid src map", 0, 0, 0);
  expect(!tma_encode_ok(tma_encode_args(sv, 2, unaligned), 2, 64), "an unaligned base", 0, 0, 0);
  expect(!tma_encode_ok(tma_encode_args(sv, 2, aligned), 2, 32), "a box row past its swizzle", 0, 0, 0);
  ConvArgs odd = l.a;
  odd.src_pixel_stride = odd.kc + 4;
  const TmaView odd_view = tma_src_view(odd, 8, 8, kBK);
  expect(!tma_encode_ok(tma_encode_args(odd_view, 2, aligned), 2, 64), "an unaligned stride", 0, 0, 0);
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
