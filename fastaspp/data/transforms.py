"""Joint (image, label) transforms: DeepLab's training augmentation and evaluation normalisation.

Images enter as float tensors [3, H, W] in [0, 1] and labels as int64 [H, W] (255 = ignore). Every
random draw takes a torch.Generator, so a sample's augmentation is reproducible from its seed.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IGNORE_INDEX = 255


def _stats(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    std = torch.tensor(IMAGENET_STD, dtype=image.dtype, device=image.device).view(-1, 1, 1)
    return mean, std


def normalize(image: torch.Tensor) -> torch.Tensor:
    """ImageNet mean/std normalisation of a [..., 3, H, W] float image in [0, 1]."""
    if image.dim() < 3 or image.shape[-3] != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float [..., 3, H, W] tensor, got {image.dtype} {tuple(image.shape)}")
    mean, std = _stats(image)
    return (image - mean) / std


def denormalize(image: torch.Tensor) -> torch.Tensor:
    """Inverse of normalize(), clamped to [0, 1]."""
    mean, std = _stats(image)
    return (image * std + mean).clamp(0, 1)


def _check_pair(image: torch.Tensor, label: torch.Tensor) -> None:
    if image.dim() != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError(f"image must be a float [3, H, W] tensor, got {image.dtype} {tuple(image.shape)}")
    if label.dim() != 2 or label.shape != image.shape[1:] or label.dtype != torch.int64:
        raise ValueError(f"label must be an int64 [H, W] tensor matching the image {tuple(image.shape[1:])}, "
                         f"got {label.dtype} {tuple(label.shape)}")


class EvalTransform:
    """Evaluation: normalisation only (the whole image is evaluated at its own size)."""

    def __call__(self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None):
        _check_pair(image, label)
        return normalize(image), label

    def __repr__(self) -> str:
        return "EvalTransform()"


class TrainTransform:
    """DeepLab's training augmentation, in this order:

    1. random scale s ~ U(scale_range): image resized bilinearly, label by nearest neighbour (both
       with pixel centres aligned, so they stay registered);
    2. normalisation;
    3. padding at the bottom/right up to crop_size: the image with 0 (the mean, once normalised), the
       label with ignore_index, so padding never counts in the loss;
    4. a random crop_size crop;
    5. a horizontal flip of both with probability 0.5 (if flip).

    The draws (scale, crop y, crop x, flip) come from `generator`, or torch's global RNG if None.
    """

    def __init__(self, crop_size: int | tuple[int, int], scale_range: tuple[float, float] = (0.5, 2.0),
                 flip: bool = True, ignore_index: int = IGNORE_INDEX):
        crop = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
        if len(crop) != 2 or not all(isinstance(c, int) and c > 0 for c in crop):
            raise ValueError(f"crop_size must be a positive int or (height, width), got {crop_size!r}")
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must be (low, high) with 0 < low <= high, got {scale_range!r}")
        self.crop_size = crop
        self.scale_range = (float(lo), float(hi))
        self.flip = flip
        self.ignore_index = ignore_index

    def __call__(self, image: torch.Tensor, label: torch.Tensor, generator: torch.Generator | None = None):
        _check_pair(image, label)
        lo, hi = self.scale_range
        scale = lo + (hi - lo) * torch.rand((), generator=generator).item()
        height, width = image.shape[1:]
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        if size != (height, width):
            image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
            label = F.interpolate(label[None, None].float(), size=size, mode="nearest-exact")[0, 0].long()
        image = normalize(image)

        crop_h, crop_w = self.crop_size
        pad_h, pad_w = max(crop_h - size[0], 0), max(crop_w - size[1], 0)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            label = F.pad(label, (0, pad_w, 0, pad_h), value=self.ignore_index)
        top = torch.randint(0, image.shape[1] - crop_h + 1, (), generator=generator).item()
        left = torch.randint(0, image.shape[2] - crop_w + 1, (), generator=generator).item()
        image = image[:, top:top + crop_h, left:left + crop_w]
        label = label[top:top + crop_h, left:left + crop_w]

        if self.flip and torch.rand((), generator=generator).item() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        return image.contiguous(), label.contiguous()

    def __repr__(self) -> str:
        return (f"TrainTransform(crop_size={self.crop_size}, scale_range={self.scale_range}, "
                f"flip={self.flip}, ignore_index={self.ignore_index})")
