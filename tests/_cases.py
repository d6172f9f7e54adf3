"""Shapes and tolerances shared by the atrous-conv tests."""
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ConvCase:
    n: int
    c_in: int
    c_out: int
    h: int
    w: int
    k: int = 3
    stride: int | tuple = 1
    padding: int | tuple = None  # None: "same" padding, dilation * (k - 1) / 2
    dilation: int | tuple = 1

    @property
    def pad(self):
        if self.padding is not None:
            return self.padding
        d = self.dilation if isinstance(self.dilation, int) else self.dilation[0]
        return d * (self.k - 1) // 2

    def __str__(self):
        return (f"n{self.n}_c{self.c_in}x{self.c_out}_{self.h}x{self.w}_k{self.k}"
                f"_s{self.stride}_p{self.pad}_d{self.dilation}").replace(" ", "")


# At least 30 combinations: ASPP-like rates on small maps, rates larger than the
# map, 1x1 maps, stride 2, odd channels, non-square maps, batch 1 and 0.
CASES = [
    ConvCase(2, 5, 7, 9, 11, dilation=2),
    ConvCase(1, 3, 4, 1, 1, dilation=6),            # 1x1 map, only the centre tap lives
    ConvCase(2, 4, 6, 1, 1, k=1),                   # 1x1 conv on a 1x1 map
    ConvCase(1, 8, 8, 5, 5, dilation=6),            # rate larger than the map
    ConvCase(2, 3, 5, 7, 7, dilation=12),           # rate much larger than the map
    ConvCase(1, 6, 4, 9, 9, dilation=4),            # partially live corner taps
    ConvCase(2, 4, 6, 8, 7, stride=2, padding=1),   # stride 2
    ConvCase(1, 5, 3, 9, 9, stride=2, dilation=2),  # stride 2 with dilation
    ConvCase(2, 3, 5, 9, 9, k=5, stride=2, padding=3, dilation=2),
    ConvCase(1, 4, 3, 6, 6, k=1),
    ConvCase(3, 7, 9, 6, 5, dilation=1),
    ConvCase(1, 16, 16, 8, 8, dilation=3),
    ConvCase(1, 9, 17, 7, 10, dilation=(1, 3), padding=(1, 3)),
    ConvCase(2, 5, 6, 10, 6, stride=(1, 2), dilation=(2, 1), padding=(2, 1)),
    ConvCase(1, 3, 3, 5, 5, padding=0, dilation=2),  # valid conv: no padding at all
    ConvCase(1, 3, 4, 6, 6, padding=4, dilation=2),  # padding larger than "same"
    ConvCase(1, 4, 4, 6, 9, padding=1, dilation=3),  # padding smaller than "same"
    ConvCase(0, 3, 4, 5, 5, dilation=2),             # empty batch
    ConvCase(0, 3, 4, 5, 5, k=1),
    ConvCase(1, 1, 1, 3, 3),                         # single channel
    ConvCase(1, 1, 5, 8, 8, dilation=2),
    ConvCase(2, 5, 1, 8, 8, dilation=3),
    ConvCase(1, 12, 20, 11, 11, dilation=6),
    ConvCase(1, 12, 20, 11, 11, dilation=9),
    ConvCase(2, 6, 8, 13, 13, dilation=18),
    ConvCase(1, 3, 5, 3, 17, dilation=4),
    ConvCase(1, 3, 5, 17, 3, dilation=4),
    ConvCase(1, 5, 7, 7, 7, k=5, dilation=1),
    ConvCase(1, 5, 7, 12, 12, k=5, dilation=3),
    ConvCase(1, 5, 7, 12, 12, k=7, dilation=2),
    ConvCase(2, 3, 4, 2, 2, stride=2, padding=1),
    ConvCase(1, 3, 4, 3, 3, stride=3, dilation=2),
    ConvCase(1, 20, 24, 4, 4, k=1, stride=2),
]

# The Triton interpreter takes seconds per call, so on a machine without a GPU the triton
# backend runs this subset (every kind of case once); the rest are marked slow for it (see
# conftest.py) and run in the GPU session, where triton runs for real.
GRADCHECK_CASES = [
    ConvCase(1, 2, 3, 5, 5, dilation=2),
    ConvCase(2, 3, 2, 4, 4, dilation=6),
    ConvCase(1, 2, 2, 6, 5, stride=2, padding=1),
    ConvCase(1, 2, 3, 5, 5, k=1),
    ConvCase(1, 2, 2, 7, 7, dilation=3, padding=(2, 4)),
]
OPCHECK_CASES = [ConvCase(2, 3, 4, 6, 6, dilation=2), ConvCase(1, 3, 5, 5, 7, stride=2, padding=1)]
INTERPRETER_CASES = {CASES[i] for i in (0, 1, 2, 4, 6, 8, 12, 13, 17, 21, 31)} | \
    {GRADCHECK_CASES[0], GRADCHECK_CASES[2], OPCHECK_CASES[1]}

# Tolerances (atol relative to max|reference|, and rtol), for outputs computed from the
# same inputs: fp64 reference vs the backend's dtype. Half types round the output once
# (bf16: 8 mantissa bits) on top of fp32 accumulation.
TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 2e-2,
}


def assert_close_scaled(actual, expected, dtype, what=""):
    tol = TOLERANCE[dtype]
    expected = expected.to(torch.float64)
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual.to(torch.float64), expected, atol=tol * max(scale, 1e-3), rtol=tol,
                               msg=lambda m: f"{what} ({dtype}): {m}")
