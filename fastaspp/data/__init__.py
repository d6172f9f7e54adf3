"""Datasets for segmentation training and evaluation, their transforms, and the VOC palette.

build_dataset("synthetic" | "voc" | "folder", root, split, transform=..., seed=..., **options)
gives a torch Dataset of (image float32 [3, H, W] normalised, label int64 [H, W], 255 = ignore);
`dataset.image_sizes` holds each sample's (H, W). collect_images(paths) gives `fastaspp predict`
its (image, output stem) pairs.
"""
from __future__ import annotations

import os

from fastaspp.data.base import IMAGE_EXTENSIONS, SegmentationDataset, read_image, read_label
from fastaspp.data.folder import FolderSegmentation
from fastaspp.data.images import collect_images
from fastaspp.data.palette import VOC_PALETTE, colorize, colorize_rgb
from fastaspp.data.synthetic import SYNTHETIC_CLASSES, SyntheticScenes
from fastaspp.data.transforms import (IGNORE_INDEX, IMAGENET_MEAN, IMAGENET_STD, EvalTransform, TrainTransform,
                                      denormalize, normalize)
from fastaspp.data.voc import VOC_CLASSES, VOCSegmentation

DATASETS = ("synthetic", "voc", "folder")


def build_dataset(name: str, root: str | None = None, split: str = "train", transform=None, seed: int = 0,
                  progress: bool = True, **options) -> SegmentationDataset:
    """A dataset by name.

    synthetic: generated, root is ignored; options: size, image_size, num_classes.
    voc: root is the VOC2012 directory (JPEGImages, SegmentationClass[Aug], ImageSets/Segmentation).
    folder: root/<split>/{images,masks} if root/<split> is a directory, else root/{images,masks} for
        every split; options: num_classes, classes.
    transform: a joint transform such as TrainTransform(crop_size); default: normalisation only.
    progress: tqdm bars on stderr while voc and folder check (and scan) a large set of files;
        synthetic has no files and ignores it.
    """
    if name == "synthetic":
        return SyntheticScenes(split=split, transform=transform, seed=seed, **options)
    if name not in DATASETS:
        raise ValueError(f"dataset name must be one of {DATASETS}, got {name!r}")
    if root is None:
        raise ValueError(f"dataset {name!r} needs a root directory (root=None)")
    if name == "voc":
        return VOCSegmentation(root, split=split, transform=transform, seed=seed, progress=progress, **options)
    split_dir = os.path.join(root, split)
    return FolderSegmentation(split_dir if os.path.isdir(split_dir) else root, transform=transform, seed=seed,
                              progress=progress, **options)


__all__ = ["DATASETS", "build_dataset", "SegmentationDataset", "SyntheticScenes", "VOCSegmentation",
           "FolderSegmentation", "SYNTHETIC_CLASSES", "VOC_CLASSES", "VOC_PALETTE", "colorize", "colorize_rgb",
           "TrainTransform", "EvalTransform", "normalize", "denormalize", "IMAGENET_MEAN", "IMAGENET_STD",
           "IGNORE_INDEX", "read_image", "read_label", "collect_images", "IMAGE_EXTENSIONS"]
