"""Where Winograd beats oneDNN for a single 3x3 conv: the rule against oneDNN in csrc/cpu/winograd.cpp.

For a sweep of the backbone's 3x3 conv + BN + ReLU shapes (eval, channels_last, fp32, stride 1,
padding = dilation = rate) it times, in one run and interleaved: eager PyTorch (oneDNN conv, then
BN and ReLU), and the fused layer forced onto each of the two paths the rule chooses between
(FASTASPP_CPU_WINOGRAD=0: oneDNN with the fold as post-ops; =1: Winograd), and reports which of
the two the rule picks by default (the default's bits equal one forced path's; where both forced
runs give the same bits, the conv is small enough for the direct loops and neither runs). A shape where the
rule's pick is more than 10% slower than the other path is listed as a miss.

    python benchmarks/cpu_winograd_crossover.py [--threads 2] [--out benchmarks/results]
"""
import math

import torch

from fastaspp.bench.timing import alternate

from _crossover import conv_bn_relu_pair, parse_args, with_env, write_result

CHANNELS = (64, 128, 256, 512)
RATES = (1, 2, 4)
SIZES = (17, 25, 33, 49, 65)
MISS = 1.10  # the rule's pick may be this much slower than the other path before it counts as a miss


def winograd_forced(flag: str, fn):
    """fn with FASTASPP_CPU_WINOGRAD set for the call."""
    return with_env({"FASTASPP_CPU_WINOGRAD": flag}, fn)


def measure(c: int, size: int, rate: int, batch: int, reps: int, calls: int) -> dict:
    eager, fused, x = conv_bn_relu_pair(c, size, rate, batch)
    loop = lambda fn: (lambda: [fn() for _ in range(calls)])  # noqa: E731
    fns = [loop(lambda: eager(x)), loop(winograd_forced("0", lambda: fused(x))),
           loop(winograd_forced("1", lambda: fused(x)))]
    with torch.no_grad():
        eager_t, onednn_t, winograd_t = alternate(fns, torch.device("cpu"), warmup=1, reps=reps, rounds=3)
        default, on_winograd = fused(x), winograd_forced("1", lambda: fused(x))()
        on_onednn = winograd_forced("0", lambda: fused(x))()
    picks = [name for name, out in (("winograd", on_winograd), ("onednn", on_onednn)) if torch.equal(default, out)]
    if not picks:
        raise RuntimeError(f"c{c} {size}x{size} r{rate}: the default's bits match neither forced path")
    per = lambda t: t.median_ms / calls  # noqa: E731
    return dict(channels=c, size=size, rate=rate, batch=batch,
                rule_picks=picks[0] if len(picks) == 1 else "neither (the direct loops)",
                eager_ms=per(eager_t), onednn_ms=per(onednn_t), winograd_ms=per(winograd_t))


def misses(rows) -> list:
    """The shapes where the rule's pick is more than MISS times slower than the other path."""
    out = []
    for r in rows:
        if r["rule_picks"] not in ("winograd", "onednn"):
            continue
        picked, other = ("winograd_ms", "onednn_ms") if r["rule_picks"] == "winograd" else ("onednn_ms", "winograd_ms")
        if r[picked] > MISS * r[other]:
            out.append(r)
    return out


def main() -> None:
    args = parse_args(__doc__)
    rows = []
    for c in CHANNELS:
        for rate in RATES:
            for size in SIZES:
                macs = c * c * 9 * size * size
                row = measure(c, size, rate, 1, args.reps, calls=max(1, math.ceil(2e8 / macs)))
                rows.append(row)
                print(f"c{c:4d} {size:3d}x{size:<3d} r{rate}: "
                      f"eager {row['eager_ms']:.3f} onednn {row['onednn_ms']:.3f} winograd {row['winograd_ms']:.3f} ms"
                      f" -> {row['rule_picks']} (onednn/winograd {row['onednn_ms'] / row['winograd_ms']:.2f})",
                      flush=True)
    missed = misses(rows)
    print(f"{len(missed)} of {len(rows)} shapes where the rule's pick is more than {MISS:.2f}x slower than the other "
          f"path" + "".join(f"\n  c{r['channels']} {r['size']}x{r['size']} r{r['rate']}" for r in missed))
    if args.out:
        shapes = [(r["channels"], r["size"], r["rate"]) for r in missed]
        write_result(args.out, "cpu-winograd-crossover", {"miss_factor": MISS, "misses": shapes, "rows": rows})


if __name__ == "__main__":
    main()
