"""Autocast for fastaspp's custom ops: autocast casts the operands of torch's own convolutions, but
not of custom ops, so the public entry points cast like conv2d does under autocast."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype active for x's device, or None (one cheap global test when autocast is off)."""
    if not torch._C._is_any_autocast_enabled():
        return None
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def cast_dtype(t: Tensor) -> torch.dtype:
    """The dtype cast() would give t under the autocast state active now."""
    dtype = autocast_dtype(t)
    if dtype is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t.dtype
    return dtype


def cast(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    """t in dtype when autocast is on (dtype not None), as autocast casts conv2d's operands: floating
    tensors other than float64, which autocast leaves alone."""
    if dtype is None or t is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)
