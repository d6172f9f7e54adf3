// See onednn_fused.h.
#include "onednn_fused.h"

#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <vector>

#include "../common/kept.h"

namespace fastaspp {
namespace {

using PointwiseFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                               at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t, c10::string_view,
                               c10::List<std::optional<at::Scalar>>, std::optional<c10::string_view>);
using ReorderFn = at::Tensor(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, at::IntArrayRef, int64_t,
                             at::OptionalIntArrayRef);

// The two oneDNN ops (registered by torch's CPU build for Inductor), or nullopt without them.
struct OnednnOps {
  c10::TypedOperatorHandle<PointwiseFn> pointwise;
  c10::TypedOperatorHandle<ReorderFn> reorder;
};

const std::optional<OnednnOps>& onednn_ops() {
  static const std::optional<OnednnOps> ops = []() -> std::optional<OnednnOps> {
    auto& dispatcher = c10::Dispatcher::singleton();
    const auto pointwise = dispatcher.findSchema({"mkldnn::_convolution_pointwise", ""});
    const auto reorder = dispatcher.findSchema({"mkldnn::_reorder_convolution_weight", ""});
    if (!at::hasMKLDNN() || !pointwise.has_value() || !reorder.has_value()) return std::nullopt;
    return OnednnOps{pointwise->typed<PointwiseFn>(), reorder->typed<ReorderFn>()};
  }();
  return ops;
}

}  // namespace

at::Tensor onednn_fused_forward(const at::Tensor& x, const at::Tensor& weight, const Affine& affine, bool relu,
                                at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  const auto& ops = onednn_ops();
  if (!ops.has_value() || x.scalar_type() != at::kFloat || weight.scalar_type() != at::kFloat) return {};
  if (!keepable(weight) || (affine.alpha.defined() && !keepable(affine.alpha))) return {};
  std::vector<at::Tensor> sources = {weight};
  if (affine.alpha.defined()) sources.push_back(affine.alpha);
  // oneDNN's weight layout depends on the input's shape: the tag names it, and the geometry.
  const std::vector<int64_t> tag = {kOnednnFoldedWeights, x.size(0), x.size(1), x.size(2), x.size(3),
                                    stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1]};
  const at::Tensor packed = kept(sources, tag, [&] {
    const at::Tensor folded = affine.alpha.defined() ? weight * affine.alpha.view({-1, 1, 1, 1}) : weight;
    return ops->reorder.call(folded.contiguous(at::MemoryFormat::ChannelsLast), padding, stride, dilation, 1,
                             x.sizes());
  });
  const std::optional<at::Tensor> bias =
      affine.beta.defined() ? std::optional<at::Tensor>(affine.beta.contiguous()) : std::nullopt;
  c10::List<std::optional<at::Scalar>> scalars;
  scalars.push_back(std::nullopt);
  return ops->pointwise.call(x, packed, bias, padding, stride, dilation, 1, relu ? "relu" : "none", scalars,
                             c10::string_view(""));
}

}  // namespace fastaspp
