"""Where the cpu backend's direct loops stop paying: the threshold of csrc/cpu/direct_conv.h.

For a sweep of 3x3 conv + BN + ReLU shapes (eval, batch 1, channels_last, fp32) it times, in one
run and interleaved: eager PyTorch (oneDNN conv, then BN and ReLU), and the fused op forced onto
each of the cpu backend's forward paths (FASTASPP_CPU_DIRECT_MAX_MACS and FASTASPP_CPU_ONEDNN set
per call): the direct loops, the live-tap GEMMs, and oneDNN's conv with the fused epilogue; and
reports each shape's live multiply-adds. The crossover is the smallest MACs from which the GEMMs
beat the loops on every larger shape; the default threshold should sit there.

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
    live, _ = live_tap_pixels((size, size), (3, 3), (1, 1), (rate, rate), (rate, rate))
    loop = lambda fn: (lambda: [fn() for _ in range(calls)])  # noqa: E731
    fns = [loop(lambda: eager(x)), loop(forced(str(10**15), "0", lambda: fused(x))),
           loop(forced("-1", "0", lambda: fused(x))), loop(forced("-1", "1", lambda: fused(x)))]
    with torch.no_grad():
        eager_t, direct_t, gemm_t, onednn_t = alternate(fns, torch.device("cpu"), warmup=1, reps=reps, rounds=3)
    per = lambda t: t.median_ms / calls  # noqa: E731
    return dict(channels=c, size=size, rate=rate, macs=live * c * c, eager_ms=per(eager_t), direct_ms=per(direct_t),
                gemm_ms=per(gemm_t), onednn_ms=per(onednn_t))


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
                print(f"c{c:4d} {size:3d}x{size:<3d} r{rate:<2d} {row['macs']:>11,d} MACs: eager {row['eager_ms']:.4f}"
                      f" direct {row['direct_ms']:.4f} gemm {row['gemm_ms']:.4f} onednn {row['onednn_ms']:.4f} ms",
                      flush=True)
    point = crossover(rows)
    print(f"crossover: the GEMMs win from {point:,d} MACs on (default threshold: "
          f"{fastaspp._ext._C.CPU_DIRECT_MAX_MACS:,d})")
    if args.out:
        write_result(args.out, "cpu-direct-crossover", {"crossover_macs": point, "rows": rows})


if __name__ == "__main__":
    main()
