"""Side-by-side overlay images (image | prediction | label) in the VOC palette, with Pillow."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

from fastaspp.data.palette import colorize_rgb
from fastaspp.data.transforms import denormalize

_GAP = 4  # white pixels between panels


def _image_rgb(image: torch.Tensor, normalized: bool) -> np.ndarray:
    if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float [3, H, W] tensor, got {image.dtype} {tuple(image.shape)}")
    image = image.detach().float().cpu()
    image = denormalize(image) if normalized else image.clamp(0, 1)
    return (image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)


def overlay(image: torch.Tensor, pred: torch.Tensor, label: torch.Tensor | None = None, normalized: bool = True,
            alpha: float = 1.0) -> Image.Image:
    """An RGB PIL image of panels image | prediction | label (the label panel only if given).

    image: float [3, H, W], ImageNet-normalised if `normalized` (as the datasets give it) else in
    [0, 1]. pred, label: integer [H, W] class indices, drawn in the VOC palette (255, ignore, is
    cream). alpha < 1 blends the masks over the image instead of drawing them opaque.
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = _image_rgb(image, normalized)
    panels = [rgb]
    for name, mask in (("pred", pred), ("label", label)):
        if mask is None:
            continue
        if tuple(mask.shape) != rgb.shape[:2]:
            raise ValueError(f"{name} must be [H, W] = {rgb.shape[:2]} like the image, got {tuple(mask.shape)}")
        colours = colorize_rgb(mask).astype(np.float32)
        panels.append((alpha * colours + (1 - alpha) * rgb).astype(np.uint8))
    height, width = rgb.shape[:2]
    canvas = np.full((height, len(panels) * width + (len(panels) - 1) * _GAP, 3), 255, dtype=np.uint8)
    for i, panel in enumerate(panels):
        canvas[:, i * (width + _GAP):i * (width + _GAP) + width] = panel
    return Image.fromarray(canvas)


def save_overlay(path: str | os.PathLike, image: torch.Tensor, pred: torch.Tensor, label: torch.Tensor | None = None,
                 normalized: bool = True, alpha: float = 1.0) -> str:
    """Write overlay(...) to `path` as PNG; returns the path."""
    path = os.fspath(path)
    overlay(image, pred, label, normalized=normalized, alpha=alpha).save(path, format="PNG")
    return path
