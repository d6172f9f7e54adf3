"""The host time fastaspp's Triton wrappers spend per launch outside Triton's JIT launch, on any
machine with triton installed (no GPU needed).

Each row runs one of fastaspp.kernels' entry points on CPU tensors with the GPU autotune configs (no
TRITON_INTERPRET), its kernels' JIT launch replaced by one that only evaluates the grid, as the launch
does, and the autotuner's first-call benchmark by a constant (one config is kept per key, as on a
GPU). So a row is fastaspp's own Python (argument checks, output allocation, kept weight layouts)
plus Triton's heuristics wrapper and the grid (past the autotuner once a key is tuned:
launch_tuned); `through the autotuner` rows launch every call through Triton's autotuner, as before
launch_tuned, and `and triton.cdiv` rows also compute grids and tile heuristics with triton.cdiv, as
before commit bb1428e (a constexpr function in recent Triton); `python only` rows replace the whole
decorated kernel by a no-op, leaving fastaspp's Python alone. The rows of one entry point are timed
in interleaved samples, so their ratios are this run's. What the JIT launch itself costs (its
argument binding and the driver call) needs a GPU: benchmarks/gpu_profile.py times those layers.

    python benchmarks/triton_host_wrappers.py [--out benchmarks/results] [--calls 2000 --samples 7]
"""
import argparse
import datetime
import json
import os
import statistics
import time

os.environ.pop("TRITON_INTERPRET", None)  # the GPU configs, several per kernel: the autotuner's key path

import torch  # noqa: E402
import triton  # noqa: E402

from fastaspp.bench.report import environment  # noqa: E402
from fastaspp.kernels import aspp as k_aspp  # noqa: E402
from fastaspp.kernels import atrous_conv as k_conv  # noqa: E402
from fastaspp.kernels import implicit_gemm  # noqa: E402
from fastaspp.kernels import launch  # noqa: E402

KERNELS = {k_conv: ("_atrous_fwd_kernel", "_atrous_dgrad_kernel"),
           k_aspp: ("_aspp_branches_kernel", "_aspp_grad_input_kernel")}


def per_call_us(fns, calls, samples):
    """{name: median µs per call} of each of fns {name: callable}, their samples interleaved."""
    for fn in fns.values():
        for _ in range(calls // 4):
            fn()
    times = {name: [] for name in fns}
    for _ in range(samples):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            times[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: statistics.median(t) for name, t in times.items()}


def _through_the_autotuner(kernel, grid, *args, **kwargs):
    return kernel[grid](*args, **kwargs)


def variant(fn, cdiv=launch.cdiv, launcher=launch.launch_tuned):
    """fn with the kernels modules' grids and heuristics on `cdiv` and their launches by `launcher`."""
    swaps = [(m, "cdiv", cdiv) for m in (k_conv, k_aspp, implicit_gemm)]
    swaps += [(m, "launch_tuned", launcher) for m in (k_conv, k_aspp)]

    def run():
        kept = [getattr(m, name) for m, name, _ in swaps]
        for m, name, value in swaps:
            setattr(m, name, value)
        try:
            fn()
        finally:
            for (m, name, _), value in zip(swaps, kept):
                setattr(m, name, value)
    return run


def stub_launches():
    """Every kernel's JIT launch evaluates its grid and returns; the autotuners' benchmark returns
    a constant (so the first config of a key is kept)."""
    for module, names in KERNELS.items():
        for name in names:
            autotuner = getattr(module, name)
            jit = launch.jit_function(autotuner)

            def run(*args, grid, warmup, _names=jit.arg_names, **kwargs):
                if callable(grid):
                    grid({**dict(zip(_names, args)), **kwargs})

            jit.run = run
            autotuner._bench = lambda *args, **kwargs: [1.0, 1.0, 1.0]


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def calls():
    """{row: callable}: the ASPP-branch shapes at batch 1 (bf16, 2048 -> 256 channels, 33 x 33, rates
    6, 12, 18) and a 3x3 conv of them."""
    dt = torch.bfloat16
    x = torch.randn(1, 2048, 33, 33).to(dt).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 2048, 3, 3).to(dt)
    g = torch.randn(1, 256, 33, 33).to(dt).contiguous(memory_format=torch.channels_last)
    ws = [torch.randn(256, 2048, 1, 1).to(dt)] + [torch.randn(256, 2048, 3, 3).to(dt) for _ in range(3)]
    s, t = torch.ones(1024), torch.zeros(1024)
    gb = torch.randn(1, 1024, 33, 33).to(dt).contiguous(memory_format=torch.channels_last)
    rates = [6, 12, 18]
    return {
        "conv forward": lambda: k_conv.atrous_conv2d_forward(x, w, s[:256], t[:256], (1, 1), (6, 6), (6, 6), True),
        "conv grad_input": lambda: k_conv.atrous_conv2d_grad_input(g, w, x.shape, (1, 1), (6, 6), (6, 6)),
        "aspp branches forward": lambda: k_aspp.aspp_branches_forward(x, ws, rates, s, t),
        "aspp branches grad_input": lambda: k_aspp.aspp_branches_grad_input(gb, ws, rates, x.shape),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=7)
    parser.add_argument("--out", default=None, help="write a JSON result file into this directory")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    # CPU tensors stand in for CUDA ones: no device context to enter.
    for module in (k_conv, k_aspp, launch):
        module.launch_ctx = lambda t: torch.no_grad()
    stub_launches()
    timings = {}
    for name, fn in calls().items():
        timings.update(per_call_us({
            f"{name}: wrappers, JIT launch stubbed": variant(fn),
            f"{name}: through the autotuner": variant(fn, launcher=_through_the_autotuner),
            f"{name}: through the autotuner and triton.cdiv": variant(fn, triton.cdiv, _through_the_autotuner)},
            args.calls, args.samples))
    for module, names in KERNELS.items():
        for name in names:
            setattr(module, name, _NoLaunch())
    timings.update(per_call_us({f"{name}: python only": fn for name, fn in calls().items()}, args.calls,
                               args.samples))
    for row, us in timings.items():
        print(f"{row:55s} {us:8.2f} us")
    if args.out:
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = os.path.join(args.out, f"triton-host-wrappers-cpu-{stamp}.json")
        with open(path, "w") as f:
            json.dump({"environment": environment(), "triton": triton.__version__, "calls": args.calls,
                       "samples": args.samples, "per_call_us": timings}, f, indent=1)
        print(path)


if __name__ == "__main__":
    main()
