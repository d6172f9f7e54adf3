// CUDA kernels for fastaspp::_atrous_conv2d_grad_weight (C launchers in atrous_conv.h; what the
// weight-gradient kernels share: grad_weight_common.cuh, the per-tap live-rectangle GEMMs and the
// split reduction described there; the 16-bit CuTe kernel: grad_weight_cute.cuh).
//
// Grid = (tap x Cout block x Cin block, split). S depends only on the shapes, never on the device
// or the kernel, and the second pass sums the partials in a fixed order: results are bitwise
// reproducible for a given kernel. Which kernel runs depends on the build and the device (the
// CuTe kernel on wgmma in an sm_90a image, else on mma.sync from sm80, where its alignment rule
// holds; else WMMA / SIMT), and their in-tile summation orders differ.

#include "grad_weight_common.cuh"
#include "grad_weight_cute.cuh"

namespace fastaspp {
namespace atrous_cuda {
namespace {  // internal linkage: nothing here is visible to other translation units

// Main loop over this CTA's slice of the tap's live output rectangle. Stages
// G [BK pixels][LDA] (Cout columns) and X [BK pixels][LDB] (Cin columns).
template <typename T, int V, int BM, int BN, int BK, int NT, int LDA, int LDB, typename Compute>
__device__ __forceinline__ void gw_mainloop(const GwArgs& a, const GwTile& t, T* As, T* Bs,
                                            Compute&& compute) {
  const GwPixels px(a, t);
  const int64_t p_begin = px.begin, p_end = px.end;

  TileLoader<T, BK, BM, V, NT> lg;
  TileLoader<T, BK, BN, V, NT> lx;

  auto load = [&](int64_t p0) {
    lg.load(
        [&](int k) -> const T* {
          const int64_t p = p0 + k;
          if (p >= p_end) return nullptr;
          const T *g_row, *x_row;
          px.rows(a, p, g_row, x_row);
          return g_row;
        },
        t.co0, a.cout);
    lx.load(
        [&](int k) -> const T* {
          const int64_t p = p0 + k;
          if (p >= p_end) return nullptr;
          const T *g_row, *x_row;
          px.rows(a, p, g_row, x_row);
          return x_row;
        },
        t.ci0, a.cin);
  };

  if (p_begin < p_end) load(p_begin);
  int buf = 0;
  for (int64_t p0 = p_begin; p0 < p_end; p0 += BK) {
    lg.store(As + buf * (BK * LDA), LDA);
    lx.store(Bs + buf * (BK * LDB), LDB);
    __syncthreads();
    if (p0 + BK < p_end) load(p0 + BK);
    compute(As + buf * (BK * LDA), Bs + buf * (BK * LDB));
    buf ^= 1;
  }
}

// fp16 / bf16 tensor-core grad_weight. G tile is read as a col-major A (Cout x pixels),
// X tile as a row-major B (pixels x Cin). Shared memory: 2x32x72 + 2x32x72 (16-bit) +
// 64x68 fp32 = 9216 + 9216 + 17408 = 35840 bytes.
template <typename T, int V>
__global__ void __launch_bounds__(128) grad_weight_wmma_kernel(GwArgs a) {
  if constexpr (tc_supported_here<T>()) {
    using namespace nvcuda;
    constexpr int BM = 64, BN = 64, BK = 32, NT = 128;
    constexpr int LDA = BM + 8, LDB = BN + 8, LDC = BN + 4;
    static_assert(LDA % 8 == 0 && LDB % 8 == 0 && LDC % 4 == 0, "wmma ldm (16-byte rows too)");
    static_assert((16 * LDA * 2) % 32 == 0 && (16 * LDB * 2) % 32 == 0 &&
                      (16 * LDC * 4) % 32 == 0,
                  "wmma alignment");
    constexpr int kABytes = 2 * BK * LDA * 2, kBBytes = 2 * BK * LDB * 2;
    static_assert(kABytes % 128 == 0 && kBBytes % 128 == 0, "buffer alignment");
    __shared__ __align__(128) unsigned char smem[kABytes + kBBytes + BM * LDC * 4];
    T* As = reinterpret_cast<T*>(smem);
    T* Bs = reinterpret_cast<T*>(smem + kABytes);
    float* Cs = reinterpret_cast<float*>(smem + kABytes + kBBytes);

    const GwTile t = make_gw_tile<64, 64>(a);
    const int warp = static_cast<int>(threadIdx.x) >> 5;
    const int wm = warp >> 1, wn = warp & 1;

    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

    gw_mainloop<T, V, BM, BN, BK, NT, LDA, LDB>(a, t, As, Bs, [&](const T* A, const T* B) {
#pragma unroll
      for (int kk = 0; kk < BK; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
          wmma::load_matrix_sync(fa[i], A + kk * LDA + wm * 32 + i * 16, LDA);
#pragma unroll
        for (int j = 0; j < 2; ++j)
          wmma::load_matrix_sync(fb[j], B + kk * LDB + wn * 32 + j * 16, LDB);
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
      }
    });

#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
      for (int j = 0; j < 2; ++j)
        wmma::store_matrix_sync(Cs + (wm * 32 + i * 16) * LDC + wn * 32 + j * 16, acc[i][j], LDC,
                                wmma::mem_row_major);
    __syncthreads();
    store_partial_tile<BM, BN, NT>(a, t, Cs, LDC);
  } else {
    __trap();  // launcher never selects this kernel on such a GPU
  }
}

// SIMT grad_weight. Shared memory, fp64 worst case: 2 x (2x16x66) doubles = 33792 bytes.
template <typename T, int V>
__global__ void __launch_bounds__(256) grad_weight_simt_kernel(GwArgs a) {
  using Acc = typename Elem<T>::Acc;
  constexpr int BM = 64, BN = 64, BK = 16, NT = 256;
  constexpr int kPad = 16 / static_cast<int>(sizeof(T));
  constexpr int LDA = BM + kPad, LDB = BN + kPad;
  static_assert((LDA * sizeof(T)) % 16 == 0 && (LDB * sizeof(T)) % 16 == 0, "vector stores");
  constexpr int kABytes = 2 * BK * LDA * static_cast<int>(sizeof(T));
  constexpr int kBBytes = 2 * BK * LDB * static_cast<int>(sizeof(T));
  static_assert(kABytes % 16 == 0, "buffer alignment");
  __shared__ __align__(16) unsigned char smem[kABytes + kBBytes];
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = reinterpret_cast<T*>(smem + kABytes);

  const GwTile t = make_gw_tile<64, 64>(a);
  const int tx = static_cast<int>(threadIdx.x) & 15, ty = static_cast<int>(threadIdx.x) >> 4;

  Acc acc[4][4];
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) acc[i][j] = Acc(0);

  gw_mainloop<T, V, BM, BN, BK, NT, LDA, LDB>(a, t, As, Bs, [&](const T* A, const T* B) {
#pragma unroll
    for (int k = 0; k < BK; ++k) {
      Acc av[4], bv[4];
#pragma unroll
      for (int i = 0; i < 4; ++i) av[i] = Elem<T>::to_acc(A[k * LDA + ty + 16 * i]);
#pragma unroll
      for (int j = 0; j < 4; ++j) bv[j] = Elem<T>::to_acc(B[k * LDB + tx + 16 * j]);
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] += av[i] * bv[j];
    }
  });

#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) store_partial<Acc>(a, t, ty + 16 * i, tx + 16 * j, acc[i][j]);
}

// Second pass: dW[co, ci, kh, kw] = sum over splits (fixed order) of the partials.
template <typename T>
__global__ void __launch_bounds__(256) grad_weight_finalize_kernel(const void* ws_v, void* dw_v,
                                                                   int64_t cout, int64_t cin,
                                                                   int64_t taps, int splits) {
  using Acc = typename Elem<T>::Acc;
  const Acc* ws = static_cast<const Acc*>(ws_v);
  T* dw = static_cast<T*>(dw_v);
  const int64_t total = cout * cin * taps;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; idx < total;
       idx += step) {
    const int64_t tap = idx % taps;
    const int64_t rest = idx / taps;
    const int64_t ci = rest % cin, co = rest / cin;
    Acc s = Acc(0);
    for (int sp = 0; sp < splits; ++sp) s += ws[((sp * taps + tap) * cout + co) * cin + ci];
    dw[idx] = Elem<T>::from_acc(s);
  }
}

// Pixel splits of the grad_weight reduction: enough CTAs to fill a large GPU (~1024), at
// least ~1024 pixels per split, at most 64. Shapes only: reproducible across devices.
int64_t grad_weight_splits(int64_t n, int64_t c_in, int64_t c_out, int64_t taps, int64_t h_out,
                           int64_t w_out) {
  const int64_t base = taps * div_up(c_out, 64) * div_up(c_in, 64);
  int64_t s = base > 0 ? div_up(1024, base) : 1;
  const int64_t by_pixels = div_up(n * h_out * w_out, 1024);
  if (s > by_pixels) s = by_pixels;
  if (s > 64) s = 64;
  if (s < 1) s = 1;
  return s;
}

// The grid of a BM x BN tile kernel: (tap x Cout block x Cin block, split); fills a's block counts.
template <int BM, int BN>
bool gw_grid(GwArgs& a, dim3& grid) {
  a.co_blocks = div_up(a.cout, BM);
  a.ci_blocks = div_up(a.cin, BN);
  const int64_t grid_x = a.kh * a.kw * a.co_blocks * a.ci_blocks;
  if (grid_x > 0x7fffffff) return false;
  grid = dim3(static_cast<unsigned>(grid_x), static_cast<unsigned>(a.splits));
  return true;
}

// 16-bit types: the CuTe kernel (grad_weight_cute.cuh: wgmma in an sm_90a image, else mma.sync)
// where it can run, else WMMA tensor cores when the kernel image has them, else SIMT; 16-byte vector
// loads when the channel counts and pointers allow.
template <typename T>
cudaError_t launch_grad_weight_t(GwArgs a, cudaStream_t stream) {
  dim3 grid;
  if constexpr (is_16bit<T>()) {
    // Both CuTe configs tile 64 x 128, so they share the grid.
    static_assert(Sm90GwConfig<T>::BM == Sm80GwConfig<T>::BM && Sm90GwConfig<T>::BN == Sm80GwConfig<T>::BN, "");
    const int choice = kCudaConv.read();  // once per launch (common/switches.h)
    void (*k)(GwArgs) = nullptr;
    if (grad_weight_cute_usable<T, Sm90GwConfig<T>>(a, choice)) {
      k = grad_weight_cute_kernel<T, Sm90GwConfig<T>>;
    } else if (grad_weight_cute_usable<T, Sm80GwConfig<T>>(a, choice)) {
      k = grad_weight_cute_kernel<T, Sm80GwConfig<T>>;
    }
    if (k != nullptr) {
      if (!gw_grid<Sm80GwConfig<T>::BM, Sm80GwConfig<T>::BN>(a, grid)) return cudaErrorInvalidValue;
      k<<<grid, Sm80Tile::kThreads, 0, stream>>>(a);
      return cudaGetLastError();
    }
  }
  if (!gw_grid<64, 64>(a, grid)) return cudaErrorInvalidValue;  // the WMMA and SIMT tiles
  constexpr int V = 16 / static_cast<int>(sizeof(T));
  const bool vec = a.cin % V == 0 && a.cout % V == 0 && aligned16(a.x) && aligned16(a.g);
  if constexpr (is_16bit<T>()) {
    void (*k)(GwArgs) = vec ? grad_weight_wmma_kernel<T, V> : grad_weight_wmma_kernel<T, 1>;
    if (tc_usable<T>(reinterpret_cast<const void*>(k))) {
      k<<<grid, 128, 0, stream>>>(a);
      return cudaGetLastError();
    }
  }
  void (*k)(GwArgs) = vec ? grad_weight_simt_kernel<T, V> : grad_weight_simt_kernel<T, 1>;
  k<<<grid, 256, 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
void launch_grad_weight_finalize(const GwArgs& a, void* dw, cudaStream_t stream) {
  const int64_t taps = a.kh * a.kw;
  const int64_t total = a.cout * a.cin * taps;
  int64_t blocks = div_up(total, 256);
  if (blocks > 4096) blocks = 4096;  // grid-stride loop covers the rest
  grad_weight_finalize_kernel<T><<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      a.ws, dw, a.cout, a.cin, taps, a.splits);
}

}  // namespace
}  // namespace atrous_cuda
}  // namespace fastaspp
// ---------------------------------------------------------------------------------------
// C launchers

using namespace fastaspp::atrous_cuda;

extern "C" int64_t fastaspp_atrous_conv2d_grad_weight_cuda_workspace_bytes(
    int dtype, int64_t n, int64_t c_in, int64_t h, int64_t w, int64_t c_out, int64_t kh,
    int64_t kw, int64_t h_out, int64_t w_out) {
  const int64_t eb = acc_bytes(dtype);
  if (eb < 0 || n < 0 || c_in < 0 || h < 0 || w < 0 || c_out < 0 || kh < 1 || kw < 1 ||
      h_out < 0 || w_out < 0) {
    return -1;
  }
  const int64_t taps = kh * kw;
  return grad_weight_splits(n, c_in, c_out, taps, h_out, w_out) * taps * c_out * c_in * eb;
}

extern "C" cudaError_t fastaspp_atrous_conv2d_grad_weight_cuda(
    const void* x, const void* grad, void* grad_weight, void* workspace,
    int64_t workspace_bytes, int dtype, int64_t n, int64_t c_in, int64_t h, int64_t w,
    int64_t c_out, int64_t kh, int64_t kw, int64_t h_out, int64_t w_out, int64_t stride_h,
    int64_t stride_w, int64_t pad_h, int64_t pad_w, int64_t dil_h, int64_t dil_w,
    cudaStream_t stream) {
  if (acc_bytes(dtype) < 0 ||
      !valid_geometry(n, c_in, h, w, c_out, kh, kw, h_out, w_out, stride_h, stride_w, pad_h,
                      pad_w, dil_h, dil_w)) {
    return cudaErrorInvalidValue;
  }
  if (c_out == 0 || c_in == 0) return cudaSuccess;  // dW is empty
  const int64_t need =
      fastaspp_atrous_conv2d_grad_weight_cuda_workspace_bytes(dtype, n, c_in, h, w, c_out, kh,
                                                              kw, h_out, w_out);
  // With no pixels (n == 0 or an empty output) the kernels never read x or grad and the
  // result is zeros, still written through the same two passes.
  const bool no_pixels = n == 0 || h_out == 0 || w_out == 0;
  if (grad_weight == nullptr || workspace == nullptr || workspace_bytes < need ||
      (!no_pixels && (x == nullptr || grad == nullptr))) {
    return cudaErrorInvalidValue;
  }

  GwArgs a{};
  a.x = x;
  a.g = grad;
  a.ws = workspace;
  a.n = n;
  a.h = h;
  a.w = w;
  a.cin = c_in;
  a.ho = h_out;
  a.wo = w_out;
  a.cout = c_out;
  a.kh = kh;
  a.kw = kw;
  a.stride_h = stride_h;
  a.stride_w = stride_w;
  a.pad_h = pad_h;
  a.pad_w = pad_w;
  a.dil_h = dil_h;
  a.dil_w = dil_w;
  a.splits = static_cast<int>(grad_weight_splits(n, c_in, c_out, kh * kw, h_out, w_out));

  return with_element_type(dtype, [&](auto element) {
    using T = decltype(element);
    const cudaError_t err = launch_grad_weight_t<T>(a, stream);
    if (err != cudaSuccess) return err;
    launch_grad_weight_finalize<T>(a, grad_weight, stream);
    return cudaGetLastError();
  });
}
