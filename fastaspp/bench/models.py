"""Whole DeepLabV3 models: fused (fastaspp ops) against the plain PyTorch model with the same
weights, and torch.compile of the plain one; eval forward and a training step (forward + backward)."""
from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch

import fastaspp
from fastaspp.bench.report import Row
from fastaspp.bench.timing import alternate, peak_memory_mb
from fastaspp.geometry import conv_flops

MODEL_NAMES = ("deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large")


def model_pair(name: str, dtype: torch.dtype, device: torch.device, num_classes: int = 21):
    """(plain, fused) models of `name` with the same random weights and BN statistics."""
    build = getattr(fastaspp.models, name)
    torch.manual_seed(0)
    plain = build(num_classes=num_classes, fused=False)
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    fused = build(num_classes=num_classes, fused=True)
    fused.load_state_dict(plain.state_dict())
    to = dict(device=device, dtype=dtype, memory_format=torch.channels_last)
    return plain.to(**to), fused.to(**to)


def model_flops(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(useful, dense) FLOPs of the model's convolutions for input x (every Conv2d, counted by a
    forward hook; useful counts only live taps), the bulk of a DeepLabV3's work."""
    totals = [0.0, 0.0]

    def hook(conv, inputs, output):
        padding = conv.padding if isinstance(conv.padding, tuple) else (0, 0)  # the models use int padding
        useful, dense = conv_flops(tuple(inputs[0].shape), tuple(conv.weight.shape), conv.stride, padding,
                                   conv.dilation)
        totals[0] += useful / conv.groups  # a grouped conv reduces over in_channels / groups
        totals[1] += dense / conv.groups

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return totals[0], totals[1]


def measure(name: str, batch: int, mode: str, dtype: torch.dtype, device: torch.device, size: int = 513,
            compile_baseline: bool = False, reps: int = 3, rounds: int = 2) -> Row:
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    plain, fused = model_pair(name, dtype, device)
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, 3, size, size, generator=gen).to(device, dtype, memory_format=torch.channels_last)
          for _ in range(2)]
    target = torch.randint(0, 21, (batch, size, size), generator=gen).to(device)
    useful, dense = model_flops(plain, xs[0])
    state = {"i": 0}

    def next_x():
        state["i"] = (state["i"] + 1) % len(xs)
        return xs[state["i"]]

    def step(model) -> Callable[[], object]:
        if mode == "eval":
            return lambda: model(next_x())["out"]

        def run():
            out = model(next_x())["out"]
            torch.nn.functional.cross_entropy(out.float(), target).backward()
        return run

    for m in (plain, fused):
        m.train(mode == "train")
    fns = [step(plain), step(fused)]
    if compile_baseline:
        fns.append(step(torch.compile(plain, mode="max-autotune" if device.type == "cuda" else None)))
    grad = torch.no_grad() if mode == "eval" else torch.enable_grad()
    with grad:
        if mode == "eval":
            err = (fused(xs[0])["out"].float() - plain(xs[0])["out"].float()).abs().max().item()
        else:
            err = float("nan")  # dropout masks: compared in tests/test_train.py
        times = alternate(fns, device, warmup=1, reps=reps, rounds=rounds)
        mems = [peak_memory_mb(fn, device) for fn in fns[:2]]
    if mode == "train":
        useful, dense = 3 * useful, 3 * dense
    return Row(f"model {mode}", f"{name}-{size}", batch, str(dtype).replace("torch.", ""), str(device),
               fastaspp.resolve_backend(device), times[0].median_ms, times[1].median_ms, times[0].spread_ms,
               times[1].spread_ms, useful, dense, err, times[2].median_ms if compile_baseline else None, *mems)


def run(names: Sequence[str], batches: Sequence[int], modes: Sequence[str], dtype, device, size: int = 513,
        compile_baseline: bool = False, progress: Optional[Callable[[Row], None]] = None) -> List[Row]:
    rows = []
    for name in names:
        for batch in batches:
            for mode in modes:
                rows.append(measure(name, max(batch, 2) if mode == "train" else batch, mode, dtype, device, size,
                                    compile_baseline))
                if progress:
                    progress(rows[-1])
    return rows
