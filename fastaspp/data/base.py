"""What the datasets share: image/label decoding, up-front file validation and per-sample seeded
augmentation."""
from __future__ import annotations

import os
import sys
from typing import Iterable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm import tqdm

from fastaspp.data.transforms import IGNORE_INDEX, EvalTransform

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")  # what a directory of images is searched for
LABEL_MODES = ("P", "L", "I", "I;16")  # single-channel modes whose pixel values are class indices
PROGRESS_MIN_ITEMS = 200  # below this, a pass over the files is too quick for a progress bar to matter
MAX_LISTED = 10  # problems or names an error lists before "and N more"


def listing(names: Iterable[str], sort: bool = True) -> str:
    """Names joined by ", ", the first MAX_LISTED of them and a count of the rest."""
    names = sorted(names) if sort else list(names)
    more = len(names) - MAX_LISTED
    return ", ".join(names[:MAX_LISTED]) + (f" and {more} more" if more > 0 else "")


def problem_report(summary: str, problems: Sequence[str]) -> str:
    """An error message: summary, then one problem a line, the first MAX_LISTED and a count of the rest."""
    more = len(problems) - MAX_LISTED
    return f"{summary}:\n  " + "\n  ".join(problems[:MAX_LISTED]) + (f"\n  and {more} more" if more > 0 else "")


def progress_bar(items: Sequence, desc: str, enabled: bool = True):
    """tqdm over items on stderr; silent when not enabled or for fewer than PROGRESS_MIN_ITEMS items."""
    return tqdm(items, desc=desc, total=len(items), file=sys.stderr,
                disable=not enabled or len(items) < PROGRESS_MIN_ITEMS)


def image_header(path: str) -> tuple[str, tuple[int, int]]:
    """(mode, (H, W)) of an image file, from its header only: PIL's open is lazy and no pixels are
    decoded here. Raises ValueError naming the file when PIL cannot read it as an image."""
    try:
        with Image.open(path) as image:
            return image.mode, (image.height, image.width)
    except FileNotFoundError:
        raise
    except UnidentifiedImageError:
        raise ValueError(f"{path} is not an image (PIL cannot identify its format)") from None
    except (OSError, Image.DecompressionBombError) as exc:
        raise ValueError(f"{path} cannot be read as an image: {exc}") from None


def label_mode_problem(path: str, mode: str) -> str | None:
    """Why a label of this mode cannot hold class indices, or None when it can."""
    if mode in LABEL_MODES:
        return None
    return (f"label {path} has mode {mode}; expected a single-channel PNG of class indices "
            f"(mode {', '.join(LABEL_MODES)})")


def _header_or_none(path: str, problems: list[str]) -> tuple[str, tuple[int, int]] | None:
    try:
        return image_header(path)
    except ValueError as exc:
        problems.append(str(exc))
        return None


def validate_samples(pairs: Sequence[tuple[str, str]], what: str, progress: bool = True) -> list[tuple[int, int]]:
    """Check every (image, label) pair from file headers before any step runs, so a bad file fails the
    dataset's construction instead of a DataLoader worker mid-run: each file must be an image PIL
    reads, each label of a LABEL_MODES mode, and each label the size of its image. Label values need
    decoding; load() checks them (check_label). Raises one ValueError listing the first MAX_LISTED
    problems and their count; returns each image's (H, W), in the order of pairs."""
    sizes, problems = [], []
    for image_path, label_path in progress_bar(pairs, f"checking {what} files", progress):
        image, label = _header_or_none(image_path, problems), _header_or_none(label_path, problems)
        if label is not None and label_mode_problem(label_path, label[0]):
            problems.append(label_mode_problem(label_path, label[0]))
        if image is not None and label is not None and image[1] != label[1]:
            problems.append(f"image {image_path} is {image[1]} (H, W) but its label {label_path} is {label[1]}")
        sizes.append(image[1] if image is not None else None)  # returned only when every image was read
    if problems:
        raise ValueError(problem_report(f"{what}: {len(problems)} problem(s) in {len(pairs)} samples", problems))
    return sizes


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
        problem = label_mode_problem(path, image.mode)
        if problem:
            raise ValueError(problem)
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

    image_sizes: each sample's image (H, W), by index, known without decoding (file datasets read
    them from headers at construction), so memory can be planned for the largest image.
    """

    classes: tuple[str, ...] = ()

    def __init__(self, transform=None, seed: int = 0):
        self.transform = EvalTransform() if transform is None else transform
        self.seed = int(seed)
        self.epoch = 0
        self.image_sizes: list[tuple[int, int]] = []

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def max_image_pixels(self) -> int:
        """H * W of the dataset's largest image."""
        return max(h * w for h, w in self.image_sizes)

    @property
    def max_image_size(self) -> tuple[int, int]:
        """(H, W) of the dataset's largest image (the most pixels; the first such sample on a tie)."""
        return max(self.image_sizes, key=lambda hw: hw[0] * hw[1])

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
