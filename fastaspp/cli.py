"""The fastaspp command line: `fastaspp demo`, `fastaspp bench` (also `python -m fastaspp`)."""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import sys
import time

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_against_reference(device: torch.device) -> float:
    """Fused ops vs fastaspp.reference: atrous conv forward and backward on ASPP-like shapes, and the
    fused ASPP in eval; returns the max relative error."""
    import fastaspp
    from fastaspp import reference

    gen = torch.Generator().manual_seed(0)
    worst = 0.0
    for c_in, c_out, size, rate, stride in [(64, 32, 17, 6, 1), (64, 32, 17, 12, 1), (32, 16, 9, 18, 1),
                                           (48, 24, 16, 2, 2)]:
        x = torch.randn(2, c_in, size, size, generator=gen).to(device, memory_format=torch.channels_last)
        w = (torch.randn(c_out, c_in, 3, 3, generator=gen) / (9 * c_in) ** 0.5).to(device)
        s, t = (torch.randn(c_out, generator=gen).to(device) for _ in range(2))
        x.requires_grad_()
        w.requires_grad_()
        out = fastaspp.ops.atrous_conv2d(x, w, None, stride, rate, rate, scale=s, shift=t, relu=True)
        ref = reference.atrous_conv2d(x, w, None, stride, rate, rate, scale=s, shift=t, relu=True)
        g = torch.randn(out.shape, generator=gen).to(device)
        grads = torch.autograd.grad(out, (x, w), g)
        ref_grads = torch.autograd.grad(ref, (x, w), g)
        for a, b in [(out, ref), *zip(grads, ref_grads)]:
            worst = max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item())
    # The fused ASPP (eval) against the reference ASPP with the same weights.
    ref_aspp = reference.ASPP(64, (6, 12, 18), 32).eval()
    with torch.no_grad():
        for m in ref_aspp.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    aspp = fastaspp.nn.ASPP(64, (6, 12, 18), 32).eval()
    aspp.load_state_dict(ref_aspp.state_dict())
    ref_aspp.to(device)
    aspp.to(device)
    x = torch.randn(2, 64, 17, 17, generator=gen).to(device, memory_format=torch.channels_last)
    with torch.no_grad():
        a, b = aspp(x), ref_aspp(x)
    return max(worst, ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item())


def cmd_bench(args: argparse.Namespace) -> int:
    import fastaspp
    from fastaspp import benchmark

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fastaspp bench: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    batches = [1] if args.quick or device.type == "cpu" else [1, 8]
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    progress = lambda r: print(f"  {r.shape} b{r.batch}: eager {r.eager_ms:.2f} ms, fused {r.fused_ms:.2f} ms, "
                               f"{r.speedup:.2f}x", flush=True)
    rows = []
    if args.op in ("conv", "all"):
        print(f"fused conv+BN+ReLU vs eager ({device}, {args.dtype}, channels_last, eval, backend {args.backend})")
        shapes = benchmark.QUICK_SHAPES if args.quick else benchmark.SHAPES
        rows += benchmark.run(shapes, batches, dtype, device, args.backend, reps=5 if args.quick else 10,
                              progress=progress)
    if args.op in ("aspp", "all"):
        from fastaspp import benchmark_aspp

        print(f"fastaspp.nn.ASPP vs the eager reference ASPP ({device}, {args.dtype}, channels_last, "
              f"backend {args.backend}{', and torch.compile of it' if args.compile else ''})")
        shapes = benchmark_aspp.ASPP_SHAPES[:1] if args.quick or device.type == "cpu" else benchmark_aspp.ASPP_SHAPES
        modes = ["eval"] if args.quick else ["eval", "train"]
        aspp_batches = [1] if args.quick or device.type == "cpu" else [1, 8, 16]
        with fastaspp.backend(args.backend):
            rows += benchmark_aspp.run_aspp(shapes, aspp_batches, modes, dtype, device, args.compile, progress)
    table = benchmark.markdown(rows)
    print()
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")
        env = benchmark.environment()
        tag = (env.get("gpu") or device.type).replace(" ", "-")
        path = os.path.join(args.out, f"{args.op}-{tag}-{args.dtype}-{stamp}.json")
        with open(path, "w") as f:
            json.dump({"environment": env, "rows": [dataclasses.asdict(r) for r in rows]}, f, indent=2)
        with open(path[:-5] + ".md", "w") as f:
            f.write(f"Environment: {json.dumps(env)}\n\n{table}")
        print(f"wrote {path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import fastaspp

    device = torch.device(args.device)
    print(f"fastaspp {fastaspp.__version__}: backends here {fastaspp.backends()}, "
          f"{device} tensors run on '{fastaspp.resolve_backend(device)}'")
    t0 = time.perf_counter()
    err = _check_against_reference(device)
    print(f"fused atrous conv+BN+ReLU (forward, backward) and fused ASPP (eval) vs reference: "
          f"max relative error {err:.2e}")
    if err > 1e-4:
        print("fastaspp demo: the fused op disagrees with the reference", file=sys.stderr)
        return 1
    bench_args = argparse.Namespace(device=args.device, dtype="float32" if device.type == "cpu" else "bfloat16",
                                    quick=device.type == "cpu", backend="auto", out=None, op="all", compile=False)
    code = cmd_bench(bench_args)
    print(f"demo finished in {time.perf_counter() - t0:.0f} s")
    return code


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastaspp", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"

    demo = sub.add_parser("demo", help="check the fused ops against the reference and time them against eager")
    demo.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    demo.set_defaults(func=cmd_demo)

    bench = sub.add_parser("bench", help="benchmark fused conv+BN+ReLU and ASPP against eager PyTorch")
    bench.add_argument("--op", choices=["conv", "aspp", "all"], default="all")
    bench.add_argument("--compile", action="store_true", help="also time torch.compile of the eager ASPP")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    bench.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    bench.add_argument("--backend", default="auto", help="auto, cpu, triton or cuda")
    bench.add_argument("--quick", action="store_true", help="a few shapes at batch 1")
    bench.add_argument("--out", help="directory for the JSON and markdown results")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
