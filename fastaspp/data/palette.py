"""The PASCAL VOC colour palette, used for every label mask fastaspp writes (any dataset)."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def _voc_palette() -> np.ndarray:
    # VOC's palette spreads the bits of the class index over the high bits of R, G and B.
    palette = np.zeros((256, 3), dtype=np.uint8)
    for index in range(256):
        c, r, g, b = index, 0, 0, 0
        for shift in range(7, -1, -1):
            r |= (c & 1) << shift
            g |= ((c >> 1) & 1) << shift
            b |= ((c >> 2) & 1) << shift
            c >>= 3
        palette[index] = (r, g, b)
    return palette


VOC_PALETTE: np.ndarray = _voc_palette()
"""[256, 3] uint8: the colour of each class index; 255 (ignore) is (224, 224, 192)."""
VOC_PALETTE.setflags(write=False)


def _as_index_array(label) -> np.ndarray:
    array = label.detach().cpu().numpy() if isinstance(label, torch.Tensor) else np.asarray(label)
    if array.ndim != 2:
        raise ValueError(f"label must be a [H, W] array of class indices, got shape {tuple(array.shape)}")
    if array.dtype.kind not in "iu":
        raise ValueError(f"label must hold integer class indices, got dtype {array.dtype}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise ValueError(f"label values must be in [0, 255] to use the palette, got "
                         f"[{array.min()}, {array.max()}]")
    return array.astype(np.uint8)


def colorize(label) -> Image.Image:
    """A [H, W] integer label (tensor or array) as a palette ("P") PIL image: saved as PNG it is a
    VOC-style mask whose pixel values are the class indices."""
    array = _as_index_array(label)
    image = Image.frombytes("P", (array.shape[1], array.shape[0]), np.ascontiguousarray(array).tobytes())
    image.putpalette(VOC_PALETTE.tobytes())
    return image


def colorize_rgb(label) -> np.ndarray:
    """A [H, W] integer label as a [H, W, 3] uint8 RGB array in the VOC palette."""
    return VOC_PALETTE[_as_index_array(label)]
