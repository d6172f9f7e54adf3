"""What the datasets share: image/label decoding and per-sample seeded augmentation."""
from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from fastaspp.data.transforms import IGNORE_INDEX, EvalTransform


def read_image(path: str) -> torch.Tensor:
    """An image file as a float32 [3, H, W] tensor in [0, 1] (any mode is converted to RGB)."""
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).float().div_(255)


def read_label(path: str) -> torch.Tensor:
    """A mask PNG of class indices (palette "P" or greyscale "L"/"I") as an int64 [H, W] tensor.

    A palette PNG's pixel values are its palette indices, which is what VOC stores; an RGB mask is
    refused, since recovering indices from colours is ambiguous.
    """
    with Image.open(path) as image:
        if image.mode not in ("P", "L", "I", "I;16"):
            raise ValueError(f"label {path} has mode {image.mode}; expected a single-channel PNG of class "
                             f"indices (mode P, L or I)")
        array = np.asarray(image)
    return torch.from_numpy(array.astype(np.int64))


def check_label(label: torch.Tensor, num_classes: int, path: str, ignore_index: int = IGNORE_INDEX) -> None:
    """Raise if a label holds values other than 0..num_classes-1 and ignore_index, naming the file."""
    bad = ((label >= num_classes) & (label != ignore_index)) | (label < 0)
    if bad.any():
        values = sorted(set(label[bad].unique().tolist()))[:8]
        raise ValueError(f"label {path} holds values {values}, outside 0..{num_classes - 1} "
                         f"and the ignore index {ignore_index}")


def check_size(image: torch.Tensor, label: torch.Tensor, image_path: str, label_path: str) -> None:
    if image.shape[1:] != label.shape:
        raise ValueError(f"image {image_path} is {tuple(image.shape[1:])} (H, W) but its label {label_path} "
                         f"is {tuple(label.shape)}")


def require_dir(path: str, what: str) -> str:
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{what}: directory {path} does not exist")
    return path


class SegmentationDataset(Dataset):
    """Base class: subclasses implement __len__ and load(index) -> (image [3, H, W] in [0, 1], label
    int64 [H, W]); __getitem__ applies the transform.

    A random transform gets a torch.Generator seeded from (seed, epoch, index), so a sample's
    augmentation depends neither on the DataLoader's worker count nor on what ran before: a resumed
    run sees the same crops. Call set_epoch(epoch) before iterating an epoch (with
    persistent_workers=False, so workers get the new epoch).
    """

    classes: tuple[str, ...] = ()

    def __init__(self, transform=None, seed: int = 0):
        self.transform = EvalTransform() if transform is None else transform
        self.seed = int(seed)
        self.epoch = 0

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def sample_generator(self, index: int) -> torch.Generator:
        # SeedSequence mixes the three numbers, so neighbouring indices/epochs get unrelated streams.
        state = np.random.SeedSequence([self.seed, self.epoch, index, 0x617567]).generate_state(1, np.uint64)
        return torch.Generator().manual_seed(int(state[0]))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} out of range for a dataset of {len(self)} samples")
        index %= len(self)
        image, label = self.load(index)
        return self.transform(image, label, generator=self.sample_generator(index))
