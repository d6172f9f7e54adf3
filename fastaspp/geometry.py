"""Tap liveness and FLOP counts: the Python twin of csrc/common/tap_geometry.h.

Tap k along one axis reads input coordinate o*stride + k*dilation - padding for
output coordinate o; it is live where that lies inside the input. The live
outputs form one range [lo, hi). Benchmarks use this to count "useful" FLOPs
(live taps only) next to dense ones.
"""
from __future__ import annotations

from typing import Sequence


def conv_out_size(in_size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    return (in_size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def tap_live_range(k: int, in_size: int, out_size: int, stride: int, padding: int, dilation: int) -> tuple[int, int]:
    offset = k * dilation - padding
    lo = max(0, -(offset // stride))  # ceil(-offset / stride)
    hi = min(out_size, (in_size - 1 - offset) // stride + 1)
    return lo, hi


def live_tap_pixels(in_hw: Sequence[int], kernel_hw: Sequence[int], stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int]) -> tuple[int, int]:
    """(live, dense) (output pixel, tap) pairs of one image."""
    out = [conv_out_size(in_hw[i], kernel_hw[i], stride[i], padding[i], dilation[i]) for i in range(2)]
    live_per_axis = []
    for i in range(2):
        total = 0
        for k in range(kernel_hw[i]):
            lo, hi = tap_live_range(k, in_hw[i], out[i], stride[i], padding[i], dilation[i])
            total += max(0, hi - lo)
        live_per_axis.append(total)
    dense = out[0] * out[1] * kernel_hw[0] * kernel_hw[1]
    return live_per_axis[0] * live_per_axis[1], dense


def conv_flops(x_shape: Sequence[int], weight_shape: Sequence[int], stride: Sequence[int],
               padding: Sequence[int], dilation: Sequence[int]) -> tuple[int, int]:
    """(useful, dense) FLOPs of a conv forward: 2 per multiply-add, useful counts live taps only."""
    n, c_in, h, w = x_shape
    c_out, _, kh, kw = weight_shape
    live, dense = live_tap_pixels((h, w), (kh, kw), stride, padding, dilation)
    per_pair = 2 * n * c_in * c_out
    return live * per_pair, dense * per_pair
