// Argument checks of the torch bindings, shared by the cpu and cuda backends: the conv geometry
// (against ConvGeometry of tap_geometry.h) and the output size it gives, and the shape and device
// checks of the cpu kernels. Errors are torch errors (TORCH_CHECK); the geometry checks' messages
// start with `op`, the others' with "fastaspp".
// Host-only (torch headers); .cu files use tap_geometry.h alone.
#pragma once

#include <ATen/ATen.h>

#include <utility>

#include "switches.h"
#include "tap_geometry.h"

namespace fastaspp {

// The geometry of stride, padding and dilation, each of 2 elements within ConvGeometry's ranges.
ConvGeometry check_geometry(const char* op, at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation);

// (Ho, Wo) of an in_h x in_w input by a kernel_h x kernel_w kernel; errors unless both are >= 1
// (the dilated kernel does not fit the padded input).
std::pair<int64_t, int64_t> check_out_size(const char* op, int64_t in_h, int64_t in_w, int64_t kernel_h,
                                           int64_t kernel_w, const ConvGeometry& g);

// t is 4-D.
void check_4d(const at::Tensor& t, const char* name);

// t is a floating-point CPU tensor.
void check_cpu_float(const at::Tensor& t, const char* name);

// The switch's choice (switches.h: an index, or kSwitchUnset), or an error naming the variable,
// its value and the values it accepts.
int checked_switch(const ChoiceSwitch& s);

// The switch's number (its fallback when unset), or an error as above.
int64_t checked_switch(const IntegerSwitch& s);

}  // namespace fastaspp
