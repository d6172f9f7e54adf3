// Argument checks shared by the cpu and cuda bindings (declared in checks.h).
#include "checks.h"

#include <cstdlib>
#include <string>

namespace fastaspp {

ConvGeometry check_geometry(const char* op, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation) {
  struct Field {
    const char* name;
    at::IntArrayRef values;
    int64_t min;
  };
  const Field fields[] = {{"stride", stride, ConvGeometry::kMinStride},
                          {"padding", padding, ConvGeometry::kMinPadding},
                          {"dilation", dilation, ConvGeometry::kMinDilation}};
  for (const Field& f : fields)
    TORCH_CHECK(f.values.size() == 2, op, ": ", f.name, " must have 2 elements, got ", f.values.size());
  for (const Field& f : fields)
    TORCH_CHECK(f.values[0] >= f.min && f.values[1] >= f.min, op, ": ", f.name, " must be >= ", f.min, ", got ",
                f.values);
  const ConvGeometry g{{stride[0], stride[1]}, {padding[0], padding[1]}, {dilation[0], dilation[1]}};
  TORCH_INTERNAL_ASSERT(g.valid());
  return g;
}

std::pair<int64_t, int64_t> check_out_size(const char* op, int64_t in_h, int64_t in_w, int64_t kernel_h,
                                           int64_t kernel_w, const ConvGeometry& g) {
  const int64_t out_h = g.out_size(0, in_h, kernel_h), out_w = g.out_size(1, in_w, kernel_w);
  TORCH_CHECK(out_h >= 1 && out_w >= 1, op, ": output size ", out_h, "x", out_w, " is too small: input ", in_h, "x",
              in_w, ", kernel ", kernel_h, "x", kernel_w, ", stride (", g.stride[0], ", ", g.stride[1], "), padding (",
              g.padding[0], ", ", g.padding[1], "), dilation (", g.dilation[0], ", ", g.dilation[1], ")");
  return {out_h, out_w};
}

void check_4d(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 4, "fastaspp: ", name, " must be 4-D, got ", t.dim(), "-D");
}

void check_cpu_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), "fastaspp cpu backend: ", name, " must be a CPU tensor, got device ", t.device());
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), "fastaspp cpu backend: ", name, " must be floating point, got ",
              t.scalar_type());
}

int checked_switch(const ChoiceSwitch& s) {
  const int choice = s.read();
  if (choice == kSwitchInvalid) {
    std::string accepted = "unset";  // "unset, 0 or 1"
    for (int i = 0; i < s.count; ++i) accepted += std::string(i + 1 == s.count ? " or " : ", ") + s.choices[i];
    TORCH_CHECK(false, "fastaspp: the environment variable ", s.name, " must be ", accepted, ", got '",
                std::getenv(s.name), "'");
  }
  return choice;
}

int64_t checked_switch(const IntegerSwitch& s) {
  int64_t value = 0;
  TORCH_CHECK(s.read(value), "fastaspp: the environment variable ", s.name, " must be unset or a whole number >= ",
              s.min, ", got '", std::getenv(s.name), "'");
  return value;
}

}  // namespace fastaspp
