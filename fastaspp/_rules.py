"""The rules every layer and backend shares, each stated once (docs/design.md §12, §14).

The C++ backends follow the same rules; csrc/common/rules.h states their side and points here.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch._prims_common import suggest_memory_format


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """What sums, statistics and folded BN parameters of `dtype` data are computed in: float64 for
    float64, float32 for everything else (the half types accumulate in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def result_format(like: Tensor) -> torch.memory_format:
    """The memory format of a result computed from `like`: y and the conv's dx take x's, dx of a
    backward call takes grad's. torch's suggest_memory_format, which the C++ kernels call too, so that
    eager results and the fake impls' traced strides agree even on ambiguous shapes (C = 1, H = W = 1).
    The ASPP's branch buffer is the exception: an internal buffer, always channels_last."""
    return suggest_memory_format(like)


def keepable(weight: Tensor) -> bool:
    """Whether a copy derived from `weight` (a re-layout, a transform, a fold) may be kept between
    calls. Not for weights that take a gradient (they change every step, so a kept copy would only
    hold memory) nor for inference tensors (they have no version counter to check)."""
    return not (weight.requires_grad or weight.is_inference())


def version_stamp(t: Tensor) -> tuple:
    """What must be unchanged for a copy derived from `t` to stay valid, besides t being the same
    object: its storage and its version counter. In-place updates (optimizer steps, load_state_dict,
    copy_) bump the version; module.to() and `.data =` change the storage."""
    return t._version, t.data_ptr()
