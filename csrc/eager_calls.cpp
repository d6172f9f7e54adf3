// See eager_calls.h. The kernel op called as torch.ops.fastaspp._atrous_conv2d_forward.default
// converts its Python arguments to TorchScript values against the schema, and the entry point's
// argument checks in Python run with cold caches in a training step: together most of the host time
// fastaspp added to a small conv's step (benchmarks/overhead_profile.py peels the layers off). This
// function checks the arguments as fastaspp.ops.atrous_conv2d's check_atrous_conv2d_args does (same
// errors, same order: tests/test_atrous_conv_errors.py runs both), reads them with the CPython API
// (positional, in the types the entry point passes) and calls the same op through the dispatcher,
// so that its autograd (cpu/atrous_conv_autograd.cpp) and every dispatch key apply as before. Only
// the eager routes call it (fastaspp/ops/_library.py: plain tensors, no dispatch or torch-function
// mode, not compiling); the rest check in Python and go through the torch op.
#include "eager_calls.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <array>
#include <optional>
#include <string>
#include <tuple>
#include <utility>

#include "common/tap_geometry.h"
#include "cpu/batch_norm_relu.h"

namespace fastaspp {
namespace {

using ForwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                             const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, at::IntArrayRef,
                             at::IntArrayRef, at::IntArrayRef, bool);

constexpr const char* kName = "fastaspp._C.atrous_conv2d_forward";

// How Python prints a dtype (torch.float32), for messages like the Python checks'.
std::string dtype_name(at::ScalarType t) { return "torch." + std::string(c10::getDtypeNames(t).first); }

// How Python prints tuple(t.shape).
std::string shape_tuple(const at::Tensor& t) {
  std::string out = "(";
  for (int64_t i = 0; i < t.dim(); ++i) out += (i ? ", " : "") + std::to_string(t.size(i));
  return out + (t.dim() == 1 ? ",)" : ")");
}

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// fastaspp.ops._checks.check_tensor for a tensor (the binding already refused anything else).
void check_tensor(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " must be a ", dim, "-D tensor ", dim == 4 ? "[N, C, H, W]" : "[C_out]",
                    ", got shape ", shape_tuple(t));
  TORCH_CHECK_TYPE(is_float(t.scalar_type()), name, " must be float16, bfloat16, float32 or float64, got ",
                   dtype_name(t.scalar_type()));
}

// fastaspp.ops._checks.check_like.
void check_like(const at::Tensor& t, const char* name, const at::Tensor& x) {
  TORCH_CHECK_TYPE(t.scalar_type() == x.scalar_type(), name, " has dtype ", dtype_name(t.scalar_type()),
                   " but x has ", dtype_name(x.scalar_type()), "; they must match");
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
}

std::string pair_tuple(const std::array<int64_t, 2>& v) {
  return "(" + std::to_string(v[0]) + ", " + std::to_string(v[1]) + ")";
}

// fastaspp.ops.atrous_conv.check_atrous_conv2d_args, check for check, message for message.
void check_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
                const std::array<int64_t, 2>& stride, const std::array<int64_t, 2>& padding,
                const std::array<int64_t, 2>& dilation) {
  check_tensor(x, "x", 4);
  check_tensor(weight, "weight", 4);
  check_like(weight, "weight", x);
  const int64_t c_out = weight.size(0), c_in = weight.size(1), kh = weight.size(2), kw = weight.size(3);
  TORCH_CHECK_VALUE(c_in == x.size(1), "weight expects ", c_in, " input channels (weight.shape[1]) but x has ",
                    x.size(1), " (x.shape[1]); groups other than 1 are not supported");
  TORCH_CHECK_VALUE(c_out && c_in && kh && kw, "weight must have non-zero C_out, C_in, KH and KW, got shape ",
                    shape_tuple(weight));
  const std::pair<const char*, const std::optional<at::Tensor>*> affine[] = {
      {"bias", &bias}, {"scale", &scale}, {"shift", &shift}};
  for (const auto& [name, t] : affine) {
    if (!t->has_value()) continue;
    check_tensor(**t, name, 1);
    check_like(**t, name, x);
    TORCH_CHECK_VALUE((*t)->size(0) == c_out, name, " must have length C_out=", c_out, ", got ", (*t)->size(0));
  }
  TORCH_CHECK_VALUE(stride[0] >= 1 && stride[1] >= 1, "stride must be >= 1, got ", pair_tuple(stride));
  TORCH_CHECK_VALUE(dilation[0] >= 1 && dilation[1] >= 1, "dilation must be >= 1, got ", pair_tuple(dilation));
  TORCH_CHECK_VALUE(padding[0] >= 0 && padding[1] >= 0, "padding must be >= 0, got ", pair_tuple(padding));
  const int64_t out_h = conv_out_size(x.size(2), kh, stride[0], padding[0], dilation[0]);
  const int64_t out_w = conv_out_size(x.size(3), kw, stride[1], padding[1], dilation[1]);
  TORCH_CHECK_VALUE(out_h >= 1 && out_w >= 1, "output size ", out_h, "x", out_w, " is too small: x is ", x.size(2),
                    "x", x.size(3), ", kernel ", kh, "x", kw, ", stride ", pair_tuple(stride), ", padding ",
                    pair_tuple(padding), ", dilation ", pair_tuple(dilation));
}

at::Tensor tensor_arg(PyObject* obj, const char* name) {
  TORCH_CHECK_TYPE(THPVariable_Check(obj), kName, ": ", name, " must be a tensor, got ", Py_TYPE(obj)->tp_name);
  return THPVariable_Unpack(obj);
}

std::optional<at::Tensor> optional_tensor_arg(PyObject* obj, const char* name) {
  if (obj == Py_None) return std::nullopt;
  return tensor_arg(obj, name);
}

// A list or tuple of two ints (fastaspp.ops._checks.pair gives a list).
std::array<int64_t, 2> pair_arg(PyObject* obj, const char* name) {
  const bool sequence = PyList_Check(obj) || PyTuple_Check(obj);
  TORCH_CHECK_TYPE(sequence && PySequence_Fast_GET_SIZE(obj) == 2, kName, ": ", name,
                   " must be a list of two ints");
  std::array<int64_t, 2> pair{};
  for (Py_ssize_t i = 0; i < 2; ++i) {
    PyObject* item = PySequence_Fast_GET_ITEM(obj, i);
    TORCH_CHECK_TYPE(PyLong_Check(item), kName, ": ", name, " must be a list of two ints");
    pair[i] = PyLong_AsLongLong(item);
    if (pair[i] == -1 && PyErr_Occurred()) throw python_error();
  }
  return pair;
}

// torch.Size's repr, for the batch-size error nn.BatchNorm2d raises.
std::string torch_size(const at::Tensor& t) {
  std::string out = "torch.Size([";
  for (int64_t i = 0; i < t.dim(); ++i) out += (i ? ", " : "") + std::to_string(t.size(i));
  return out + "])";
}

}  // namespace

PyObject* atrous_conv2d_forward_eager(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastaspp::_atrous_conv2d_forward", "")
                             .typed<ForwardFn>();
  PyObject *x, *weight, *bias, *scale, *shift, *stride, *padding, *dilation;
  int relu = 0;
  if (!PyArg_ParseTuple(args, "OOOOOOOOp:atrous_conv2d_forward", &x, &weight, &bias, &scale, &shift, &stride,
                        &padding, &dilation, &relu))
    return nullptr;
  const at::Tensor x_t = tensor_arg(x, "x"), weight_t = tensor_arg(weight, "weight");
  const std::optional<at::Tensor> bias_t = optional_tensor_arg(bias, "bias"),
                                  scale_t = optional_tensor_arg(scale, "scale"),
                                  shift_t = optional_tensor_arg(shift, "shift");
  const std::array<int64_t, 2> stride_v = pair_arg(stride, "stride"), padding_v = pair_arg(padding, "padding"),
                               dilation_v = pair_arg(dilation, "dilation");
  check_args(x_t, weight_t, bias_t, scale_t, shift_t, stride_v, padding_v, dilation_v);
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;  // as torch's bindings do: the kernel may run for a while
    y = op.call(x_t, weight_t, bias_t, scale_t, shift_t, stride_v, padding_v, dilation_v, relu != 0);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

PyObject* batch_norm_relu_train_eager(PyObject* /*module*/, PyObject* args) {
  HANDLE_TH_ERRORS
  using ForwardBn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor&, const std::optional<at::Tensor>&,
                                                                    const std::optional<at::Tensor>&, double, bool);
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("fastaspp::_batch_norm_relu_train_forward", "")
                             .typed<ForwardBn>();
  PyObject *z, *weight, *bias, *running_mean, *running_var;
  double factor = 0.0, eps = 0.0;
  int relu = 0;
  if (!PyArg_ParseTuple(args, "OOOOOddp:batch_norm_relu_train", &z, &weight, &bias, &running_mean, &running_var,
                        &factor, &eps, &relu))
    return nullptr;
  const at::Tensor z_t = tensor_arg(z, "z");
  const std::optional<at::Tensor> weight_t = optional_tensor_arg(weight, "weight"),
                                  bias_t = optional_tensor_arg(bias, "bias"),
                                  mean_t = optional_tensor_arg(running_mean, "running_mean"),
                                  var_t = optional_tensor_arg(running_var, "running_var");
  TORCH_CHECK_VALUE(z_t.dim() == 4, "expected 4D input (got ", z_t.dim(), "D input)");
  const int64_t count = z_t.size(0) * z_t.size(2) * z_t.size(3);
  TORCH_CHECK_VALUE(count > 1, "Expected more than 1 value per channel when training, got input size ",
                    torch_size(z_t));
  at::Tensor y, mean, var;
  {
    pybind11::gil_scoped_release no_gil;
    std::tie(y, mean, var) = op.call(z_t, weight_t, bias_t, eps, relu != 0);
    // The running statistics move as nn.BatchNorm2d's do: by factor, with the unbiased variance.
    at::NoGradGuard no_grad;
    if (mean_t.has_value()) move_running_stat(*mean_t, mean, 1.0, factor);
    if (var_t.has_value()) move_running_stat(*var_t, var, static_cast<double>(count) / (count - 1), factor);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

}  // namespace fastaspp
