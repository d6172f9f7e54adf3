// The Python module fastaspp._C: importing the extension runs the op registrations of the other
// translation units (TORCH_LIBRARY in atrous_conv.cpp and aspp.cpp, the kernels in cpu/ and cuda/).
// It carries no functions of its own, only how it was built and the cpu backend's default path rule.
#include <Python.h>

#include "cpu/direct_conv.h"

#ifndef FASTASPP_WITH_CUDA
#define FASTASPP_WITH_CUDA 0
#endif

static struct PyModuleDef fastaspp_module = {PyModuleDef_HEAD_INIT, "_C",
                                             "fastaspp's C++/CUDA op library", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fastaspp_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "WITH_CUDA", FASTASPP_WITH_CUDA) != 0 ||
      PyModule_AddIntConstant(module, "CPU_DIRECT_MAX_MACS", fastaspp::kDirectMaxMacs) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
