"""MaskFormer's short-side resize protocol, reusable by any converter.

MaskFormer / Mask2Former (`datasets/prepare_ade20k_full_sem_seg.py`) store ADE20K-Full at a
short side of at most 512 px: an image whose short side exceeds 512 is resized so the short
side is 512 and the long side is `round(long / short * 512)` (Python's `round`, i.e. half to
even), the image with OpenCV's bilinear interpolation and the label with OpenCV's nearest
neighbour. We reproduce exactly that (same interpolation code paths, same rounding), so
shards made with the default protocol hold the pixels the published ADE20K-Full numbers were
trained and evaluated on.

Nearest-neighbour is a pure selection of source pixels, so it can be applied to an encoded
label (e.g. ADE's RGB `_seg.png`) before decoding the class values: fewer pixels to remap.
"""

from __future__ import annotations

import cv2
import numpy as np


def short_side_size(height: int, width: int, max_short_side: int) -> tuple[int, int]:
    """(height, width) after the protocol; unchanged when `max_short_side` <= 0 or not exceeded."""
    short, long = min(height, width), max(height, width)
    if max_short_side <= 0 or short <= max_short_side:
        return height, width
    new_long = round(long / float(short) * max_short_side)
    return (max_short_side, new_long) if height <= width else (new_long, max_short_side)


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """H x W x C uint8 image -> size[0] x size[1] x C, bilinear (OpenCV, as MaskFormer)."""
    if image.shape[:2] == tuple(size):
        return image
    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)


def resize_nearest(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """H x W (x C) label -> size[0] x size[1] (x C), nearest neighbour (OpenCV, as MaskFormer).

    OpenCV's INTER_NEAREST takes source pixel `floor(dst * src / dst_size)` on each axis.
    """
    if label.shape[:2] == tuple(size):
        return label
    return cv2.resize(label, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
