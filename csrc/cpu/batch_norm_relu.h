// The cpu backend's training batch norm + ReLU (batch_norm_relu.cpp): what its eager call needs
// besides the ops fastaspp::_batch_norm_relu_train_{forward,backward}.
#pragma once

#include <ATen/ATen.h>

namespace fastaspp {

// running = running * (1 - factor) + batch * scale * factor, in place: a BN running statistic moved
// as nn.BatchNorm2d moves it (scale = M / (M - 1) for the variance: the unbiased estimate), in fp64
// and then rounded once to running's dtype. batch: [C], fp32 or fp64.
void move_running_stat(const at::Tensor& running, const at::Tensor& batch, double scale, double factor);

}  // namespace fastaspp
