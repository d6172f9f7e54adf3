"""Evaluation and prediction from a checkpoint (`fastaspp eval`, `fastaspp predict`).

mIoU comes from one confusion matrix over the whole split (ignore label 255), optionally with the
paper's multi-scale and flipped inputs (class probabilities averaged, fastaspp.metrics).
"""
from __future__ import annotations

import json
import os
from typing import List, Optional, Sequence

import torch

import fastaspp
from fastaspp.checkpoint import load_checkpoint
from fastaspp.data import EvalTransform, build_dataset, colorize, normalize, read_image
from fastaspp.metrics import ConfusionMatrix, predict_multiscale
from fastaspp.train import build_model
from fastaspp.visualize import save_overlay


def load_trained_model(path: str, device: torch.device, fused: bool = True) -> tuple[torch.nn.Module, dict]:
    """The model a `fastaspp train` checkpoint describes, with its weights, in eval mode; and the
    checkpoint's config and class names."""
    state = load_checkpoint(path)
    if "model" not in state or "config" not in state:
        raise ValueError(f"checkpoint {path} holds no model and config (keys {sorted(state)}); "
                         "it must come from `fastaspp train`")
    cfg = state["config"]
    classes = state.get("classes") or []
    model = build_model(cfg["model"], len(classes), cfg.get("output_stride"), cfg.get("multi_grid"),
                        cfg.get("aux_weight", 0) > 0, fused)
    model.load_state_dict(state["model"])
    return model.to(device, memory_format=torch.channels_last).eval(), {"config": cfg, "classes": classes}


def evaluate(model: torch.nn.Module, dataset, device: torch.device, scales: Sequence[float] = (1.0,),
             flip: bool = False, out: Optional[str] = None, overlays: int = 4, class_names=None) -> dict:
    """mIoU, pixel accuracy and per-class IoU of `model` on `dataset` (one image at a time, so that
    any image size works); with `out`, writes out/eval.json and `overlays` PNGs (image | prediction |
    label)."""
    num_classes = dataset.num_classes
    matrix = ConfusionMatrix(num_classes, device=device)
    model_fn = lambda x: model(x)["out"]  # noqa: E731
    written: List[str] = []
    if out:
        os.makedirs(out, exist_ok=True)
    with torch.inference_mode():
        for index in range(len(dataset)):
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


def evaluate_checkpoint(checkpoint: str, dataset: str, data_root: Optional[str], device: str, out: str,
                        scales: Sequence[float] = (1.0,), flip: bool = False, backend: str = "auto",
                        split: str = "val", overlays: int = 4, limit: Optional[int] = None) -> dict:
    dev = torch.device(device)
    model, meta = load_trained_model(checkpoint, dev)
    seed = meta["config"].get("seed", 0)
    data = build_dataset(dataset, data_root, split, transform=EvalTransform(), seed=seed)
    if data.num_classes != len(meta["classes"]):
        raise ValueError(f"dataset {dataset!r} has {data.num_classes} classes but the checkpoint's model predicts "
                         f"{len(meta['classes'])}")
    if limit is not None:
        if limit < 1:
            raise ValueError(f"limit must be a positive number of images, got {limit}")
        classes, data = data.classes, torch.utils.data.Subset(data, range(min(limit, len(data))))
        data.classes, data.num_classes = classes, len(classes)
    with fastaspp.backend(backend):
        return evaluate(model, data, dev, scales, flip, out, overlays, data.classes)


def predict_images(checkpoint: str, images: Sequence[str], out: str, device: str = "cpu",
                   backend: str = "auto") -> List[str]:
    """For each image file: out/<stem>_mask.png (VOC palette) and out/<stem>_overlay.png."""
    dev = torch.device(device)
    model, _ = load_trained_model(checkpoint, dev)
    os.makedirs(out, exist_ok=True)
    written = []
    with fastaspp.backend(backend), torch.inference_mode():
        for path in images:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"image {path} does not exist")
            image = normalize(read_image(path))
            pred = model(image[None].to(dev, memory_format=torch.channels_last))["out"].argmax(1)[0].cpu()
            stem = os.path.splitext(os.path.basename(path))[0]
            mask_path = os.path.join(out, f"{stem}_mask.png")
            colorize(pred).save(mask_path)
            written += [mask_path, save_overlay(os.path.join(out, f"{stem}_overlay.png"), image, pred)]
    return written
