// See eager_calls.h. The kernel op called as torch.ops.fastaspp._atrous_conv2d_forward.default
// converts its Python arguments to TorchScript values against the schema, a Python path that
// cost a visible share of a small conv's training step (benchmarks/overhead_profile.py: the kernel
// op against F.conv2d). This function reads the arguments with the CPython API (positional, in the
// types fastaspp.ops.atrous_conv2d passes) and calls the same op through the dispatcher, so that its
// autograd (cpu/atrous_conv_autograd.cpp) and every dispatch key apply as before. Only the eager
// routes call it (fastaspp/ops/_library.py: plain tensors, no dispatch or torch-function mode, not
// compiling); the rest go through the torch op.
#include "eager_calls.h"

#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/Exceptions.h>
#include <torch/csrc/autograd/python_variable.h>
#include <torch/csrc/utils/pybind.h>

#include <array>
#include <optional>

namespace fastaspp {
namespace {

using ForwardFn = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                             const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, at::IntArrayRef,
                             at::IntArrayRef, at::IntArrayRef, bool);

constexpr const char* kName = "fastaspp._C.atrous_conv2d_forward";

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
  at::Tensor y;
  {
    pybind11::gil_scoped_release no_gil;  // as torch's bindings do: the kernel may run for a while
    y = op.call(x_t, weight_t, bias_t, scale_t, shift_t, stride_v, padding_v, dilation_v, relu != 0);
  }
  return THPVariable_Wrap(std::move(y));
  END_HANDLE_TH_ERRORS
}

}  // namespace fastaspp
