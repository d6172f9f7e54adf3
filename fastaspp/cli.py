"""The fastaspp command line: `fastaspp demo`, `fastaspp bench` (also `python -m fastaspp`)."""
from __future__ import annotations

import argparse
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


def _bench_backends(name: str, device: torch.device) -> list:
    """The fastaspp backends a bench run times: one name, or "all" usable on this device."""
    import fastaspp

    if name != "all":
        return [name]
    usable = [b for b in fastaspp.backends() if fastaspp.resolve_backend(device, b) == b]
    # The interpreter runs Triton on CPU tensors for tests only: it is not a CPU backend to time.
    return [b for b in usable if device.type == "cuda" or b == "cpu"]


def cmd_bench(args: argparse.Namespace) -> int:
    import fastaspp
    from fastaspp.bench import aspp as bench_aspp
    from fastaspp.bench import conv as bench_conv
    from fastaspp.bench.report import markdown, write_results
    from fastaspp.bench.timing import measure_peak_tflops

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("fastaspp bench: --device cuda but no CUDA GPU is available", file=sys.stderr)
        return 2
    dtype = DTYPES[args.dtype]
    gpu_full = device.type == "cuda" and not args.quick
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    progress = lambda r: print(f"  {r.kind} {r.shape} b{r.batch} [{r.backend}]: eager {r.eager_ms:.2f} ms, "
                               f"fused {r.fused_ms:.2f} ms, {r.speedup:.2f}x"
                               + (f", compiled {r.compiled_ms:.2f} ms" if r.compiled_ms else ""), flush=True)
    peak = measure_peak_tflops(device, dtype)
    print(f"peak: {peak:.2f} TFLOP/s ({args.dtype} matmul on {device})")
    rows = []
    for backend in _bench_backends(args.backend, device):
        with fastaspp.backend(backend):
            if args.op in ("conv", "all"):
                print(f"fused conv+BN+ReLU vs eager ({device}, {args.dtype}, channels_last, eval, backend {backend})")
                shapes = bench_conv.QUICK_SHAPES if args.quick else bench_conv.SHAPES
                rows += bench_conv.run(shapes, [1, 8] if gpu_full else [1], dtype, device, backend, args.compile,
                                       reps=5 if args.quick else 10, progress=progress)
            if args.op in ("aspp", "all"):
                print(f"fastaspp.nn.ASPP vs the eager reference ASPP ({device}, {args.dtype}, channels_last, "
                      f"backend {backend})")
                shapes = bench_aspp.ASPP_SHAPES if gpu_full else bench_aspp.ASPP_SHAPES[:1]
                modes = ["eval"] if args.quick else ["eval", "train"]
                rows += bench_aspp.run(shapes, [1, 8, 16] if gpu_full else [1], modes, dtype, device, args.compile,
                                       progress)
    print()
    print(markdown(rows, peak))
    if args.out:
        command = "fastaspp " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["bench"] else f"fastaspp bench {vars(args)}"
        for path in write_results(args.out, args.op, device, args.dtype, rows, peak, command):
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
    bench.add_argument("--compile", action="store_true",
                       help="also time torch.compile of the eager modules (max-autotune on GPU)")
    bench.add_argument("--device", choices=["cpu", "cuda"], default=default_device)
    bench.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    bench.add_argument("--backend", default="auto", help="auto, cpu, triton, cuda, or all (each usable one)")
    bench.add_argument("--quick", action="store_true", help="a few shapes at batch 1")
    bench.add_argument("--out", help="directory for the JSON, markdown and PNG results")
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
