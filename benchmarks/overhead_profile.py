"""Where one small fused call's host time goes on CPU: the whole public call against its parts,
each timed alone (many calls, median of several samples), and torch.profiler's table of the ATen
ops inside the C++ kernel.

Parts of fastaspp.ops.atrous_conv2d (eval, no grad): argument checks (in Python, as the torch op's
route runs them); backend choice and the route past the op dispatch; the kernel (the C++ op called
directly), with its weight layout kept and re-made; the binding the eager routes call (the checks
in C++, then the kernel); the torch op's dispatch. For a training call: the forward with autograd,
and forward + backward. (Before 2026-11-30 the parts were those of that commit's layers: the folded
affine in Python, the output layout, the custom op.) Eager PyTorch's conv2d → affine → relu is timed
alongside. The parts name this commit's functions: update them when the layers change.

Then a ConvBNReLU training step at a mid size (MID_SHAPE, a mostly live conv of the overhead bench's
MID_CONVS at batch 2) with its layers peeled off one at a time, timed in interleaved rounds so that
the differences between neighbours are this run's: the module, then the public entry point, then
the kernel op (called as the entry point does, and by torch.ops), down to eager's own conv without
modules; and the module's training BN + ReLU (one C++ op on CPU, fastaspp.nn._train_bn) against
BatchNorm2d and ReLU themselves, which the rows below it keep. Each difference is that layer's host
time in a step whose other work is the same.

    python benchmarks/overhead_profile.py [--threads 1] [--out benchmarks/results] [--calls 200 --samples 15]
"""
import argparse
import datetime
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import fastaspp
from fastaspp.bench.report import environment
from fastaspp.nn._train_bn import batch_norm_act
from fastaspp.ops import atrous_conv as op_module
from fastaspp.ops._checks import pair

SHAPE = dict(batch=1, c_in=8, c_out=8, size=6, rate=2)
MID_SHAPE = dict(batch=2, channels=32, size=17, rate=1)


def per_call_us(fn, calls, samples):
    for _ in range(calls // 4):
        fn()
    times = []
    for _ in range(samples):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls * 1e6)
    return statistics.median(times)


def parts(x, w, scale, shift):
    """{part: callable} for this commit's layers of the op's eval call."""
    from fastaspp.ops._library import route

    stride, padding, dilation = [1, 1], [SHAPE["rate"]] * 2, [SHAPE["rate"]] * 2
    kernel = torch.ops.fastaspp._atrous_conv2d_forward.default

    def checks():
        s, p, d = (pair(v, n) for v, n in ((1, "stride"), (2, "padding"), (2, "dilation")))
        op_module.autocast_dtype(x)
        op_module.check_atrous_conv2d_args(x, w, None, scale, shift, s, p, d)

    def backend():
        fastaspp.resolve_backend(x.device)
        route(x, w, None, scale, shift)

    def fresh_weight():  # a weight whose tap-major copy cannot be kept (it takes a gradient)
        return kernel(x, w_grad, None, scale, shift, stride, padding, dilation, True)

    w_grad = w.clone().requires_grad_()
    return {
        "whole call": lambda: fastaspp.ops.atrous_conv2d(x, w, None, scale=scale, shift=shift, relu=True,
                                                        padding=2, dilation=2),
        "argument checks (Python: the torch op's route)": checks,
        "backend choice and route": backend,
        "kernel (C++ op called directly, kept weight layout)": lambda: kernel(
            x, w, None, scale, shift, stride, padding, dilation, True),
        "fastaspp._C's binding (C++ checks, then the kernel op)": lambda: fastaspp._ext._C.atrous_conv2d_forward(
            x, w, None, scale, shift, stride, padding, dilation, True),
        "kernel with the weight re-laid out (no kept copy)": fresh_weight,
        "torch op dispatch (torch.ops.fastaspp.atrous_conv2d, no grad)": lambda: torch.ops.fastaspp.atrous_conv2d(
            x, w, None, scale, shift, stride, padding, dilation, True, "cpu"),
        "eager conv2d alone": lambda: F.conv2d(x, w, None, 1, 2, 2),
        "eager conv2d + affine + relu": lambda: F.relu(F.conv2d(x, w, None, 1, 2, 2) * scale.view(1, -1, 1, 1)
                                                       + shift.view(1, -1, 1, 1)),
    }


def train_parts(x, w, scale, shift):
    xg, wg, sg, tg = (t.detach().clone().requires_grad_() for t in (x.expand(2, -1, -1, -1), w, scale, shift))
    xg = xg.detach().contiguous(memory_format=torch.channels_last).requires_grad_()

    def fused():
        return fastaspp.ops.atrous_conv2d(xg, wg, None, scale=sg, shift=tg, relu=True, padding=2, dilation=2)

    def eager():
        return F.relu(F.conv2d(xg, wg, None, 1, 2, 2) * sg.view(1, -1, 1, 1) + tg.view(1, -1, 1, 1))

    return {
        "train: fused forward (with autograd)": fused,
        "train: fused forward + backward": lambda: fused().sum().backward(),
        "train: eager forward": eager,
        "train: eager forward + backward": lambda: eager().sum().backward(),
    }


def mid_train_steps(calls, rounds):
    """{layer: median µs} of one ConvBNReLU training step (forward + backward) at MID_SHAPE, each
    variant with one more layer of fastaspp's peeled off, timed in interleaved rounds."""
    gen = torch.Generator().manual_seed(0)
    c, size, rate = MID_SHAPE["channels"], MID_SHAPE["size"], MID_SHAPE["rate"]
    fused = fastaspp.nn.ConvBNReLU(c, c, 3, padding=rate, dilation=rate).train()
    eager = torch.nn.Sequential(torch.nn.Conv2d(c, c, 3, padding=rate, dilation=rate, bias=False),
                                torch.nn.BatchNorm2d(c), torch.nn.ReLU()).train()
    eager.load_state_dict(fused.state_dict())
    shape = (MID_SHAPE["batch"], c, size, size)
    x = torch.randn(*shape, generator=gen).contiguous(memory_format=torch.channels_last).requires_grad_()
    g = torch.randn(*shape, generator=gen).contiguous(memory_format=torch.channels_last)
    w, bn = fused[0].weight, fused[1]
    geometry = ([1, 1], [rate, rate], [rate, rate])
    kernel = torch.ops.fastaspp._atrous_conv2d_forward.default
    steps = {
        "eager nn.Sequential(Conv2d, BatchNorm2d, ReLU)": lambda: eager(x),
        "fastaspp.nn.ConvBNReLU": lambda: fused(x),
        "no module: batch_norm_act(bn, fastaspp.ops.atrous_conv2d(x, w), relu=True)": lambda: batch_norm_act(
            bn, fastaspp.ops.atrous_conv2d(x, w, None, 1, rate, rate), True),
        "BN and ReLU as modules: F.relu(bn(fastaspp.ops.atrous_conv2d(x, w)))": lambda: F.relu(bn(
            fastaspp.ops.atrous_conv2d(x, w, None, 1, rate, rate))),
        "no entry point: fastaspp._C's binding (C++ checks, kernel op)": lambda: F.relu(bn(
            fastaspp._ext._C.atrous_conv2d_forward(x, w, None, None, None, *geometry, False))),
        "no entry point: the kernel op by torch.ops": lambda: F.relu(bn(
            kernel(x, w, None, None, None, *geometry, False))),
        "no fastaspp: F.conv2d for the conv": lambda: F.relu(bn(F.conv2d(x, w, None, 1, rate, rate))),
    }
    samples = {name: [] for name in steps}
    for _ in range(2):  # warm-up
        for step in steps.values():
            step().backward(g)
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                step().backward(g)
            samples[name].append((time.perf_counter() - t0) / calls * 1e6)
    return {name: statistics.median(times) for name, times in samples.items()}


def kernel_ops(x, w, scale, shift, calls=100):
    """torch.profiler's ATen ops under the C++ kernel: (name, calls per kernel call, self µs per kernel call)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            torch.ops.fastaspp._atrous_conv2d_forward.default(x, w, None, scale, shift, [1, 1], [2, 2], [2, 2], True)
    rows = [(e.key, e.count / calls, e.self_cpu_time_total / calls) for e in prof.key_averages()]
    return sorted(rows, key=lambda r: -r[2])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument("--calls", type=int, default=200, help="calls per sample (a training part: a quarter)")
    parser.add_argument("--samples", type=int, default=15, help="samples per part; the median is reported")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(SHAPE["batch"], SHAPE["c_in"], SHAPE["size"], SHAPE["size"], generator=gen).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(SHAPE["c_out"], SHAPE["c_in"], 3, 3, generator=gen)
    scale, shift = torch.rand(SHAPE["c_out"], generator=gen) + 0.5, torch.randn(SHAPE["c_out"], generator=gen)
    timings = {}
    with torch.no_grad():
        for name, fn in parts(x, w, scale, shift).items():
            timings[name] = per_call_us(fn, args.calls, args.samples)
            print(f"{name:60s} {timings[name]:8.1f} µs", flush=True)
    for name, fn in train_parts(x, w, scale, shift).items():
        timings[name] = per_call_us(fn, max(1, args.calls // 4), args.samples)
        print(f"{name:60s} {timings[name]:8.1f} µs", flush=True)
    print(f"\nConvBNReLU training step at {MID_SHAPE}, layers peeled off (interleaved rounds):")
    mid = mid_train_steps(max(1, args.calls // 10), args.samples)
    for name, us in mid.items():
        print(f"  {name:64s} {us:8.1f} µs", flush=True)
    with torch.no_grad():
        ops = kernel_ops(x, w, scale, shift)
    print("\nATen ops inside the C++ kernel (per kernel call):")
    for name, count, us in ops[:15]:
        print(f"  {name:50s} x{count:5.1f} {us:8.1f} µs self")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        path = os.path.join(args.out, f"overhead-profile-cpu-{stamp}.json")
        with open(path, "w") as f:
            json.dump({"environment": environment(), "shape": SHAPE, "per_call_us": timings,
                       "mid_shape": MID_SHAPE, "mid_train_step_us": mid,
                       "kernel_aten_ops": [dict(op=n, calls=c, self_us=u) for n, c, u in ops]}, f, indent=2)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
