// Host-side checks of the CuTe conv kernel's layouts and thread mappings (csrc/cuda/conv_sm80.cuh),
// run by tests/test_cuda_host_programs.py without a GPU: CuTe's layout algebra runs on the host.
// Prints one line per failed check and "ok" when every check passes.
#include <cstdio>
#include <vector>

#include "../../csrc/cuda/conv_sm80.cuh"

using namespace cute;

static int failures = 0;

static void expect(bool ok, const char* what, int a, int b, int c) {
  if (!ok && failures++ < 20) std::printf("FAILED %s at (%d, %d, %d)\n", what, a, b, c);
}

// Every (row, k, stage) of a (rows, 32, S) layout maps to a distinct offset below its cosize, and
// each 8-element chunk along `chunk_mode` (0: rows, 1: k) is 8 consecutive 16-byte-aligned offsets,
// as the kernel's 16-byte cp.async writes assume.
template <class Layout>
void check_smem(Layout layout, int chunk_mode, const char* name) {
  const int rows = size<0>(layout), ks = size<1>(layout), stages = size<2>(layout);
  std::vector<int> hits(cosize(layout), 0);
  expect(static_cast<int>(hits.size()) == rows * ks * stages, name, rows, ks, stages);
  for (int s = 0; s < stages; ++s)
    for (int r = 0; r < rows; ++r)
      for (int k = 0; k < ks; ++k) {
        const int off = layout(r, k, s);
        expect(off >= 0 && off < static_cast<int>(hits.size()), name, r, k, s);
        if (off >= 0 && off < static_cast<int>(hits.size())) ++hits[off];
        const int along = chunk_mode == 0 ? r : k;
        if (along % 8 == 0) {
          expect(off % 8 == 0, name, r, k, s);
          for (int j = 1; j < 8; ++j) {
            const int next = chunk_mode == 0 ? layout(r + j, k, s) : layout(r, k + j, s);
            expect(next == off + j, name, r, k, s);
          }
        }
      }
  for (size_t i = 0; i < hits.size(); ++i) expect(hits[i] == 1, name, static_cast<int>(i), hits[i], 0);
}

// Every (m, n) of the BM x BN tile is one accumulator of exactly one thread.
template <typename T>
void check_accumulators(const char* name) {
  using Config = fastaspp::atrous_cuda::Sm80Config<T>;
  typename Config::TiledMma mma;
  expect(size(mma) == fastaspp::atrous_cuda::Sm80Tile::kThreads, name, size(mma), 0, 0);
  std::vector<int> hits(Config::BM * Config::BN, 0);
  for (int tid = 0; tid < size(mma); ++tid) {
    Tensor coord = mma.get_slice(tid).partition_C(make_identity_tensor(Shape<Int<Config::BM>, Int<Config::BN>>{}));
    for (int i = 0; i < size(coord); ++i) {
      const int m = get<0>(coord(i)), n = get<1>(coord(i));
      expect(m >= 0 && m < Config::BM && n >= 0 && n < Config::BN, name, tid, m, n);
      if (m >= 0 && m < Config::BM && n >= 0 && n < Config::BN) ++hits[m * Config::BN + n];
    }
  }
  for (int e = 0; e < Config::BM * Config::BN; ++e) expect(hits[e] == 1, name, e / Config::BN, e % Config::BN, hits[e]);
}

// The A-tile chunk mapping of conv_sm80_kernel's load (and of the projection prologue, which
// rewrites the chunks a thread copied): chunk s = tid + i * kThreads is (pixel s / (BK / 8), k
// offset 8 * (s % (BK / 8))); every (pixel, chunk) of a stage once.
void check_a_chunks() {
  using fastaspp::atrous_cuda::Sm80Tile;
  constexpr int BM = Sm80Tile::kBM, BK = Sm80Tile::kBK, CH = Sm80Tile::kChunk, NT = Sm80Tile::kThreads;
  std::vector<int> hits(BM * (BK / CH), 0);
  for (int tid = 0; tid < NT; ++tid)
    for (int i = 0; i < BM * (BK / CH) / NT; ++i) {
      const int s = tid + i * NT, m = s / (BK / CH), kc = (s % (BK / CH)) * CH;
      expect(m < BM && kc < BK && kc % CH == 0, "A chunk in the tile", tid, m, kc);
      if (m < BM && kc < BK) ++hits[m * (BK / CH) + kc / CH];
    }
  for (int c = 0; c < BM * (BK / CH); ++c) expect(hits[c] == 1, "A chunk owned once", c / (BK / CH), c % (BK / CH), hits[c]);
}

int main() {
  check_a_chunks();
  using Bf16 = fastaspp::atrous_cuda::Sm80Config<__nv_bfloat16>;
  check_smem(typename Bf16::LayoutA{}, 1, "A: (pixel, k, stage), chunks along k");
  check_smem(typename Bf16::LayoutB{}, 0, "B: (n, k, stage), chunks along n");
  check_accumulators<__nv_bfloat16>("bf16 accumulators");
  check_accumulators<__half>("fp16 accumulators");
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
