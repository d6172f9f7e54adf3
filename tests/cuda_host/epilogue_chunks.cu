// Host check of the staged epilogues' 16-byte paths (csrc/cuda/conv_common.cuh, and the weight
// gradient's partial tiles in grad_weight_common.cuh), run by
// tests/test_cuda_host_programs.py without a GPU: store_output_chunk, which stores 8 channels of a
// pixel at a time, must write exactly the bytes that store_output writes value by value, and leave
// exactly its values in the staged tile (what the BN statistics read), for fp16 and bf16, forward
// (with and without scale, shift, image bias and ReLU) and input gradient, over random maps (patches
// overhanging the map), channel counts (the last 128-channel block partial), channel slices of wider
// pixels, and tiles with negative values, signed zeros and NaN. Bytes outside the written slice keep
// their sentinel. store_partial4 must write the workspace that store_partial writes, for partial
// Cout and Cin blocks. Prints one line per failed check and "ok" when every check passes.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <vector>

#include "../../csrc/cuda/conv_common.cuh"
#include "../../csrc/cuda/grad_weight_common.cuh"

using namespace fastaspp;
using namespace fastaspp::atrous_cuda;

static int failures = 0;

static void expect(bool ok, const char* what, long long a, long long b) {
  if (!ok && failures++ < 20) std::printf("FAILED %s at (%lld, %lld)\n", what, a, b);
}

// 16-byte aligned storage of n values (the kernels' tensors are at least that aligned).
template <typename V>
struct Aligned {
  V* p;
  size_t n;
  explicit Aligned(size_t count) : p(static_cast<V*>(std::aligned_alloc(16, (count * sizeof(V) + 15) / 16 * 16))), n(count) {}
  ~Aligned() { std::free(p); }
};

constexpr int kBN = 128, kLdc = kBN + 4;  // the CuTe kernel's tile

template <typename T, bool kDgrad>
void run_case(std::mt19937_64& rng, int c) {
  auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  std::normal_distribution<float> normal(0.0f, 2.0f);
  ConvArgs a{};
  a.n = pick(1, 2);
  a.dst_h = pick(1, 20);
  a.dst_w = pick(1, 20);
  a.nc = 8 * pick(1, 40);
  a.dst_channel_offset = 8 * pick(0, 3);
  a.dst_pixel_stride = a.dst_channel_offset + a.nc + 8 * pick(0, 2);
  a.tiling = patch_tiling(a.dst_h, a.dst_w);
  a.relu = !kDgrad && pick(0, 1);
  const int64_t pixels = a.n * a.dst_h * a.dst_w;
  Aligned<T> ref(pixels * a.dst_pixel_stride), vec(pixels * a.dst_pixel_stride);
  std::memset(ref.p, 0x5a, ref.n * sizeof(T));
  std::memset(vec.p, 0x5a, vec.n * sizeof(T));
  Aligned<T> scale(a.nc), shift(a.nc), bias(a.n * a.nc);
  for (int64_t i = 0; i < a.nc; ++i) scale.p[i] = Elem<T>::from_acc(normal(rng)), shift.p[i] = Elem<T>::from_acc(normal(rng));
  for (int64_t i = 0; i < a.n * a.nc; ++i) bias.p[i] = Elem<T>::from_acc(normal(rng));
  if (!kDgrad) {
    a.scale = pick(0, 2) ? scale.p : nullptr;
    a.shift = pick(0, 2) ? shift.p : nullptr;
    a.image_bias = pick(0, 1) ? bias.p : nullptr;
  }
  expect(epilogue_chunks_ok<T>(a, kLdc), "chunks usable", c, 0);
  Aligned<float> tile_ref(kTilePixels * kLdc), tile_vec(kTilePixels * kLdc);
  for (int64_t block = 0; block < a.n * a.tiling.tiles_per_img; ++block) {
    const Patch t = patch_of(a.tiling, block, a.dst_h, a.dst_w);
    for (int64_t n0 = 0; n0 < a.nc; n0 += kBN) {
      for (size_t i = 0; i < tile_ref.n; ++i) {
        const int64_t kind = pick(0, 40);
        tile_ref.p[i] = kind == 0 ? NAN : kind == 1 ? -0.0f : normal(rng);
      }
      std::memcpy(tile_vec.p, tile_ref.p, tile_ref.n * sizeof(float));
      a.dst = ref.p;
      for (int m = 0; m < kTilePixels; ++m)
        for (int j = 0; j < kBN; ++j)
          tile_ref.p[m * kLdc + j] = store_output<T, kDgrad, float>(a, t, m, n0 + j, tile_ref.p[m * kLdc + j]);
      a.dst = vec.p;
      for (int m = 0; m < kTilePixels; ++m)
        for (int j = 0; j < kBN; j += 8) store_output_chunk<T, kDgrad>(a, t, m, n0 + j, tile_vec.p + m * kLdc + j, true);
      expect(std::memcmp(tile_ref.p, tile_vec.p, tile_ref.n * sizeof(float)) == 0, "staged values", c, block);
    }
  }
  expect(std::memcmp(ref.p, vec.p, ref.n * sizeof(T)) == 0, "stored bytes", c, 0);
  long long written = 0;
  for (size_t i = 0; i < ref.n; ++i) {
    unsigned short bits;
    std::memcpy(&bits, ref.p + i, sizeof(bits));
    written += bits != 0x5a5a;
  }
  expect(written > 0, "something stored", c, written);
}

// The weight gradient's partial tiles (64 x 128, as the CuTe kernel): every tile of random
// workspaces, 4 columns at a time against one at a time.
void run_partials(std::mt19937_64& rng, int c) {
  auto pick = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  std::normal_distribution<float> normal(0.0f, 1.0f);
  constexpr int BM = 64;
  GwArgs a{};
  a.cout = 8 * pick(1, 20);
  a.cin = 8 * pick(1, 40);
  a.kh = pick(1, 3);
  a.kw = pick(1, 3);
  a.splits = static_cast<int>(pick(1, 3));
  const int64_t taps = a.kh * a.kw, elems = a.splits * taps * a.cout * a.cin;
  Aligned<float> ref(elems), vec(elems), tile(BM * kLdc);
  std::memset(ref.p, 0x5a, elems * sizeof(float));
  std::memset(vec.p, 0x5a, elems * sizeof(float));
  for (int64_t split = 0; split < a.splits; ++split)
    for (int64_t tap = 0; tap < taps; ++tap)
      for (int64_t co0 = 0; co0 < a.cout; co0 += BM)
        for (int64_t ci0 = 0; ci0 < a.cin; ci0 += kBN) {
          const GwTile t{tap, co0, ci0, split};
          for (size_t i = 0; i < tile.n; ++i) tile.p[i] = normal(rng);
          a.ws = ref.p;
          for (int m = 0; m < BM; ++m)
            for (int j = 0; j < kBN; ++j) store_partial<float>(a, t, m, j, tile.p[m * kLdc + j]);
          a.ws = vec.p;
          expect(partials_in_chunks(a, kLdc), "partials in chunks", c, 0);
          for (int m = 0; m < BM; ++m)
            for (int j = 0; j < kBN; j += 4) store_partial4(a, t, m, j, tile.p + m * kLdc + j);
        }
  expect(std::memcmp(ref.p, vec.p, elems * sizeof(float)) == 0, "partials", c, elems);
  long long sentinels = 0;
  for (int64_t i = 0; i < elems; ++i) {
    unsigned int bits;
    std::memcpy(&bits, ref.p + i, sizeof(bits));
    sentinels += bits == 0x5a5a5a5au;
  }
  expect(sentinels == 0, "every partial written", c, sentinels);
}

int main() {
  std::mt19937_64 rng(17);
  for (int c = 0; c < 60; ++c) {
    run_case<__nv_bfloat16, false>(rng, c);
    run_case<__half, false>(rng, c);
    run_case<__nv_bfloat16, true>(rng, c);
    run_case<__half, true>(rng, c);
  }
  for (int c = 0; c < 40; ++c) run_partials(rng, c);
  // The 16-byte path is refused where a chunk could straddle the slice or an address is unaligned.
  ConvArgs a{};
  a.nc = 16, a.dst_pixel_stride = 24, a.dst_channel_offset = 8;
  alignas(16) static __nv_bfloat16 buf[64];
  a.dst = buf;
  expect(epilogue_chunks_ok<__nv_bfloat16>(a, kLdc), "aligned slice", 0, 0);
  a.dst_channel_offset = 4;
  expect(!epilogue_chunks_ok<__nv_bfloat16>(a, kLdc), "offset 4", 0, 0);
  a.dst_channel_offset = 8, a.dst_pixel_stride = 28;
  expect(!epilogue_chunks_ok<__nv_bfloat16>(a, kLdc), "stride 28", 0, 0);
  a.dst_pixel_stride = 24, a.scale = buf + 1;
  expect(!epilogue_chunks_ok<__nv_bfloat16>(a, kLdc), "unaligned scale", 0, 0);
  a.scale = nullptr, a.dst = buf + 4;
  expect(!epilogue_chunks_ok<__nv_bfloat16>(a, kLdc), "unaligned dst", 0, 0);
  a.dst = buf;
  expect(!epilogue_chunks_ok<__nv_bfloat16>(a, kLdc + 2), "tile rows not 16-byte aligned", 0, 0);
  expect(!epilogue_chunks_ok<float>(a, kLdc), "32-bit values", 0, 0);
  GwArgs g{};
  g.cin = 12;
  alignas(16) static float ws[64];
  g.ws = ws;
  expect(partials_in_chunks(g, kLdc), "cin 12", 0, 0);
  g.cin = 10;
  expect(!partials_in_chunks(g, kLdc), "cin 10", 0, 0);
  g.cin = 12, g.ws = ws + 1;
  expect(!partials_in_chunks(g, kLdc), "unaligned workspace", 0, 0);
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
