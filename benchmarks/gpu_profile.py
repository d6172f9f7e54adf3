"""Where a fused conv's time goes on the GPU: kernel time (profiler) against per-call time.

For a few ASPP-sized convs (bf16, channels_last) and each GPU backend (and the cuda backend's
128 x 256 and 8-stage wgmma tiles, FASTASPP_CUDA_CONV=wgmma_wide and wgmma_deep, the 128 x 256
tile fed by TMA, wgmma_tma, and its 64 x 128
tiles with a split K loop, FASTASPP_CUDA_SPLIT_K) it prints the median
per-call time (CUDA events around one call), the host time per call (many calls, one sync), and
the device time of each kernel the call launches (torch.profiler). If the per-call time is far
above the kernels' sum, the cost is on the host; otherwise it is in the kernels. Each case ends
with the cuda rows' kernel time against cuDNN's conv kernel and the triton row's kernels, and the
issue's goals (goal_lines). Last, where the
host time of a batch-1 call goes: the Python functions that take the most of it (cProfile), and
for triton each layer of the call replayed alone (triton_layers).
Run on a GPU machine: python benchmarks/gpu_profile.py (tests/test_bench.py runs it on CPU, the cpu
backend standing in for every row, to catch a renamed helper before device time is spent on it.)
"""
import contextlib
import cProfile
import dataclasses
import json
import os
import pstats
import statistics
import time

import torch
from torch.profiler import ProfilerActivity, profile

import fastaspp
from fastaspp.bench import conv as benchmark
from fastaspp.bench.report import environment
from fastaspp.bench.timing import summarize, time_ms

CASES = [("aspp-33-r6", 1), ("aspp-33-r6", 8), ("aspp-65-r36", 8)]
# Row label: (backend, the cuda switches while it runs; the others unset); cuda-wide is the 128 x 256
# wgmma tile, cuda-tma the same tile fed by TMA with a producer warpgroup, cuda-deep the 64 x 128
# one with 8 stages, "-split" their K loop in up to 8 parts where the grid leaves SMs idle (the
# batch-1 case; cuda-tma-split: the 64 x 128 TMA tile where the 128 x 256 grid is below a wave).
CUDA_SWITCHES = ("FASTASPP_CUDA_CONV", "FASTASPP_CUDA_SPLIT_K")
SPLIT = {"FASTASPP_CUDA_SPLIT_K": "8"}
DEEP = {"FASTASPP_CUDA_CONV": "wgmma_deep"}
BACKENDS = {"triton": ("triton", {}), "cuda": ("cuda", {}), "cuda-wide": ("cuda", {"FASTASPP_CUDA_CONV": "wgmma_wide"}),
            "cuda-tma": ("cuda", {"FASTASPP_CUDA_CONV": "wgmma_tma"}), "cuda-deep": ("cuda", DEEP),
            "cuda-split": ("cuda", SPLIT), "cuda-deep-split": ("cuda", {**DEEP, **SPLIT}),
            "cuda-tma-split": ("cuda", {"FASTASPP_CUDA_CONV": "wgmma_tma", **SPLIT})}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_call_ms(fn, device, reps=50):
    return summarize(time_ms(fn, device, warmup=5, reps=reps)).median_ms


def host_ms(fn, device, reps=100, samples=5):
    """Host time per call: the median over `samples` of (time to queue `reps` calls) / reps, each
    sample starting on an idle device (one sample of run 3 varied by +-40% between similar cases)."""
    per_call = []
    for _ in range(samples):
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        per_call.append((time.perf_counter() - t0) * 1e3 / reps)
    _sync(device)
    return statistics.median(per_call)


def kernel_table(fn, device, reps=10):
    """Each kernel one call of fn launches, with its device time per call (ms), longest first (on a
    CPU stand-in: each ATen op's own CPU time)."""
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
        _sync(device)
    rows = [(e.key, (e.device_time_total if cuda else e.self_cpu_time_total) / 1e3 / reps)
            for e in prof.key_averages()]
    return sorted([row for row in rows if row[1] > 0], key=lambda r: -r[1])


# The goals for the cuda backend (bf16): its kernels at least 0.9x cuDNN's speed at aspp-33 r6
# batch 8 and 2x at aspp-65 r36 batch 8, and at least the triton backend's speed everywhere.
CUDNN_GOALS = {("aspp-33-r6", 8): 0.9, ("aspp-65-r36", 8): 2.0}


def goal_lines(name, batch, device_ms):
    """The summary of one case: device_ms maps each row label to its kernels [(name, ms per call)]
    (eager's first kernel, its longest, is cuDNN's conv). Per cuda row: the speed of its kernels
    against cuDNN's conv kernel and against the triton row's kernels, and the goals."""
    cudnn = device_ms["eager"][0][1]
    triton = sum(ms for _, ms in device_ms["triton"])
    goal = CUDNN_GOALS.get((name, batch))
    lines = [f"{name} b{batch} goals: cuDNN conv kernel {cudnn:.3f} ms, triton kernels {triton:.3f} ms"]
    for label, kernels in device_ms.items():
        if not label.startswith("cuda"):
            continue
        total = sum(ms for _, ms in kernels)
        vs_cudnn, vs_triton = cudnn / total, triton / total
        verdict = [f"{'meets' if vs_triton >= 1 else 'misses'} >= triton"]
        if goal is not None:
            verdict.insert(0, f"{'meets' if vs_cudnn >= goal else 'misses'} >= {goal}x cuDNN")
        lines.append(f"  {label:15s} kernels {total:.3f} ms: {vs_cudnn:.2f}x cuDNN, {vs_triton:.2f}x triton "
                     f"({', '.join(verdict)})")
    return lines


def _pair(name, batch, device, dtype, channels):
    """The bench's conv pair of case `name` (its channels replaced by `channels` when given)."""
    shape = {s.name: s for s in benchmark.SHAPES}[name]
    if channels is not None:
        shape = dataclasses.replace(shape, c_in=channels, c_out=channels)
    return benchmark.ConvPair(shape, batch, dtype, device)


def main(device=torch.device("cuda"), dtype=torch.bfloat16, backends=BACKENDS, channels=None, quick=False):
    """The per-case table and goals; the arguments let a CPU test run it on stand-ins (quick: a few
    calls per measurement)."""
    print("environment:", json.dumps(environment()), flush=True)  # device, versions, commit
    for name, batch in CASES:
        pair = _pair(name, batch, device, dtype, channels)
        with torch.no_grad():
            # Each call takes the pair's next input: one input of aspp-33 at batch 8 (36 MB) would
            # stay in the H200's 60 MB L2 from call to call.
            # The backend is chosen around a row's calls, not in each: the fused rows' host time then
            # holds no more Python than a user's call does (fastaspp.backend() costs a few µs).
            runs = [("eager", None, lambda pair=pair: pair.eager(pair.next_x()), {})]
            runs += [(label, b, lambda pair=pair: pair.fused(pair.next_x()), switches)
                     for label, (b, switches) in backends.items()]
            device_ms = {}
            for label, b, fn, switches in runs:
                with _cuda_switches(switches), (fastaspp.backend(b) if b else contextlib.nullcontext()):
                    if quick:
                        call, host = per_call_ms(fn, device, reps=2), host_ms(fn, device, reps=2, samples=2)
                        device_ms[label] = kernel_table(fn, device, reps=1)
                    else:
                        call, host = per_call_ms(fn, device), host_ms(fn, device)
                        device_ms[label] = kernel_table(fn, device)
                kernels = "; ".join(f"{k[:40]} {ms:.3f}" for k, ms in device_ms[label][:4])
                print(f"{name} b{batch} {label:15s} call {call:.3f} ms, host {host:.3f} ms | {kernels}", flush=True)
            print("\n".join(goal_lines(name, batch, device_ms)), flush=True)


def host_profile(fn, device, reps=300, top=12):
    """Lines naming the `top` functions by their own host time per call of fn, then the `top` by their
    time with callees (the layers a call passes through: module, op, Triton's autotuner, heuristics,
    JIT and launcher), per call (cProfile; its own overhead inflates every entry, so compare entries,
    not totals with host_ms)."""
    fn()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(reps):
        fn()
    profiler.disable()
    _sync(device)
    stats = pstats.Stats(profiler).stats  # {(file, line, name): (calls, ncalls, tottime, cumtime, callers)}
    lines = []
    for heading, column in (("by own time:", 2), ("by time with callees:", 3)):
        rows = sorted(stats.items(), key=lambda item: -item[1][column])[:top]
        lines.append(f" {heading}")
        lines += [f"  {tottime / reps * 1e6:7.1f} us own, {cumtime / reps * 1e6:7.1f} us with callees: "
                  f"{name} ({'/'.join(file.split('/')[-2:])}:{line})"
                  for (file, line, name), (_, _, tottime, cumtime, _) in rows]
    return lines


def triton_layers(pair, device, reps=100, samples=5):
    """Host time per call (ms) of each layer a triton eval call passes through, each layer's call
    captured from one real call and replayed alone (no profiler to inflate it): the module; the
    kernels module's forward (layouts, output, grid); its launch (launch_tuned: past the autotuner
    and heuristics once the key has launched); the same launch through the autotuner (autotuner,
    heuristics, JIT: every launch before launch_tuned); the JIT launch with the tuned config and
    tiles. Differences name each layer's cost."""
    from fastaspp.kernels import atrous_conv as kernels
    from fastaspp.kernels.launch import jit_function

    autotuner = kernels._atrous_fwd_kernel
    jit = jit_function(autotuner)
    forward, launch, calls = kernels.atrous_conv2d_forward, kernels.launch_tuned, {}

    def capture(name, fn):
        def recording(*args, **kwargs):
            calls[name] = (fn, args, kwargs)
            return fn(*args, **kwargs)
        return recording

    x = pair.next_x()
    kernels.atrous_conv2d_forward = capture("kernels.atrous_conv2d_forward", forward)
    kernels.launch_tuned = capture("launch_tuned", launch)
    jit.run = capture("JIT launch", jit.run)
    try:
        with fastaspp.backend("triton"):
            pair.fused(x)
    finally:  # the instance's own attribute goes: its class's method shows again
        kernels.atrous_conv2d_forward, kernels.launch_tuned = forward, launch
        del jit.run
    layers = {"module": lambda: pair.fused(x)}
    layers.update({name: (lambda fn=fn, args=args, kwargs=kwargs: fn(*args, **kwargs))
                   for name, (fn, args, kwargs) in calls.items()})
    _, (kernel, grid, *args), kwargs = calls["launch_tuned"]
    layers["autotuned launch"] = lambda: kernel[grid](*args, **kwargs)
    layers = {name: layers[name] for name in ("module", "kernels.atrous_conv2d_forward", "launch_tuned",
                                              "autotuned launch", "JIT launch")}
    with fastaspp.backend("triton"), launch_device(device):
        return {name: host_ms(fn, device, reps, samples) for name, fn in layers.items()}


def launch_device(device):
    """The device a replayed launch runs on (the kernels module sets it around its own launches)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def main_host(device=torch.device("cuda"), dtype=torch.bfloat16, backends=("triton", "cuda"), channels=None,
              reps=300):
    """Where a batch-1 call's host time goes, per backend (aspp-33 r6, the smallest case)."""
    pair = _pair("aspp-33-r6", 1, device, dtype, channels)
    with torch.no_grad():
        for b in backends:
            print(f"host time of aspp-33-r6 b1 {b}, by function:", flush=True)
            with fastaspp.backend(b):
                lines = host_profile(lambda: pair.fused(pair.next_x()), device, reps)
            print("\n".join(lines), flush=True)
        if "triton" in backends:
            layers = triton_layers(pair, device)
            print("host time of aspp-33-r6 b1 triton, by layer (replayed alone): "
                  + ", ".join(f"{name} {ms * 1e3:.1f} us" for name, ms in layers.items()), flush=True)


@contextlib.contextmanager
def _cuda_switches(values):
    """The CUDA_SWITCHES set as values says (the others unset) inside, restored after."""
    before = {name: os.environ.pop(name, None) for name in CUDA_SWITCHES}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            os.environ.pop(name, None)
            if value is not None:
                os.environ[name] = value


if __name__ == "__main__":
    main()
    main_host()
