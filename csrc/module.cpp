// The Python module fastaspp._C: importing it loads the op registrations above.
// It carries no functions of its own, only how it was built.
#include <Python.h>

#ifndef FASTASPP_WITH_CUDA
#define FASTASPP_WITH_CUDA 0
#endif

static struct PyModuleDef fastaspp_module = {PyModuleDef_HEAD_INIT, "_C",
                                             "fastaspp's C++/CUDA op library", -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) {
  PyObject* module = PyModule_Create(&fastaspp_module);
  if (module == nullptr) return nullptr;
  if (PyModule_AddIntConstant(module, "WITH_CUDA", FASTASPP_WITH_CUDA) != 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
