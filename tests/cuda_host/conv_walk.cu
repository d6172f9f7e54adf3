// Host emulation of the CuTe conv kernel's walk (csrc/cuda/conv_cute.cuh), run by
// tests/test_cuda_host_programs.py without a GPU. For every CTA of a launch it runs the kernel's
// own index code on the host: the patches the CTA owns (cta_patches_of, one or two a CTA), its
// (conv, live tap, channel chunk) steps over their cover (first_step / next_step, checked against
// count_steps), each step's A rows (tile_row_src: slot, gather, zero where a row reads padding or
// its slot holds no patch) and B rows, then stores the tile as the staged epilogue does value by
// value (store_tile_value). Only the MMA is replaced, by fp64 sums. The result must match a direct
// fp64 conv, every element of each conv's slice written once and none outside it, for:
// * forward launches of one conv and of several into channel slices of one dst (the ASPP's
//   branches: grid mode);
// * input-gradient launches of one conv (strides 1 to 3 along each axis: each stride phase of dx
//   tiled apart)
//   and of several summed into one dx (sum mode), each reading its channel slice of the gradient;
// * one and two patches per CTA, 128- and 256-channel blocks, channel counts with a K tail;
// * K loops split into parts (FASTASPP_CUDA_SPLIT_K: step_at, k_split_range, each part's gather
//   wherever in a tap it starts, the parts summed in order; each conv of a launch with its own
//   parts), whose steps in part order must be the unsplit walk; k_split_plan's rules; and the
//   walks it is given (longest_walks: each conv's longest CTA walk, or in sum mode the longest
//   over every conv), against count_steps of every one-patch CTA.
// Prints one line per failed check and "ok" when every check passes.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

#include "../../csrc/cuda/conv_common.cuh"

using namespace fastaspp;
using namespace fastaspp::atrous_cuda;

static int failures = 0;

static void expect(bool ok, const char* what, long long a, long long b, double c) {
  if (!ok && failures++ < 20) std::printf("FAILED %s at (%lld, %lld, %g)\n", what, a, b, c);
}

constexpr int kBK = 32;  // the CuTe kernel's K step

// One launch as the kernel runs it, CTA by CTA, with kPatches patches a CTA and BN channels a
// block; with splits > 1, conv i's K loops in 1 + (splits - 1 + i) % splits parts (conv 0's
// `splits`, conv 1's none, ...; in sum mode every conv has conv 0's). dst must hold NaN where
// nothing is to be written.
template <bool kDgrad, int kPatches, int BN>
static void emulate(ConvBatch& b, int splits = 1) {
  for (int i = 0; i < b.count; ++i) {
    const ConvArgs& c = b.conv[i];
    b.conv[i].tiling = conv_patch_tiling(c.dst_h, c.dst_w, kDgrad, c.stride_h, c.stride_w);
  }
  b.splits = splits;
  for (int i = 0; i < b.count; ++i) b.conv[i].parts = b.sum_convs ? splits : 1 + (splits - 1 + i) % splits;
  int64_t blocks = 1;
  for (int i = 0; i < b.count; ++i) blocks = std::max<int64_t>(blocks, ceil_div(b.conv[i].nc, int64_t(BN)));
  b.blocks_per_conv = static_cast<int>(blocks);
  const ConvArgs& first = b.conv[0];
  const int64_t grid_x = first.n * ctas_per_img(first.tiling, kPatches);
  const int64_t grid_y = b.sum_convs ? blocks : blocks * b.count;
  constexpr int BM = kPatches * kTilePixels;
  std::vector<double> acc(BM * BN);
  int64_t longest[kMaxConvs] = {};  // the most steps of a CTA, per conv (sum mode: of every CTA)
  for (int64_t y = 0; y < grid_y; ++y)
    for (int64_t x = 0; x < grid_x; ++x) {
      // cta_convs, cta_n0, cta_patches with blockIdx = (x, y).
      const ConvRange r = b.sum_convs ? ConvRange{0, b.count} : ConvRange{int(y / blocks), int(y / blocks) + 1};
      const ConvArgs& a = b.conv[r.first];
      const int64_t n0 = (y % blocks) * BN;
      const CtaPatches cp = cta_patches_of(a.tiling, kPatches, x, a.dst_h, a.dst_w);
      const Patch& t = cp.cover;
      std::fill(acc.begin(), acc.end(), 0.0);
      std::vector<Step> walk;  // the unsplit walk
      for (Step s = first_step<kDgrad>(b, r.first, r.end, t); s.conv < r.end;
           s = next_step<kDgrad, kBK>(b, r.end, t, s)) {
        walk.push_back(s);
      }
      const int64_t steps = count_steps<kDgrad, kBK>(b, r, t);
      expect(int64_t(walk.size()) == steps, "walk length = count_steps", x, y, double(steps));
      longest[b.sum_convs ? 0 : r.first] = std::max(longest[b.sum_convs ? 0 : r.first], steps);
      int64_t walked = 0;  // steps the parts walked so far, in part order
      const int parts = b.splits > 1 ? a.parts : 1;  // conv_cute_kernel's; z past them returns
      for (int part = 0; part < parts; ++part) {
        // conv_cute_kernel's part: its range, its first step, then its source pointers as the
        // kernel keeps them: gathered at a tap's first step or the part's first (wherever that
        // lies in the tap), then moved on by BK channels (BK weight rows) a step.
        const StepRange range = parts > 1 ? k_split_range(steps, part, parts) : StepRange{0, steps};
        expect(range.begin == walked, "parts are consecutive (cta, part, begin)", x, part, double(range.begin));
        Step s = parts > 1 ? step_at<kDgrad, kBK>(b, r, t, range.begin) : first_step<kDgrad>(b, r.first, r.end, t);
        std::vector<double> partial(BM * BN, 0.0);
        std::vector<const double*> rows(BM);
        const double* wt_rows = nullptr;
        int64_t k_offset = 0;  // channels the A pointers have moved on since their gather
        bool gathered = false;
        for (int64_t i = range.begin; i < range.end; ++i, s = next_step<kDgrad, kBK>(b, r.end, t, s)) {
          const bool in_walk = i < steps && s.conv == walk[i].conv && s.tap == walk[i].tap && s.k0 == walk[i].k0;
          expect(in_walk, "a part walks its steps of the unsplit walk (cta, step, k0)", x, i, double(s.k0));
          if (!in_walk) break;
          ++walked;
          const ConvArgs& c = b.conv[s.conv];
          if (s.k0 == 0 || !gathered) {
            gathered = true;
            const int64_t kh = s.tap / c.kw, kw = s.tap % c.kw;
            for (int m = 0; m < BM; ++m) rows[m] = tile_row_src<kPatches, kDgrad, double>(c, cp, kh, kw, m);
            k_offset = s.k0;
            wt_rows = static_cast<const double*>(c.wt) + (s.tap * c.kc + s.k0) * c.nc;
          }
          const int64_t room = std::min<int64_t>(kBK, c.kc - s.k0);  // the zero fill past the channels
          for (int m = 0; m < BM; ++m) {
            if (rows[m] == nullptr) continue;  // the kernel's zero fill
            for (int64_t k = 0; k < room; ++k)
              for (int j = 0; j < BN && n0 + j < c.nc; ++j)
                partial[m * BN + j] += rows[m][k_offset + k] * wt_rows[k * c.nc + n0 + j];
          }
          k_offset += kBK;
          wt_rows += kBK * c.nc;
        }
        for (int e = 0; e < BM * BN; ++e) acc[e] += partial[e];  // conv_split_finalize_kernel's order
      }
      expect(walked == steps, "the parts walk every step once (cta, parts, steps)", x, parts, double(walked));
      // staged_epilogue's rows: the slots that hold patches.
      for (int m = 0; m < cp.count * kTilePixels; ++m)
        for (int j = 0; j < BN; ++j)
          store_tile_value<double, kDgrad, kPatches, double>(a, cp, m, n0 + j, acc[m * BN + j]);
    }
  if constexpr (kPatches == 1) {  // the split plan's walks (longest_walks) against every CTA's
    int64_t walks[kMaxConvs];
    const int count = longest_walks<kDgrad, kBK>(b, walks);
    expect(count == (b.sum_convs ? 1 : b.count), "longest_walks: one walk a conv, or one in sum mode", count,
           b.sum_convs, 0);
    for (int i = 0; i < count && i < b.count; ++i)
      expect(walks[i] == longest[i], "longest_walks = a CTA's most steps (conv, walk, counted)", i, walks[i],
             double(longest[i]));
  }
}

struct Geometry {
  int64_t n, cin, cout, h, w, k, sh, sw, p, d, ho, wo;  // strides sh, sw: the input gradient's phases
};

static Geometry random_geometry(std::mt19937& gen, int64_t cin, int64_t cout) {
  std::uniform_int_distribution<int> size(1, 23), kern(0, 2), stride(1, 3), dil(1, 12), batch(1, 2);
  for (;;) {
    Geometry g;
    g.n = batch(gen), g.cin = cin, g.cout = cout, g.h = size(gen), g.w = size(gen);
    g.k = 2 * kern(gen) + 1, g.sh = stride(gen), g.sw = stride(gen), g.d = dil(gen);
    g.p = std::uniform_int_distribution<int64_t>(0, g.d * (g.k - 1))(gen);
    g.ho = conv_out_size(g.h, g.k, g.sh, g.p, g.d), g.wo = conv_out_size(g.w, g.k, g.sw, g.p, g.d);
    if (g.ho >= 1 && g.wo >= 1) return g;
  }
}

static std::vector<double> random_values(std::mt19937& gen, size_t count) {
  std::uniform_real_distribution<double> u(-1.0, 1.0);
  std::vector<double> v(count);
  for (auto& e : v) e = u(gen);
  return v;
}

static ConvArgs conv_args(const Geometry& g, bool dgrad) {
  ConvArgs a{};
  a.n = g.n, a.kh = g.k, a.kw = g.k;
  a.stride_h = g.sh, a.stride_w = g.sw, a.pad_h = a.pad_w = g.p, a.dil_h = a.dil_w = g.d;
  a.src_h = dgrad ? g.ho : g.h, a.src_w = dgrad ? g.wo : g.w, a.kc = dgrad ? g.cout : g.cin;
  a.dst_h = dgrad ? g.h : g.ho, a.dst_w = dgrad ? g.w : g.wo, a.nc = dgrad ? g.cin : g.cout;
  a.src_pixel_stride = a.kc, a.dst_pixel_stride = a.nc;
  return a;
}

// Forward: `branches` convs of one input into channel slices of one NHWC dst (grid mode).
template <int kPatches, int BN>
static void check_forward(std::mt19937& gen, int trial, int branches, int64_t cin, int64_t cout, int splits = 1) {
  std::vector<Geometry> gs;
  const Geometry base = random_geometry(gen, cin, cout);
  ConvBatch b{};
  b.count = branches;
  const int64_t ctot = branches * cout;
  std::vector<std::vector<double>> ws;
  for (int i = 0; i < branches; ++i) {
    Geometry g = base;
    if (i > 0) {  // an ASPP branch: 3x3, stride 1, padding = dilation (the same output map)
      g.k = 3, g.sh = g.sw = 1, g.d = std::uniform_int_distribution<int>(1, 12)(gen), g.p = g.d;
      g.ho = g.h, g.wo = g.w;
    } else if (branches > 1) {
      g.k = 1, g.sh = g.sw = 1, g.p = 0, g.d = 1, g.ho = g.h, g.wo = g.w;
    }
    gs.push_back(g);
    ws.push_back(random_values(gen, g.k * g.k * cin * cout));  // [KH, KW, Cin, Cout]
  }
  const Geometry& g0 = gs[0];
  std::vector<double> x = random_values(gen, g0.n * g0.h * g0.w * cin);
  std::vector<double> y(g0.n * g0.ho * g0.wo * ctot, NAN);
  for (int i = 0; i < branches; ++i) {
    ConvArgs a = conv_args(gs[i], false);
    a.src = x.data(), a.wt = ws[i].data(), a.dst = y.data();
    a.dst_pixel_stride = ctot, a.dst_channel_offset = i * cout;
    b.conv[i] = a;
  }
  emulate<false, kPatches, BN>(b, splits);
  for (int i = 0; i < branches; ++i) {
    const Geometry& g = gs[i];
    for (int64_t n = 0; n < g.n; ++n)
      for (int64_t oh = 0; oh < g.ho; ++oh)
        for (int64_t ow = 0; ow < g.wo; ++ow)
          for (int64_t co = 0; co < cout; ++co) {
            double ref = 0, mag = 0;
            for (int64_t kh = 0; kh < g.k; ++kh)
              for (int64_t kw = 0; kw < g.k; ++kw) {
                const int64_t ih = oh * g.sh - g.p + kh * g.d, iw = ow * g.sw - g.p + kw * g.d;
                if (ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) continue;
                for (int64_t ci = 0; ci < cin; ++ci) {
                  const double term =
                      x[((n * g.h + ih) * g.w + iw) * cin + ci] * ws[i][((kh * g.k + kw) * cin + ci) * cout + co];
                  ref += term, mag += std::fabs(term);
                }
              }
            const double got = y[((n * g.ho + oh) * g.wo + ow) * ctot + i * cout + co];
            expect(std::fabs(got - ref) <= 1e-12 * (mag + 1), "forward value (trial, branch, got)", trial, i, got);
          }
  }
  for (double v : y) expect(!std::isnan(v), "forward: every element of every slice written", trial, branches, v);
}

// Input gradient: `branches` convs summed into one dx, each reading its channel slice of one
// gradient (sum mode; one branch is a plain conv's input gradient, stride 2 included).
template <int kPatches, int BN>
static void check_grad_input(std::mt19937& gen, int trial, int branches, int64_t cin, int64_t cout,
                             int splits = 1) {
  std::vector<Geometry> gs;
  const Geometry base = random_geometry(gen, cin, cout);
  for (int i = 0; i < branches; ++i) {
    Geometry g = base;
    if (branches > 1) {  // ASPP branches: 1x1, then 3x3 at padding = dilation, stride 1
      g.sh = g.sw = 1, g.ho = g.h, g.wo = g.w, g.k = i == 0 ? 1 : 3;
      g.d = i == 0 ? 1 : std::uniform_int_distribution<int>(1, 12)(gen), g.p = i == 0 ? 0 : g.d;
    }
    gs.push_back(g);
  }
  const Geometry& g0 = gs[0];
  const int64_t ctot = branches * cout;
  std::vector<double> grad = random_values(gen, g0.n * g0.ho * g0.wo * ctot);
  std::vector<std::vector<double>> ws;  // [KH, KW, Cout, Cin], the kernel's grad_input layout
  for (const Geometry& g : gs) ws.push_back(random_values(gen, g.k * g.k * cout * cin));
  std::vector<double> dx(g0.n * g0.h * g0.w * cin, NAN);
  ConvBatch b{};
  b.count = branches;
  b.sum_convs = 1;
  for (int i = 0; i < branches; ++i) {
    ConvArgs a = conv_args(gs[i], true);
    a.src = grad.data(), a.src_pixel_stride = ctot, a.src_channel_offset = i * cout;
    a.wt = ws[i].data(), a.dst = dx.data();
    b.conv[i] = a;
  }
  emulate<true, kPatches, BN>(b, splits);
  std::vector<double> ref(dx.size(), 0.0), mag(dx.size(), 0.0);
  for (int i = 0; i < branches; ++i) {
    const Geometry& g = gs[i];
    for (int64_t n = 0; n < g.n; ++n)
      for (int64_t oh = 0; oh < g.ho; ++oh)
        for (int64_t ow = 0; ow < g.wo; ++ow)
          for (int64_t kh = 0; kh < g.k; ++kh)
            for (int64_t kw = 0; kw < g.k; ++kw) {
              const int64_t ih = oh * g.sh - g.p + kh * g.d, iw = ow * g.sw - g.p + kw * g.d;
              if (ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) continue;
              for (int64_t co = 0; co < cout; ++co)
                for (int64_t ci = 0; ci < cin; ++ci) {
                  const double term = grad[((n * g.ho + oh) * g.wo + ow) * ctot + i * cout + co] *
                                      ws[i][((kh * g.k + kw) * cout + co) * cin + ci];
                  const int64_t at = ((n * g.h + ih) * g.w + iw) * cin + ci;
                  ref[at] += term, mag[at] += std::fabs(term);
                }
            }
  }
  for (size_t e = 0; e < dx.size(); ++e)
    expect(std::fabs(dx[e] - ref[e]) <= 1e-12 * (mag[e] + 1), "grad_input value (trial, element, got)", trial,
           static_cast<long long>(e), dx[e]);
}

template <int kPatches, int BN>
static void check_config(std::mt19937& gen) {
  for (int trial = 0; trial < 12; ++trial) {
    // Channel counts in 8s, as the CuTe kernels require: 40 = one K step and a tail of 8; 136 =
    // a partial second 128-channel block.
    const int64_t cin = trial % 3 == 0 ? 40 : 16, cout = trial % 4 == 0 ? 136 : 24;
    check_forward<kPatches, BN>(gen, trial, 1, cin, cout);
    check_forward<kPatches, BN>(gen, trial, 4, cin, cout);
    check_grad_input<kPatches, BN>(gen, trial, 1, cin, cout);
    check_grad_input<kPatches, BN>(gen, trial, 4, cin, cout);
  }
}

// The 64 x 128 tiles with split K loops: parts that start inside a tap (40 channels: two steps a
// tap), more parts than a CTA has steps (empty parts), convs of one launch with different parts
// (some whole), and sums over several convs.
static void check_splits(std::mt19937& gen) {
  for (int trial = 0; trial < 8; ++trial) {
    const int splits = 2 + trial % 4;
    const int64_t cin = trial % 2 == 0 ? 40 : 16, cout = trial % 3 == 0 ? 136 : 24;
    check_forward<1, 128>(gen, trial, 1, cin, cout, splits);
    check_forward<1, 128>(gen, trial, 4, cin, cout, splits);
    check_grad_input<1, 128>(gen, trial, 1, cin, cout, splits);
    check_grad_input<1, 128>(gen, trial, 4, cin, cout, splits);
  }
}

// k_split_plan's rules (common/k_split.h) and k_split_range's parts.
static void check_split_rules() {
  // An H200: 132 SMs, 3 CTAs each. aspp-33 r6 at batch 1: 25 patches x 2 channel blocks, 9 taps x
  // 64 steps (2048 channels).
  int parts[4];
  const int64_t conv[1] = {576}, aspp[4] = {64, 576, 576, 576};
  expect(k_split_plan(conv, 1, 50, 132, 3, 4, parts) == 4 && parts[0] == 4, "the cap bounds the parts", 4, 0, 0);
  expect(k_split_plan(conv, 1, 50, 132, 3, 64, parts) == 7 && parts[0] == 7, "one wave bounds the parts", 64,
         parts[0], 0);
  expect(k_split_plan(conv, 1, 50, 132, 3, 1, parts) == 1 && parts[0] == 1, "a cap of 1 never splits", 1, 0, 0);
  expect(k_split_plan(conv, 1, 400, 132, 3, 8, parts) == 1 && parts[0] == 1, "a full wave is not split", 400, 0, 0);
  const int64_t short_walk[1] = {24};
  expect(k_split_plan(short_walk, 1, 50, 132, 3, 64, parts) == 24 / kMinStepsPerSplit, "parts keep their steps", 24,
         parts[0], 0);
  // The ASPP's branches at batch 1 (grid mode): the 3x3 branches in two parts, the 1x1 one whole;
  // 350 CTAs for 396 places.
  expect(k_split_plan(aspp, 4, 50, 132, 3, 8, parts) == 2 && parts[0] == 1 && parts[1] == 2 && parts[2] == 2 &&
             parts[3] == 2,
         "the ASPP's long walks split, its short one not", parts[0], parts[1], 0);
  // Their live walks where the r18 branch has 4 live taps at most (33 x 33 map: 256 steps): the r6
  // and r12 branches now take 3 parts, the shorter r18 walk none; the longest part 256 steps, not 288.
  const int64_t aspp_live[4] = {64, 576, 576, 256};
  expect(k_split_plan(aspp_live, 4, 50, 132, 3, 8, parts) == 3 && parts[0] == 1 && parts[1] == 3 &&
             parts[2] == 3 && parts[3] == 1,
         "live walks size the parts", parts[1], parts[3], 0);
  // Sum mode (the ASPP's input gradient): one walk of every branch's steps, over every CTA.
  const int64_t whole[1] = {64 + 3 * 576};
  expect(k_split_plan(whole, 1, 50, 132, 3, 8, parts) == 7 && parts[0] == 7, "sum mode splits the whole walk",
         parts[0], 0, 0);
  for (int64_t per_walk = 1; per_walk < 300; per_walk += 7)
    for (int64_t s0 = 0; s0 < 700; s0 += 29)
      for (int64_t cap = 0; cap < 12; ++cap)
        for (int count = 1; count <= 3; count += 2) {
          const int64_t walks[3] = {s0, s0 / 9, 2 * s0 + 5};
          const int most = k_split_plan(walks, count, per_walk, 132, 3, cap, parts);
          int64_t split_ctas = 0;
          bool ok = most >= 1;
          for (int i = 0; i < count; ++i) {
            ok = ok && parts[i] >= 1 && parts[i] <= most &&
                 (parts[i] == 1 || (parts[i] <= cap && walks[i] / parts[i] >= kMinStepsPerSplit));
            if (parts[i] > 1) split_ctas += per_walk * parts[i];
          }
          ok = ok && (most == 1 || (count * per_walk < 132 * 3 && split_ctas <= 132 * 3));
          expect(ok, "k_split_plan within its rules (ctas a walk, steps, walks)", per_walk, s0, count);
        }
  for (int64_t steps = 0; steps < 40; ++steps)
    for (int n = 1; n < 9; ++n) {
      int64_t next = 0;
      for (int p = 0; p < n; ++p) {
        const StepRange r = k_split_range(steps, p, n);
        const int64_t size = r.end - r.begin;
        expect(r.begin == next && size >= steps / n && size <= steps / n + 1,
               "k_split_range: consecutive parts of balanced sizes (steps, part, size)", steps, p, double(size));
        next = r.end;
      }
      expect(next == steps, "k_split_range covers every step", steps, n, double(next));
    }
}

int main() {
  std::mt19937 gen(5);
  check_config<1, 128>(gen);  // Sm80Config, Sm90Config
  check_config<2, 256>(gen);  // Sm90WideConfig
  check_splits(gen);          // the 64 x 128 configs, FASTASPP_CUDA_SPLIT_K
  check_split_rules();
  if (failures == 0) std::printf("ok\n");
  return failures == 0 ? 0 : 1;
}
