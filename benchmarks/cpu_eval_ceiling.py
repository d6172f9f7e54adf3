"""How fast can an ASPP eval forward get on this CPU? Floors for two algorithms, measured in one run
against the eager reference ASPP and fastaspp.nn.ASPP.

- direct: the useful (live-tap) FLOPs at the machine's matmul rate (docs/design.md §2), measured in the
  same run. No kernel that performs each live multiply-add can beat it.
- winograd: each 3x3 branch of rate r split into its r x r sub-grids (pixels of equal residue mod r),
  where the atrous conv becomes a plain 3x3 conv with unit spacing (zeros beyond the map). Per axis,
  a sub-grid of s pixels costs 1 product if s = 1, 3 if s = 2 (a 2x2 Toeplitz matrix-vector product
  as F(2,2) with the weights as data), and tiles * (m + 2) for F(m,3) tiles with m <= 6 otherwise.
  The floor times the 1x1 branch, the projection and, per rate, the cheaper of oneDNN's conv and the
  batched GEMM over the alpha_h * alpha_w transform points alone (transforms and their memory
  traffic are free).

`--check` also runs those transforms (fp64 exactness, fp32 error) on a small random conv per rate,
so that the products counted are ones that compute the conv.

    python benchmarks/cpu_eval_ceiling.py [--size 33] [--rates 6 12 18] [--check] [--out benchmarks/results]
"""
import argparse
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn.functional as F

from fastaspp.bench.aspp import AsppShape, aspp_pair
from fastaspp.bench.report import environment
from fastaspp.bench.timing import alternate, measure_peak_tflops

POINTS = [0.0, 1.0, -1.0, 2.0, -2.0, 0.5, -0.5]  # Toom-Cook points, infinity added last


def toom_cook(m: int, r: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(AT [m, a], G [a, r], BT [a, a]), a = m + r - 1, with y_i = sum_k g_k d_(i+k) = AT ((G g) * (BT d)):
    the transpose of polynomial multiplication by evaluation at a points and interpolation."""
    a = m + r - 1

    def evaluation(k: int) -> np.ndarray:
        e = np.zeros((a, k))
        for i, p in enumerate(POINTS[:a - 1]):
            e[i] = [p ** j for j in range(k)]
        e[a - 1, k - 1] = 1.0  # infinity: the leading coefficient
        return e

    return evaluation(m).T, evaluation(r), np.linalg.inv(evaluation(a)).T


def axis_plan(s: int):
    """Transforms of one axis of a sub-grid of s pixels: (m, tiles, Mw [a, 3], Mx [a, m + 2], P [m, a])
    with y = P ((Mw w) * (Mx d)) per tile, d the tile's m inputs with one halo pixel each side."""
    if s == 1:
        centre = np.array([[0.0, 1.0, 0.0]])
        return 1, 1, centre, centre, np.ones((1, 1))
    if s == 2:
        # [y0, y1] = [[w1, w2], [w0, w1]] x: reversed, a correlation of the data (w0, w1, w2) with the
        # filter (x0, x1), so F(2,2) with the roles swapped: 3 products instead of 4.
        at, g, bt = toom_cook(2, 2)
        mx = np.zeros((3, 4))
        mx[:, 1:3] = g
        return 2, 1, bt, mx, at[::-1].copy()
    tiles = math.ceil(s / 6)
    m = math.ceil(s / tiles)
    at, g, bt = toom_cook(m, 3)
    return m, tiles, g, bt, at


def winograd_conv(x: torch.Tensor, w: torch.Tensor, rate: int) -> torch.Tensor:
    """conv2d(x, w, padding=rate, dilation=rate) through the sub-grid transforms above (reference
    speed, for --check only)."""
    n, c, h, wd = x.shape
    plans = [axis_plan(math.ceil(size / rate)) for size in (h, wd)]
    (mh, th, mwh, mxh, ph), (mw, tw, mww, mxw, pw) = [
        (m, t) + tuple(torch.tensor(a, dtype=x.dtype) for a in mats) for m, t, *mats in plans]
    lh, lw = mh * th, mw * tw
    u = torch.einsum("ak,oikl,bl->abio", mwh, w, mww)
    xp = F.pad(x.permute(0, 2, 3, 1), (0, 0, 0, rate * lw - wd, 0, rate * lh - h))
    sub = F.pad(xp.view(n, lh, rate, lw, rate, c).permute(0, 2, 4, 1, 3, 5), (0, 0, 1, 1, 1, 1))
    tiles = sub.unfold(3, mh + 2, mh).unfold(4, mw + 2, mw)  # [n, a, b, th, tw, c, mh+2, mw+2]
    v = torch.einsum("pi,nabstcij,qj->pqnabstc", mxh, tiles, mxw)
    prod = torch.einsum("pqnabstc,pqco->pqnabsto", v, u)
    y = torch.einsum("ip,pqnabsto,jq->nsiatjbo", ph, prod, pw).reshape(n, lh * rate, lw * rate, -1)
    return y[:, :h, :wd].permute(0, 3, 1, 2)


def winograd_gemm_shape(batch: int, size: int, rate: int) -> tuple[int, int]:
    """(transform points, rows) of a rate's batched Winograd GEMM on a size x size map."""
    _, tiles, mw, _, _ = axis_plan(math.ceil(size / rate))
    points = mw.shape[0] ** 2
    return points, batch * min(rate, size) ** 2 * tiles ** 2


def check(rates: list[int], size: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    rows = []
    for r in rates:
        x = torch.randn(2, 64, size, size, generator=gen, dtype=torch.float64)
        w = torch.randn(32, 64, 3, 3, generator=gen, dtype=torch.float64)
        ref = F.conv2d(x, w, padding=r, dilation=r)
        scale = ref.abs().max().item()
        err64 = (winograd_conv(x, w, r) - ref).abs().max().item() / scale
        err32 = (winograd_conv(x.float(), w.float(), r).double() - ref).abs().max().item() / scale
        direct32 = (F.conv2d(x.float(), w.float(), padding=r, dilation=r).double() - ref).abs().max().item() / scale
        assert err64 < 1e-12, f"rate {r}: the transforms do not compute the conv (fp64 error {err64:.1e})"
        rows.append({"rate": r, "fp64_rel_err": err64, "fp32_rel_err": err32, "fp32_direct_rel_err": direct32})
        print(f"rate {r:>2}: fp64 error {err64:.1e}; fp32 error {err32:.1e} (direct conv in fp32: {direct32:.1e})")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=33)
    parser.add_argument("--rates", type=int, nargs="+", default=[6, 12, 18])
    parser.add_argument("--c-in", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    cpu, c, batch, size = torch.device("cpu"), 256, args.batch, args.size
    checks = check(args.rates, size) if args.check else []

    shape = AsppShape(f"aspp-{size}-{tuple(args.rates)}", args.c_in, size, tuple(args.rates), c)
    eager, fused = (m.eval() for m in aspp_pair(shape, torch.float32, cpu))
    x = torch.randn(batch, args.c_in, size, size).contiguous(memory_format=torch.channels_last)
    pixels = batch * size * size

    gen = torch.Generator().manual_seed(1)
    w = torch.randn(args.c_in, c, generator=gen)
    one_by_one = torch.randn(pixels, args.c_in, generator=gen)
    proj_in, proj_w = torch.randn(pixels, (len(args.rates) + 1) * c, generator=gen), torch.randn(
        (len(args.rates) + 1) * c, c, generator=gen)
    conv_w = torch.randn(c, args.c_in, 3, 3, generator=gen).contiguous(memory_format=torch.channels_last)
    wino = {}
    for r in args.rates:
        points, rows = winograd_gemm_shape(batch, size, r)
        wino[r] = (torch.randn(points, rows, args.c_in, generator=gen),
                   torch.randn(points, args.c_in, c, generator=gen))

    def eager_call():
        with torch.no_grad():
            eager(x)

    def fused_call():
        with torch.no_grad():
            fused(x)

    def conv_call(r):
        with torch.no_grad():
            F.conv2d(x, conv_w, padding=r, dilation=r)

    fns = [eager_call, fused_call, lambda: one_by_one @ w, lambda: proj_in @ proj_w]
    fns += [lambda r=r: conv_call(r) for r in args.rates]
    fns += [lambda r=r: torch.bmm(*wino[r]) for r in args.rates]
    t = [timing.median_ms for timing in alternate(fns, cpu, warmup=2, reps=5, rounds=args.rounds)]
    t_eager, t_fused, t_1x1, t_proj = t[:4]
    t_conv = dict(zip(args.rates, t[4:4 + len(args.rates)]))
    t_wino = dict(zip(args.rates, t[4 + len(args.rates):]))
    peak_tflops = measure_peak_tflops(cpu, torch.float32)

    direct_floor = shape.flops(batch)[0] / peak_tflops / 1e9
    wino_floor = t_1x1 + t_proj + sum(min(t_conv[r], t_wino[r]) for r in args.rates)
    print(f"ASPP eval, {args.c_in}->{c}, {size}x{size}, rates {args.rates}, batch {batch}, fp32, "
          f"{torch.get_num_threads()} threads")
    print(f"eager {t_eager:.1f} ms, fastaspp {t_fused:.1f} ms ({t_eager / t_fused:.2f}x)")
    print(f"direct floor {direct_floor:.1f} ms (useful FLOPs at {peak_tflops * 1e3:.0f} GFLOP/s): "
          f"at most {t_eager / direct_floor:.2f}x eager")
    for r in args.rates:
        points, rows = winograd_gemm_shape(batch, size, r)
        print(f"  rate {r:>2}: oneDNN conv {t_conv[r]:.1f} ms, Winograd GEMM ({points} x [{rows}, {args.c_in}] @ "
              f"[{args.c_in}, {c}]) {t_wino[r]:.1f} ms, transformed weights {points * args.c_in * c * 4 / 1e6:.0f} MB")
    print(f"winograd floor {wino_floor:.1f} ms: at most {t_eager / wino_floor:.2f}x eager")
    if args.out:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        path = os.path.join(args.out, f"cpu-eval-ceiling-{stamp}.json")
        result = {"environment": environment(), "shape": shape.name, "batch": batch, "eager_ms": t_eager,
                  "fused_ms": t_fused, "peak_tflops": peak_tflops, "direct_floor_ms": direct_floor,
                  "winograd_floor_ms": wino_floor,
                  "one_by_one_ms": t_1x1, "projection_ms": t_proj,
                  "rates": [{"rate": r, "onednn_conv_ms": t_conv[r], "winograd_gemm_ms": t_wino[r],
                             "winograd_points_rows": winograd_gemm_shape(batch, size, r)} for r in args.rates],
                  "checks": checks}
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
