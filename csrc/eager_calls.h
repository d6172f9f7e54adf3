// Functions of the Python module fastaspp._C (module.cpp's method table) for the eager routes of
// fastaspp's Python entry points.
#pragma once

#include <Python.h>

namespace fastaspp {

// fastaspp._C.atrous_conv2d_forward(x, weight, bias, scale, shift, stride, padding, dilation, relu):
// the kernel op fastaspp::_atrous_conv2d_forward, called through the dispatcher.
PyObject* atrous_conv2d_forward_eager(PyObject* module, PyObject* args);

// fastaspp._C.batch_norm_relu_train(z, weight, bias, running_mean, running_var, factor, eps, relu): a
// training nn.BatchNorm2d (then ReLU when relu) in one op, fastaspp::_batch_norm_relu_train_forward
// with its C++ autograd (cpu/batch_norm_relu.cpp); the running statistics, when given, move in place
// by factor as the module's do. The batch-size error is nn.BatchNorm2d's.
PyObject* batch_norm_relu_train_eager(PyObject* module, PyObject* args);

}  // namespace fastaspp
