// CUDA kernels for fastaspp::_atrous_conv2d_{forward,grad_input} (grad_weight: grad_weight.cu;
// what they share: kernel_common.cuh).
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
//   two chosen per launch to waste the least area: common/conv_tiling.h; for a strided conv's
//   grad_input, of one stride phase: see below) and BN = 64 dst
//   channels. A launch runs a batch of convs over the same dst map (ConvBatch, conv_common.cuh:
//   the ASPP's branches, each into its channel slice; a single conv is a batch of one): grid.x
//   is the patch, grid.y the (conv, channel block). (The 128 x 256 CuTe tile owns two adjacent
//   patches per CTA: conv_tiling.h's CtaPatches.)
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
// * fp16 / bf16: the CuTe kernel of conv_cute.cuh (cp.async pipeline; wgmma in an sm_90a image,
//   else mma.sync; BN = 128, or 256 on the wide wgmma tile) when
//   the channel counts are multiples of 8 and the operands 16-byte aligned (or, behind
//   FASTASPP_CUDA_CONV=wgmma_tma, conv_tma.cuh's 128 x 256 tile fed by TMA for stride-1 convs);
//   otherwise WMMA 16x16x16 with fp32 accumulators, 4 warps as 2x2, 32x32 per warp, BK=32.
//   fp32 / fp64 (and fp16 / bf16 on GPUs without the needed tensor cores): SIMT, 256
//   threads as 16x16, 4x4 outputs per thread strided by 16, BK=16, fp32 / fp64 accumulation.
// * Epilogue: acc * scale[co] + shift[co] + image_bias[n, co] (forward only, each optional),
//   optional ReLU, convert, store NHWC with bounds checks (the patch may overhang the map, the
//   channel block the channel count). The CuTe and WMMA kernels stage the tile in shared memory
//   first (staged_epilogue, conv_common.cuh): a thread then stores 8 channels of a pixel at once
//   (16 bytes) where the slice and the vectors are aligned, else one value at a time; SIMT stages
//   it only for the BN statistics, which follow the stores. The training projection's BN + ReLU of its input is a
//   prologue on each staged A tile (forward, 1x1 only). dst pixel p, channel co lives at
//   dst[p * dst_pixel_stride + dst_channel_offset + co]: the forward can write a channel slice
//   [off, off + Cout) of a wider NHWC buffer (pixel stride Ctot), e.g. one ASPP branch of the
//   shared concat buffer.
//   Plain NHWC is stride = Cout, offset = 0 (grad_input always uses stride = Cin, offset 0).
//   Only the store moves; the gather, the tiling and the dead-tap skipping do not change.
// * grad_input with stride > 1 tiles each stride phase of dx apart (conv_tiling.h): a patch's
//   pixels are every stride-th row and column from its phase, so a tap reaches all of them or
//   none, and no CTA gathers rows of the wrong phase (before, only 1/(sh*sw) of a live tap's rows
//   were real).
// * Known cost: only the CuTe 64 x 128 tiles split their K loop when few pixel tiles leave SMs
//   idle (FASTASPP_CUDA_SPLIT_K, off by default until measured on a device).

#include <algorithm>
#include <cstring>
#include <vector>

#include "conv_common.cuh"
#include "conv_cute.cuh"
#include "conv_tma.cuh"

namespace fastaspp {
namespace atrous_cuda {
namespace {  // internal linkage: nothing here is visible to other translation units

// The shared main loop: walks the live (conv, tap, chunk) steps of the patch over the CTA's convs,
// stages A [BM][LDA] and B [BK][LDB] into double-buffered shared memory and calls compute(A, B)
// per step.
template <typename T, int V, bool kDgrad, int BM, int BN, int BK, int NT, int LDA, int LDB,
          typename Compute>
__device__ __forceinline__ void conv_mainloop(const ConvBatch& b, ConvRange r, const Patch& t, int64_t n0,
                                              T* As, T* Bs, Compute&& compute) {
  static_assert(BM == kTilePixels, "the patch is 64 pixels");
  TileLoader<T, BM, BK, V, NT> la;
  TileLoader<T, BK, BN, V, NT> lb;

  auto load = [&](const Step& st) {
    const ConvArgs& a = b.conv[st.conv];
    const T* wt = static_cast<const T*>(a.wt);
    const int64_t kh = st.tap / a.kw, kw = st.tap % a.kw;
    la.load([&](int m) -> const T* { return gather_row<kDgrad, T>(a, t, kh, kw, m); }, st.k0, a.kc);
    lb.load(
        [&](int k) -> const T* {
          const int64_t kk = st.k0 + k;
          return kk < a.kc ? wt + (st.tap * a.kc + kk) * a.nc : nullptr;
        },
        n0, a.nc);
  };

  Step s = first_step<kDgrad>(b, r.first, r.end, t);
  if (s.conv < r.end) load(s);
  int buf = 0;
  while (s.conv < r.end) {
    if constexpr (!kDgrad) {
      const ConvArgs& a = b.conv[s.conv];
      if (a.src_scale != nullptr) la.apply([&](int64_t k, T v) { return prologue_value<T>(a, k, v); });
    }
    la.store(As + buf * (BM * LDA), LDA);
    lb.store(Bs + buf * (BK * LDB), LDB);
    __syncthreads();
    const Step nx = next_step<kDgrad, BK>(b, r.end, t, s);
    if (nx.conv < r.end) load(nx);  // in flight during the math below
    compute(As + buf * (BM * LDA), Bs + buf * (BK * LDB));
    buf ^= 1;
    s = nx;
  }
}

// fp16 / bf16 tensor-core conv. Shared memory: A 2x64x40, B 2x32x72 (16-bit) + C 64x68 fp32
// = 10240 + 9216 + 17408 = 36864 bytes.
template <typename T, int V, bool kDgrad>
__global__ void __launch_bounds__(128) conv_wmma_kernel(const __grid_constant__ ConvBatch batch) {
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

    const ConvRange r = cta_convs(batch);
    const ConvArgs& a = batch.conv[r.first];  // its epilogue
    const CtaPatches cp = cta_patches<1>(a);
    const Patch& t = cp.cover;  // the CTA's one patch
    const int64_t n0 = cta_n0<BN>(batch);
    const int warp = static_cast<int>(threadIdx.x) >> 5;
    const int wm = warp >> 1, wn = warp & 1;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    conv_mainloop<T, V, kDgrad, BM, BN, BK, NT, LDA, LDB>(
        batch, r, t, n0, As, Bs, [&](const T* A, const T* B) {
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
    staged_epilogue<T, kDgrad, BN, NT, 1>(a, cp, n0, Cs, LDC);
  } else {
    __trap();  // launcher never selects this kernel on such a GPU
  }
}

// SIMT conv (fp32 / fp64, and the 16-bit fallback). Shared memory, fp64 worst case:
// A 2x64x18 + B 2x16x66 doubles = 18432 + 16896 = 35328 bytes; the tile staged for the BN
// statistics (64 x 65 accumulators, 33280 bytes for fp64) reuses it.
template <typename T, int V, bool kDgrad>
__global__ void __launch_bounds__(256) conv_simt_kernel(const __grid_constant__ ConvBatch batch) {
  using Acc = typename Elem<T>::Acc;
  constexpr int BM = 64, BN = 64, BK = 16, NT = 256;
  constexpr int kPad = 16 / static_cast<int>(sizeof(T));  // one 16-byte vector
  constexpr int LDA = BK + kPad, LDB = BN + kPad, LDC = BN + 1;
  static_assert((LDA * sizeof(T)) % 16 == 0 && (LDB * sizeof(T)) % 16 == 0, "vector stores");
  constexpr int kABytes = 2 * BM * LDA * static_cast<int>(sizeof(T));
  constexpr int kBBytes = 2 * BK * LDB * static_cast<int>(sizeof(T));
  constexpr int kCBytes = BM * LDC * static_cast<int>(sizeof(Acc));
  static_assert(kABytes % 16 == 0, "buffer alignment");
  __shared__ __align__(16) unsigned char smem[kABytes + kBBytes > kCBytes ? kABytes + kBBytes : kCBytes];
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = reinterpret_cast<T*>(smem + kABytes);

  const ConvRange r = cta_convs(batch);
  const ConvArgs& a = batch.conv[r.first];  // its epilogue
  const CtaPatches cp = cta_patches<1>(a);
  const Patch& t = cp.cover;  // the CTA's one patch
  const int64_t n0 = cta_n0<BN>(batch);
  const int tx = static_cast<int>(threadIdx.x) & 15, ty = static_cast<int>(threadIdx.x) >> 4;

  // Thread owns rows ty + 16i and columns tx + 16j: A reads broadcast within a half-warp,
  // B reads hit 16 consecutive words, so neither conflicts on banks.
  Acc acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = Acc(0);

  conv_mainloop<T, V, kDgrad, BM, BN, BK, NT, LDA, LDB>(
      batch, r, t, n0, As, Bs, [&](const T* A, const T* B) {
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

  if constexpr (!kDgrad) {
    if (a.stats != nullptr) {  // uniform: stage the tile for the per-channel statistics
      Acc* cs = reinterpret_cast<Acc*>(smem);
      __syncthreads();  // every thread is done with the operand buffers cs overwrites
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) cs[(ty + 16 * i) * LDC + tx + 16 * j] = acc[i][j];
      __syncthreads();
      staged_epilogue<T, kDgrad, BN, NT, 1>(a, cp, n0, cs, LDC);
      return;
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      store_output<T, kDgrad, Acc>(a, t, ty + 16 * i, n0 + tx + 16 * j, acc[i][j]);
    }
}

// The grid of a launch over the batch with BN dst channels and patches_per_cta patches per CTA
// (x: the patches, y: the (conv, channel block)s; sets b.blocks_per_conv), or {0, 0} when it is
// past the grid's limits.
template <int BN>
dim3 batch_grid(ConvBatch& b, int patches_per_cta = 1) {
  int64_t blocks = 1;
  for (int i = 0; i < b.count; ++i) blocks = std::max(blocks, div_up(b.conv[i].nc, BN));
  const ConvArgs& a = b.conv[0];  // every conv has the same dst map, so the same patches
  const int64_t grid_x = a.n * ctas_per_img(a.tiling, patches_per_cta);
  const int64_t grid_y = b.sum_convs ? blocks : blocks * b.count;
  if (grid_x > 0x7fffffff || grid_y > 65535) return dim3(0, 0);
  b.blocks_per_conv = static_cast<int>(blocks);
  return dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(grid_y));
}

// Launches `kernel` over `grid` with smem_bytes of dynamic shared memory, its parameter p (the
// batch, or conv_tma.cuh's batch with its tensor maps).
template <typename Param>
cudaError_t launch_grid(void (*kernel)(Param), const Param& p, dim3 grid, int threads, cudaStream_t stream,
                        int smem_bytes = 0) {
  if (grid.x == 0) return cudaErrorInvalidValue;
  if (smem_bytes > 0) {
    const cudaError_t err = allow_dynamic_smem(reinterpret_cast<const void*>(kernel), smem_bytes);
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, threads, smem_bytes, stream>>>(p);
  return cudaGetLastError();
}

// Each conv's K parts over a launch on `grid` (ConvArgs::parts, common/k_split.h: its CTAs' longest
// walk over their live taps, longest_walks, against the launch's walks spread over one wave of the
// current GPU at ctas_per_sm CTAs an SM), and the most of them; 1 (without counting walks) where the
// grid fills a wave.
template <bool kDgrad, int BK>
int plan_k_split(ConvBatch& b, dim3 grid, int ctas_per_sm, int64_t cap) {
  if (!k_split_may_help(int64_t(grid.x) * grid.y, sm_count(), ctas_per_sm, cap)) return 1;
  int64_t walks[kMaxConvs];
  int parts[kMaxConvs];
  const int count = longest_walks<kDgrad, BK>(b, walks);  // b.count, or one walk in sum mode
  const int64_t ctas_per_walk = int64_t(grid.x) * (b.sum_convs ? grid.y : b.blocks_per_conv);
  const int most = k_split_plan(walks, count, ctas_per_walk, sm_count(), ctas_per_sm, cap, parts);
  for (int i = 0; i < b.count; ++i) b.conv[i].parts = parts[b.sum_convs ? 0 : i];
  return most;
}

// Where the grid leaves SMs idle and split_cap (FASTASPP_CUDA_SPLIT_K) allows, plans a split of the
// launch's K loops (plan_k_split) and takes the parts' workspace of BM x BN fp32 tiles from
// `scratch` (never with none): sets b.splits (1: no split) and b.partials.
template <bool kDgrad, int BM, int BN, int BK>
cudaError_t prepare_k_split(ConvBatch& b, dim3 grid, int ctas_per_sm, int64_t split_cap,
                            const FastasppScratch* scratch) {
  b.splits = 1;
  b.partials = nullptr;
  const bool may_split = scratch != nullptr && split_cap > 1 && grid.x > 0;
  const int splits = may_split ? plan_k_split<kDgrad, BK>(b, grid, ctas_per_sm, split_cap) : 1;
  if (splits <= 1) return cudaSuccess;
  const int64_t ctas = int64_t(grid.x) * grid.y;
  void* partials = scratch->allocate(scratch->context, splits * ctas * BM * BN * int64_t(sizeof(float)));
  if (partials == nullptr) return cudaErrorMemoryAllocation;
  b.splits = splits;
  b.partials = static_cast<float*>(partials);
  return cudaSuccess;
}

// Launches a conv kernel of Config over `grid` and the b.splits parts of its K loops
// (prepare_k_split), then, where they split (configs with one patch a CTA), the
// conv_split_finalize_kernel that runs the epilogue of the convs that split.
template <typename T, bool kDgrad, typename Config, typename Param>
cudaError_t launch_parts(void (*kernel)(Param), const Param& p, const ConvBatch& b, dim3 grid, int smem_bytes,
                         cudaStream_t stream) {
  const cudaError_t err =
      launch_grid(kernel, p, dim3(grid.x, grid.y, b.splits), Config::kThreads, stream, smem_bytes);
  if constexpr (Config::kPatches == 1) {
    if (err == cudaSuccess && b.splits > 1) {
      return launch_grid(conv_split_finalize_kernel<T, kDgrad, Config::BM, Config::BN>, b, grid,
                         kSplitFinalizeThreads, stream);
    }
  }
  return err;
}

// Launches conv_cute_kernel with Config (its threads, patches per CTA and shared memory); a config
// with one patch a CTA may split its K loops.
template <typename T, bool kDgrad, typename Config>
cudaError_t launch_cute(ConvBatch& b, int64_t split_cap, const FastasppScratch* scratch, cudaStream_t stream) {
  const dim3 grid = batch_grid<Config::BN>(b, Config::kPatches);
  const cudaError_t err = prepare_k_split<kDgrad, Config::BM, Config::BN, Config::BK>(
      b, grid, Config::kCtasPerSm, Config::kPatches == 1 ? split_cap : 1, scratch);
  if (err != cudaSuccess) return err;
  const int smem = Config::kDynamicSmem ? CuteSmem<Config>::kBytes : 0;
  return launch_parts<T, kDgrad, Config>(conv_cute_kernel<T, kDgrad, Config>, b, b, grid, smem, stream);
}

// Launches conv_tma_kernel with Config (conv_tma.cuh; tma_batch_ok and tma_kernel_usable hold), its
// tensor maps encoded here; the one-patch tile may split its K loops as launch_cute's do.
template <typename T, bool kDgrad, typename Config>
cudaError_t launch_tma(ConvBatch& b, int64_t split_cap, const FastasppScratch* scratch, cudaStream_t stream) {
  const dim3 grid = batch_grid<Config::BN>(b, Config::kPatches);
  cudaError_t err = prepare_k_split<kDgrad, Config::BM, Config::BN, Config::BK>(
      b, grid, Config::kCtasPerSm, Config::kPatches == 1 ? split_cap : 1, scratch);
  if (err != cudaSuccess) return err;
  const auto kernel = conv_tma_kernel<T, kDgrad, Config>;
  const int registers = kernel_image(reinterpret_cast<const void*>(kernel)).registers;
  if (!Config::registers_fit(registers)) {  // its consumers' setmaxnreg would never return
    note_tma_failure("the TMA kernel was built with %d registers a thread, too few for its warp roles' %d and %d",
                     registers, Config::kProducerRegisters, Config::kConsumerRegisters);
    return cudaErrorNotSupported;
  }
  TmaConvBatch launch{};
  launch.batch = b;
  err = encode_tensor_maps<T, Config::BK>(launch);
  if (err != cudaSuccess) return err;
  return launch_parts<T, kDgrad, Config>(kernel, launch, b, grid, Config::kSmemBytes, stream);
}

// 16-bit types: the CuTe kernel (conv_cute.cuh) where it can run every conv of the batch: on the
// 128 x 256 wgmma tile fed by TMA (conv_tma.cuh: stride 1, no prologue, at most 4 convs; its 64 x 128
// tile, which may split, for grids below a wave when FASTASPP_CUDA_SPLIT_K allows), on the
// 128 x 256 wgmma tile, or on the 8-stage 64 x 128 one, where FASTASPP_CUDA_CONV asks for it
// (wgmma_tma, wgmma_wide, wgmma_deep), else on the 64 x 128 one, in an sm_90a image, else on mma.sync, the
// 64 x 128 tiles with their K loop split where FASTASPP_CUDA_SPLIT_K allows (launch_cute); else WMMA
// tensor cores when the kernel image has them, else SIMT; 16-byte vector loads when every conv's
// channel counts and pointers allow.
template <typename T, bool kDgrad>
cudaError_t launch_conv_t(ConvBatch& b, const FastasppScratch* scratch, cudaStream_t stream) {
  bool vec = true;
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  for (int i = 0; i < b.count; ++i) {
    const ConvArgs& a = b.conv[i];
    vec = vec && a.kc % V == 0 && a.nc % V == 0 && a.src_pixel_stride % V == 0 && a.src_channel_offset % V == 0 &&
          aligned16(a.src) && aligned16(a.wt);
  }
  if constexpr (is_16bit<T>()) {
    bool cute = true;  // the operands suit the CuTe configs; which one runs is the configs' rule
    for (int i = 0; i < b.count; ++i) cute = cute && conv_cute_operands_ok(b.conv[i]);
    const int choice = kCudaConv.read();  // once per launch (common/switches.h)
    int64_t split_cap = 1;
    if (!kCudaSplitK.read(split_cap)) split_cap = 1;  // the bindings have rejected invalid values
    if (cute && tma_batch_ok<T>(b) && tma_kernel_usable(choice)) {
      // The 128 x 256 tile, or with FASTASPP_CUDA_SPLIT_K, where its grid would not fill a wave, the
      // 64 x 128 one, whose K loop may split.
      const dim3 wide = batch_grid<Sm90TmaConfig<T>::BN>(b, Sm90TmaConfig<T>::kPatches);
      if (split_cap <= 1 || int64_t(wide.x) * wide.y >= sm_count()) {
        return launch_tma<T, kDgrad, Sm90TmaConfig<T>>(b, split_cap, scratch, stream);
      }
      return launch_tma<T, kDgrad, Sm90TmaNarrowConfig<T>>(b, split_cap, scratch, stream);
    }
    if (cute && conv_cute_config_usable<T, kDgrad, Sm90WideConfig<T>>(choice)) {
      return launch_cute<T, kDgrad, Sm90WideConfig<T>>(b, split_cap, scratch, stream);
    }
    if (cute && conv_cute_config_usable<T, kDgrad, Sm90DeepConfig<T>>(choice)) {
      return launch_cute<T, kDgrad, Sm90DeepConfig<T>>(b, split_cap, scratch, stream);
    }
    if (cute && conv_cute_config_usable<T, kDgrad, Sm90Config<T>>(choice)) {
      return launch_cute<T, kDgrad, Sm90Config<T>>(b, split_cap, scratch, stream);
    }
    if (cute && conv_cute_config_usable<T, kDgrad, Sm80Config<T>>(choice)) {
      return launch_cute<T, kDgrad, Sm80Config<T>>(b, split_cap, scratch, stream);
    }
    void (*k)(ConvBatch) = vec ? conv_wmma_kernel<T, V, kDgrad> : conv_wmma_kernel<T, 1, kDgrad>;
    if (tc_usable<T>(reinterpret_cast<const void*>(k))) return launch_grid(k, b, batch_grid<64>(b), 128, stream);
  }
  void (*k)(ConvBatch) = vec ? conv_simt_kernel<T, V, kDgrad> : conv_simt_kernel<T, 1, kDgrad>;
  return launch_grid(k, b, batch_grid<64>(b), 256, stream);  // BN of the WMMA and SIMT kernels: 64
}

// Fills the tiling fields of each conv and launches the dtype's kernel over them (scratch: where a
// split K loop's workspace comes from, or null for none).
template <bool kDgrad>
cudaError_t launch_conv(ConvBatch& b, int dtype, const FastasppScratch* scratch, cudaStream_t stream) {
  for (int i = 0; i < b.count; ++i) {
    const ConvArgs& c = b.conv[i];
    b.conv[i].tiling = conv_patch_tiling(c.dst_h, c.dst_w, kDgrad, c.stride_h, c.stride_w);
  }
  return with_element_type(dtype, [&](auto element) {
    return launch_conv_t<decltype(element), kDgrad>(b, scratch, stream);
  });
}

template <bool kDgrad>
cudaError_t launch_conv(const ConvArgs& a, int dtype, const FastasppScratch* scratch, cudaStream_t stream) {
  ConvBatch b{};
  b.conv[0] = a;
  b.count = 1;
  return launch_conv<kDgrad>(b, dtype, scratch, stream);
}

}  // namespace
}  // namespace atrous_cuda
}  // namespace fastaspp
// ---------------------------------------------------------------------------------------
// C launchers

using namespace fastaspp::atrous_cuda;

extern "C" const char* fastaspp_cuda_take_failure_detail(void) {
  static thread_local char taken[sizeof(tma_failure_detail)];
  std::memcpy(taken, tma_failure_detail, sizeof(taken));
  tma_failure_detail[0] = '\0';
  return taken;
}

extern "C" int64_t fastaspp_conv_patch_count(int64_t n, int64_t h_out, int64_t w_out) {
  if (n < 0 || h_out < 0 || w_out < 0) return -1;
  return n * fastaspp::patch_tiling(h_out, w_out).tiles_per_img;
}

namespace {

enum class Check { kLaunch, kNothingToDo, kInvalid };

// One forward conv's ConvArgs from the launcher arguments (see atrous_conv.h), with its checks.
Check forward_args(ConvArgs& a, const void* x, const void* weight_hwio, void* y, int64_t y_pixel_stride,
                   int64_t y_channel_offset, int dtype, int64_t n, int64_t c_in, int64_t h, int64_t w,
                   int64_t c_out, int64_t kh, int64_t kw, int64_t h_out, int64_t w_out, int64_t stride_h,
                   int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
                   const FastasppForwardOptions* options) {
  if (options == nullptr || acc_bytes(dtype) < 0 ||
      !valid_geometry(n, c_in, h, w, c_out, kh, kw, h_out, w_out, stride_h, stride_w, pad_h, pad_w, dil_h,
                      dil_w)) {
    return Check::kInvalid;
  }
  // The slice must lie inside each pixel's run of y_pixel_stride elements, so that no two
  // (pixel, channel) pairs share an address.
  if (y_channel_offset < 0 || y_pixel_stride < c_out || y_channel_offset > y_pixel_stride - c_out) {
    return Check::kInvalid;
  }
  const int prologue_parts = (options->x_centre != nullptr) + (options->x_scale != nullptr) +
                             (options->x_shift != nullptr);
  if (prologue_parts != 0 && (prologue_parts != 3 || kh != 1 || kw != 1 || stride_h != 1 || stride_w != 1 ||
                              pad_h != 0 || pad_w != 0)) {
    return Check::kInvalid;
  }
  if (n == 0 || c_out == 0 || h_out == 0 || w_out == 0) return Check::kNothingToDo;
  if (y == nullptr || (c_in > 0 && (x == nullptr || weight_hwio == nullptr))) return Check::kInvalid;
  a = ConvArgs{};
  a.src = x;
  a.wt = weight_hwio;
  a.scale = options->scale;
  a.shift = options->shift;
  a.image_bias = options->image_bias;
  a.src_centre = options->x_centre;
  a.src_scale = options->x_scale;
  a.src_shift = options->x_shift;
  a.stats = options->stats;
  a.stats_plane = fastaspp_conv_patch_count(n, h_out, w_out) * y_pixel_stride;
  a.dst = y;
  a.dst_pixel_stride = y_pixel_stride;
  a.dst_channel_offset = y_channel_offset;
  a.src_pixel_stride = c_in;  // dense NHWC x
  a.src_channel_offset = 0;
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
  a.relu = options->relu != 0;
  return Check::kLaunch;
}

}  // namespace

extern "C" cudaError_t fastaspp_atrous_conv2d_forward_branches_cuda(
    const void* x, void* y, int64_t y_pixel_stride, int dtype, int64_t n, int64_t c_in, int64_t h, int64_t w,
    int64_t c_out, int64_t h_out, int64_t w_out, int64_t stride_h, int64_t stride_w,
    const FastasppBranch* branches, int count, const FastasppScratch* scratch, cudaStream_t stream) {
  if (count < 0 || (count > 0 && branches == nullptr)) return cudaErrorInvalidValue;
  // Every branch is checked before any launch; the slices must not overlap (they run concurrently).
  for (int i = 0; i < count; ++i) {
    for (int j = 0; j < i; ++j) {
      const int64_t lo = std::max(branches[i].y_channel_offset, branches[j].y_channel_offset);
      const int64_t hi = std::min(branches[i].y_channel_offset, branches[j].y_channel_offset) + c_out;
      if (c_out > 0 && lo < hi) return cudaErrorInvalidValue;
    }
  }
  std::vector<ConvArgs> convs(count);
  bool nothing_to_do = false;  // an empty output: the same for every branch, each still checked
  for (int i = 0; i < count; ++i) {
    const FastasppBranch& br = branches[i];
    const FastasppBranchGeometry& g = br.geometry;
    const Check check = forward_args(convs[i], x, br.weight_hwio, y, y_pixel_stride, br.y_channel_offset, dtype, n,
                                     c_in, h, w, c_out, g.kh, g.kw, h_out, w_out, stride_h, stride_w, g.pad_h,
                                     g.pad_w, g.dil_h, g.dil_w, &br.options);
    if (check == Check::kInvalid) return cudaErrorInvalidValue;
    nothing_to_do = nothing_to_do || check == Check::kNothingToDo;
  }
  if (nothing_to_do) return cudaSuccess;
  for (int first = 0; first < count; first += kMaxConvs) {  // one launch per kMaxConvs branches
    ConvBatch batch{};
    batch.count = std::min(count - first, kMaxConvs);
    for (int i = 0; i < batch.count; ++i) batch.conv[i] = convs[first + i];
    const cudaError_t err = launch_conv<false>(batch, dtype, scratch, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

extern "C" cudaError_t fastaspp_atrous_conv2d_forward_fused_cuda(
    const void* x, const void* weight_hwio, void* y, int64_t y_pixel_stride,
    int64_t y_channel_offset, int dtype, int64_t n, int64_t c_in, int64_t h, int64_t w,
    int64_t c_out, int64_t kh, int64_t kw, int64_t h_out, int64_t w_out, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
    const FastasppForwardOptions* options, const FastasppScratch* scratch, cudaStream_t stream) {
  ConvArgs a;
  const Check check = forward_args(a, x, weight_hwio, y, y_pixel_stride, y_channel_offset, dtype, n, c_in, h, w,
                                   c_out, kh, kw, h_out, w_out, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
                                   options);
  if (check == Check::kInvalid) return cudaErrorInvalidValue;
  if (check == Check::kNothingToDo) return cudaSuccess;
  return launch_conv<false>(a, dtype, scratch, stream);
}

extern "C" cudaError_t fastaspp_atrous_conv2d_forward_strided_cuda(
    const void* x, const void* weight_hwio, const void* scale, const void* shift, void* y,
    int64_t y_pixel_stride, int64_t y_channel_offset, int dtype, int64_t n, int64_t c_in,
    int64_t h, int64_t w, int64_t c_out, int64_t kh, int64_t kw, int64_t h_out, int64_t w_out,
    int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
    int64_t dil_w, int relu, cudaStream_t stream) {
  // scale and shift are required here (the fused launcher makes them optional).
  if (scale == nullptr || shift == nullptr) {
    const bool empty = n == 0 || c_out == 0 || h_out == 0 || w_out == 0;
    if (!empty) return cudaErrorInvalidValue;
  }
  FastasppForwardOptions options{};
  options.scale = scale;
  options.shift = shift;
  options.relu = relu;
  return fastaspp_atrous_conv2d_forward_fused_cuda(
      x, weight_hwio, y, y_pixel_stride, y_channel_offset, dtype, n, c_in, h, w, c_out, kh, kw,
      h_out, w_out, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w, &options, nullptr, stream);
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

namespace {

// One input-gradient conv's ConvArgs from the launcher arguments (see atrous_conv.h), with its
// checks; grad's pixels hold grad_pixel_stride channels, this conv's from grad_channel_offset.
Check grad_input_args(ConvArgs& a, const void* grad, int64_t grad_pixel_stride, int64_t grad_channel_offset,
                      const void* weight_hwoi, void* grad_input, int dtype, int64_t n, int64_t c_in, int64_t h,
                      int64_t w, int64_t c_out, int64_t kh, int64_t kw, int64_t h_out, int64_t w_out,
                      int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h,
                      int64_t dil_w) {
  if (acc_bytes(dtype) < 0 ||
      !valid_geometry(n, c_in, h, w, c_out, kh, kw, h_out, w_out, stride_h, stride_w, pad_h, pad_w, dil_h,
                      dil_w)) {
    return Check::kInvalid;
  }
  if (grad_channel_offset < 0 || grad_pixel_stride < c_out || grad_channel_offset > grad_pixel_stride - c_out) {
    return Check::kInvalid;
  }
  if (n == 0 || c_in == 0 || h == 0 || w == 0) return Check::kNothingToDo;
  // With an empty grad every tap is dead and the kernel writes zeros without reading it.
  const bool empty_src = c_out == 0 || h_out == 0 || w_out == 0;
  if (grad_input == nullptr || (!empty_src && (grad == nullptr || weight_hwoi == nullptr))) {
    return Check::kInvalid;
  }
  a = ConvArgs{};
  a.src = grad;
  a.src_pixel_stride = grad_pixel_stride;
  a.src_channel_offset = grad_channel_offset;
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
  return Check::kLaunch;
}

}  // namespace

extern "C" cudaError_t fastaspp_atrous_conv2d_grad_input_cuda(
    const void* grad, const void* weight_hwoi, void* grad_input, int dtype, int64_t n,
    int64_t c_in, int64_t h, int64_t w, int64_t c_out, int64_t kh, int64_t kw, int64_t h_out,
    int64_t w_out, int64_t stride_h, int64_t stride_w, int64_t pad_h, int64_t pad_w,
    int64_t dil_h, int64_t dil_w, const FastasppScratch* scratch, cudaStream_t stream) {
  ConvArgs a;
  const Check check = grad_input_args(a, grad, c_out, 0, weight_hwoi, grad_input, dtype, n, c_in, h, w, c_out, kh,
                                      kw, h_out, w_out, stride_h, stride_w, pad_h, pad_w, dil_h, dil_w);
  if (check == Check::kInvalid) return cudaErrorInvalidValue;
  if (check == Check::kNothingToDo) return cudaSuccess;
  return launch_conv<true>(a, dtype, scratch, stream);
}

extern "C" cudaError_t fastaspp_atrous_conv2d_grad_input_branches_cuda(
    const void* grad, int64_t grad_pixel_stride, void* grad_input, int dtype, int64_t n, int64_t c_in,
    int64_t h, int64_t w, int64_t c_out, int64_t h_out, int64_t w_out, int64_t stride_h, int64_t stride_w,
    const FastasppGradBranch* branches, int count, const FastasppScratch* scratch, cudaStream_t stream) {
  if (count < 1 || count > FASTASPP_MAX_BRANCHES || branches == nullptr) return cudaErrorInvalidValue;
  static_assert(FASTASPP_MAX_BRANCHES == kMaxConvs, "one launch sums every branch");
  ConvBatch batch{};
  batch.sum_convs = 1;
  batch.count = count;
  bool nothing_to_do = false;  // an empty dx: the same for every branch, each still checked
  for (int i = 0; i < count; ++i) {
    const FastasppGradBranch& br = branches[i];
    const FastasppBranchGeometry& g = br.geometry;
    const Check check = grad_input_args(batch.conv[i], grad, grad_pixel_stride, br.grad_channel_offset,
                                        br.weight_hwoi, grad_input, dtype, n, c_in, h, w, c_out, g.kh, g.kw,
                                        h_out, w_out, stride_h, stride_w, g.pad_h, g.pad_w, g.dil_h, g.dil_w);
    if (check == Check::kInvalid) return cudaErrorInvalidValue;
    nothing_to_do = nothing_to_do || check == Check::kNothingToDo;
  }
  if (nothing_to_do) return cudaSuccess;
  return launch_conv<true>(batch, dtype, scratch, stream);
}
