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


def graphed(forward: Callable[[torch.Tensor], object], example: torch.Tensor) -> Callable[[torch.Tensor], object]:
    """forward captured in a CUDA graph (after a warm-up on a side stream): a call copies its input
    into the captured one and replays the graph, one launch for the whole model."""
    static_x = example.clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            forward(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = forward(static_x)

    def replay(x: torch.Tensor):
        static_x.copy_(x)
        graph.replay()
        return static_out
    return replay


def measure(name: str, batch: int, mode: str, dtype: torch.dtype, device: torch.device, size: int = 513,
            compile_baseline: bool = False, reps: int = 3, rounds: int = 2, cuda_graphs: bool = False) -> Row:
    """One row: plain against fused. With cuda_graphs (eval on a GPU), both sides run as captured CUDA
    graphs, so the row compares device time without the host's per-op cost."""
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    if cuda_graphs and (mode != "eval" or device.type != "cuda"):
        raise ValueError("cuda_graphs applies to eval rows on a CUDA device")
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
        if mode == "eval" and cuda_graphs:
            with torch.no_grad():
                replay = graphed(lambda x: model(x)["out"], xs[0])
            return lambda: replay(next_x())
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
    return Row(f"model {mode}" + (" cuda-graph" if cuda_graphs else ""), f"{name}-{size}", batch,
               str(dtype).replace("torch.", ""), str(device),
               fastaspp.resolve_backend(device), times[0].median_ms, times[1].median_ms, times[0].spread_ms,
               times[1].spread_ms, useful, dense, err, times[2].median_ms if compile_baseline else None, *mems)


def run(names: Sequence[str], batches: Sequence[int], modes: Sequence[str], dtype, device, size: int = 513,
        compile_baseline: bool = False, progress: Optional[Callable[[Row], None]] = None,
        cuda_graphs: bool = False) -> List[Row]:
    """Rows per model, batch and mode; with cuda_graphs (GPU), each eval row again with both sides
    captured in CUDA graphs."""
    rows = []
    for name in names:
        for batch in batches:
            for mode in modes:
                graphs = [False, True] if cuda_graphs and mode == "eval" and device.type == "cuda" else [False]
                for graph in graphs:
                    rows.append(measure(name, max(batch, 2) if mode == "train" else batch, mode, dtype, device, size,
                                        compile_baseline and not graph, cuda_graphs=graph))
                    if progress:
                        progress(rows[-1])
    return rows
