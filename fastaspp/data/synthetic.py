"""SyntheticScenes: procedurally generated segmentation scenes, the embedded dataset (no download).

Each scene is a textured background (class 0) with 3 to 6 shapes drawn over it, later ones
occluding earlier ones. A class is a shape with its own colour family and texture:

    disc      red,     shaded like a dome
    box       green,   stripes along the box
    triangle  blue,    checkerboard
    ring      yellow,  dots (the hole shows what is underneath)
    cross     magenta, diagonal stripes

Colours are jittered per object (hue, saturation, brightness), textures modulate brightness, and
every pixel gets strong Gaussian noise (NOISE), so a single pixel's colour is an unreliable cue
while a small neighbourhood is a reliable one: a net of 1x1 convolutions (colour only) stays far
below a net of 3x3 ones (see tests/test_data.py). Shapes are 35% to 65% of the image's shorter
side across, so they survive DeepLab's output stride, and cover about half the pixels. A scene
depends only on (seed, split, index); the splits use different random streams.
"""
from __future__ import annotations

import colorsys
from functools import lru_cache

import numpy as np
import torch

from fastaspp.data.base import SegmentationDataset

SYNTHETIC_CLASSES = ("background", "disc", "box", "triangle", "ring", "cross")

# Per class: hue centre (HSV, in [0, 1)) and texture.
_STYLES = {1: (0.00, "dome"), 2: (0.33, "stripes"), 3: (0.62, "checker"), 4: (0.15, "dots"),
           5: (0.83, "diagonal")}
_SPLITS = {"train": 0, "val": 1}
NOISE = 0.12  # per-pixel, per-channel standard deviation, on colours in [0, 1]


@lru_cache(maxsize=8)
def _interp_matrix(out_size: int, in_size: int) -> np.ndarray:
    """[out_size, in_size] linear interpolation weights: smooth noise = A @ coarse grid @ B.T."""
    pos = np.linspace(0, in_size - 1, out_size, dtype=np.float32)
    lo = np.minimum(pos.astype(np.int64), in_size - 2)
    frac = pos - lo
    matrix = np.zeros((out_size, in_size), dtype=np.float32)
    matrix[np.arange(out_size), lo] = 1 - frac
    matrix[np.arange(out_size), lo + 1] = frac
    return matrix


def _smooth_noise(rng: np.random.Generator, height: int, width: int, cells: int) -> np.ndarray:
    """Low-frequency noise in about [-1, 1]: a coarse random grid, bilinearly upsampled."""
    grid = rng.uniform(-1, 1, size=(cells, cells)).astype(np.float32)
    return _interp_matrix(height, cells) @ grid @ _interp_matrix(width, cells).T


def _hsv(h: float, s: float, v: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _texture(kind: str, u: np.ndarray, v: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness modulation in [-1, 1] in the object's own frame (u, v), so it moves with it."""
    if kind == "dome":
        return 1 - 2 * np.clip(np.hypot(u, v) / radius, 0, 1) ** 2
    period = rng.uniform(6, 10)
    if kind == "stripes":
        return np.sign(np.sin(u * (2 * np.pi / period)))
    if kind == "checker":
        return np.sign(np.sin(u * (2 * np.pi / period)) * np.sin(v * (2 * np.pi / period)))
    if kind == "diagonal":
        return np.sign(np.sin((u + v) * (np.pi / period)))
    if kind == "dots":
        return np.where(np.sin(u * (2 * np.pi / period)) * np.sin(v * (2 * np.pi / period)) > 0.5, -1.0, 0.4)
    raise ValueError(kind)


def _shape_mask(cls: int, u: np.ndarray, v: np.ndarray, radius: float, rng: np.random.Generator) -> np.ndarray:
    if cls == 1:  # disc
        return u * u + v * v <= radius * radius
    if cls == 2:  # box, aspect ratio up to 1:2
        half_w, half_h = radius, radius * rng.uniform(0.5, 1.0)
        return (np.abs(u) <= half_w) & (np.abs(v) <= half_h)
    if cls == 3:  # equilateral triangle with circumradius `radius`: three half-planes at the inradius
        inside = np.ones(u.shape, dtype=bool)
        for k in range(3):
            angle = np.pi / 2 + k * 2 * np.pi / 3
            inside &= u * np.cos(angle) + v * np.sin(angle) <= radius / 2
        return inside
    if cls == 4:  # ring
        dist2 = u * u + v * v
        return (dist2 <= radius * radius) & (dist2 >= (radius * rng.uniform(0.2, 0.35)) ** 2)
    if cls == 5:  # cross: two perpendicular bars
        half = radius * rng.uniform(0.35, 0.5)
        au, av = np.abs(u), np.abs(v)
        return ((au <= radius) & (av <= half)) | ((av <= radius) & (au <= half))
    raise ValueError(cls)


def render_scene(rng: np.random.Generator, height: int, width: int, num_classes: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (image float32 [3, H, W] in [0, 1], label int64 [H, W])."""
    # Background: two muted colours mixed by smooth noise, with smooth brightness variation.
    hue = rng.uniform()
    c1 = _hsv(hue, rng.uniform(0.0, 0.25), rng.uniform(0.35, 0.7))
    c2 = _hsv(hue + rng.uniform(-0.3, 0.3), rng.uniform(0.0, 0.25), rng.uniform(0.35, 0.7))
    mix = (_smooth_noise(rng, height, width, 5) + 1) / 2
    shade = 1 + 0.25 * _smooth_noise(rng, height, width, 9)
    image = (c1[:, None, None] * mix + c2[:, None, None] * (1 - mix)) * shade
    label = np.zeros((height, width), dtype=np.int64)

    short = min(height, width)
    for _ in range(rng.integers(3, 7)):
        cls = int(rng.integers(1, num_classes))
        # A triangle fills 41% of its circumcircle: enlarged, its area is close to the other shapes'.
        radius = rng.uniform(0.18, 0.32) * short * (1.4 if cls == 3 else 1.0)
        cy, cx = rng.uniform(0.1, 0.9) * height, rng.uniform(0.1, 0.9) * width
        # Work inside the bounding box only: the rest of the image is untouched.
        y0, y1 = max(int(cy - radius) - 1, 0), min(int(cy + radius) + 2, height)
        x0, x1 = max(int(cx - radius) - 1, 0), min(int(cx + radius) + 2, width)
        if y0 >= y1 or x0 >= x1:
            continue
        dy = np.arange(y0, y1, dtype=np.float32)[:, None] + 0.5 - cy
        dx = np.arange(x0, x1, dtype=np.float32)[None, :] + 0.5 - cx
        theta = rng.uniform(0, 2 * np.pi)
        u = dx * np.cos(theta) + dy * np.sin(theta)
        v = dy * np.cos(theta) - dx * np.sin(theta)
        mask = _shape_mask(cls, u, v, radius, rng)
        hue_centre, texture = _STYLES[cls]
        colour = _hsv(hue_centre + rng.normal(0, 0.02), rng.uniform(0.65, 1.0), rng.uniform(0.65, 0.95))
        patch = colour[:, None, None] * (1 + 0.3 * _texture(texture, u, v, radius, rng))[None]
        region = image[:, y0:y1, x0:x1]
        region[:, mask] = patch[:, mask]
        label[y0:y1, x0:x1][mask] = cls

    image += rng.normal(0, NOISE, size=image.shape).astype(np.float32)
    return np.clip(image, 0, 1, out=image), label


class SyntheticScenes(SegmentationDataset):
    """Procedurally generated scenes (see the module docstring), rendered on demand.

    split: "train" or "val" (disjoint random streams). size: number of images (default 2048 for
    train, 128 for val). image_size: int or (H, W); the default 161 leaves a 129 training crop
    mostly filled after a random downscale. num_classes: 2 to 6, background included (the
    first num_classes names of SYNTHETIC_CLASSES). seed: selects the scenes and the augmentation.
    transform: a joint transform (default: normalisation only). Items are (image float32 [3, H, W]
    normalised, label int64 [H, W]); load(index) gives the image in [0, 1] before the transform.
    """

    def __init__(self, split: str = "train", size: int | None = None, image_size: int | tuple[int, int] = 161,
                 num_classes: int = len(SYNTHETIC_CLASSES), seed: int = 0, transform=None):
        super().__init__(transform=transform, seed=seed)
        if split not in _SPLITS:
            raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
        if not 2 <= num_classes <= len(SYNTHETIC_CLASSES):
            raise ValueError(f"num_classes must be in 2..{len(SYNTHETIC_CLASSES)} (background included), "
                             f"got {num_classes}")
        hw = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(hw) != 2 or not all(isinstance(n, int) and n >= 16 for n in hw):
            raise ValueError(f"image_size must be an int or (H, W), each at least 16, got {image_size!r}")
        size = (2048 if split == "train" else 128) if size is None else size
        if size < 1:
            raise ValueError(f"size must be a positive number of images, got {size}")
        self.split = split
        self.size = int(size)
        self.image_size = hw
        self.image_sizes = [hw] * self.size
        self.classes = SYNTHETIC_CLASSES[:num_classes]

    def __len__(self) -> int:
        return self.size

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, _SPLITS[self.split], index])
        image, label = render_scene(rng, *self.image_size, num_classes=self.num_classes)
        return torch.from_numpy(image), torch.from_numpy(label)

    def __repr__(self) -> str:
        return (f"SyntheticScenes(split={self.split!r}, size={self.size}, image_size={self.image_size}, "
                f"num_classes={self.num_classes}, seed={self.seed}, transform={self.transform!r})")
