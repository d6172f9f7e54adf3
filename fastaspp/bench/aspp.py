"""fastaspp.nn.ASPP against the eager reference ASPP (torchvision's layout) and torch.compile of it.

Eval: a forward under no_grad. Train: a training step, forward + backward (no optimizer) with the
input's gradient as in a whole model, both modules in train mode. channels_last on both sides; the same weights.
"""
from __future__ import annotations

import dataclasses
from typing import List, Sequence

import torch

import fastaspp
from fastaspp import reference
from fastaspp.bench.report import Row, max_error
from fastaspp.bench.timing import alternate, peak_memory_mb
from fastaspp.geometry import conv_flops


@dataclasses.dataclass(frozen=True)
class AsppShape:
    name: str
    c_in: int
    size: int
    rates: tuple
    c: int = 256

    def flops(self, batch: int) -> tuple[int, int]:
        """(useful, dense) FLOPs of one eval forward: dense = eager's (every tap, the 5-branch concat)."""
        x = (batch, self.c_in, self.size, self.size)
        pixels = batch * self.size * self.size
        one_by_one = 2 * pixels * self.c_in * self.c
        useful = dense = one_by_one + 2 * batch * self.c_in * self.c  # 1x1 branch + pooling conv
        for r in self.rates:
            u, d = conv_flops(x, (self.c, self.c_in, 3, 3), (1, 1), (r, r), (r, r))
            useful, dense = useful + u, dense + d
        branches = len(self.rates) + 1
        useful += 2 * pixels * branches * self.c * self.c  # the pooling slice is a per-image bias
        dense += 2 * pixels * (branches + 1) * self.c * self.c
        return useful, dense


ASPP_SHAPES = [AsppShape("aspp-33-(6,12,18)", 2048, 33, (6, 12, 18)),
               AsppShape("aspp-65-(12,24,36)", 2048, 65, (12, 24, 36))]


def aspp_pair(shape: AsppShape, dtype, device):
    """The eager reference ASPP and fastaspp.nn.ASPP with the same weights (random BN statistics)."""
    gen = torch.Generator().manual_seed(0)
    eager = reference.ASPP(shape.c_in, shape.rates, shape.c)
    with torch.no_grad():
        for m in eager.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    fused = fastaspp.nn.ASPP(shape.c_in, shape.rates, shape.c)
    fused.load_state_dict(eager.state_dict())
    to = dict(device=device, dtype=dtype, memory_format=torch.channels_last)
    return eager.to(**to), fused.to(**to)


def measure(shape: AsppShape, batch: int, mode: str, dtype: torch.dtype, device: torch.device,
                 compile_baseline: bool = False, reps: int = 5, rounds: int = 3) -> Row:
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    if mode == "train" and batch < 2:
        raise ValueError("a training step needs batch >= 2: the pooling branch's BatchNorm sees one value "
                         "per channel at batch 1")
    eager, fused = aspp_pair(shape, dtype, device)
    # In training the input needs its gradient (it is the backbone's output), so backward does the
    # input gradient as well as the weight gradients: three forwards of work, as counted below.
    xs = [torch.randn(batch, shape.c_in, shape.size, shape.size, generator=torch.Generator().manual_seed(i))
          .to(device=device, dtype=dtype, memory_format=torch.channels_last).requires_grad_(mode == "train")
          for i in range(3)]
    state = {"i": 0}

    def next_x():
        state["i"] = (state["i"] + 1) % len(xs)
        return xs[state["i"]]

    for m in (eager, fused):
        m.train(mode == "train")
    if mode == "eval":
        def step(m):
            return lambda: m(next_x())
        grad = torch.no_grad()
    else:
        def step(m):
            def run():
                m(next_x()).sum().backward()
            return run
        grad = torch.enable_grad()
    fns = [step(eager), step(fused)]
    if compile_baseline:
        mode_arg = "max-autotune" if device.type == "cuda" else None
        fns.append(step(torch.compile(eager, mode=mode_arg)))
    with grad:
        if mode == "eval":
            x = xs[0]
            err, scale = max_error([(fused(x), eager(x))])
        else:
            err, scale = float("nan"), None  # dropout masks differ between the modules' calls; tests check training
        times = alternate(fns, device, warmup=2, reps=reps, rounds=rounds)
        mems = [peak_memory_mb(fn, device) for fn in fns[:2]]
    useful, dense = shape.flops(batch)
    if mode == "train":  # forward + backward: about three forwards of work
        useful, dense = 3 * useful, 3 * dense
    return Row(f"aspp {mode}", shape.name, batch, str(dtype).replace("torch.", ""), str(device),
               fastaspp.resolve_backend(device), times[0].median_ms, times[1].median_ms, times[0].spread_ms,
               times[1].spread_ms, useful, dense, err, times[2].median_ms if compile_baseline else None, *mems,
               eager_max_abs=scale)


def run(shapes: Sequence[AsppShape], batches: Sequence[int], modes: Sequence[str], dtype, device,
             compile_baseline: bool = False, progress=None) -> List[Row]:
    rows = []
    for shape in shapes:
        for batch in batches:
            for mode in modes:
                # Training needs batch >= 2 (pooling-branch BatchNorm); batch 1 rows train at 2.
                b = max(batch, 2) if mode == "train" else batch
                row = measure(shape, b, mode, dtype, device, compile_baseline)
                rows.append(row)
                if progress:
                    progress(row)
    return rows
