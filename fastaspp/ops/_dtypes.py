"""The one dtype rule every op shares: what a dtype accumulates (sums, statistics, folded BN) in."""
from __future__ import annotations

import torch


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64; float32 for everything else (half types accumulate in fp32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
