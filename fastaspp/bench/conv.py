"""Fused conv+BN+ReLU (fastaspp.nn.ConvBNReLU, eval) against eager conv2d → batch_norm → relu
(cuDNN / oneDNN) and torch.compile of it; channels_last on both sides, the same weights."""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterable, List, Optional

import torch

import fastaspp
from fastaspp.bench.report import Row, max_error
from fastaspp.bench.timing import alternate, peak_memory_mb
from fastaspp.geometry import conv_flops


@dataclasses.dataclass(frozen=True)
class ConvShape:
    name: str
    c_in: int
    c_out: int
    size: int
    rate: int

    def flops(self, batch: int) -> tuple[int, int]:
        """(useful, dense) FLOPs of one forward at this batch."""
        return conv_flops((batch, self.c_in, self.size, self.size), (self.c_out, self.c_in, 3, 3),
                          (1, 1), (self.rate, self.rate), (self.rate, self.rate))


# ASPP branches (2048→256) at output stride 16 (33x33, rates 6/12/18) and 8 (65x65, 12/24/36);
# dilated backbone convs at 65x65.
ASPP_SHAPES = [ConvShape(f"aspp-33-r{r}", 2048, 256, 33, r) for r in (6, 12, 18)] + \
              [ConvShape(f"aspp-65-r{r}", 2048, 256, 65, r) for r in (12, 24, 36)]
BACKBONE_SHAPES = [ConvShape("backbone-256-d2", 256, 256, 65, 2), ConvShape("backbone-512-d4", 512, 512, 65, 4)]
SHAPES = ASPP_SHAPES + BACKBONE_SHAPES
QUICK_SHAPES = [s for s in SHAPES if s.name in ("aspp-33-r6", "aspp-33-r18", "backbone-256-d2")]


class ConvPair:
    """Eager and fused modules over the same weights, cycling through several random inputs (no
    zeros, and no single input that stays in cache)."""

    def __init__(self, shape: ConvShape, batch: int, dtype: torch.dtype, device: torch.device, inputs: int = 3):
        gen = torch.Generator().manual_seed(0)
        self.xs = [torch.randn(batch, shape.c_in, shape.size, shape.size, generator=gen)
                   .to(device=device, dtype=dtype, memory_format=torch.channels_last) for _ in range(inputs)]
        conv = torch.nn.Conv2d(shape.c_in, shape.c_out, 3, padding=shape.rate, dilation=shape.rate, bias=False)
        bn = torch.nn.BatchNorm2d(shape.c_out)
        with torch.no_grad():
            bn.running_mean.uniform_(-0.5, 0.5, generator=gen)
            bn.running_var.uniform_(0.5, 2.0, generator=gen)
            bn.weight.uniform_(0.5, 1.5, generator=gen)
            bn.bias.uniform_(-0.5, 0.5, generator=gen)
        self.eager = torch.nn.Sequential(conv, bn, torch.nn.ReLU()).eval().to(
            device=device, dtype=dtype, memory_format=torch.channels_last)
        self.fused = fastaspp.nn.ConvBNReLU.from_modules(self.eager[0], self.eager[1]).eval()
        self.i = 0

    def next_x(self) -> torch.Tensor:
        self.i = (self.i + 1) % len(self.xs)
        return self.xs[self.i]


def measure(shape: ConvShape, batch: int, dtype: torch.dtype, device: torch.device, backend: str = "auto",
            compile_baseline: bool = False, warmup: int = 2, reps: int = 7, rounds: int = 3) -> Row:
    pair = ConvPair(shape, batch, dtype, device)
    with torch.no_grad(), fastaspp.backend(backend):
        x = pair.xs[0]
        err, scale = max_error([(pair.fused(x), pair.eager(x))])
        fns = [lambda: pair.eager(pair.next_x()), lambda: pair.fused(pair.next_x())]
        if compile_baseline:
            compiled = torch.compile(pair.eager, mode="max-autotune" if device.type == "cuda" else None)
            fns.append(lambda: compiled(pair.next_x()))
        times = alternate(fns, device, warmup, reps, rounds)
        mems = [peak_memory_mb(fn, device) for fn in fns[:2]]
        resolved = fastaspp.resolve_backend(device)
    useful, dense = shape.flops(batch)
    return Row("conv", shape.name, batch, str(dtype).replace("torch.", ""), str(device), resolved,
               times[0].median_ms, times[1].median_ms, times[0].spread_ms, times[1].spread_ms, useful, dense, err,
               times[2].median_ms if compile_baseline else None, mems[0], mems[1], eager_max_abs=scale)


def run(shapes: Iterable[ConvShape], batches: Iterable[int], dtype: torch.dtype, device: torch.device,
        backend: str = "auto", compile_baseline: bool = False, reps: int = 7,
        progress: Optional[Callable[[Row], None]] = None) -> List[Row]:
    rows = []
    for shape in shapes:
        for batch in batches:
            rows.append(measure(shape, batch, dtype, device, backend, compile_baseline, reps=reps))
            if progress:
                progress(rows[-1])
    return rows
