"""Training and test transforms (mmseg semantics, numpy + OpenCV).

Training (docs/method.md sec. 5), in mmseg's order:
    random resize of a (long, short) base scale by a ratio in [0.5, 2.0] (keep aspect)
    -> random crop with cat_max_ratio (up to 10 tries) -> horizontal flip
    -> photometric distortion -> normalise -> pad to the crop (image 0, label ignore).
Every random choice is drawn once per call from the given `np.random.Generator`, so the
frames of a video clip share one set of parameters, and the loader can make a sample's
augmentation a function of (seed, sample position) alone (exact resume, any worker count).

Test: resize so that the short side is `short_side` and the long side at most `max_long`
(mmseg's keep-ratio rule), normalise, and leave the label at its original size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import overload

import cv2
import numpy as np

from rankseg_core.shards.codec import IGNORE


def rescale_size(h: int, w: int, long_side: float, short_side: float) -> tuple[int, int]:
    """mmcv `rescale_size` with keep_ratio: the largest size with long <= long_side and
    short <= short_side. Returns (new_h, new_w)."""
    factor = min(long_side / max(h, w), short_side / min(h, w))
    return max(1, int(h * factor + 0.5)), max(1, int(w * factor + 0.5))


@overload
def resize_pair(image: np.ndarray, label: np.ndarray, size: tuple[int, int], nearest: bool = False
                ) -> tuple[np.ndarray, np.ndarray]: ...
@overload
def resize_pair(image: np.ndarray, label: None, size: tuple[int, int], nearest: bool = False
                ) -> tuple[np.ndarray, None]: ...
def resize_pair(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int], nearest: bool = False
                ) -> tuple[np.ndarray, np.ndarray | None]:
    """Bilinear image (nearest with `nearest`, for index maps), nearest label. size = (h, w)."""
    h, w = size
    if image.shape[:2] == (h, w):
        return image, label
    image = cv2.resize(image, (w, h), interpolation=cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR)
    if label is not None:
        label = cv2.resize(label, (w, h), interpolation=cv2.INTER_NEAREST)
    return image, label


def _crop_ok(label: np.ndarray, cat_max_ratio: float, ignore: int) -> bool:
    """mmseg's test: >1 labelled class and none above cat_max_ratio of labelled pixels."""
    counts = np.bincount(label.ravel(), minlength=ignore + 1)
    counts[ignore] = 0
    counts = counts[counts > 0]
    return counts.size > 1 and counts.max() / counts.sum() < cat_max_ratio


def random_crop_box(label: np.ndarray, crop: int, rng: np.random.Generator, cat_max_ratio: float = 0.75,
                    ignore: int = IGNORE, tries: int = 10) -> tuple[int, int, int, int]:
    """(y1, y2, x1, x2) of a crop <= crop x crop, as mmseg's RandomCrop.

    With cat_max_ratio < 1, redraw up to `tries` times while the crop is dominated by one
    class (or holds < 2 classes); after the last try the last drawn box is kept unchecked.
    """
    h, w = label.shape

    def draw() -> tuple[int, int, int, int]:
        y = int(rng.integers(0, max(h - crop, 0) + 1))
        x = int(rng.integers(0, max(w - crop, 0) + 1))
        return y, min(y + crop, h), x, min(x + crop, w)

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            y1, y2, x1, x2 = box
            if _crop_ok(label[y1:y2, x1:x2], cat_max_ratio, ignore):
                break
            box = draw()
    return box


def _convert(channel: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(channel.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


@dataclass
class PhotoParams:
    """One draw of mmseg's PhotoMetricDistortion (None = that step skipped)."""

    brightness: float | None
    contrast: float | None
    contrast_first: bool
    saturation: float | None
    hue: int | None


def draw_photometric(rng: np.random.Generator, brightness_delta: int = 32,
                     contrast_range: tuple[float, float] = (0.5, 1.5),
                     saturation_range: tuple[float, float] = (0.5, 1.5), hue_delta: int = 18) -> PhotoParams:
    """Each step happens with probability 0.5; contrast goes before or after the HSV steps."""
    brightness = float(rng.uniform(-brightness_delta, brightness_delta)) if rng.integers(2) else None
    contrast_first = bool(rng.integers(2))
    contrast = float(rng.uniform(*contrast_range)) if rng.integers(2) else None
    saturation = float(rng.uniform(*saturation_range)) if rng.integers(2) else None
    hue = int(rng.integers(-hue_delta, hue_delta + 1)) if rng.integers(2) else None
    return PhotoParams(brightness, contrast, contrast_first, saturation, hue)


def apply_photometric(image: np.ndarray, p: PhotoParams) -> np.ndarray:
    """H x W x 3 uint8 RGB -> distorted uint8 RGB (each step clips to 0..255, as mmseg)."""
    if p.brightness is not None:
        image = _convert(image, beta=p.brightness)
    if p.contrast is not None and p.contrast_first:
        image = _convert(image, alpha=p.contrast)
    if p.saturation is not None or p.hue is not None:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)  # uint8: H in [0, 180)
        if p.saturation is not None:
            hsv[..., 1] = _convert(hsv[..., 1], alpha=p.saturation)
        if p.hue is not None:
            hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + p.hue) % 180).astype(np.uint8)
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if p.contrast is not None and not p.contrast_first:
        image = _convert(image, alpha=p.contrast)
    return image


def normalize(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> 3 x H x W float32, (x - mean) / std on the 0..255 scale."""
    out = (image.astype(np.float32) - mean) / std
    return np.ascontiguousarray(out.transpose(2, 0, 1))


# (resized (h, w), crop box (y1, y2, x1, x2), flipped): where a clip's pixels went.
Geometry = tuple[tuple[int, int], tuple[int, int, int, int], bool]


@dataclass
class TrainTransform:
    """Clip-consistent training augmentation.

    Call with T images (H x W x 3 uint8 RGB) and T labels (H x W uint16, 65535 = ignore) of
    one clip (T = 1 for images) -> (T x 3 x crop x crop float32, T x crop x crop int64 with
    `ignore` kept). All frames must have the same size. Panoptic data: T segment-index maps
    (H x W uint16, 0 = no segment) go through the same geometry as the labels (nearest
    resize, crop, flip; padding 0) and come back as a third array T x crop x crop int64; the
    random draws are the same with or without them. Instance masks: `with_instances`.
    """

    crop: int
    mean: np.ndarray
    std: np.ndarray
    scale: tuple[int, int] = (2048, 512)  # (long, short) base scale, multiplied by the ratio
    ratio_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip_prob: float = 0.5
    photometric: bool = True
    photo_kw: dict = field(default_factory=dict)
    ignore: int = IGNORE

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, np.float32)
        self.std = np.asarray(self.std, np.float32)

    def _draw(self, images: list[np.ndarray], labels: list[np.ndarray], rng: np.random.Generator
              ) -> tuple[tuple[int, int], tuple[int, int, int, int], bool, PhotoParams | None,
                         list[tuple[np.ndarray, np.ndarray]]]:
        """The clip's random geometry and photometric draw, in mmseg's order: (resized size,
        crop box, flip, photometric params, the resized (image, label) pairs)."""
        h, w = labels[0].shape
        ratio = rng.uniform(*self.ratio_range)
        size = rescale_size(h, w, self.scale[0] * ratio, self.scale[1] * ratio)
        resized = [resize_pair(i, lab, size) for i, lab in zip(images, labels)]
        # The crop is chosen on the first frame's label; the clip shares it.
        box = random_crop_box(resized[0][1], self.crop, rng, self.cat_max_ratio, self.ignore)
        flip = bool(rng.random() < self.flip_prob)
        photo = draw_photometric(rng, **self.photo_kw) if self.photometric else None
        return size, box, flip, photo, resized

    def __call__(self, images: list[np.ndarray], labels: list[np.ndarray], rng: np.random.Generator,
                 segments: list[np.ndarray] | None = None) -> tuple[np.ndarray, ...]:
        out_img, out_lab, out_seg, _ = self.apply_geometry(images, labels, rng, segments)
        return (out_img, out_lab) if out_seg is None else (out_img, out_lab, out_seg)

    def apply_geometry(self, images: list[np.ndarray], labels: list[np.ndarray], rng: np.random.Generator,
               segments: list[np.ndarray] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, Geometry]:
        """Image, label, segment maps (or None) and the geometry (size, box, flip) used."""
        h, w = labels[0].shape
        if any(lab.shape != (h, w) or img.shape[:2] != (h, w) for img, lab in zip(images, labels)):
            raise ValueError("all frames of a clip (and each image and its label) must have the same size")
        if segments is not None and any(s.shape != (h, w) for s in segments):
            raise ValueError("a segment map differs in size from its label")
        size, (y1, y2, x1, x2), flip, photo, resized = self._draw(images, labels, rng)
        segs = None if segments is None else [resize_pair(s, None, size, nearest=True)[0] for s in segments]

        t, c = len(images), self.crop
        out_img = np.zeros((t, 3, c, c), np.float32)  # pad value 0 after normalisation, as mmseg
        out_lab = np.full((t, c, c), self.ignore, np.int64)
        for f, (img, lab) in enumerate(resized):
            img, lab = img[y1:y2, x1:x2], lab[y1:y2, x1:x2]
            if flip:
                img, lab = img[:, ::-1], lab[:, ::-1]
            if photo is not None:
                img = apply_photometric(np.ascontiguousarray(img), photo)
            ch, cw = lab.shape
            out_img[f, :, :ch, :cw] = normalize(img, self.mean, self.std)
            out_lab[f, :ch, :cw] = lab
        geometry = (size, (y1, y2, x1, x2), flip)
        if segs is None:
            return out_img, out_lab, None, geometry
        out_seg = np.zeros((t, c, c), np.int64)
        for f, s in enumerate(segs):
            s = s[y1:y2, x1:x2]
            out_seg[f, :s.shape[0], :s.shape[1]] = s[:, ::-1] if flip else s
        return out_img, out_lab, out_seg, geometry

    def with_instances(self, images: list[np.ndarray], labels: list[np.ndarray], instances: list[np.ndarray],
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """As `__call__`, plus per frame an n_t x H x W stack of instance masks (uint8 / bool,
        possibly overlapping) -> n_t x crop x crop bool, moved exactly as the label: nearest
        resize to the label's size, the same crop and flip, padding False. The random draws
        are `__call__`'s (the crop is still chosen on the first frame's LABEL), so adding the
        masks changes nothing else. Masks are resized one at a time and cropped at once, so
        only one full-size resized mask is held at any time (bounded memory for many
        instances). An instance whose pixels all fall outside the crop comes back empty (the
        caller drops it: absent from that frame)."""
        h, w = labels[0].shape
        if len(instances) != len(labels) or any(m.ndim != 3 or m.shape[1:] != (h, w) for m in instances):
            raise ValueError("instance masks must be one n x H x W stack per frame, of the label's size")
        out_img, out_lab, _, (size, (y1, y2, x1, x2), flip) = self.apply_geometry(images, labels, rng, None)
        c = self.crop
        out_masks = []
        for stack in instances:
            out = np.zeros((stack.shape[0], c, c), bool)
            for j, m in enumerate(stack):
                r = resize_pair(np.ascontiguousarray(m, np.uint8), None, size, nearest=True)[0][y1:y2, x1:x2]
                out[j, :r.shape[0], :r.shape[1]] = (r[:, ::-1] if flip else r) != 0
            out_masks.append(out)
        return out_img, out_lab, out_masks


@dataclass
class TestTransform:
    """Resize an image for evaluation / prediction; the label is not touched.

    image H x W x 3 uint8 RGB -> 3 x H' x W' float32 with (H', W') from `rescale_size`.
    """

    short_side: int
    max_long: int
    mean: np.ndarray
    std: np.ndarray

    def __post_init__(self) -> None:
        self.mean = np.asarray(self.mean, np.float32)
        self.std = np.asarray(self.std, np.float32)

    def size(self, h: int, w: int) -> tuple[int, int]:
        return rescale_size(h, w, self.max_long, self.short_side)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        image, _ = resize_pair(image, None, self.size(*image.shape[:2]))
        return normalize(image, self.mean, self.std)


def build_train_transform(cfg, mean: list[float], std: list[float]) -> TrainTransform:
    """TrainTransform from a TrainConfig (`cfg.aug`, crop = cfg.model.img_size)."""
    a = cfg.aug
    return TrainTransform(
        crop=cfg.model.img_size, mean=np.asarray(a.mean or mean), std=np.asarray(a.std or std),
        scale=(int(a.scale[0]), int(a.scale[1])), ratio_range=(a.ratio_range[0], a.ratio_range[1]),
        cat_max_ratio=a.cat_max_ratio, flip_prob=a.flip_prob, photometric=a.photometric,
        photo_kw=dict(brightness_delta=a.brightness_delta, contrast_range=tuple(a.contrast_range),
                      saturation_range=tuple(a.saturation_range), hue_delta=a.hue_delta))


def build_test_transform(cfg, mean: list[float], std: list[float]) -> TestTransform:
    a, e = cfg.aug, cfg.eval
    return TestTransform(short_side=int(e.short_side), max_long=int(e.max_long),
                         mean=np.asarray(a.mean or mean), std=np.asarray(a.std or std))
