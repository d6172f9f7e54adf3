"""PASCAL VOC 2012 segmentation in its own layout.

    root/JPEGImages/<id>.jpg
    root/SegmentationClass/<id>.png        palette PNGs; pixel values are class indices, 255 = ignore
    root/SegmentationClassAug/<id>.png     used instead when present (the SBD-augmented labels)
    root/ImageSets/Segmentation/<split>.txt  one id per line; for train, train_aug.txt is preferred
                                             when present next to train.txt
"""
from __future__ import annotations

import os

from fastaspp.data.base import (SegmentationDataset, check_label, check_size, listing, read_image, read_label,
                                 require_dir, validate_samples)

VOC_CLASSES = ("background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair",
               "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
               "train", "tvmonitor")


def _missing(ids: list[str], pairs: list[tuple[str, str]]) -> list[str]:
    """'<id> (image)', '<id> (label)' or '<id> (image and label)' for each id lacking files, in list order."""
    missing = []
    for name, (image_path, label_path) in zip(ids, pairs):
        lacks = [what for what, path in (("image", image_path), ("label", label_path)) if not os.path.isfile(path)]
        if lacks:
            missing.append(f"{name} ({' and '.join(lacks)})")
    return missing


class VOCSegmentation(SegmentationDataset):
    """VOC 2012 segmentation. split names a list in ImageSets/Segmentation ("train", "val",
    "trainval", ...). Items are (image float32 [3, H, W] after `transform`, label int64 [H, W]).

    Every listed id's image and label must exist and pass validate_samples, checked at construction
    so that a bad file fails before training or evaluation starts; progress: a tqdm bar on stderr
    while checking a large split.
    """

    classes = VOC_CLASSES

    def __init__(self, root: str, split: str = "train", transform=None, seed: int = 0, progress: bool = True):
        super().__init__(transform=transform, seed=seed)
        require_dir(root, "VOC root")
        self.root = root
        self.split = split
        self.image_dir = require_dir(os.path.join(root, "JPEGImages"), "VOC images")
        aug = os.path.join(root, "SegmentationClassAug")
        self.label_dir = aug if os.path.isdir(aug) else require_dir(os.path.join(root, "SegmentationClass"),
                                                                     "VOC labels (nor SegmentationClassAug)")
        lists = require_dir(os.path.join(root, "ImageSets", "Segmentation"), "VOC split lists")
        list_file = os.path.join(lists, f"{split}.txt")
        if split == "train" and os.path.isfile(os.path.join(lists, "train_aug.txt")):
            list_file = os.path.join(lists, "train_aug.txt")
        if not os.path.isfile(list_file):
            available = sorted(f[:-4] for f in os.listdir(lists) if f.endswith(".txt"))
            raise FileNotFoundError(f"VOC split {split!r}: list file {list_file} does not exist "
                                    f"(splits there: {available})")
        with open(list_file) as f:
            self.ids = [line.split()[0] for line in f if line.strip()]
        if not self.ids:
            raise ValueError(f"VOC split list {list_file} is empty")
        self.list_file = list_file
        pairs = [self.paths(i) for i in range(len(self))]
        missing = _missing(self.ids, pairs)
        if missing:
            raise FileNotFoundError(f"VOC split {split!r}: {len(missing)} of the {len(self.ids)} ids listed in "
                                    f"{list_file} lack an image {self.image_dir}/<id>.jpg or a label "
                                    f"{self.label_dir}/<id>.png: {listing(missing, sort=False)}")
        self.image_sizes = validate_samples(pairs, f"VOC split {split!r}", progress)

    def __len__(self) -> int:
        return len(self.ids)

    def paths(self, index: int) -> tuple[str, str]:
        name = self.ids[index]
        return os.path.join(self.image_dir, f"{name}.jpg"), os.path.join(self.label_dir, f"{name}.png")

    def load(self, index: int):
        image_path, label_path = self.paths(index)
        image, label = read_image(image_path), read_label(label_path)
        check_size(image, label, image_path, label_path)
        check_label(label, self.num_classes, label_path)
        return image, label

    def __repr__(self) -> str:
        return (f"VOCSegmentation(root={self.root!r}, split={self.split!r}, {len(self)} images, "
                f"labels={self.label_dir!r})")
