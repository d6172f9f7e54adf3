// Functions of the Python module fastaspp._C (module.cpp's method table) for the eager routes of
// fastaspp's Python entry points.
#pragma once

#include <Python.h>

namespace fastaspp {

// fastaspp._C.atrous_conv2d_forward(x, weight, bias, scale, shift, stride, padding, dilation, relu):
// the kernel op fastaspp::_atrous_conv2d_forward, called through the dispatcher.
PyObject* atrous_conv2d_forward_eager(PyObject* module, PyObject* args);

}  // namespace fastaspp
