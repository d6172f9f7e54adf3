// The Python module fastaspp._C. The ops are not registered here: each registration is a static
// initialiser of another translation unit of the same library, so importing the module (which
// loads the library) runs them all: the schemas in csrc/atrous_conv.cpp (TORCH_LIBRARY) and
// csrc/{aspp,batch_norm_relu,conv_tiling,kept_bytes}.cpp (TORCH_LIBRARY_FRAGMENT), the kernels in
// csrc/cpu/{atrous_conv,aspp,aspp_train,batch_norm_relu}.cpp, the C++ autograd of the cpu conv
// (csrc/cpu/atrous_conv_autograd.cpp) and of the training BN + ReLU, and, in a CUDA build,
// csrc/cuda/{atrous_conv_cuda,aspp_cuda,aspp_project_cuda}.cpp
// (TORCH_LIBRARY_IMPL). The module itself carries two functions, the eager routes' calls of the conv
// kernel op and of the training BN + ReLU (eager_calls.h), and constants: WITH_CUDA (how it was
// built), CPU_DIRECT_MAX_MACS (the default threshold of the cpu backend's direct loops,
// direct_conv.h) and the limits of the fp32 forward's rule within that range (conv_paths.h).
#include <Python.h>

#include "cpu/conv_paths.h"
#include "cpu/direct_conv.h"
#include "eager_calls.h"

#ifndef FASTASPP_WITH_CUDA
#define FASTASPP_WITH_CUDA 0
#endif

static PyMethodDef fastaspp_methods[] = {
    {"atrous_conv2d_forward", fastaspp::atrous_conv2d_forward_eager, METH_VARARGS,
     "atrous_conv2d_forward(x, weight, bias, scale, shift, stride, padding, dilation, relu): the kernel op "
     "fastaspp::_atrous_conv2d_forward for fastaspp.ops.atrous_conv2d's eager routes"},
    {"batch_norm_relu_train", fastaspp::batch_norm_relu_train_eager, METH_VARARGS,
     "batch_norm_relu_train(z, weight, bias, running_mean, running_var, factor, eps, relu): training batch norm "
     "(+ ReLU) in one op for fastaspp.nn's conv + BN blocks on CPU tensors"},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef fastaspp_module = {PyModuleDef_HEAD_INIT, "_C", "fastaspp's C++/CUDA op library", -1,
                                             fastaspp_methods};

// PyModule_AddIntConstant's twin for a float: 0, or -1 with an exception set.
static int add_float(PyObject* module, const char* name, double value) {
  PyObject* number = PyFloat_FromDouble(value);
  if (number == nullptr) return -1;
  const int status = PyModule_AddObjectRef(module, name, number);
  Py_DECREF(number);
  return status;
}

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fastaspp_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "WITH_CUDA", FASTASPP_WITH_CUDA) != 0 ||
      PyModule_AddIntConstant(module, "CPU_DIRECT_MAX_MACS", fastaspp::kDirectMaxMacs) != 0 ||
      PyModule_AddIntConstant(module, "CPU_DIRECT_ANY_SHARE_MAX_MACS", fastaspp::kDirectAnyShareMaxMacs) != 0 ||
      add_float(module, "CPU_DIRECT_MAX_LIVE_SHARE", fastaspp::kDirectMaxLiveShareFp32) != 0 ||
      PyModule_AddIntConstant(module, "CPU_TORCH_CONV_MAX_MACS", fastaspp::kTorchConvMaxMacs) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
