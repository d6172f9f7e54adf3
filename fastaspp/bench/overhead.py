"""Fixed cost per call: fastaspp's fused paths against the eager PyTorch they replace, on inputs so
small that the time is almost all host overhead (argument checks, dispatch, weight preparation,
allocation), plus whole models at small inputs.

Workloads, each eval (a forward under no_grad) and train (forward + backward, every parameter and
the input taking a gradient, no optimizer step: the same on both sides):
  * op: fastaspp.ops.atrous_conv2d(x, W, scale=, shift=, relu=True) against conv2d → affine → relu;
  * convbnrelu: fastaspp.nn.ConvBNReLU against nn.Sequential(Conv2d, BatchNorm2d, ReLU);
  * aspp: fastaspp.nn.ASPP against the plain ASPP module (torchvision's layout);
  * the three models, fused=True against fused=False, at 33x33, 65x65 and 129x129;
  * convbnrelu again at mid sizes (MID_CONVS: 0.9-8 M live multiply-adds, between the tiny inputs
    and the conv bench's), where the cpu backend switches between its direct loops and torch's conv.
A sample times `calls` back-to-back calls (so that the clock's resolution and the loop do not
count) and reports the time of one; eager and fused are interleaved in rounds.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F

import fastaspp
from fastaspp import reference
from fastaspp.bench.aspp import AsppShape, aspp_pair
from fastaspp.bench.models import model_flops, model_pair
from fastaspp.bench.report import Row, max_error
from fastaspp.bench.timing import alternate
from fastaspp.geometry import conv_flops

MODES = ("eval", "train")


@dataclasses.dataclass(frozen=True)
class TinyConv:
    """A 3x3 atrous conv small enough that its fixed cost dominates."""
    c_in: int = 8
    c_out: int = 8
    size: int = 6
    rate: int = 2

    @property
    def name(self) -> str:
        return f"{self.c_in}x{self.size}x{self.size}-{self.c_out}-r{self.rate}"

    def flops(self, batch: int) -> tuple[int, int]:
        return conv_flops((batch, self.c_in, self.size, self.size), (self.c_out, self.c_in, 3, 3), (1, 1),
                          (self.rate, self.rate), (self.rate, self.rate))


TINY_CONV = TinyConv()
# Mostly live 3x3 convs, and one with few live pairs, from 0.9 to 8 M live multiply-adds at batch 1.
MID_CONVS = (TinyConv(32, 32, 17, 1), TinyConv(64, 64, 9, 1), TinyConv(128, 128, 5, 1), TinyConv(256, 256, 5, 2),
             TinyConv(64, 64, 9, 6))
TINY_ASPP = AsppShape("16x5x5-(6,12,18)-16", 16, 5, (6, 12, 18), 16)
MODEL_SIZES = (33, 65, 129)


def _batch(mode: str) -> int:
    return 2 if mode == "train" else 1  # train: BatchNorm needs more than one value per channel


def _inputs(shape: Sequence[int], mode: str, device, dtype, count: int = 2) -> List[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=gen).to(device, dtype, memory_format=torch.channels_last)
            .requires_grad_(mode == "train") for _ in range(count)]


def _cycle(xs: List[torch.Tensor]) -> Callable[[], torch.Tensor]:
    state = {"i": 0}

    def next_x() -> torch.Tensor:
        state["i"] = (state["i"] + 1) % len(xs)
        return xs[state["i"]]
    return next_x


def _step(forward: Callable[[torch.Tensor], torch.Tensor], next_x, mode: str) -> Callable[[], object]:
    if mode == "eval":
        return lambda: forward(next_x())
    return lambda: forward(next_x()).sum().backward()


def _time(fns: List[Callable[[], object]], mode: str, device, calls: int, reps: int, rounds: int):
    """Per-call timings of each fn (eager first), `calls` calls per sample, in rounds."""
    looped = [(lambda fn=fn: [fn() for _ in range(calls)]) for fn in fns]
    with torch.no_grad() if mode == "eval" else torch.enable_grad():
        timings = alternate(looped, device, warmup=1, reps=reps, rounds=rounds)
    return [dataclasses.replace(t, median_ms=t.median_ms / calls, spread_ms=t.spread_ms / calls) for t in timings]


def _row(kind: str, shape: str, batch: int, dtype, device, timings, flops, err: float, scale) -> Row:
    eager, fused = timings
    return Row(kind, shape, batch, str(dtype).replace("torch.", ""), str(device), fastaspp.resolve_backend(device),
               eager.median_ms, fused.median_ms, eager.spread_ms, fused.spread_ms, flops[0], flops[1], err,
               eager_max_abs=scale)


def _compare(kind: str, mode: str, eager, fused, x_shape: Sequence[int], shape_name: str, flops, dtype, device,
             calls: int, reps: int, rounds: int, err_in_train: bool = False) -> Row:
    """One row: eager against fused on random inputs of x_shape (the max abs error in eval, and in
    training when err_in_train: modules with dropout draw different masks), timed in rounds."""
    xs = _inputs(x_shape, mode, device, dtype)
    err, scale = float("nan"), None
    if mode == "eval" or err_in_train:
        with torch.no_grad():
            err, scale = max_error([(fused(xs[0]), eager(xs[0]))])
    next_x = _cycle(xs)
    timings = _time([_step(eager, next_x, mode), _step(fused, next_x, mode)], mode, device, calls, reps, rounds)
    if mode == "train":  # forward + backward: about three forwards of work
        flops = (3 * flops[0], 3 * flops[1])
    return _row(f"overhead {kind} {mode}", shape_name, x_shape[0], dtype, device, timings, flops, err, scale)


def measure_op(mode: str, dtype=torch.float32, device=torch.device("cpu"), shape: TinyConv = TINY_CONV,
               calls: int = 50, reps: int = 5, rounds: int = 3) -> Row:
    """fastaspp.ops.atrous_conv2d against conv2d → per-channel affine → relu (the functional call)."""
    batch = _batch(mode)
    gen = torch.Generator().manual_seed(1)
    make = lambda *s: torch.randn(*s, generator=gen).to(device, dtype).requires_grad_(mode == "train")  # noqa: E731
    weight, scale, shift = make(shape.c_out, shape.c_in, 3, 3), make(shape.c_out), make(shape.c_out)
    conv = dict(padding=shape.rate, dilation=shape.rate)

    def eager(x):
        y = F.conv2d(x, weight, None, **conv)
        return F.relu(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1))

    def fused(x):
        return fastaspp.ops.atrous_conv2d(x, weight, None, scale=scale, shift=shift, relu=True, **conv)

    return _compare("op", mode, eager, fused, (batch, shape.c_in, shape.size, shape.size), shape.name,
                    shape.flops(batch), dtype, device, calls, reps, rounds, err_in_train=True)


def measure_convbnrelu(mode: str, dtype=torch.float32, device=torch.device("cpu"), shape: TinyConv = TINY_CONV,
                       calls: int = 50, reps: int = 5, rounds: int = 3) -> Row:
    """fastaspp.nn.ConvBNReLU against nn.Sequential(Conv2d, BatchNorm2d, ReLU) with the same state."""
    batch = _batch(mode)
    torch.manual_seed(0)
    eager = reference.conv_bn_relu(shape.c_in, shape.c_out, 3, padding=shape.rate, dilation=shape.rate)
    with torch.no_grad():
        eager[1].running_mean.uniform_(-0.5, 0.5)
        eager[1].running_var.uniform_(0.5, 2.0)
    fused = fastaspp.nn.ConvBNReLU(shape.c_in, shape.c_out, 3, padding=shape.rate, dilation=shape.rate)
    fused.load_state_dict(eager.state_dict())
    for m in (eager, fused):
        m.to(device, dtype, memory_format=torch.channels_last).train(mode == "train")
    return _compare("convbnrelu", mode, eager, fused, (batch, shape.c_in, shape.size, shape.size), shape.name,
                    shape.flops(batch), dtype, device, calls, reps, rounds)


def measure_aspp(mode: str, dtype=torch.float32, device=torch.device("cpu"), shape: AsppShape = TINY_ASPP,
                 calls: int = 20, reps: int = 5, rounds: int = 3) -> Row:
    """fastaspp.nn.ASPP against the plain ASPP module with the same state."""
    batch = _batch(mode)
    eager, fused = aspp_pair(shape, dtype, device)
    for m in (eager, fused):
        m.train(mode == "train")
    return _compare("aspp", mode, eager, fused, (batch, shape.c_in, shape.size, shape.size), shape.name,
                    shape.flops(batch), dtype, device, calls, reps, rounds)


def measure_model(name: str, size: int, mode: str, dtype=torch.float32, device=torch.device("cpu"),
                  reps: int = 3, rounds: int = 3) -> Row:
    """A whole model, fused=True against fused=False with the same state: eval forward, or a training
    forward + backward of the cross-entropy loss (train mode: batch statistics, dropout)."""
    batch = _batch(mode)
    plain, fused = model_pair(name, dtype, device)
    xs = _inputs((batch, 3, size, size), "eval", device, dtype)  # the image takes no gradient
    target = torch.randint(0, 21, (batch, size, size), generator=torch.Generator().manual_seed(0)).to(device)
    useful, dense = model_flops(plain, xs[0])
    err, scale = float("nan"), None
    if mode == "eval":
        with torch.no_grad():
            err, scale = max_error([(fused.eval()(xs[0])["out"], plain.eval()(xs[0])["out"])])
    for m in (plain, fused):
        m.train(mode == "train")
    next_x = _cycle(xs)

    def step(model):
        if mode == "eval":
            return lambda: model(next_x())["out"]
        return lambda: F.cross_entropy(model(next_x())["out"].float(), target).backward()

    timings = _time([step(plain), step(fused)], mode, device, 1, reps, rounds)
    if mode == "train":
        useful, dense = 3 * useful, 3 * dense
    return _row(f"overhead model {mode}", f"{name}-{size}", batch, dtype, device, timings, (useful, dense), err,
                scale)


def run(dtype=torch.float32, device=torch.device("cpu"), models: Sequence[str] = (),
        sizes: Sequence[int] = MODEL_SIZES, modes: Sequence[str] = MODES,
        progress: Optional[Callable[[Row], None]] = None, mid_convs: Sequence[TinyConv] = MID_CONVS) -> List[Row]:
    rows = []

    def add(row: Row) -> None:
        rows.append(row)
        if progress:
            progress(row)

    for mode in modes:
        add(measure_op(mode, dtype, device))
        add(measure_convbnrelu(mode, dtype, device))
        add(measure_aspp(mode, dtype, device))
    for mode in modes:
        for shape in mid_convs:
            add(measure_convbnrelu(mode, dtype, device, shape, calls=10))
    for name in models:
        for size in sizes:
            for mode in modes:
                add(measure_model(name, size, mode, dtype, device))
    return rows
