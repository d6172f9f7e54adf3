"""Training DeepLabV3 with the paper's protocol (`fastaspp train`, or `train(TrainConfig(...))`).

Protocol (arXiv 1706.05587 §4): random scale 0.5-2.0, crop padded with the ignore label, horizontal
flip; logits upsampled to the label size; cross-entropy ignoring 255; BN trained; SGD with momentum
0.9 and weight decay 1e-4; the "poly" learning rate lr·(1 - step/iters)^0.9 from 0.007. At the end,
BN running statistics are re-estimated over a few training batches without the random scale and flip
(recalibrate_bn).

Runs are resumable exactly: the sample order is a function of (seed, epoch), each sample's
augmentation of (seed, epoch, index) (see fastaspp.data.base), and a checkpoint holds the model,
optimizer, step and RNG states, so `--resume DIR/last.pt` continues as if never stopped. A resume
refuses a configuration that would change the run (RESUME_FIELDS) unless allow_config_change, and
drops the log lines past the checkpoint's step. A run never writes into a directory that holds
something else unless told to overwrite. SIGINT or SIGTERM ends the current step, saves, and raises
TrainingInterrupted (a second SIGINT stops at once).

Distributed: under torchrun (WORLD_SIZE > 1) each rank trains on its share of every batch with
DistributedDataParallel and fastaspp's SyncBatchNorm2d (gloo on CPU, nccl on GPU); rank 0 logs and
writes checkpoints. --batch-size is the global batch.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import signal
import threading
import time
from typing import Iterator, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fastaspp
from fastaspp import models
from fastaspp.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from fastaspp.data import IGNORE_INDEX, TrainTransform, build_dataset
from fastaspp.data.base import listing
from fastaspp.devices import resolve_device

MODELS = {"deeplabv3_resnet50": models.deeplabv3_resnet50, "deeplabv3_resnet101": models.deeplabv3_resnet101,
          "deeplabv3_mobilenet_v3_large": models.deeplabv3_mobilenet_v3_large}
DEFAULT_OUTPUT_STRIDE = {"deeplabv3_resnet50": 8, "deeplabv3_resnet101": 8, "deeplabv3_mobilenet_v3_large": 16}
# What a run's trajectory depends on: a resume with any of these changed is not a continuation.
# (device, backend, workers and the logging/saving cadence change where and how it runs, not what.)
RESUME_FIELDS = ("model", "dataset", "data_root", "iters", "batch_size", "crop", "lr", "lr_power", "momentum",
                 "weight_decay", "output_stride", "multi_grid", "aux_weight", "amp", "seed", "fused",
                 "bn_recalibration")
CHECKPOINT_NAME, LOG_NAME = "last.pt", "metrics.jsonl"


class TrainingInterrupted(Exception):
    """Training stopped on a signal after saving: `checkpoint` resumes it at `step`."""

    def __init__(self, signal_name: str, step: int, checkpoint: str):
        super().__init__(f"training interrupted by {signal_name} at step {step}; saved {checkpoint}")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint


@dataclasses.dataclass
class TrainConfig:
    model: str = "deeplabv3_mobilenet_v3_large"
    dataset: str = "synthetic"
    data_root: Optional[str] = None
    iters: int = 150
    batch_size: int = 8
    crop: int = 129
    lr: float = 0.007
    lr_power: float = 0.9
    momentum: float = 0.9
    weight_decay: float = 1e-4
    output_stride: Optional[int] = None  # None: the model's default (8 for ResNets, 16 for MobileNetV3)
    multi_grid: Optional[Sequence[int]] = None
    aux_weight: float = 0.0  # > 0 adds the aux head (FCN on C4) with this loss weight
    amp: bool = False  # bfloat16 autocast
    backend: str = "auto"
    device: str = "cpu"
    out: str = "runs/train"
    resume: Optional[str] = None
    seed: int = 0
    workers: int = 0
    fused: bool = True
    bn_recalibration: int = 20  # batches for re-estimating BN running statistics at the end (0: off)
    log_every: int = 1
    save_every: int = 50
    progress: bool = True
    overwrite: bool = False  # replace the run in a non-empty `out` (its last.pt and metrics.jsonl)
    allow_config_change: bool = False  # resume although a RESUME_FIELDS value differs from the checkpoint's

    def validate(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, got {self.model!r}")
        for name in ("iters", "batch_size", "crop", "save_every", "log_every"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("workers", "bn_recalibration", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(f"{name} must be an int >= 0, got {getattr(self, name)!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.aux_weight < 0:
            raise ValueError(f"aux_weight must be >= 0, got {self.aux_weight}")
        if self.multi_grid is not None and "resnet" not in self.model:
            raise ValueError(f"multi_grid applies to the ResNet models, not {self.model}")
        resolve_device(self.device)
        stride = self.output_stride or DEFAULT_OUTPUT_STRIDE[self.model]
        if self.crop < 2 * stride + 1:
            raise ValueError(f"crop must be at least {2 * stride + 1} at output stride {stride} (features of 3x3 "
                             f"or more for the ASPP), got {self.crop}")
        if self.overwrite and self.resume and _same_file(self.resume, os.path.join(self.out, CHECKPOINT_NAME)):
            raise ValueError(f"overwrite would delete the checkpoint that resume names ({self.resume})")


def _same_file(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def _check_out(cfg: TrainConfig) -> None:
    """Refuse to write into a directory that holds something else: a new run needs an empty (or new)
    `out` unless cfg.overwrite; a resume may continue in the directory of the run it resumes."""
    if not os.path.exists(cfg.out):
        return
    if not os.path.isdir(cfg.out):
        raise ValueError(f"out {cfg.out} exists and is not a directory")
    entries = os.listdir(cfg.out)
    if not entries or cfg.overwrite:
        return
    checkpoint = os.path.join(cfg.out, CHECKPOINT_NAME)
    if cfg.resume and (not os.path.exists(checkpoint) or _same_file(cfg.resume, checkpoint)):
        return
    if cfg.resume:
        raise ValueError(f"out {cfg.out} holds another run's {CHECKPOINT_NAME}, not the one resume names "
                         f"({cfg.resume}); choose another out, or overwrite to replace that run")
    raise ValueError(f"out {cfg.out} is not empty ({listing(entries)}); choose a new directory, resume "
                     f"{checkpoint} to continue that run, or overwrite to replace it")


def _config_changes(saved: dict, cfg: TrainConfig) -> List[str]:
    """'name: saved -> now' for each RESUME_FIELDS value that differs (fields the checkpoint lacks are skipped)."""
    now = _jsonable(cfg)
    changes = []
    for name in RESUME_FIELDS:
        if name not in saved:
            continue
        old, new = saved[name], now[name]
        if name == "data_root" and old is not None and new is not None:
            same = os.path.realpath(old) == os.path.realpath(new)
        else:
            same = old == new
        if not same:
            changes.append(f"{name}: {old!r} -> {new!r}")
    return changes


def _resume_state(cfg: TrainConfig) -> dict:
    """The checkpoint cfg.resume names, checked to be a training checkpoint this configuration continues."""
    state = load_checkpoint(cfg.resume)
    if state.get("kind") != "train":
        raise ValueError(f"resume {cfg.resume}: not a training checkpoint (kind {state.get('kind')!r})")
    changes = _config_changes(state.get("config", {}), cfg)
    if changes and not cfg.allow_config_change:
        raise ValueError(f"resume {cfg.resume}: the configuration differs from the checkpoint's, so the run would "
                         f"not continue as it started ({'; '.join(changes)}); use the checkpoint's values, or allow "
                         f"the config change")
    step = int(state["step"])
    if step >= cfg.iters:
        raise ValueError(f"resume {cfg.resume}: the checkpoint is at step {step}, already at or past iters "
                         f"{cfg.iters}; nothing to train")
    return state


def _truncate_log(path: str, step: int) -> None:
    """Keep the log lines up to `step` (a resumed run rewrites the later ones); an unreadable line,
    such as one cut short by a kill, is dropped."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                if json.loads(line)["step"] <= step:
                    kept.append(line if line.endswith("\n") else line + "\n")
            except (ValueError, KeyError, TypeError):
                continue
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)


class _StopOnSignal:
    """Turns the first SIGINT/SIGTERM into a request to stop after the current step (checked with
    `requested`); a second SIGINT raises KeyboardInterrupt at once. Handlers can only be set from the
    main thread; elsewhere signals keep their usual effect."""

    def __init__(self):
        self.requested: Optional[str] = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __enter__(self) -> "_StopOnSignal":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def build_model(model: str, num_classes: int, output_stride: Optional[int] = None,
                multi_grid: Optional[Sequence[int]] = None, aux: bool = False, fused: bool = True) -> torch.nn.Module:
    """A model of MODELS by name with the paper's options given (None keeps the model's default)."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {model!r}")
    kwargs = dict(num_classes=num_classes, aux_loss=aux, fused=fused)
    if output_stride is not None:
        kwargs["output_stride"] = output_stride
    if multi_grid is not None:
        kwargs["multi_grid"] = tuple(multi_grid)
    return MODELS[model](**kwargs)


def poly_lr(base_lr: float, step: int, total: int, power: float) -> float:
    """The "poly" schedule: base_lr * (1 - step / total) ** power."""
    return base_lr * (1 - step / total) ** power


def segmentation_loss(outputs: dict, target: torch.Tensor, aux_weight: float) -> torch.Tensor:
    loss = F.cross_entropy(outputs["out"].float(), target, ignore_index=IGNORE_INDEX)
    if aux_weight > 0:
        loss = loss + aux_weight * F.cross_entropy(outputs["aux"].float(), target, ignore_index=IGNORE_INDEX)
    return loss


def epoch_batches(num_samples: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> List[List[int]]:
    """This rank's index batches of one epoch: a permutation drawn from (seed, epoch), cut into global
    batches of batch_size (the incomplete last one dropped), each split evenly across ranks."""
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()
    per_rank = batch_size // world
    batches = []
    for start in range(0, num_samples - batch_size + 1, batch_size):
        batch = order[start:start + batch_size]
        batches.append(batch[rank * per_rank:(rank + 1) * per_rank])
    return batches


def _worker_ignores_stop_signals(worker_id: int) -> None:
    # Ctrl-C signals the terminal's whole process group: a worker that died of it would fail the step
    # that the main process means to finish and save. The main process stops the workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _loader(dataset, batches: List[List[int]], cfg: TrainConfig, epoch: int) -> torch.utils.data.DataLoader:
    """A DataLoader over these index batches with a generator of its own: a loader draws its workers'
    base seed when iterated, which from the global RNG would shift every later dropout mask on resume."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=cfg.workers,
                                       generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch),
                                       worker_init_fn=_worker_ignores_stop_signals if cfg.workers else None)


def _steps(dataset, cfg: TrainConfig, start: int, rank: int, world: int) -> Iterator[tuple]:
    """(step, images, labels) from `start` to cfg.iters, in the order a run from step 0 would see."""
    per_epoch = len(dataset) // cfg.batch_size
    if per_epoch == 0:
        raise ValueError(f"the dataset has {len(dataset)} samples, fewer than one batch of {cfg.batch_size}")
    step = start
    while step < cfg.iters:
        epoch, skip = divmod(step, per_epoch)
        dataset.set_epoch(epoch)
        batches = epoch_batches(len(dataset), cfg.batch_size, cfg.seed, epoch, rank, world)[skip:]
        for images, labels in _loader(dataset, batches, cfg, epoch):
            yield step, images, labels
            step += 1
            if step >= cfg.iters:
                return


def recalibrate_bn(model: torch.nn.Module, batches) -> None:
    """Re-estimates every BatchNorm's running statistics as the plain average over `batches` of its
    batch statistics (the model in train mode, no gradients), keeping num_batches_tracked.

    Short runs need this: MobileNetV3's BN momentum is 0.01, so after 150 steps its running
    statistics are still mostly their initial values, and eval, which uses them, predicts one class
    (measured: eval far below the same weights run with batch statistics)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
             and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches below
    was_training = model.training
    model.train()
    try:
        with torch.no_grad():
            for images in batches:
                model(images)
    finally:
        for m, (momentum, tracked) in zip(norms, saved):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)
        model.train(was_training)


def _recalibration_images(dataset, cfg: TrainConfig, device: torch.device, rank: int, world: int):
    """cfg.bn_recalibration batches of training images cropped to cfg.crop without the random scale
    and flip: statistics of images as evaluation sees them (on the synthetic scenes with a stand-in
    MobileNetV3 they gave a higher val mIoU than fully augmented batches)."""
    plain = copy.copy(dataset)
    plain.transform = TrainTransform(cfg.crop, scale_range=(1.0, 1.0), flip=False)
    epoch = 10**6  # a stream of its own, disjoint from the training epochs' seeds
    plain.set_epoch(epoch)
    batches = epoch_batches(len(plain), cfg.batch_size, cfg.seed, epoch, rank, world)[:cfg.bn_recalibration]
    return (images.to(device, memory_format=torch.channels_last) for images, _ in _loader(plain, batches, cfg, epoch))


def _distributed(cfg: TrainConfig) -> tuple[int, int]:
    """(rank, world size); initialises the process group under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device == "cuda" else "gloo")
    if cfg.batch_size % world:
        raise ValueError(f"batch_size {cfg.batch_size} must be divisible by the {world} processes")
    return dist.get_rank(), world


def _jsonable(cfg: TrainConfig) -> dict:
    out = dataclasses.asdict(cfg)
    out["multi_grid"] = list(cfg.multi_grid) if cfg.multi_grid is not None else None
    return out


def _stop_everywhere(stop: _StopOnSignal, world: int, device: torch.device) -> Optional[str]:
    """The stop request, agreed by all ranks (any rank's signal stops all at the same step)."""
    if world == 1:
        return stop.requested
    flag = torch.tensor([1 if stop.requested else 0], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return (stop.requested or "SIGTERM") if flag.item() else None


def train(cfg: TrainConfig) -> dict:
    """Runs the training; returns {"step", "loss", "checkpoint"} (rank 0's view). Raises
    TrainingInterrupted after saving if SIGINT/SIGTERM arrives."""
    cfg.validate()
    _check_out(cfg)
    state = _resume_state(cfg) if cfg.resume else None
    start = int(state["step"]) if state else 0
    rank, world = _distributed(cfg)
    device = torch.device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")) if cfg.device == "cuda" else None)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    dataset = build_dataset(cfg.dataset, cfg.data_root, "train", transform=TrainTransform(cfg.crop), seed=cfg.seed,
                            progress=cfg.progress)
    model = build_model(cfg.model, dataset.num_classes, cfg.output_stride, cfg.multi_grid, cfg.aux_weight > 0,
                        cfg.fused).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"])
        del state
    if world > 1:
        # Each rank its own dropout stream (the weights are already equal: built from cfg.seed, and
        # DDP broadcasts rank 0's). Derived from (seed, rank, step), so a resumed run is
        # deterministic too, though only a single-process resume replays the RNG exactly.
        torch.manual_seed(cfg.seed + 1000003 * (rank + 1) + 7919 * start)
        model = fastaspp.nn.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.index is not None
                                                          else None)
    module = model.module if world > 1 else model
    model.train()
    checkpoint_path = os.path.join(cfg.out, CHECKPOINT_NAME)
    log_path = os.path.join(cfg.out, LOG_NAME)
    log = bar = None
    if rank == 0:
        os.makedirs(cfg.out, exist_ok=True)
        if cfg.overwrite and not cfg.resume:
            for path in (checkpoint_path, log_path):
                if os.path.exists(path):
                    os.remove(path)
        _truncate_log(log_path, start)
        log = open(log_path, "a")
        if cfg.progress:
            from tqdm import tqdm

            bar = tqdm(total=cfg.iters, initial=start, desc="train", unit="it", dynamic_ncols=True)

    def save(step: int) -> None:
        if rank == 0:
            save_checkpoint(checkpoint_path, {
                "kind": "train", "model": module.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "rng": capture_rng_state(), "config": _jsonable(cfg), "classes": list(dataset.classes)})

    loss_value = math.nan
    step = start
    try:
        with fastaspp.backend(cfg.backend), _StopOnSignal() as stop:
            tick = time.perf_counter()
            for step, images, labels in _steps(dataset, cfg, start, rank, world):
                lr = poly_lr(cfg.lr, step, cfg.iters, cfg.lr_power)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                images = images.to(device, memory_format=torch.channels_last)
                labels = labels.to(device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                    outputs = model(images)
                loss = segmentation_loss(outputs, labels, cfg.aux_weight)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"the loss is {loss.item()} at step {step}; lower lr or drop amp")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                loss_value = loss.item()
                now = time.perf_counter()
                images_per_s = cfg.batch_size / (now - tick)
                tick = now
                if log is not None and (step + 1) % cfg.log_every == 0:
                    log.write(json.dumps({"step": step + 1, "loss": loss_value, "lr": lr,
                                          "images_per_s": images_per_s}) + "\n")
                    log.flush()
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", img_s=f"{images_per_s:.1f}")
                step += 1
                signal_name = _stop_everywhere(stop, world, device)
                if signal_name and step < cfg.iters:
                    save(step)
                    raise TrainingInterrupted(signal_name, step, checkpoint_path)
                if step % cfg.save_every == 0:
                    save(step)
        if cfg.bn_recalibration and step == cfg.iters:
            images = _recalibration_images(dataset, cfg, device, rank, world)
            if rank == 0 and cfg.progress:
                from tqdm import tqdm

                images = tqdm(images, total=cfg.bn_recalibration, desc="BN recalibration", unit="batch",
                              leave=False, dynamic_ncols=True)
            with fastaspp.backend(cfg.backend), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.amp):
                recalibrate_bn(model, images)  # all ranks: SyncBN
            save(step)
        elif step % cfg.save_every:
            save(step)
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
    return {"step": step, "loss": loss_value, "checkpoint": checkpoint_path}
