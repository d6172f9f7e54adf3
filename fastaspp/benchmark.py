"""Timing of fastaspp's fused conv+BN+ReLU against eager PyTorch, shared by the CLI and benchmarks/
(the ASPP comparisons are in benchmark_aspp.py).

Baseline: eager conv2d → batch_norm → relu (cuDNN / oneDNN), channels_last on both sides,
eval mode. Each row reports median time, ratio against eager measured in the same run,
and dense and useful (live-tap) FLOP/s.
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Callable, Iterable, List, Optional

import torch

import fastaspp
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


@dataclasses.dataclass
class Row:
    shape: str
    batch: int
    dtype: str
    device: str
    backend: str
    eager_ms: float
    fused_ms: float
    speedup: float
    fused_dense_tflops: float
    fused_useful_tflops: float
    eager_dense_tflops: float
    eager_useful_tflops: float
    max_abs_err: float
    compiled_ms: Optional[float] = None  # torch.compile of the eager baseline, where measured


class _Pair:
    """Eager and fused callables over the same weights, cycling through several inputs."""

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


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> List[float]:
    """Per-call times in ms: CUDA events on GPU, perf_counter on CPU, after warm-up."""
    for _ in range(warmup):
        fn()
    times = []
    if device.type == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def alternate(fns: List[Callable[[], object]], device: torch.device, warmup: int, reps: int,
              rounds: int) -> List[float]:
    """Median ms of each fn, timed in alternating rounds so slow drifts (clock, other load) hit all alike."""
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, acc in zip(fns, times):
            acc += time_ms(fn, device, warmup, reps)
    return [statistics.median(t) for t in times]


def measure(shape: ConvShape, batch: int, dtype: torch.dtype, device: torch.device,
            backend: str = "auto", warmup: int = 2, reps: int = 7, rounds: int = 3) -> Row:
    pair = _Pair(shape, batch, dtype, device)
    with torch.no_grad(), fastaspp.backend(backend):
        x = pair.xs[0]
        err = (pair.fused(x).float() - pair.eager(x).float()).abs().max().item()
        eager_ms, fused_ms = alternate([lambda: pair.eager(pair.next_x()), lambda: pair.fused(pair.next_x())],
                                       device, warmup, reps, rounds)
        resolved = fastaspp.resolve_backend(device)
    useful, dense = shape.flops(batch)
    return Row(shape.name, batch, str(dtype).replace("torch.", ""), str(device), resolved, eager_ms, fused_ms,
               eager_ms / fused_ms, dense / fused_ms / 1e9, useful / fused_ms / 1e9, dense / eager_ms / 1e9,
               useful / eager_ms / 1e9, err)


def run(shapes: Iterable[ConvShape], batches: Iterable[int], dtype: torch.dtype, device: torch.device,
        backend: str = "auto", reps: int = 7, progress: Optional[Callable[[Row], None]] = None) -> List[Row]:
    rows = []
    for shape in shapes:
        for batch in batches:
            row = measure(shape, batch, dtype, device, backend, reps=reps)
            rows.append(row)
            if progress:
                progress(row)
    return rows


def markdown(rows: List[Row]) -> str:
    head = ("| shape | batch | dtype | backend | eager ms | fused ms | speed-up | compiled ms (fused vs it) "
            "| TFLOP/s dense / useful, fused | TFLOP/s dense / useful, eager | max abs err |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    compiled = lambda r: "-" if r.compiled_ms is None else f"{r.compiled_ms:.2f} ({r.compiled_ms / r.fused_ms:.2f}x)"
    return head + "".join(
        f"| {r.shape} | {r.batch} | {r.dtype} | {r.backend} | {r.eager_ms:.2f} | {r.fused_ms:.2f} | "
        f"{r.speedup:.2f}x | {compiled(r)} | {r.fused_dense_tflops:.3f} / {r.fused_useful_tflops:.3f} | "
        f"{r.eager_dense_tflops:.3f} / {r.eager_useful_tflops:.3f} | {r.max_abs_err:.1e} |\n"
        for r in rows)


def _cpu_model() -> Optional[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def environment() -> dict:
    """Device and versions stamped on every result file."""
    import platform
    import subprocess

    info = {"torch": torch.__version__, "fastaspp": fastaspp.__version__, "cuda": torch.version.cuda,
            "cpu": _cpu_model() or platform.machine(), "threads": torch.get_num_threads()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    # FASTASPP_COMMIT names the commit where the tree was copied without its .git (a device run).
    info["commit"] = os.environ.get("FASTASPP_COMMIT")
    try:
        info["commit"] = info["commit"] or subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                                        cwd=__file__.rsplit("/", 2)[0], timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["commit"] = None
    return info
