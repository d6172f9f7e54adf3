"""The batch norm (and ReLU) after a conv in training, as conv_bn_act runs it.

On plain CPU tensors, an nn.BatchNorm2d with no forward hooks runs as one C++ op with its own
autograd node (csrc/cpu/batch_norm_relu.cpp, through fastaspp._C.batch_norm_relu_train): the
statistics, then normalisation and ReLU in one pass, and a two-pass backward that recomputes the
ReLU's mask from z, where eager runs BatchNorm2d and ReLU as two ops and two nodes. Results and
running statistics are the modules' within rounding (tests/test_train_bn.py). Everything else runs
the modules themselves, by this explicit rule: CUDA tensors (cuDNN's batch norm), the torch op's
route (torch.compile, export, dispatch or torch-function modes, tensor subclasses), torch.func's
transforms and forward-mode AD (which a C++ autograd node cannot join), CPU autocast
(whose dtype policy for batch_norm stays torch's), other classes (SyncBatchNorm2d, subclasses,
parametrized modules) and forward hooks, which a fused call would skip.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as _module

from fastaspp import _ext
from fastaspp.ops._library import runs_kernels


def _fused(bn: nn.Module, z: Tensor) -> bool:
    return (type(bn) is nn.BatchNorm2d and z.device.type == "cpu" and _ext.loaded()
            and not (bn._forward_hooks or bn._forward_pre_hooks or _module._global_forward_hooks
                     or _module._global_forward_pre_hooks)
            and not torch.is_autocast_enabled("cpu") and runs_kernels(z))


def batch_norm_act(bn: nn.BatchNorm2d, z: Tensor, relu: bool) -> Tensor:
    """act(bn(z)) for a BN normalising with batch statistics (training, or no running statistics)."""
    if not _fused(bn, z):
        y = bn(z)
        return F.relu(y) if relu else y
    # An exact nn.BatchNorm2d (_fused): its parameters and buffers are in these dicts (nn.Module's
    # attribute lookup costs a small call µs).
    params, buffers = bn.__dict__["_parameters"], bn.__dict__["_buffers"]
    running_mean, running_var = buffers["running_mean"], buffers["running_var"]
    # nn.BatchNorm2d.forward's bookkeeping: whether the running statistics move, and by what factor.
    factor = 0.0 if bn.momentum is None else bn.momentum
    update = bn.training and bn.track_running_stats and running_mean is not None
    if update and buffers["num_batches_tracked"] is not None:
        buffers["num_batches_tracked"].add_(1)
        if bn.momentum is None:  # a cumulative moving average
            factor = 1.0 / float(buffers["num_batches_tracked"])
    return _ext._C.batch_norm_relu_train(z, params["weight"], params["bias"], running_mean if update else None,
                                         running_var if update else None, factor, bn.eps, relu)
