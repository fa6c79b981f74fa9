"""Augmentation invariants: crop size, ignore padding, cat_max_ratio, flip consistency, clips."""

from __future__ import annotations

import numpy as np
import pytest

from rankseg_core.data import augment
from rankseg_core.data.augment import PhotoParams, TrainTransform, apply_photometric, random_crop_box, rescale_size
from rankseg_core.shards.codec import IGNORE

PALETTE = np.random.default_rng(0).integers(0, 256, (8, 3)).astype(np.uint8)


def scene(h: int, w: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A label of vertical bands of classes 0..5 (some ignore) and image = palette[label]."""
    rng = np.random.default_rng(seed)
    cols = np.sort(rng.integers(0, 6, w))
    label = np.broadcast_to(cols, (h, w)).astype(np.uint16).copy()
    label[h // 2:h // 2 + 2] = IGNORE  # an unlabelled strip, as region boundaries in real data
    image = PALETTE[np.where(label == IGNORE, 7, label)]
    return image, label


def plain(crop: int, **kw) -> TrainTransform:
    """No photometric change, identity normalisation: output pixels are the input colours."""
    return TrainTransform(crop=crop, mean=np.zeros(3), std=np.ones(3), photometric=False, **kw)


def test_rescale_size_matches_mmseg() -> None:
    # mmcv keep-ratio rule for (2048, 512): a 375 x 500 ADE image becomes 512 x 683.
    assert rescale_size(375, 500, 2048, 512) == (512, 683)
    assert rescale_size(100, 5000, 2048, 512) == (41, 2048)  # long side caps
    assert augment.TestTransform(512, 2048, np.zeros(3), np.ones(3)).size(480, 640) == (512, 683)


@pytest.mark.parametrize("size", [(20, 30), (64, 64), (200, 90)])
def test_crop_size_and_ignore_padding(size: tuple[int, int]) -> None:
    image, label = scene(*size)
    tf = plain(48, scale=(size[1], size[0]), ratio_range=(1.0, 1.0))  # no resize
    for seed in range(5):
        img, lab = tf([image], [label], np.random.default_rng(seed))
        assert img.shape == (1, 3, 48, 48) and img.dtype == np.float32
        assert lab.shape == (1, 48, 48) and lab.dtype == np.int64
        ch, cw = min(48, size[0]), min(48, size[1])
        assert (lab[0, ch:] == IGNORE).all() and (lab[0, :, cw:] == IGNORE).all()  # label pad = ignore
        assert (img[0, :, ch:] == 0).all() and (img[0, :, :, cw:] == 0).all()  # image pad = 0
        valid = lab[0, :ch, :cw]
        assert set(np.unique(valid)) <= set(range(6)) | {IGNORE}


def test_image_label_stay_aligned_through_resize_flip_crop() -> None:
    image, label = scene(96, 128, seed=3)
    tf = plain(64, scale=(256, 96), ratio_range=(0.5, 2.0), flip_prob=0.5)
    flips = set()
    for seed in range(12):
        img, lab = tf([image], [label], np.random.default_rng(seed))
        rgb = img[0].transpose(1, 2, 0)
        ok = (lab[0] != IGNORE)
        # Away from band edges (bilinear blends colours there) every labelled pixel has its class colour.
        inner = ok.copy()
        for d in (1, 2):  # 2-px erosion: upsampling by up to 2x blends two pixels deep
            inner[:, d:] &= lab[0, :, d:] == lab[0, :, :-d]
            inner[:, :-d] &= lab[0, :, :-d] == lab[0, :, d:]
            inner[d:] &= lab[0, d:] == lab[0, :-d]
            inner[:-d] &= lab[0, :-d] == lab[0, d:]
        err = np.abs(rgb[inner] - PALETTE[lab[0][inner]].astype(np.float32)).max(axis=1)
        assert np.mean(err < 1.5) > 0.97, seed
        # Bands are sorted left to right in the source: a flip reverses the order in the crop.
        cols = [np.median(np.nonzero((lab[0] == c).any(0))[0]) for c in np.unique(lab[0][ok])]
        if len(cols) > 1:
            flips.add(bool(np.all(np.diff(cols) < 0)))
    assert flips == {True, False}  # both flipped and unflipped crops occurred


def test_cat_max_ratio_retries() -> None:
    rng = np.random.default_rng(0)
    # Class 0 everywhere but a 40 x 40 patch of classes 1/2: most 48-px crops hold only class 0.
    label = np.zeros((200, 200), np.uint16)
    label[80:120, 80:100], label[80:120, 100:120] = 1, 2

    def good(box: tuple[int, int, int, int]) -> bool:
        y1, y2, x1, x2 = box
        counts = np.bincount(label[y1:y2, x1:x2].ravel(), minlength=3)
        counts = counts[counts > 0]
        return counts.size > 1 and counts.max() / counts.sum() < 0.75

    with_retry = [good(random_crop_box(label, 48, rng, 0.75)) for _ in range(300)]
    without = [good(random_crop_box(label, 48, rng, 1.0)) for _ in range(300)]
    p = np.mean(without)
    assert p < 0.4
    # mmseg: up to 10 re-draws, so P(bad) = (1 - p)^11.
    assert np.mean(with_retry) > 1 - (1 - p) ** 11 - 0.1
    # A single-class label can never pass: exactly 11 boxes are drawn and the last is kept.
    flat = np.zeros((100, 100), np.uint16)
    a, b = np.random.default_rng(5), np.random.default_rng(5)
    box = random_crop_box(flat, 48, a, 0.75)
    draws = [(int(b.integers(0, 53)), int(b.integers(0, 53))) for _ in range(11)]
    assert (box[0], box[2]) == draws[-1]
    assert a.integers(1 << 30) == b.integers(1 << 30)  # same number of draws consumed


def test_ignore_does_not_count_for_cat_max_ratio() -> None:
    # 96% ignore, the labelled pixels a 50/50 mix of classes 1 and 2 everywhere: if ignore
    # counted as a class no crop would pass; it must not, so the first box is accepted.
    label = np.full((64, 64), IGNORE, np.uint16)
    label[::5, ::5] = 1
    label[::5, 2::5] = 2
    a, b = np.random.default_rng(1), np.random.default_rng(1)
    random_crop_box(label, 32, a, 0.75)
    b.integers(0, 33), b.integers(0, 33)  # one (y, x) draw
    assert a.integers(1 << 30) == b.integers(1 << 30)


def test_clip_frames_share_parameters() -> None:
    image, label = scene(80, 100, seed=1)
    tf = TrainTransform(crop=48, mean=np.full(3, 127.5), std=np.full(3, 127.5), scale=(200, 80))
    img, lab = tf([image, image.copy()], [label, label.copy()], np.random.default_rng(7))
    assert np.array_equal(img[0], img[1]) and np.array_equal(lab[0], lab[1])
    img2, lab2 = tf([image], [label], np.random.default_rng(7))  # same rng: same augmentation
    assert np.array_equal(img2[0], img[0]) and np.array_equal(lab2[0], lab[0])
    with pytest.raises(ValueError, match="same size"):
        tf([image, image[:50]], [label, label[:50]], np.random.default_rng(0))


def test_photometric_matches_hand_computation() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (16, 16, 3)).astype(np.uint8)
    out = apply_photometric(image, PhotoParams(brightness=20.0, contrast=None, contrast_first=True,
                                               saturation=None, hue=None))
    assert np.array_equal(out, np.clip(image.astype(np.float32) + 20, 0, 255).astype(np.uint8))
    out = apply_photometric(image, PhotoParams(None, 1.5, False, None, None))
    assert np.array_equal(out, np.clip(image.astype(np.float32) * 1.5, 0, 255).astype(np.uint8))
    grey = np.full((4, 4, 3), 100, np.uint8)  # no saturation: hue / saturation leave grey unchanged
    assert np.array_equal(apply_photometric(grey, PhotoParams(None, None, True, 1.4, 10)), grey)
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 200
    shifted = apply_photometric(red, PhotoParams(None, None, True, None, 60))  # +120 degrees: red -> green
    assert shifted[0, 0, 1] > 150 and shifted[0, 0, 0] < 20 and shifted[0, 0, 2] < 20


def test_test_transform_normalises() -> None:
    image = np.full((30, 60, 3), 255, np.uint8)
    x = augment.TestTransform(16, 64, np.full(3, 127.5), np.full(3, 127.5))(image)
    assert x.shape == (3, 16, 32) and np.allclose(x, 1.0)
