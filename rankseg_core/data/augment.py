"""Training and test transforms (mmseg semantics, numpy + OpenCV).

Training (docs/method.md sec. 5), in mmseg's order:
    random resize of a (long, short) base scale by a ratio in [0.5, 2.0] (keep aspect)
    -> random crop with cat_max_ratio (up to 10 tries) -> horizontal flip
    -> photometric distortion -> normalise -> pad to the crop (image 0, label ignore).
The training loader stops before "normalise": its workers ship the padded uint8 crop, and
data/device.py normalises on the device and zeroes the padding afterwards, which gives the
same float values bit for bit (`TrainTransform.apply_geometry` is that whole chain in numpy).
Every random choice is drawn once per call from the given `np.random.Generator`, so the
frames of a video clip share one set of parameters, and the loader can make a sample's
augmentation a function of (seed, sample position) alone (exact resume, any worker count).

Test: resize so that the short side is `short_side` and the long side at most `max_long`
(mmseg's keep-ratio rule), normalise, and leave the label at its original size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import overload

import cv2
import numpy as np

from rankseg_core.shards.codec import IGNORE
from rankseg_core.utils.counting import value_counts


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


def resize_window(src: np.ndarray, size: tuple[int, int], rows: int, cols: int, nearest: bool = False
                  ) -> np.ndarray:
    """The top-left rows x cols of `cv2.resize(src, size)` (bilinear; nearest with
    `nearest`), bit for bit, from a resize of only the source pixels they read.

    Why it is exact: OpenCV maps output pixel x to source coordinate (x + 0.5) * s - 0.5 with
    s = 1 / f, f the scale factor it is given. Called on a window that starts at source (0, 0)
    with the full resize's factors (fx = W / w, fy = H / h: the same doubles OpenCV derives
    from the sizes), every output pixel of the window gets the full resize's coordinates and
    weights; the window reaches two source pixels past the last one read, so its own border
    clamping never touches the part returned (tests/test_loader_device.py compares this with
    the full resize over random sizes). Training keeps only a crop of the resized image: up to
    2x the decoded size, resized whole, was the largest cost after decoding.
    src: h x w (x C); size = (H, W); rows <= H, cols <= W. A view when size is src's size."""
    h, w = src.shape[:2]
    out_h, out_w = size
    if (h, w) == (out_h, out_w):
        return src[:rows, :cols]
    interp = cv2.INTER_NEAREST if nearest else cv2.INTER_LINEAR
    r = min(h, math.ceil((rows + 1) * h / out_h) + 2)
    c = min(w, math.ceil((cols + 1) * w / out_w) + 2)
    if (r, c) == (h, w):
        out = cv2.resize(src, (out_w, out_h), interpolation=interp)
    else:
        out = cv2.resize(src[:r, :c], None, fx=out_w / w, fy=out_h / h, interpolation=interp)
    return out[:rows, :cols]


def nearest_index(src: int, dst: int) -> np.ndarray:
    """The source index OpenCV's INTER_NEAREST resize reads for each of `dst` outputs along one
    axis: floor(x / (dst / src)) in double precision, clamped to src - 1 (its resizeNN, with the
    factor it derives from the sizes). tests/test_loader_device.py compares it with cv2.resize."""
    step = 1.0 / (dst / src)
    return np.minimum(np.floor(np.arange(dst, dtype=np.float64) * step).astype(np.intp), src - 1)


class NearestResized:
    """`cv2.resize(src, (W, H), interpolation=INTER_NEAREST)`, made crop by crop: indexing
    with two slices gathers only that block of the resized map, bit for bit.

    Why: training keeps a crop of the resized label, and the crop is chosen on it (mmseg's
    cat_max_ratio tries); resizing the whole label first (up to 4x the decoded pixels at
    ratio 2) cost more than the tries themselves. src: h x w (x C); size = (H, W)."""

    def __init__(self, src: np.ndarray, size: tuple[int, int]) -> None:
        self.src = src
        self.shape = (int(size[0]), int(size[1]))
        self._rows, self._cols = nearest_index(src.shape[0], self.shape[0]), nearest_index(src.shape[1], self.shape[1])

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        return self.src.take(self._rows[rows], 0).take(self._cols[cols], 1)

    def of(self, other: np.ndarray) -> "NearestResized":
        """The same resize of another map of this one's size (a clip's other frame, its segment
        map), reusing the source indices."""
        if other.shape[:2] != self.src.shape[:2]:
            raise ValueError(f"a {other.shape[:2]} map is not of the {self.src.shape[:2]} size of this resize")
        view = object.__new__(NearestResized)
        view.src, view.shape, view._rows, view._cols = other, self.shape, self._rows, self._cols
        return view


def _varied(counts: np.ndarray, cat_max_ratio: float) -> bool:
    """mmseg's test on a crop's per-class pixel counts: >1 class and none above cat_max_ratio."""
    counts = counts[counts > 0]
    return counts.size > 1 and counts.max() / counts.sum() < cat_max_ratio


def _crop_ok(label: np.ndarray, cat_max_ratio: float, ignore: int) -> bool:
    """mmseg's test: >1 labelled class and none above cat_max_ratio of labelled pixels."""
    # Count the labelled pixels only: a bincount through the ignore value (65535) would
    # allocate and scan 65536 bins per try, the dominant cost of the whole crop.
    if ignore == IGNORE and label.dtype == np.uint16:
        # uint16 wrap-around sends the ignore value to bin 0 and class c to c + 1: one pass
        # where selecting the labelled pixels first takes a mask and a compaction.
        shifted = label + np.uint16(1)
        if shifted.max() < 256:
            # Every class < 255 (most datasets): 8-bit counts (`_counts8`), ~2x faster than
            # bincount, which widens every pixel to int64 first.
            counts = _counts8(shifted.astype(np.uint8))[1:]
        else:
            counts = np.bincount(shifted.ravel())[1:]
    else:
        flat = label.ravel()
        counts = np.bincount(flat[flat != ignore])
    return _varied(counts, cat_max_ratio)


def _hist8(x: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit histogram (~2x np.bincount, which widens every pixel to int64 first); its
    float32 counts are exact below 2^24 pixels."""
    if x.size >= 1 << 24:
        return np.bincount(x.ravel(), minlength=256)
    return cv2.calcHist([np.ascontiguousarray(x)], [0], None, [256], [0, 256]).ravel().astype(np.int64)


def _counts8(x: np.ndarray) -> np.ndarray:
    """The 256 per-value pixel counts of a uint8 map (int64): by runs where values repeat along
    rows, as label crops do (utils/counting.py), else OpenCV's histogram."""
    return value_counts(x, 256, _hist8)


# uint8 (shifted by one) -> uint16 label: 0 -> the ignore value, v -> v - 1.
_UNSHIFT = np.concatenate([[IGNORE], np.arange(255)]).astype(np.uint16)


class LabelCrops(NearestResized):
    """A label's nearest resize (`NearestResized`, crop by crop) that also answers mmseg's
    cat_max_ratio test for tried boxes (`ok`) and makes the chosen box's crop (`crop`).

    Why: where every class is < 255 (most datasets) the label is shifted by one into uint8
    once (ignore -> 0, class c -> c + 1), so each tried crop is gathered at half the bytes and
    counted as it is (`_counts8`), instead of widening, shifting and narrowing every tried crop
    for a histogram. The last tried crop is kept: when it is the chosen box, the label's crop is
    that crop through a 256-entry table back to uint16 instead of a second gather. Other labels
    take `_crop_ok`'s path; the answers are the same."""

    def __init__(self, src: np.ndarray, size: tuple[int, int], ignore: int = IGNORE, crop: int | None = None) -> None:
        super().__init__(src, size)
        self.ignore, self._crop = ignore, crop
        self._shifted: NearestResized | np.ndarray | None = None
        self._made = False  # the shifted map is made on the first try (never without cat_max_ratio)
        self._last: tuple[tuple[int, int, int, int], np.ndarray] | None = None

    def shifted(self) -> NearestResized | np.ndarray | None:
        """The resized label shifted into uint8, or None where a class is >= 255 (or another
        ignore value is used): made once, on the first call."""
        if not self._made:
            self._made = True
            if self.ignore == IGNORE and self.src.dtype == np.uint16:
                plus = self.src + np.uint16(1)  # ignore wraps to 0
                if plus.max() < 256:
                    plus8 = plus.astype(np.uint8)
                    if self._crop is not None and 2 * self._crop ** 2 >= self.shape[0] * self.shape[1]:
                        # The tries would gather most of the resized map anyway: OpenCV's nearest
                        # resize makes it whole (the same pixels) faster than two gathers per try
                        # (~8 % of the crop choice at 512 px with crop 512).
                        self._shifted = cv2.resize(plus8, (self.shape[1], self.shape[0]),
                                                   interpolation=cv2.INTER_NEAREST)
                    else:
                        self._shifted = NearestResized.of(self, plus8)
        return self._shifted

    def ok(self, box: tuple[int, int, int, int], cat_max_ratio: float) -> bool:
        """mmseg's test on the crop `box` = (y1, y2, x1, x2) of the resized label."""
        y1, y2, x1, x2 = box
        shifted = self.shifted()
        if shifted is None:
            return _crop_ok(self[y1:y2, x1:x2], cat_max_ratio, self.ignore)
        crop = shifted[y1:y2, x1:x2]
        self._last = (box, crop)
        return _varied(_counts8(crop)[1:], cat_max_ratio)

    def crop(self, box: tuple[int, int, int, int]) -> np.ndarray:
        """The resized label's crop `box` (the source's dtype)."""
        if self._last is not None and self._last[0] == box:
            return cv2.LUT(self._last[1], _UNSHIFT)
        y1, y2, x1, x2 = box
        return self[y1:y2, x1:x2]


def random_crop_box(label: np.ndarray | NearestResized, crop: int, rng: np.random.Generator, cat_max_ratio: float = 0.75,
                    ignore: int = IGNORE, tries: int = 10) -> tuple[int, int, int, int]:
    """(y1, y2, x1, x2) of a crop <= crop x crop, as mmseg's RandomCrop.

    With cat_max_ratio < 1, redraw up to `tries` times while the crop is dominated by one
    class (or holds < 2 classes); after the last try the last drawn box is kept unchecked.
    label: the resized label map, an array or a `NearestResized` (only the tried boxes are
    read); a `LabelCrops` answers the test itself (with its own ignore value).
    """
    h, w = label.shape

    def draw() -> tuple[int, int, int, int]:
        y = int(rng.integers(0, max(h - crop, 0) + 1))
        x = int(rng.integers(0, max(w - crop, 0) + 1))
        return y, min(y + crop, h), x, min(x + crop, w)

    def ok(box: tuple[int, int, int, int]) -> bool:
        if isinstance(label, LabelCrops):
            return label.ok(box, cat_max_ratio)
        y1, y2, x1, x2 = box
        return _crop_ok(label[y1:y2, x1:x2], cat_max_ratio, ignore)

    box = draw()
    if cat_max_ratio < 1.0:
        for _ in range(tries):
            if ok(box):
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


# Every photometric step maps each uint8 value on its own, so it is a 256-entry table: the
# table is the float formula evaluated on 0..255 (the same float32 operations, hence the same
# bytes as applying it pixel by pixel) and cv2.LUT applies it in one pass without float copies.
_LEVELS = np.arange(256, dtype=np.uint8)


def _convert_table(alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return _convert(_LEVELS, alpha, beta)


def _hue_table(delta: int) -> np.ndarray:
    return ((_LEVELS.astype(np.int16) + delta) % 180).astype(np.uint8)


# Row k + 255: the table of a saturating shift of every value by k (-255 <= k <= 255).
_SHIFTS = np.clip(np.arange(256)[None, :] + np.arange(-255, 256)[:, None], 0, 255).astype(np.uint8)


def _apply_tables(image: np.ndarray, tables: list[np.ndarray]) -> np.ndarray:
    """Per-value tables applied one after the other, as one pass: they compose into one table
    (a table of a table is exact), and a table that is a saturating shift of every value by k
    (the brightness step's, unless float rounding lands on an integer) runs as OpenCV's
    saturating add, ~2.5x faster than a table pass (the same bytes: checked on all 256 values)."""
    if not tables:
        return image
    table = tables[0]
    for t in tables[1:]:
        table = t[table]
    k = int(table[128]) - 128
    if np.array_equal(table, _SHIFTS[k + 255]):
        if k == 0:
            return image
        # (cv2.add with a negative scalar takes a signed working type: ~15x slower than subtract)
        return cv2.add(image, (k, k, k, 0)) if k > 0 else cv2.subtract(image, (-k, -k, -k, 0))  # type: ignore[call-overload]
    return cv2.LUT(image, table)


def apply_photometric(image: np.ndarray, p: PhotoParams) -> np.ndarray:
    """H x W x 3 uint8 RGB -> distorted uint8 RGB (each step clips to 0..255, as mmseg).

    The input may be a strided view (a crop); it is never written to (without any step it is
    returned as it is)."""
    before = [] if p.brightness is None else [_convert_table(beta=p.brightness)]
    after: list[np.ndarray] = []
    if p.contrast is not None:
        (before if p.contrast_first else after).append(_convert_table(alpha=p.contrast))
    if p.saturation is None and p.hue is None:  # nothing between: one pass for all
        return _apply_tables(image, before + after)
    image = _apply_tables(image, before)
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)  # uint8: H in [0, 180)
    # One 3-channel table: hue on H, saturation on S, V unchanged.
    table = np.stack([_LEVELS if p.hue is None else _hue_table(p.hue),
                      _LEVELS if p.saturation is None else _convert_table(alpha=p.saturation), _LEVELS], -1)
    image = cv2.cvtColor(cv2.LUT(hsv, table[:, None, :]), cv2.COLOR_HSV2RGB)
    return _apply_tables(image, after)


def normalize(image: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 -> 3 x H x W float32, (x - mean) / std on the 0..255 scale."""
    out = (image.astype(np.float32) - mean) / std
    return np.ascontiguousarray(out.transpose(2, 0, 1))


def normalize_padded(image: np.ndarray, extent: tuple[int, int], mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """T x 3 x c x c uint8 crops whose real pixels are the top-left extent = (h, w) ->
    T x 3 x c x c float32: (x - mean) / std there (float32 arithmetic, as `normalize`), 0
    in the padding (mmseg pads after normalising). The numpy reference of data/device.py."""
    h, w = extent
    m, s = np.asarray(mean, np.float32)[:, None, None], np.asarray(std, np.float32)[:, None, None]
    out = np.zeros(image.shape, np.float32)
    out[:, :, :h, :w] = (image[:, :, :h, :w].astype(np.float32) - m) / s
    return out


@dataclass
class RawClip:
    """One augmented clip before normalisation, as the training workers ship it.

    image: T x 3 x c x c uint8 (padding 0); label: T x c x c uint16 (padding `ignore`);
    segments: T x c x c uint16 segment indices (padding 0) or None; geometry: (resized
    size, crop box, flip). The real pixels are the top-left `extent` of every frame."""

    image: np.ndarray
    label: np.ndarray
    segments: np.ndarray | None
    geometry: tuple[tuple[int, int], tuple[int, int, int, int], bool]

    @property
    def extent(self) -> tuple[int, int]:
        """(h, w) of the crop's real pixels; the rest of c x c is padding."""
        _, (y1, y2, x1, x2), _ = self.geometry
        return y2 - y1, x2 - x1


def _check_masks(instances: list[np.ndarray], shape: tuple[int, int], frames: int) -> None:
    if len(instances) != frames or any(m.ndim != 3 or m.shape[1:] != tuple(shape) for m in instances):
        raise ValueError("instance masks must be one n x H x W stack per frame, of the label's size")


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
    `crop_clip` is the same chain without normalisation (uint8 image, uint16 maps): what
    the training workers ship.
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

    def _draw(self, label: np.ndarray, rng: np.random.Generator
              ) -> tuple[tuple[int, int], tuple[int, int, int, int], bool, PhotoParams | None, LabelCrops]:
        """The clip's random geometry and photometric draw from its first frame's label, in
        mmseg's order: (resized size, crop box, flip, photometric params, that label resized
        (nearest) to the size, on which the crop was chosen, as a `LabelCrops` view)."""
        h, w = label.shape
        ratio = rng.uniform(*self.ratio_range)
        size = rescale_size(h, w, self.scale[0] * ratio, self.scale[1] * ratio)
        resized = LabelCrops(label, size, self.ignore, self.crop)
        # The crop is chosen on the first frame's label; the clip shares it.
        box = random_crop_box(resized, self.crop, rng, self.cat_max_ratio, self.ignore)
        flip = bool(rng.random() < self.flip_prob)
        photo = draw_photometric(rng, **self.photo_kw) if self.photometric else None
        return size, box, flip, photo, resized

    def __call__(self, images: list[np.ndarray], labels: list[np.ndarray], rng: np.random.Generator,
                 segments: list[np.ndarray] | None = None) -> tuple[np.ndarray, ...]:
        out_img, out_lab, out_seg, _ = self.apply_geometry(images, labels, rng, segments)
        return (out_img, out_lab) if out_seg is None else (out_img, out_lab, out_seg)

    def apply_geometry(self, images: list[np.ndarray], labels: list[np.ndarray], rng: np.random.Generator,
               segments: list[np.ndarray] | None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, Geometry]:
        """Image (T x 3 x c x c float32, normalised, padding 0), label and segment maps
        (int64, or None) and the geometry (size, box, flip) used: `crop_clip` normalised in
        numpy (the loader normalises the same crop on the device instead)."""
        raw = self.crop_clip(images, labels, rng, segments)
        seg = None if raw.segments is None else raw.segments.astype(np.int64)
        return (normalize_padded(raw.image, raw.extent, self.mean, self.std), raw.label.astype(np.int64), seg,
                raw.geometry)

    def crop_clip(self, images: list[np.ndarray], labels: list[np.ndarray], rng: np.random.Generator,
                  segments: list[np.ndarray] | None = None) -> RawClip:
        """The clip's augmented crops before normalisation (`RawClip`); the random draws are
        those of `__call__`."""
        h, w = labels[0].shape
        if any(lab.shape != (h, w) or img.shape[:2] != (h, w) for img, lab in zip(images, labels)):
            raise ValueError("all frames of a clip (and each image and its label) must have the same size")
        if segments is not None and any(s.shape != (h, w) for s in segments):
            raise ValueError("a segment map differs in size from its label")
        size, (y1, y2, x1, x2), flip, photo, label0 = self._draw(labels[0], rng)

        def crop_of(x: np.ndarray, nearest: bool = True) -> np.ndarray:
            # Only the crop of a nearest-resized map is gathered; only the part of the resized
            # image above and left of the crop's far corner is made.
            if nearest:
                return label0.of(x)[y1:y2, x1:x2]
            return resize_window(x, size, y2, x2)[y1:, x1:]

        t, c = len(images), self.crop
        ch, cw = y2 - y1, x2 - x1
        cols = slice(None, None, -1) if flip else slice(None)  # the label's flip rides on its copy into the batch
        out_img = np.zeros((t, 3, c, c), np.uint8)  # 0 in the padding: the device zeroes it after normalising
        out_lab = np.full((t, c, c), self.ignore, np.uint16)
        for f, (img, lab) in enumerate(zip(images, labels)):
            img = crop_of(img, nearest=False)
            if photo is not None:  # per pixel, so it commutes with the flip
                img = apply_photometric(img, photo)
            if flip:
                img = cv2.flip(img, 1)
            # HWC -> CHW: cv2.split writes each channel straight into its plane of the batch,
            # about 3x faster than numpy's transposing copy (which was ~2 % of a sample).
            cv2.split(img, [out_img[f, k, :ch, :cw] for k in range(3)])
            out_lab[f, :ch, :cw] = (label0.crop((y1, y2, x1, x2)) if f == 0 else crop_of(lab))[:, cols]
        geometry = ((int(size[0]), int(size[1])), (y1, y2, x1, x2), flip)
        if segments is None:
            return RawClip(out_img, out_lab, None, geometry)
        out_seg = np.zeros((t, c, c), np.uint16)
        for f, s in enumerate(segments):
            out_seg[f, :ch, :cw] = crop_of(s)[:, cols]
        return RawClip(out_img, out_lab, out_seg, geometry)

    def crop_masks(self, instances: list[np.ndarray], shape: tuple[int, int], geometry: Geometry) -> list[np.ndarray]:
        """Per frame an n_t x H x W stack of instance masks (uint8 / bool, possibly
        overlapping) -> n_t x crop x crop bool, moved exactly as the label by `geometry`:
        nearest resize to the resized size, the same crop and flip, padding False. Only the
        crop's pixels are gathered (`nearest_index`), so memory stays that of the output for
        many instances. An instance whose pixels all fall
        outside the crop comes back empty (the caller drops it: absent from that frame).
        shape: the (H, W) of the clip's labels, which every mask must have."""
        _check_masks(instances, shape, len(instances))
        size, (y1, y2, x1, x2), flip = geometry
        c = self.crop
        rows, cols = nearest_index(shape[0], size[0])[y1:y2], nearest_index(shape[1], size[1])[x1:x2]
        if flip:
            cols = cols[::-1]
        out_masks = []
        for stack in instances:
            out = np.zeros((stack.shape[0], c, c), bool)
            # One gather of exactly the crop's pixels (no n x rows x W intermediate).
            out[:, :len(rows), :len(cols)] = stack[:, rows[:, None], cols[None, :]] != 0
            out_masks.append(out)
        return out_masks

    def with_instances(self, images: list[np.ndarray], labels: list[np.ndarray], instances: list[np.ndarray],
                       rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
        """As `__call__`, plus per frame an n_t x H x W stack of instance masks -> n_t x crop x
        crop bool (`crop_masks`). The random draws are `__call__`'s (the crop is still chosen
        on the first frame's LABEL), so adding the masks changes nothing else."""
        _check_masks(instances, labels[0].shape, len(labels))  # before any random draw
        out_img, out_lab, _, geometry = self.apply_geometry(images, labels, rng, None)
        return out_img, out_lab, self.crop_masks(instances, labels[0].shape, geometry)


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


def train_mean_std(cfg, mean: list[float], std: list[float]) -> tuple[list[float], list[float]]:
    """The training normalisation: `cfg.aug.mean` / `cfg.aug.std` where set, else the model's
    (`Family.data_config`). One rule for the numpy path and the device (data/device.py)."""
    return [float(x) for x in (cfg.aug.mean or mean)], [float(x) for x in (cfg.aug.std or std)]


def build_train_transform(cfg, mean: list[float], std: list[float]) -> TrainTransform:
    """TrainTransform from a TrainConfig (`cfg.aug`, crop = cfg.model.img_size)."""
    a = cfg.aug
    mean, std = train_mean_std(cfg, mean, std)
    return TrainTransform(
        crop=cfg.model.img_size, mean=np.asarray(mean), std=np.asarray(std),
        scale=(int(a.scale[0]), int(a.scale[1])), ratio_range=(a.ratio_range[0], a.ratio_range[1]),
        cat_max_ratio=a.cat_max_ratio, flip_prob=a.flip_prob, photometric=a.photometric,
        photo_kw=dict(brightness_delta=a.brightness_delta, contrast_range=tuple(a.contrast_range),
                      saturation_range=tuple(a.saturation_range), hue_delta=a.hue_delta))


def build_test_transform(cfg, mean: list[float], std: list[float]) -> TestTransform:
    a, e = cfg.aug, cfg.eval
    return TestTransform(short_side=int(e.short_side), max_long=int(e.max_long),
                         mean=np.asarray(a.mean or mean), std=np.asarray(a.std or std))
