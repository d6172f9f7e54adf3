"""Does the eager baseline already skip dead taps? Times torch's conv2d (oneDNN on CPU, cuDNN on GPU)
for one 3x3 ASPP branch at several rates on one map and compares the time with the live share of
its (pixel, tap) pairs (docs/design.md §2).

If eager time tracks the live share, the baseline skips padding work itself and dead-tap skipping
cannot buy a speed-up against it; if it stays flat, it multiplies the zeros.

    python benchmarks/eager_dead_taps.py [--device cpu] [--size 33] [--out benchmarks/results]
"""
import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from fastaspp.bench.report import environment
from fastaspp.bench.timing import time_ms
from fastaspp.geometry import conv_flops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", type=int, default=33)
    parser.add_argument("--c-in", type=int, default=2048)
    parser.add_argument("--reps", type=int, default=15)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, args.c_in, args.size, args.size, generator=gen).to(device).contiguous(
        memory_format=torch.channels_last)
    w = torch.randn(256, args.c_in, 3, 3, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    rows = []
    with torch.no_grad():
        for rate in (1, 6, 12, 18, 24, 36):
            def fn(rate=rate):
                return F.conv2d(x, w, padding=rate, dilation=rate)

            ms = statistics.median(time_ms(fn, device, warmup=3, reps=args.reps))
            useful, dense = conv_flops(tuple(x.shape), tuple(w.shape), (1, 1), (rate, rate), (rate, rate))
            rows.append({"rate": rate, "eager_ms": ms, "live_share": useful / dense})
    base = rows[0]["eager_ms"]  # rate 1: every tap live but the border
    print(f"conv2d 3x3, {args.c_in}->256, {args.size}x{args.size}, batch 1, {device}")
    print("rate | eager ms | time / rate-1 time | live share")
    for r in rows:
        print(f"{r['rate']:>4} | {r['eager_ms']:8.2f} | {r['eager_ms'] / base:18.2f} | {r['live_share']:.2f}")
    if args.out:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        path = os.path.join(args.out, f"eager-dead-taps-{device.type}-{stamp}.json")
        with open(path, "w") as f:
            json.dump({"environment": environment(), "size": args.size, "c_in": args.c_in, "rows": rows}, f,
                      indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
