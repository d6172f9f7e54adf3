"""Evaluation and prediction from a checkpoint (`fastaspp eval`, `fastaspp predict`).

mIoU comes from one confusion matrix over the whole split (ignore label 255), optionally with the
paper's multi-scale and flipped inputs (class probabilities averaged, fastaspp.metrics).

The checkpoint is the authority on the classes: the dataset's labels must lie in 0..C-1 (or be the
ignore value) for the checkpoint's C classes, and a label outside them is an error naming the file.
Before the first image, the memory the largest scale needs on the largest image is estimated, and a
scale that cannot fit is refused.
"""
from __future__ import annotations

import json
import math
import os
from typing import List, Optional, Sequence

import torch

import fastaspp
from fastaspp.checkpoint import load_checkpoint
from fastaspp.data import EvalTransform, build_dataset, collect_images, colorize, normalize, read_image
from fastaspp.devices import available_memory, resolve_device
from fastaspp.metrics import ConfusionMatrix, check_scales, predict_multiscale
from fastaspp.train import build_model
from fastaspp.visualize import save_overlay


def load_trained_model(path: str, device: torch.device, fused: bool = True) -> tuple[torch.nn.Module, dict]:
    """The model a `fastaspp train` checkpoint describes, with its weights, in eval mode; and the
    checkpoint's config and class names."""
    state = load_checkpoint(path)
    if state.get("kind") != "train" or "model" not in state or "config" not in state:
        raise ValueError(f"checkpoint {path} holds no model and config (keys {sorted(state)}); "
                         "it must come from `fastaspp train`")
    cfg = state["config"]
    classes = state.get("classes") or []
    model = build_model(cfg["model"], len(classes), cfg.get("output_stride"), cfg.get("multi_grid"),
                        cfg.get("aux_weight", 0) > 0, fused)
    model.load_state_dict(state["model"])
    return model.to(device, memory_format=torch.channels_last).eval(), {"config": cfg, "classes": classes}


# Peak memory of an inference forward per byte of the model's largest layer output. Measured peak RSS
# growth (ResNet-50 at 257-769 px, MobileNetV3 at 513-1025 px) stayed within this estimate.
_PEAK_PER_LARGEST_OUTPUT = 10
_PROBE_SIZE = 129


def _largest_output_bytes(model: torch.nn.Module, device: torch.device) -> int:
    """Bytes of the largest tensor any leaf module returns on a _PROBE_SIZE² input."""
    largest = 0

    def hook(module, inputs, output):
        nonlocal largest
        for t in output if isinstance(output, (tuple, list)) else (output,):
            if isinstance(t, torch.Tensor):
                largest = max(largest, t.numel() * t.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if next(m.children(), None) is None]
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE, device=device).to(memory_format=torch.channels_last))
    finally:
        for h in handles:
            h.remove()
    return largest


def _probability_bytes(num_classes: int, pixels: int) -> int:
    """fp32 logits, probabilities and their running sum at the image's size."""
    return 3 * 4 * num_classes * pixels


def estimate_eval_bytes(model: torch.nn.Module, device: torch.device, num_classes: int, pixels: int,
                        scale: float) -> int:
    """Estimated peak bytes of evaluating one image of `pixels` pixels at `scale`: activations grow
    with the pixel count, and the class probabilities are held at the image's size."""
    per_pixel = _PEAK_PER_LARGEST_OUTPUT * _largest_output_bytes(model, device) / _PROBE_SIZE ** 2
    return int(per_pixel * pixels * scale ** 2) + _probability_bytes(num_classes, pixels)


def check_eval_memory(model: torch.nn.Module, device: torch.device, num_classes: int,
                      image_sizes: Sequence[tuple], scales: Sequence[float]) -> None:
    """Refuse scales whose estimated memory on the largest image exceeds what `device` has free
    (nothing is checked where free memory cannot be read: a CPU without /proc/meminfo)."""
    free = available_memory(device)
    if free is None or not image_sizes:
        return
    height, width = max(image_sizes, key=lambda hw: hw[0] * hw[1])
    scale = max(scales)
    need = estimate_eval_bytes(model, device, num_classes, height * width, scale)
    if need > free:
        fixed = _probability_bytes(num_classes, height * width)
        fits = math.sqrt(max(free - fixed, 0) / ((need - fixed) / scale ** 2))
        raise ValueError(f"scale {scale:g} on the largest image ({height}x{width}) needs an estimated "
                         f"{need / 2**30:.1f} GiB of {device.type} memory, but {free / 2**30:.1f} GiB is available; "
                         f"use scales up to about {fits:.2f}")


def evaluate(model: torch.nn.Module, dataset, device: torch.device, scales: Sequence[float] = (1.0,),
             flip: bool = False, out: Optional[str] = None, overlays: int = 4, class_names=None,
             progress: bool = False) -> dict:
    """mIoU, pixel accuracy and per-class IoU of `model` on `dataset` (one image at a time, so that
    any image size works); with `out`, writes out/eval.json and `overlays` PNGs (image | prediction |
    label). progress: a tqdm bar on stderr."""
    num_classes = dataset.num_classes
    matrix = ConfusionMatrix(num_classes, device=device)
    model_fn = lambda x: model(x)["out"]  # noqa: E731
    written: List[str] = []
    if out:
        os.makedirs(out, exist_ok=True)
    indices = range(len(dataset))
    if progress:
        from tqdm import tqdm

        indices = tqdm(indices, desc="eval", unit="img", dynamic_ncols=True)
    with torch.inference_mode():
        for index in indices:
            image, label = dataset[index]
            batch = image[None].to(device, memory_format=torch.channels_last)
            pred = predict_multiscale(model_fn, batch, scales, flip).argmax(1)[0]
            matrix.update(pred, label.to(device))
            if out and len(written) < overlays:
                written.append(save_overlay(os.path.join(out, f"overlay_{index:04d}.png"), image, pred.cpu(), label))
    result = matrix.summary(class_names or getattr(dataset, "classes", None) or None)
    result.update(images=len(dataset), scales=list(scales), flip=flip)
    if out:
        with open(os.path.join(out, "eval.json"), "w") as f:
            json.dump(result, f, indent=2)
        result["overlays"] = written
    return result


def _eval_dataset(name: str, root: Optional[str], split: str, classes: Sequence[str], seed: int, progress: bool):
    """The split, read with the checkpoint's classes: a folder dataset takes them (so a label past
    them is an error naming its file); a dataset with fixed classes must have as many."""
    if name == "folder":
        return build_dataset(name, root, split, transform=EvalTransform(), seed=seed, classes=classes,
                             progress=progress)
    data = build_dataset(name, root, split, transform=EvalTransform(), seed=seed, progress=progress)
    if data.num_classes != len(classes):
        raise ValueError(f"dataset {name!r} has {data.num_classes} classes but the checkpoint's model predicts "
                         f"{len(classes)}; evaluate it on the data it was trained for")
    return data


def evaluate_checkpoint(checkpoint: str, dataset: str, data_root: Optional[str], device: str, out: str,
                        scales: Sequence[float] = (1.0,), flip: bool = False, backend: str = "auto",
                        split: str = "val", overlays: int = 4, limit: Optional[int] = None,
                        progress: bool = False) -> dict:
    dev = resolve_device(device)
    if overlays < 0:
        raise ValueError(f"overlays must be >= 0, got {overlays}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of images, got {limit}")
    scales = check_scales(scales)
    model, meta = load_trained_model(checkpoint, dev)
    data = _eval_dataset(dataset, data_root, split, meta["classes"], meta["config"].get("seed", 0), progress)
    sizes = list(getattr(data, "image_sizes", []))
    if limit is not None:
        classes, data = data.classes, torch.utils.data.Subset(data, range(min(limit, len(data))))
        data.classes, data.num_classes = classes, len(classes)
        sizes = sizes[:limit]
    with fastaspp.backend(backend):
        check_eval_memory(model, dev, len(meta["classes"]), sizes, scales)
        return evaluate(model, data, dev, scales, flip, out, overlays, meta["classes"], progress)


def predict_images(checkpoint: str, images: Sequence[str], out: str, device: str = "cpu",
                   backend: str = "auto") -> List[str]:
    """For each image file (a directory stands for the images in it): out/<stem>_mask.png (VOC
    palette) and out/<stem>_overlay.png, stems made unique as collect_images says. Every input is
    checked before the first is processed."""
    dev = resolve_device(device)
    inputs = collect_images(images)
    model, _ = load_trained_model(checkpoint, dev)
    os.makedirs(out, exist_ok=True)
    written = []
    with fastaspp.backend(backend), torch.inference_mode():
        for path, stem in inputs:
            image = normalize(read_image(path))
            pred = model(image[None].to(dev, memory_format=torch.channels_last))["out"].argmax(1)[0].cpu()
            mask_path = os.path.join(out, f"{stem}_mask.png")
            colorize(pred).save(mask_path)
            written += [mask_path, save_overlay(os.path.join(out, f"{stem}_overlay.png"), image, pred)]
    return written
