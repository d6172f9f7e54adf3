"""Where the cpu backend's direct loops stop paying: the threshold of csrc/cpu/direct_conv.h.

For a sweep of 3x3 conv + BN + ReLU shapes (eval, batch 1, channels_last, fp32) it times, in one
run and interleaved: eager PyTorch (torch's conv, then BN and ReLU), the fused op with the cpu
backend's own choice of path, and the fused op forced onto each of its forward paths
(FASTASPP_CPU_DIRECT_MAX_MACS and FASTASPP_CPU_ONEDNN set per call): the direct loops, the live-tap
GEMMs, oneDNN's conv with the fused epilogue, and, in the lower part of the direct loops' range
(fastaspp._C.CPU_TORCH_CONV_MAX_MACS), torch's conv with the epilogue in place; and reports each
shape's live multiply-adds and share of live pairs. The crossover is the smallest MACs from which
the GEMMs beat the loops on every larger shape; the default threshold should sit there. Shapes
where the default pick took longer than eager are listed at the end: the rule in
csrc/cpu/conv_paths.h should leave none beyond the noise between runs.

    python benchmarks/cpu_direct_crossover.py [--threads 2] [--out benchmarks/results]
"""

import torch

import fastaspp
from fastaspp.bench.timing import alternate
from fastaspp.geometry import live_tap_pixels

from _crossover import conv_bn_relu_pair, parse_args, with_env, write_result

CHANNELS = (8, 16, 32, 64, 128, 256)
SIZES = (5, 9, 17, 33)
RATES = (1, 2, 6)


def forced(limit: str, onednn: str, fn):
    """fn with FASTASPP_CPU_DIRECT_MAX_MACS and FASTASPP_CPU_ONEDNN set for the call."""
    return with_env({"FASTASPP_CPU_DIRECT_MAX_MACS": limit, "FASTASPP_CPU_ONEDNN": onednn}, fn)


def measure(c: int, size: int, rate: int, reps: int, calls: int) -> dict:
    eager, fused, x = conv_bn_relu_pair(c, size, rate)
    live, dense = live_tap_pixels((size, size), (3, 3), (1, 1), (rate, rate), (rate, rate))
    torch_conv_range = live * c * c <= fastaspp._ext._C.CPU_TORCH_CONV_MAX_MACS
    loop = lambda fn: (lambda: [fn() for _ in range(calls)])  # noqa: E731
    fns = [loop(lambda: eager(x)), loop(lambda: fused(x)), loop(forced(str(10**15), "0", lambda: fused(x))),
           loop(forced("-1", "0", lambda: fused(x))), loop(forced("-1", "1", lambda: fused(x)))]
    if torch_conv_range:  # FASTASPP_CPU_ONEDNN=1 in this part of the loops' range: torch's conv + epilogue
        fns.append(loop(forced(str(fastaspp._ext._C.CPU_DIRECT_MAX_MACS), "1", lambda: fused(x))))
    with torch.no_grad():
        times = alternate(fns, torch.device("cpu"), warmup=1, reps=reps, rounds=3)
    ms = [t.median_ms / calls for t in times]
    row = dict(channels=c, size=size, rate=rate, macs=live * c * c, live_share=live / dense, eager_ms=ms[0],
               default_ms=ms[1], direct_ms=ms[2], gemm_ms=ms[3], onednn_ms=ms[4])
    if torch_conv_range:
        row["torch_conv_ms"] = ms[5]
    return row


def crossover(rows) -> int:
    """The smallest MACs from which the GEMMs are at least as fast as the loops on every larger shape."""
    ordered = sorted(rows, key=lambda r: r["macs"])
    for i, row in enumerate(ordered):
        if all(r["gemm_ms"] <= r["direct_ms"] for r in ordered[i:]):
            return row["macs"]
    return ordered[-1]["macs"] + 1


def main() -> None:
    args = parse_args(__doc__)
    rows = []
    for c in CHANNELS:
        for size in SIZES:
            for rate in RATES:
                if rate >= size:
                    continue
                macs = live_tap_pixels((size, size), (3, 3), (1, 1), (rate, rate), (rate, rate))[0] * c * c
                row = measure(c, size, rate, args.reps, calls=max(1, min(200, 2_000_000 // max(macs, 1))))
                rows.append(row)
                torch_conv = f" torch conv {row['torch_conv_ms']:.4f}" if "torch_conv_ms" in row else ""
                print(f"c{c:4d} {size:3d}x{size:<3d} r{rate:<2d} {row['macs']:>11,d} MACs"
                      f" ({row['live_share']:.0%} live): eager {row['eager_ms']:.4f} default {row['default_ms']:.4f}"
                      f" direct {row['direct_ms']:.4f} gemm {row['gemm_ms']:.4f} onednn {row['onednn_ms']:.4f}"
                      f"{torch_conv} ms", flush=True)
    point = crossover(rows)
    print(f"crossover: the GEMMs win from {point:,d} MACs on (default threshold: "
          f"{fastaspp._ext._C.CPU_DIRECT_MAX_MACS:,d})")
    slower = [r for r in rows if r["default_ms"] > r["eager_ms"]]
    print(f"default pick slower than eager: {len(slower)} of {len(rows)} shapes")
    for r in slower:
        print(f"  c{r['channels']} {r['size']}x{r['size']} r{r['rate']}: {r['default_ms'] / r['eager_ms']:.2f}x eager")
    if args.out:
        write_result(args.out, "cpu-direct-crossover", {"crossover_macs": point, "rows": rows})


if __name__ == "__main__":
    main()
