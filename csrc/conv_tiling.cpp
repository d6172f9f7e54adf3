// torch.ops.fastaspp._conv_patch_taps: the cuda conv kernels' tiling (common/conv_tiling.h) run on
// the host, so that CPU-only machines test what every CTA of those kernels will compute
// (tests/test_conv_tiling.py). Not used by any kernel path.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "common/conv_tiling.h"

namespace fastaspp {
namespace {

// [P, 6 + KH*KW] int64 for the P patches of one image: rows [r0, r1) and columns [c0, c1) of its
// phase's sub-map, the phase (ph, pw) (the patch's dst pixels are (ph + sh * r, pw + sw * c) for
// the input gradient, which tiles each stride phase apart; (r, c) with phase 0 for the forward),
// then 1 for each tap (kh-major) the CTA of that patch visits, 0 for each it skips. dst is the map
// the CTA writes: the output (forward) or the input (dgrad, the input gradient).
at::Tensor conv_patch_taps(int64_t src_h, int64_t src_w, int64_t dst_h, int64_t dst_w, int64_t kernel_h,
                           int64_t kernel_w, at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, bool dgrad) {
  TORCH_CHECK(src_h >= 0 && src_w >= 0 && dst_h >= 0 && dst_w >= 0 && kernel_h >= 1 && kernel_w >= 1,
              "fastaspp: _conv_patch_taps wants sizes >= 0 and a kernel of at least 1x1");
  const ConvGeometry g{{stride[0], stride[1]}, {padding[0], padding[1]}, {dilation[0], dilation[1]}};
  TORCH_CHECK(g.valid(), "fastaspp: _conv_patch_taps wants stride >= 1, padding >= 0, dilation >= 1");
  const PatchTiling tiling = conv_patch_tiling(dst_h, dst_w, dgrad, g.stride[0], g.stride[1]);  // the kernels'
  const int64_t patches = dst_h > 0 && dst_w > 0 ? tiling.tiles_per_img : 0;
  at::Tensor out = at::zeros({patches, 6 + kernel_h * kernel_w}, at::kLong);
  auto rows = out.accessor<int64_t, 2>();
  const auto live = dgrad ? patch_tap_live<true> : patch_tap_live<false>;
  for (int64_t b = 0; b < patches; ++b) {
    const Patch p = patch_of(tiling, b, dst_h, dst_w);
    rows[b][0] = p.r0, rows[b][1] = p.r1, rows[b][2] = p.c0, rows[b][3] = p.c1, rows[b][4] = p.ph, rows[b][5] = p.pw;
    for (int64_t kh = 0; kh < kernel_h; ++kh) {
      if (!live(kh, src_h, dst_h, g.stride[0], g.padding[0], g.dilation[0], p.r0, p.r1, p.ph, tiling.phases_h)) {
        continue;
      }
      for (int64_t kw = 0; kw < kernel_w; ++kw) {
        rows[b][6 + kh * kernel_w + kw] =
            live(kw, src_w, dst_w, g.stride[1], g.padding[1], g.dilation[1], p.c0, p.c1, p.pw, tiling.phases_w);
      }
    }
  }
  return out;
}

}  // namespace
}  // namespace fastaspp

TORCH_LIBRARY_FRAGMENT(fastaspp, m) {
  m.def("_conv_patch_taps(int src_h, int src_w, int dst_h, int dst_w, int kernel_h, int kernel_w, int[2] stride, "
        "int[2] padding, int[2] dilation, bool dgrad) -> Tensor",
        &fastaspp::conv_patch_taps);
}
