"""Whole DeepLabV3 models: fused (fastaspp ops) against the plain PyTorch model with the same
weights, and torch.compile of the plain one; eval forward at 513x513 and a training step (forward,
backward and an SGD step on a 321x321 crop, batch 2 at least: the paper's crop)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import torch

import fastaspp
from fastaspp.bench.report import Row, max_error
from fastaspp.bench.timing import alternate, peak_memory_mb
from fastaspp.geometry import conv_flops

MODEL_NAMES = ("deeplabv3_resnet50", "deeplabv3_resnet101", "deeplabv3_mobilenet_v3_large")
TRAIN_CROP = 321


@dataclass(frozen=True)
class ModelCase:
    """A model and its options (keyword arguments of its builder), named by label in result rows."""

    label: str
    name: str
    options: Tuple[Tuple[str, object], ...] = ()


# Every model and option combination the CPU goals cover: both ResNets at output stride 8 and 16,
# Multi-Grid, the cascade head, and MobileNetV3.
MODEL_CASES = (
    ModelCase("resnet50-os8", "deeplabv3_resnet50", (("output_stride", 8),)),
    ModelCase("resnet50-os16", "deeplabv3_resnet50", (("output_stride", 16),)),
    ModelCase("resnet101-os8", "deeplabv3_resnet101", (("output_stride", 8),)),
    ModelCase("resnet101-os16", "deeplabv3_resnet101", (("output_stride", 16),)),
    ModelCase("resnet50-os16-mg124", "deeplabv3_resnet50", (("output_stride", 16), ("multi_grid", (1, 2, 4)))),
    ModelCase("resnet50-os16-cascade", "deeplabv3_resnet50", (("output_stride", 16), ("head", "cascade"))),
    ModelCase("mobilenet_v3_large", "deeplabv3_mobilenet_v3_large"),
)
# On a GPU, the three models at their defaults (a GPU session's device time is short).
GPU_MODEL_CASES = tuple(ModelCase(name.replace("deeplabv3_", ""), name) for name in MODEL_NAMES)


def model_pair(name: str, dtype: torch.dtype, device: torch.device, num_classes: int = 21, **options):
    """(plain, fused) models of `name` (built with `options`) with the same random weights and BN statistics."""
    build = getattr(fastaspp.models, name)
    torch.manual_seed(0)
    plain = build(num_classes=num_classes, fused=False, **options)
    with torch.no_grad():
        for m in plain.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    fused = build(num_classes=num_classes, fused=True, **options)
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


def measure(case: ModelCase, batch: int, mode: str, dtype: torch.dtype, device: torch.device, size: int = 513,
            compile_baseline: bool = False, reps: int = 3, rounds: int = 2, cuda_graphs: bool = False) -> Row:
    """One row: plain against fused. A training step is forward, backward and an SGD step (momentum
    0.9) of each model's own optimizer. With cuda_graphs (eval on a GPU), both sides run as captured
    CUDA graphs, so the row compares device time without the host's per-op cost."""
    if mode not in ("eval", "train"):
        raise ValueError(f"mode must be 'eval' or 'train', got {mode!r}")
    if cuda_graphs and (mode != "eval" or device.type != "cuda"):
        raise ValueError("cuda_graphs applies to eval rows on a CUDA device")
    plain, fused = model_pair(case.name, dtype, device, **dict(case.options))
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

        optimizer = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)

        def run():
            out = model(next_x())["out"]
            optimizer.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(out.float(), target).backward()
            optimizer.step()
        return run

    for m in (plain, fused):
        m.train(mode == "train")
    fns = [step(plain), step(fused)]
    if compile_baseline:
        fns.append(step(torch.compile(plain, mode="max-autotune" if device.type == "cuda" else None)))
    grad = torch.no_grad() if mode == "eval" else torch.enable_grad()
    with grad:
        if mode == "eval":
            err, scale = max_error([(fused(xs[0])["out"], plain(xs[0])["out"])])
        else:
            err, scale = float("nan"), None  # dropout masks: compared in tests/test_train.py
        times = alternate(fns, device, warmup=1, reps=reps, rounds=rounds)
        mems = [peak_memory_mb(fn, device) for fn in fns[:2]]
    if mode == "train":
        useful, dense = 3 * useful, 3 * dense
    return Row(f"model {mode}" + (" cuda-graph" if cuda_graphs else ""), f"{case.label}-{size}", batch,
               str(dtype).replace("torch.", ""), str(device),
               fastaspp.resolve_backend(device), times[0].median_ms, times[1].median_ms, times[0].spread_ms,
               times[1].spread_ms, useful, dense, err, times[2].median_ms if compile_baseline else None, *mems,
               eager_max_abs=scale)


# Multi-scale eval (the paper's inference): one timed call runs the image at every scale, so kept
# weight preparations must serve every size at once (docs/design.md §9, §12).
MULTISCALE = (0.5, 0.75, 1.0)
MODEL_MULTISCALE_LABELS = ("resnet50-os16", "resnet101-os8")


def measure_multiscale(case: ModelCase, dtype: torch.dtype, device: torch.device, size: int = 513,
                       scales: Sequence[float] = MULTISCALE, reps: int = 2, rounds: int = 2) -> Row:
    """One row: plain against fused in eval, each call a forward at every scale of a size x size image
    (batch 1), as multi-scale inference runs them."""
    plain, fused = model_pair(case.name, dtype, device, **dict(case.options))
    gen = torch.Generator().manual_seed(0)
    sides = [int(size * s) for s in scales]
    xs = [torch.randn(1, 3, side, side, generator=gen).to(device, dtype, memory_format=torch.channels_last)
          for side in sides]
    useful = dense = 0.0
    for x in xs:
        u, d = model_flops(plain, x)
        useful, dense = useful + u, dense + d
    fns = [lambda m=m: [m(x)["out"] for x in xs] for m in (plain.eval(), fused.eval())]
    with torch.no_grad():
        err, scale = max_error((fused(x)["out"], plain(x)["out"]) for x in xs)
        times = alternate(fns, device, warmup=1, reps=reps, rounds=rounds)
    return Row("model eval multi-scale", f"{case.label}-{'/'.join(map(str, sides))}", 1,
               str(dtype).replace("torch.", ""), str(device), fastaspp.resolve_backend(device), times[0].median_ms,
               times[1].median_ms, times[0].spread_ms, times[1].spread_ms, useful, dense, err, eager_max_abs=scale)


def run(cases: Sequence[ModelCase], batches: Sequence[int], modes: Sequence[str], dtype, device, size: int = 513,
        compile_baseline: bool = False, progress: Optional[Callable[[Row], None]] = None,
        cuda_graphs: bool = False) -> List[Row]:
    """Rows per model case, batch and mode: eval at size x size, training steps at TRAIN_CROP with a
    batch of at least 2 (batch statistics); with cuda_graphs (GPU), each eval row again with both
    sides captured in CUDA graphs."""
    rows = []
    for case in cases:
        for batch in batches:
            for mode in modes:
                graphs = [False, True] if cuda_graphs and mode == "eval" and device.type == "cuda" else [False]
                for graph in graphs:
                    train = mode == "train"
                    rows.append(measure(case, max(batch, 2) if train else batch, mode, dtype, device,
                                        TRAIN_CROP if train else size, compile_baseline and not graph,
                                        cuda_graphs=graph))
                    if progress:
                        progress(rows[-1])
    return rows
