"""Timing done one way for every benchmark: warm-up, CUDA events (or a host clock on CPU), the median
of many calls, eager and fused interleaved in rounds, and the spread reported with the median."""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, List, Optional

import torch


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    spread_ms: float  # 80th minus 20th percentile of the per-call times


def time_ms(fn: Callable[[], object], device: torch.device, warmup: int, reps: int) -> List[float]:
    """Per-call times in ms after `warmup` calls: CUDA events on GPU, perf_counter on CPU."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return times


def summarize(times: List[float]) -> Timing:
    if len(times) < 2:
        return Timing(times[0], 0.0)
    q = statistics.quantiles(times, n=5, method="inclusive")
    return Timing(statistics.median(times), q[3] - q[0])


def alternate(fns: List[Callable[[], object]], device: torch.device, warmup: int, reps: int,
              rounds: int) -> List[Timing]:
    """Each fn timed in alternating rounds, so that slow drifts (clocks, other load) hit all alike."""
    times: List[List[float]] = [[] for _ in fns]
    for _ in range(rounds):
        for fn, acc in zip(fns, times):
            acc += time_ms(fn, device, warmup, reps)
    return [summarize(t) for t in times]


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> Optional[float]:
    """Device memory one call allocates beyond what was allocated before it (GPU only; None on CPU,
    where torch keeps no allocator statistics)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / 2**20


def measure_peak_tflops(device: torch.device, dtype: torch.dtype, size: Optional[int] = None) -> float:
    """The device's matrix-product rate, measured once per run: a large square matmul on random data
    (8192 on GPU, 2048 on CPU), the fastest of 10 after warm-up, in TFLOP/s. (Runs before
    2026-11-27T11:05Z took the median of a 1024 matmul on CPU, which fused GEMMs on large shapes
    exceeded: their "% of peak" can pass 100%.)"""
    n = size or (8192 if device.type == "cuda" else 2048)
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    fastest = min(time_ms(lambda: a @ b, device, warmup=3, reps=10))
    return 2 * n**3 / fastest / 1e9
