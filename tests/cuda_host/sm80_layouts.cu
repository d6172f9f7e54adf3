// Host-side checks of the CuTe kernels' layouts and thread mappings (csrc/cuda/conv_cute.cuh for both
// instruction sets and the 128 x 256 wgmma tile, conv_tma.cuh, grad_weight_cute.cuh), run by
// tests/test_cuda_host_programs.py without a GPU: CuTe's layout algebra runs on the host.
// Prints one line per failed check and "ok" when every check passes.
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#include "../../csrc/cuda/conv_cute.cuh"
#include "../../csrc/cuda/conv_tma.cuh"
#include "../../csrc/cuda/grad_weight_cute.cuh"

using namespace cute;

static int failures = 0;

static void expect(bool ok, const char* what, int a, int b, int c) {
  if (!ok && failures++ < 20) std::printf("FAILED %s at (%d, %d, %d)\n", what, a, b, c);
}

// Every (row, k, stage) of a (rows, 32, S) layout maps to a distinct offset below its cosize, and
// each 8-element chunk along `chunk_mode` (0: rows, 1: k) is 8 consecutive 16-byte-aligned offsets,
// as the kernel's 16-byte cp.async writes assume. Stage s lies s stage sizes (cosize / S) past
// stage 0, swizzle included: the CuTe kernels' stage0_offset and stage_start (sm80_common.cuh) rely on it.
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
        expect(off == layout(r, k, 0) + s * (static_cast<int>(cosize(layout)) / stages), name, r, k, s);
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

// Where TMA puts the byte at `byte` of a box's dense image in shared memory under a `span`-byte
// swizzle (CU_TENSOR_MAP_SWIZZLE_64B / _128B; 1024-byte aligned destination): its 16-byte chunk
// index within the span XORed with bits 7 and up of the offset (the row of 128 bytes, modulo
// span / 16).
static int tma_swizzle(int byte, int span) { return byte ^ (((byte >> 7) & (span / 16 - 1)) << 4); }

// The TMA kernel's stages are exactly what its boxes write: layout(r, k, s) (16-bit elements)
// holds the byte box_byte(r, k, s) of the stages' dense box images lands on.
template <class Layout, class BoxByte>
void check_tma_smem(Layout layout, int span, BoxByte box_byte, const char* name) {
  for (int s = 0; s < size<2>(layout); ++s)
    for (int r = 0; r < size<0>(layout); ++r)
      for (int k = 0; k < size<1>(layout); ++k)
        expect(2 * layout(r, k, s) == tma_swizzle(box_byte(r, k, s), span), name, r, k, s);
}

// Every (m, n) of the BM x BN tile is one accumulator of exactly one of the config's threads, and
// for a conv config, row m's accumulators belong to warpgroup m / 64 (the warpgroup of the patch
// in slot m / kTilePixels).
template <typename Config, int kThreads = fastaspp::atrous_cuda::Sm80Tile::kThreads>
void check_accumulators(const char* name, bool rows_by_warpgroup = false) {
  typename Config::TiledMma mma;
  expect(size(mma) == kThreads, name, size(mma), 0, 0);
  std::vector<int> hits(Config::BM * Config::BN, 0);
  for (int tid = 0; tid < size(mma); ++tid) {
    Tensor coord = mma.get_slice(tid).partition_C(make_identity_tensor(Shape<Int<Config::BM>, Int<Config::BN>>{}));
    for (int i = 0; i < size(coord); ++i) {
      const int m = get<0>(coord(i)), n = get<1>(coord(i));
      expect(m >= 0 && m < Config::BM && n >= 0 && n < Config::BN, name, tid, m, n);
      if (rows_by_warpgroup) expect(m / 64 == tid / 128, name, tid, m, n);
      if (m >= 0 && m < Config::BM && n >= 0 && n < Config::BN) ++hits[m * Config::BN + n];
    }
  }
  for (int e = 0; e < Config::BM * Config::BN; ++e) expect(hits[e] == 1, name, e / Config::BN, e % Config::BN, hits[e]);
}

// A TMA conv config (conv_tma.cuh): its stages are bijective and stage-periodic like the others,
// its A stages are what its src boxes (one a patch slot: 64 rows of BK values under the 64-byte
// swizzle) write and its B stages what its weight boxes (one per 64 channels: BK rows of 128 bytes
// under the 128-byte swizzle) write; its consumer warpgroups hold the tile's accumulators, one per
// patch's rows; its shared memory fits its CTAs on an SM.
template <typename Tma>
void check_tma_config(const char* name) {
  using namespace fastaspp::atrous_cuda;
  constexpr int kBoxN = fastaspp::kTmaWeightBoxN;
  static_assert(Tma::kMmaThreads == Tma::kPatches * 128 && Tma::BM == Tma::kPatches * 64 && Tma::BK == 32,
                "a consumer warpgroup per 64-pixel patch");
  const std::string n(name);
  check_smem(as_position_independent_swizzle_layout(typename Tma::LayoutA{}), 1, (n + " A: (pixel, k, stage)").c_str());
  check_smem(as_position_independent_swizzle_layout(typename Tma::LayoutB{}), 0, (n + " B: (n, k, stage)").c_str());
  check_tma_smem(as_position_independent_swizzle_layout(typename Tma::LayoutA{}), 64,
                 [](int m, int k, int s) { return s * Tma::kABytes / Tma::kStages + m * Tma::BK * 2 + 2 * k; },
                 (n + " A = its src boxes (pixel, k, stage)").c_str());
  check_tma_smem(as_position_independent_swizzle_layout(typename Tma::LayoutB{}), 128,
                 [](int c, int k, int s) {
                   return s * Tma::kBBytes / Tma::kStages + (c / kBoxN) * Tma::kBBoxBytes + k * kBoxN * 2 +
                          2 * (c % kBoxN);
                 },
                 (n + " B = its weight boxes (n, k, stage)").c_str());
  check_accumulators<Tma, Tma::kMmaThreads>((n + " accumulators").c_str(), true);
  // The register split uses the whole launch cap: one allocation unit (8) less and setmaxnreg.inc
  // would wait forever, which launch_tma's refusal of such an image is for.
  expect(Tma::registers_fit(Tma::kLaunchRegisters) && !Tma::registers_fit(Tma::kLaunchRegisters - 8),
         (n + " registers").c_str(), Tma::kLaunchRegisters, Tma::kProducerRegisters, Tma::kConsumerRegisters);
  expect(Tma::kABytes / Tma::kStages == Tma::kPatches * Tma::kABoxBytes &&
             Tma::kCtasPerSm * Tma::kSmemBytes <= 227 * 1024,
         (n + " shared memory").c_str(), Tma::kSmemBytes, Tma::kCtasPerSm, 0);
}

// The chunk mappings of the conv kernel's loads: chunk s = tid + i * NT of a tile of `outer`
// runs of `per` chunks is (run s / per, element offset 8 * (s % per)); every (run, chunk) of a
// stage is copied by exactly one of the NT threads (and, for the conv's A tile, rewritten by the
// same thread in the projection's prologue).
void check_chunks(int outer, int per, const char* name, int NT = fastaspp::atrous_cuda::Sm80Tile::kThreads) {
  constexpr int CH = fastaspp::atrous_cuda::Sm80Tile::kChunk;
  expect((outer * per) % NT == 0, name, outer, per, NT);
  std::vector<int> hits(outer * per, 0);
  for (int tid = 0; tid < NT; ++tid)
    for (int i = 0; i < outer * per / NT; ++i) {
      const int s = tid + i * NT, run = s / per, off = (s % per) * CH;
      expect(run < outer && off < per * CH, name, tid, run, off);
      if (run < outer && off < per * CH) ++hits[run * per + off / CH];
    }
  for (int c = 0; c < outer * per; ++c) expect(hits[c] == 1, name, c / per, c % per, hits[c]);
}

// The weight gradient's chunk owners (GwChunks): every (pixel, chunk) of a step's tile of BK
// pixels by `per` chunks is copied by exactly one (thread, j).
void check_gw_chunks(int per, const char* name) {
  using fastaspp::atrous_cuda::GwChunks;
  constexpr int NT = fastaspp::atrous_cuda::Sm80Tile::kThreads, BK = fastaspp::atrous_cuda::Sm80Tile::kBK;
  expect(per % GwChunks::kThreadsPerPixel == 0, name, per, GwChunks::kThreadsPerPixel, 0);
  std::vector<int> hits(BK * per, 0);
  for (int tid = 0; tid < NT; ++tid)
    for (int j = 0; j < per / GwChunks::kThreadsPerPixel; ++j) {
      const int pixel = GwChunks::pixel(tid), chunk = GwChunks::chunk(tid, j);
      expect(pixel < BK && chunk < per, name, tid, pixel, chunk);
      if (pixel < BK && chunk < per) ++hits[pixel * per + chunk];
    }
  for (int c = 0; c < BK * per; ++c) expect(hits[c] == 1, name, c / per, c % per, hits[c]);
}

// cp_async_pipeline's schedule (sm80_common.cuh), replayed with its PipelineShape arithmetic for
// every step count up to 40: step it's compute finds step it's copies in its stage, and they are in
// a cp.async group that the wait at step it has completed; no copy is issued into a stage that a
// step whose MMAs may still run (it - kMmasInFlight .. it) reads; every step is loaded once.
template <class Shape>
void check_pipeline(const char* name) {
  for (int steps = 0; steps <= 40; ++steps) {
    std::vector<int> holds(Shape::kStages, -1);  // the step whose copies a stage holds
    std::vector<int> read_at;                     // the stage step it reads
    int issued = 0, groups = 0;
    for (int stage = 0; stage < Shape::kAhead; ++stage) {
      if (issued < steps) holds[stage] = issued++;
      ++groups;
    }
    int stage = 0, refill = Shape::kAhead;
    for (int it = 0; it < steps; ++it) {
      const int complete = groups - (Shape::kAhead - 1);  // cp_async_wait<kAhead - 1>
      expect(complete >= it + 1, name, steps, it, complete);
      expect(holds[stage] == it, name, steps, it, holds[stage]);
      read_at.push_back(stage);
      if (issued < steps) {
        for (int m = 0; m <= Shape::kMmasInFlight && m <= it; ++m) expect(refill != read_at[it - m], name, steps, it, m);
        holds[refill] = issued++;
      }
      ++groups;
      stage = Shape::next(stage);
      refill = Shape::next(refill);
    }
    expect(issued == steps, name, steps, issued, -1);
  }
}

int main() {
  using namespace fastaspp::atrous_cuda;
  using Conv = Sm80Config<__nv_bfloat16>;
  using Gw = Sm80GwConfig<__nv_bfloat16>;
  constexpr int CH = Sm80Tile::kChunk;
  // conv: A (pixel, k) K-major, B (n, k) N-major; weight gradient: A (co, pixel), B (ci, pixel),
  // both MN-major.
  check_smem(typename Conv::LayoutA{}, 1, "conv A: (pixel, k, stage), chunks along k");
  check_smem(typename Conv::LayoutB{}, 0, "conv B: (n, k, stage), chunks along n");
  check_smem(typename Gw::LayoutA{}, 0, "wgrad A: (co, pixel, stage), chunks along co");
  check_smem(typename Gw::LayoutB{}, 0, "wgrad B: (ci, pixel, stage), chunks along ci");
  check_chunks(Conv::BM, Conv::BK / CH, "conv A chunks (pixel, k)");
  check_chunks(Conv::BK, Conv::BN / CH, "conv B chunks (k, n)");
  check_gw_chunks(Gw::BM / CH, "wgrad A chunks (pixel, co)");
  check_gw_chunks(Gw::BN / CH, "wgrad B chunks (pixel, ci)");
  check_accumulators<Conv>("conv bf16 accumulators");
  check_accumulators<Sm80Config<__half>>("conv fp16 accumulators");
  check_accumulators<Gw>("wgrad bf16 accumulators");
  // The wgmma path: the same chunk mappings into wgmma's canonical layouts (as offsets from a
  // 1024-byte aligned base, the swizzle's period), one warpgroup's accumulators.
  using Sm90 = Sm90Config<__nv_bfloat16>;
  check_smem(as_position_independent_swizzle_layout(typename Sm90::LayoutA{}), 1, "sm90 A: (pixel, k, stage)");
  check_smem(as_position_independent_swizzle_layout(typename Sm90::LayoutB{}), 0, "sm90 B: (n, k, stage)");
  check_accumulators<Sm90>("sm90 bf16 accumulators");
  check_accumulators<Sm90Config<__half>>("sm90 fp16 accumulators");
  // The 128 x 256 tile: two warpgroups, one per patch slot, over the same chunk mappings.
  using Wide = Sm90WideConfig<__nv_bfloat16>;
  static_assert(Wide::kThreads == 256 && Wide::BM == 128 && Wide::BN == 256, "the wide tile");
  check_smem(as_position_independent_swizzle_layout(typename Wide::LayoutA{}), 1, "wide A: (pixel, k, stage)");
  check_smem(as_position_independent_swizzle_layout(typename Wide::LayoutB{}), 0, "wide B: (n, k, stage)");
  check_chunks(Wide::BM, Wide::BK / CH, "wide A chunks (pixel, k)", Wide::kThreads);
  check_chunks(Wide::BK, Wide::BN / CH, "wide B chunks (k, n)", Wide::kThreads);
  check_accumulators<Wide, Wide::kThreads>("wide bf16 accumulators", true);
  check_accumulators<Sm90WideConfig<__half>, Wide::kThreads>("wide fp16 accumulators", true);
  // The TMA tiles (128 x 256 and 64 x 128): see check_tma_config.
  check_tma_config<Sm90TmaConfig<__nv_bfloat16>>("tma");
  check_tma_config<Sm90TmaConfig<__half>>("tma fp16");
  check_tma_config<Sm90TmaNarrowConfig<__nv_bfloat16>>("narrow tma");
  check_tma_config<Sm90TmaNarrowConfig<__half>>("narrow tma fp16");
  // The 8-stage 64 x 128 tile: Sm90Config's mappings over more stages.
  using Deep = Sm90DeepConfig<__nv_bfloat16>;
  check_smem(as_position_independent_swizzle_layout(typename Deep::LayoutA{}), 1, "deep A: (pixel, k, stage)");
  check_smem(as_position_independent_swizzle_layout(typename Deep::LayoutB{}), 0, "deep B: (n, k, stage)");
  check_accumulators<Deep>("deep bf16 accumulators");
  expect(CuteSmem<Deep>::kBytes == Sm90DeepPipeline::kStages * (Deep::BM + Deep::BN) * Deep::BK * 2 &&
             Deep::kCtasPerSm * CuteSmem<Deep>::kBytes <= 227 * 1024,
         "deep shared memory", CuteSmem<Deep>::kBytes, Deep::kCtasPerSm, 0);
  // Its shared memory: the stages, then the staged fp32 tile over them, within an H100's 227 KB.
  expect(CuteSmem<Wide>::kBytes == Sm90WidePipeline::kStages * (Wide::BM + Wide::BN) * Wide::BK * 2 &&
             CuteSmem<Wide>::kCBytes <= CuteSmem<Wide>::kBytes && CuteSmem<Wide>::kBytes <= 227 * 1024,
         "wide shared memory", CuteSmem<Wide>::kBytes, CuteSmem<Wide>::kCBytes, 0);
  expect(CuteSmem<Sm90>::kBytes == 49152 && CuteSmem<Conv>::kBytes == 36864, "static shared memory",
         CuteSmem<Sm90>::kBytes, CuteSmem<Conv>::kBytes, 0);
  using Sm90Gw = Sm90GwConfig<__nv_bfloat16>;
  check_smem(as_position_independent_swizzle_layout(typename Sm90Gw::LayoutA{}), 0, "sm90 wgrad A: (co, pixel)");
  check_smem(as_position_independent_swizzle_layout(typename Sm90Gw::LayoutB{}), 0, "sm90 wgrad B: (ci, pixel)");
  check_accumulators<Sm90Gw>("sm90 wgrad bf16 accumulators");
  check_accumulators<Sm80GwConfig<__half>>("wgrad fp16 accumulators");
  // The pipelines, and the stage count each config's layouts were built with.
  check_pipeline<Sm80Pipeline>("sm80 pipeline (steps, step, detail)");
  check_pipeline<Sm90Pipeline>("sm90 pipeline (steps, step, detail)");
  check_pipeline<Sm90WidePipeline>("wide pipeline (steps, step, detail)");
  check_pipeline<Sm90DeepPipeline>("deep pipeline (steps, step, detail)");
  check_pipeline<PipelineShape<2, 0>>("2-stage pipeline (steps, step, detail)");
  check_pipeline<PipelineShape<5, 2>>("5-stage pipeline (steps, step, detail)");
  expect(size<2>(typename Conv::LayoutA{}) == Sm80Pipeline::kStages && size<2>(typename Gw::LayoutB{}) == Sm80Pipeline::kStages,
         "sm80 layouts' stages", int(size<2>(typename Conv::LayoutA{})), Sm80Pipeline::kStages, 0);
  expect(size<2>(typename Sm90::LayoutA{}) == Sm90Pipeline::kStages && size<2>(typename Sm90Gw::LayoutB{}) == Sm90Pipeline::kStages,
         "sm90 layouts' stages", int(size<2>(typename Sm90::LayoutA{})), Sm90Pipeline::kStages, 0);
  expect(size<2>(typename Wide::LayoutA{}) == Sm90WidePipeline::kStages &&
             size<2>(typename Wide::LayoutB{}) == Sm90WidePipeline::kStages &&
             std::is_same<Wide::Pipeline, Sm90WidePipeline>::value,
         "wide layouts' stages", int(size<2>(typename Wide::LayoutA{})), Sm90WidePipeline::kStages, 0);
  expect(size<2>(typename Deep::LayoutA{}) == Sm90DeepPipeline::kStages &&
             size<2>(typename Deep::LayoutB{}) == Sm90DeepPipeline::kStages &&
             std::is_same<Deep::Pipeline, Sm90DeepPipeline>::value,
         "deep layouts' stages", int(size<2>(typename Deep::LayoutA{})), Sm90DeepPipeline::kStages, 0);
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
