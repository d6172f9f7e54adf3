"""A folder dataset: root/images/<stem>.<jpg|jpeg|png|bmp> and root/masks/<stem>.png side by side,
the masks single-channel PNGs of class indices (255 = ignore)."""
from __future__ import annotations

import os

import torch

from fastaspp.data.base import (IMAGE_EXTENSIONS, SegmentationDataset, check_label, check_size, listing,
                                 progress_bar, read_image, read_label, require_dir, validate_samples)


def _by_stem(directory: str, extensions: tuple[str, ...]) -> dict[str, str]:
    files: dict[str, str] = {}
    for name in sorted(os.listdir(directory)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in extensions or not os.path.isfile(os.path.join(directory, name)):
            continue
        if stem in files:
            raise ValueError(f"{directory} holds two files with the stem {stem!r}: {files[stem]} and {name}")
        files[stem] = name
    return files


class FolderSegmentation(SegmentationDataset):
    """Pairs root/images and root/masks by file stem; an unpaired file on either side is an error, and
    so is, before any sample is loaded, a file that is not an image, a mask that is not single-channel
    or a mask whose size differs from its image's (see validate_samples).

    num_classes: background included; if None it is found by scanning every mask once (max index
    other than 255, plus one). class names are "0", "1", ... unless `classes` is given.
    progress: tqdm bars on stderr for the checks and the scan of a large folder.
    """

    def __init__(self, root: str, num_classes: int | None = None, classes=None, transform=None, seed: int = 0,
                 progress: bool = True):
        super().__init__(transform=transform, seed=seed)
        self.root = root
        require_dir(root, "folder dataset root")
        self.image_dir = require_dir(os.path.join(root, "images"), "folder dataset images")
        self.mask_dir = require_dir(os.path.join(root, "masks"), "folder dataset masks")
        images, masks = _by_stem(self.image_dir, IMAGE_EXTENSIONS), _by_stem(self.mask_dir, (".png",))
        only_images = [images[s] for s in images.keys() - masks.keys()]
        only_masks = [masks[s] for s in masks.keys() - images.keys()]
        if only_images or only_masks:
            parts = []
            if only_images:
                parts.append(f"images without a mask in {self.mask_dir}: {listing(only_images)}")
            if only_masks:
                parts.append(f"masks without an image in {self.image_dir}: {listing(only_masks)}")
            raise ValueError("folder dataset: unmatched files; " + "; ".join(parts))
        if not images:
            raise ValueError(f"folder dataset: no images ({', '.join(IMAGE_EXTENSIONS)}) in {self.image_dir}")
        self.stems = sorted(images)
        self._images, self._masks = images, masks
        self.progress = progress
        self.image_sizes = validate_samples([self.paths(i) for i in range(len(self))],
                                            f"folder dataset {root}", progress)
        if classes is not None:
            classes = tuple(classes)
            if num_classes is not None and num_classes != len(classes):
                raise ValueError(f"num_classes={num_classes} but {len(classes)} class names were given")
            num_classes = len(classes)
        if num_classes is None:
            num_classes = self._scan_num_classes()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        self.classes = classes if classes is not None else tuple(str(i) for i in range(num_classes))

    def _scan_num_classes(self) -> int:
        highest = 0
        for index in progress_bar(range(len(self)), "scanning masks for num_classes", self.progress):
            label = read_label(self.paths(index)[1])
            label = label[label != 255]
            if label.numel():
                highest = max(highest, int(label.max()))
        return highest + 1

    def __len__(self) -> int:
        return len(self.stems)

    def paths(self, index: int) -> tuple[str, str]:
        stem = self.stems[index]
        return os.path.join(self.image_dir, self._images[stem]), os.path.join(self.mask_dir, self._masks[stem])

    def load(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path, label_path = self.paths(index)
        image, label = read_image(image_path), read_label(label_path)
        check_size(image, label, image_path, label_path)
        check_label(label, self.num_classes, label_path)
        return image, label

    def __repr__(self) -> str:
        return f"FolderSegmentation(root={self.root!r}, {len(self)} images, num_classes={self.num_classes})"
