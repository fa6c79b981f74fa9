"""The training loader's compact batches (uint8 / uint16 from the workers) and their
normalisation on the device (data/device.py): bit for bit the numpy chain they replace.

The reference here is the training transform as it was before the loader shipped uint8
(float32 photometric steps, numpy normalisation, float32 / int64 crops built in place),
re-implemented in this file from mmseg's semantics, so it does not share code with
data/augment.py beyond the random draw."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from conftest import make_synthetic

from rankseg_core.config.train import TrainConfig
from rankseg_core.data import augment
from rankseg_core.data.augment import PhotoParams, TrainTransform, apply_photometric
from rankseg_core.data.device import padding_mask, to_device
from rankseg_core.data.loading import BatchStream, clip_table, make_loader
from rankseg_core.shards.codec import IGNORE
from rankseg_core.shards.read import ShardDataset
from rankseg_core.utils import distributed as D

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]  # ImageNet on 0..255: negative values exist


def bits(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """The float32 bit patterns (so that -0.0 != +0.0)."""
    a = x.numpy() if isinstance(x, torch.Tensor) else x
    assert a.dtype == np.float32
    return a.view(np.int32)


# ---------------------------------------------------------------------------------------
# The reference: the float path as it was


def old_convert(x: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(x.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def old_photometric(image: np.ndarray, p: PhotoParams) -> np.ndarray:
    """mmseg PhotoMetricDistortion on float32 pixels, step by step."""
    if p.brightness is not None:
        image = old_convert(image, beta=p.brightness)
    if p.contrast is not None and p.contrast_first:
        image = old_convert(image, alpha=p.contrast)
    if p.saturation is not None or p.hue is not None:
        hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
        if p.saturation is not None:
            hsv[..., 1] = old_convert(hsv[..., 1], alpha=p.saturation)
        if p.hue is not None:
            hsv[..., 0] = ((hsv[..., 0].astype(np.int16) + p.hue) % 180).astype(np.uint8)
        image = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    if p.contrast is not None and not p.contrast_first:
        image = old_convert(image, alpha=p.contrast)
    return image


def old_transform(tf: TrainTransform, images: list[np.ndarray], labels: list[np.ndarray], rng: np.random.Generator,
                  segments: list[np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Float32 image (normalised in numpy, HWC -> CHW, padding 0), int64 label and segments.
    Every frame is resized whole (bilinear image, nearest label, as mmseg) and then cropped."""
    size, (y1, y2, x1, x2), flip, photo, label0 = tf._draw(labels[0], rng)
    wh = (size[1], size[0])
    resized = [(cv2.resize(i, wh, interpolation=cv2.INTER_LINEAR), cv2.resize(lab, wh, interpolation=cv2.INTER_NEAREST))
               for i, lab in zip(images, labels)]
    assert np.array_equal(resized[0][1], label0[:, :])  # the crop was chosen on the resized first label
    t, c = len(images), tf.crop
    mean, std = np.asarray(tf.mean, np.float32), np.asarray(tf.std, np.float32)
    out_img = np.zeros((t, 3, c, c), np.float32)
    out_lab = np.full((t, c, c), IGNORE, np.int64)
    out_seg = np.zeros((t, c, c), np.int64)
    for f, (img, lab) in enumerate(resized):
        img, lab = img[y1:y2, x1:x2], lab[y1:y2, x1:x2]
        if flip:
            img, lab = img[:, ::-1], lab[:, ::-1]
        if photo is not None:
            img = old_photometric(np.ascontiguousarray(img), photo)
        norm = (img.astype(np.float32) - mean) / std
        out_img[f, :, :lab.shape[0], :lab.shape[1]] = norm.transpose(2, 0, 1)
        out_lab[f, :lab.shape[0], :lab.shape[1]] = lab
        if segments is not None:
            s = cv2.resize(segments[f], (size[1], size[0]), interpolation=cv2.INTER_NEAREST)[y1:y2, x1:x2]
            out_seg[f, :s.shape[0], :s.shape[1]] = s[:, ::-1] if flip else s
    return out_img, out_lab, (out_seg if segments is not None else None)


def clip(h: int, w: int, t: int, seed: int) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """T frames of noise images, labels of 6 blocky classes + ignore, segment maps."""
    rng = np.random.default_rng(seed)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for _ in range(t)]
    blocks = rng.integers(0, 7, (t, (h + 7) // 8, (w + 7) // 8))
    labels = [np.where(b == 6, IGNORE, b).astype(np.uint16).repeat(8, 0).repeat(8, 1)[:h, :w].copy() for b in blocks]
    segs = [(lab % 4).astype(np.uint16) for lab in labels]
    return images, labels, segs


# ---------------------------------------------------------------------------------------


def test_padding_mask_by_hand() -> None:
    got = padding_mask(torch.tensor([[2, 3], [4, 1]], dtype=torch.int32), (4, 4))
    want = np.ones((2, 4, 4), bool)
    want[0, :2, :3] = False
    want[1, :4, :1] = False
    assert np.array_equal(got.numpy(), want)


def test_to_device_is_bit_identical_to_numpy_normalisation() -> None:
    rng = np.random.default_rng(0)
    n, c = 5, 24
    image = rng.integers(0, 256, (n, 3, c, c), dtype=np.uint8)
    extent = np.array([[24, 24], [10, 24], [24, 7], [1, 1], [13, 17]], np.int32)
    for i, (h, w) in enumerate(extent):  # padding 0, as the workers ship it
        image[i, :, h:] = 0
        image[i, :, :, w:] = 0
    label = rng.integers(0, 5, (n, c, c)).astype(np.uint16)
    label[0, 0, 0] = IGNORE
    batch = {"image": torch.from_numpy(image), "label": torch.from_numpy(label),
             "extent": torch.from_numpy(extent), "segments_info": [["kept"]] * n}
    out = to_device(batch, torch.device("cpu"), MEAN, STD)
    assert set(out) == {"image", "label", "segments_info"} and out["segments_info"] is batch["segments_info"]
    assert out["image"].dtype == torch.float32 and out["label"].dtype == torch.int64
    assert out["label"][0, 0, 0] == IGNORE and np.array_equal(out["label"].numpy(), label.astype(np.int64))
    # Independently: per frame, HWC normalisation as the old `normalize`, zeros elsewhere.
    m, s = np.asarray(MEAN, np.float32), np.asarray(STD, np.float32)
    want = np.zeros((n, 3, c, c), np.float32)
    for i, (h, w) in enumerate(extent):
        hwc = image[i, :, :h, :w].transpose(1, 2, 0)
        want[i, :, :h, :w] = ((hwc.astype(np.float32) - m) / s).transpose(2, 0, 1)
    assert np.array_equal(bits(out["image"]), bits(want))  # padding is +0.0, not -0.0
    assert np.array_equal(bits(augment.normalize_padded(image[2:3], (24, 7), m, s)), bits(want[2:3]))


def test_photometric_tables_equal_the_float_steps() -> None:
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    image[0, :3] = [[0, 0, 0], [255, 255, 255], [255, 0, 128]]  # the clipping ends
    for seed in range(40):
        p = augment.draw_photometric(np.random.default_rng(seed))
        assert np.array_equal(apply_photometric(image, p), old_photometric(image, p)), p
    view = image[2:15, 3:20]  # a strided crop, as the transform passes it; left untouched
    before = view.copy()
    p = PhotoParams(-20.5, 1.3, True, 0.7, -11)
    assert np.array_equal(apply_photometric(view, p), old_photometric(np.ascontiguousarray(view), p))
    assert np.array_equal(view, before)
    # The table passes: a brightness shift as a saturating add, tables composed across a
    # skipped HSV step, and a brightness whose float32 sums round onto integers for large
    # values only (not a shift: a table pass). Every level 0..255 occurs in `levels`.
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)[:, :, None].repeat(3, 2)
    cases = [PhotoParams(7.25, None, True, None, None), PhotoParams(-31.9, None, False, None, 5),
             PhotoParams(12.0, 0.6, True, None, None), PhotoParams(-3.5, 1.4, False, None, None),
             PhotoParams(0.99999997, None, True, 1.2, None), PhotoParams(0.0, None, True, None, None),
             PhotoParams(None, 1.0, False, None, None)]
    assert not np.array_equal(augment._convert_table(beta=0.99999997),
                              np.clip(np.arange(256) + int(augment._convert_table(beta=0.99999997)[128]) - 128, 0, 255))
    for p in cases:
        for x in (levels, view):
            assert np.array_equal(apply_photometric(x, p), old_photometric(np.ascontiguousarray(x), p)), p


@pytest.mark.parametrize("hw,crop,t", [((40, 56), 32, 1), ((30, 20), 32, 2), ((64, 48), 24, 1)])
def test_crop_clip_then_device_equals_the_old_float_path(hw: tuple[int, int], crop: int, t: int) -> None:
    """Same crops, flips, photometric draws and pixels at fixed seeds, through both routes."""
    tf = TrainTransform(crop=crop, mean=np.asarray(MEAN), std=np.asarray(STD), scale=(2 * max(hw), min(hw)),
                        ratio_range=(0.5, 2.0))
    flips, padded = set(), set()
    for seed in range(8):
        images, labels, segs = clip(*hw, t, seed)
        want_img, want_lab, want_seg = old_transform(tf, images, labels, np.random.default_rng(seed), segs)
        assert want_seg is not None
        raw = tf.crop_clip(images, labels, np.random.default_rng(seed), segs)
        assert raw.image.dtype == np.uint8 and raw.label.dtype == np.uint16 and raw.segments is not None
        assert raw.segments.dtype == np.uint16 and raw.image.shape == (t, 3, crop, crop)
        ext = torch.tensor([raw.extent] * t, dtype=torch.int32)
        out = to_device({"image": torch.from_numpy(raw.image), "label": torch.from_numpy(raw.label),
                         "segments": torch.from_numpy(raw.segments), "extent": ext}, torch.device("cpu"), MEAN, STD)
        assert np.array_equal(bits(out["image"]), bits(want_img))
        assert np.array_equal(out["label"].numpy(), want_lab) and out["segments"].dtype == torch.int64
        assert np.array_equal(out["segments"].numpy(), want_seg)
        img, lab, seg, geometry = tf.apply_geometry(images, labels, np.random.default_rng(seed), segs)
        assert np.array_equal(bits(img), bits(want_img)) and np.array_equal(lab, want_lab)
        assert seg is not None and np.array_equal(seg, want_seg) and geometry == raw.geometry
        flips.add(geometry[2])
        padded.add(raw.extent != (crop, crop))
    assert flips == {True, False}  # both branches ran
    if min(hw) < crop:
        assert True in padded  # some crops were padded (the resize may also enlarge past the crop)


def test_resize_window_is_the_full_resize_cut() -> None:
    """The top-left part of a resize made from a source window equals the full resize's,
    bit for bit, for bilinear colour images and nearest label / mask maps, enlarging and
    shrinking (2x exactly too: OpenCV's area fast path), at random sizes and corners."""
    rng = np.random.default_rng(7)
    kinds = [(cv2.INTER_LINEAR, False, np.uint8, 3), (cv2.INTER_NEAREST, True, np.uint16, 0),
             (cv2.INTER_NEAREST, True, np.uint8, 0)]
    cut = 0
    for case in range(150):
        h, w = (int(x) for x in rng.integers(1, 160, 2))
        out_h, out_w = (int(x) for x in rng.integers(1, 320, 2))
        if case % 5 == 0:
            out_h, out_w = (max(h // 2, 1), max(w // 2, 1)) if case % 10 else (2 * h, 2 * w)
        if case == 1:
            out_h, out_w = h, w
        rows, cols = int(rng.integers(1, out_h + 1)), int(rng.integers(1, out_w + 1))
        for interp, nearest, dtype, channels in kinds:
            shape = (h, w, channels) if channels else (h, w)
            src = rng.integers(0, np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
            want = cv2.resize(src, (out_w, out_h), interpolation=interp)[:rows, :cols]
            got = augment.resize_window(src, (out_h, out_w), rows, cols, nearest)
            assert got.dtype == dtype and np.array_equal(got, want), (h, w, out_h, out_w, rows, cols, nearest)
        cut += math.ceil((rows + 1) * h / out_h) + 2 < h
    assert cut > 50  # most cases resized a true window, not the whole source


@pytest.mark.parametrize("dtype,channels", [(np.uint16, 0), (np.uint8, 0), (np.bool_, 0), (np.uint8, 3)])
def test_nearest_resized_crops_equal_cv2_resize(dtype: type, channels: int) -> None:
    """`NearestResized[y1:y2, x1:x2]` is the same block of cv2.resize(INTER_NEAREST), bit for
    bit, over random sizes (down, up, equal, odd factors) and random blocks."""
    rng = np.random.default_rng(7)
    for case in range(300):
        h, w = (int(x) for x in rng.integers(1, 200, 2))
        out_h, out_w = (int(x) for x in rng.integers(1, 500, 2))
        if case % 7 == 0:
            out_h, out_w = (h, w) if case % 14 else (3 * h, 2 * w)
        shape = (h, w, channels) if channels else (h, w)
        src = rng.integers(0, 2 if dtype == np.bool_ else np.iinfo(dtype).max, shape, endpoint=True).astype(dtype)
        ref_src = src.view(np.uint8) if dtype == np.bool_ else src  # cv2 does not take bool
        want = cv2.resize(ref_src, (out_w, out_h), interpolation=cv2.INTER_NEAREST)
        y1, x1 = int(rng.integers(0, out_h)), int(rng.integers(0, out_w))
        y2, x2 = int(rng.integers(y1 + 1, out_h + 1)), int(rng.integers(x1 + 1, out_w + 1))
        view = augment.NearestResized(src, (out_h, out_w))
        got = view[y1:y2, x1:x2]
        assert view.shape == (out_h, out_w) and got.dtype == dtype
        assert np.array_equal(got.view(np.uint8) if dtype == np.bool_ else got, want[y1:y2, x1:x2]), (h, w, out_h, out_w)
        assert np.array_equal(view[:, :].view(np.uint8) if dtype == np.bool_ else view[:, :], want)
        other = np.ascontiguousarray(src[::-1])  # another map of the same size: the same indices
        want_other = cv2.resize(other.view(np.uint8) if dtype == np.bool_ else other, (out_w, out_h),
                                interpolation=cv2.INTER_NEAREST)
        got_other = view.of(other)[y1:y2, x1:x2]
        assert np.array_equal(got_other.view(np.uint8) if dtype == np.bool_ else got_other, want_other[y1:y2, x1:x2])
    with pytest.raises(ValueError, match="not of the"):
        augment.NearestResized(np.zeros((4, 5), np.uint16), (8, 10)).of(np.zeros((5, 4), np.uint16))


def test_crop_check_counts_labelled_pixels_as_mmseg() -> None:
    """`_crop_ok` (uint16 wrap-around counting) against mmseg's np.unique formulation."""
    def mmseg_ok(x: np.ndarray) -> bool:
        labels, counts = np.unique(x, return_counts=True)
        counts = counts[labels != IGNORE]
        return len(counts) > 1 and counts.max() / counts.sum() < 0.75

    rng = np.random.default_rng(3)
    outcomes = set()
    for case in range(300):
        k = int(rng.integers(1, 5))
        label = rng.choice(np.array([*rng.integers(0, 300, k), IGNORE], np.uint16), (12, 9),
                           p=rng.dirichlet(np.ones(k + 1)))
        want = mmseg_ok(label)
        outcomes.add(want)
        assert augment._crop_ok(label, 0.75, IGNORE) == want
        assert augment._crop_ok(label[:, 1:], 0.75, IGNORE) == mmseg_ok(label[:, 1:])  # a strided window
        assert augment._crop_ok(label.astype(np.int64), 0.75, IGNORE) == want  # the general path
    assert outcomes == {True, False}
    # Both counting paths (every class < 255: OpenCV's 8-bit histogram; else bincount) at the
    # boundary: 254 is the largest class of the 8-bit path.
    for top in (253, 254, 255, 256, 65534):
        for share in (0.74, 0.75, 0.76):
            n = 400
            label = np.full(n, IGNORE, np.uint16)
            label[: int(share * 300)] = top
            label[int(share * 300):300] = 7
            label = label.reshape(20, 20)
            assert augment._crop_ok(label, 0.75, IGNORE) == mmseg_ok(label), (top, share)


@pytest.mark.parametrize("kind", ["runs", "noise", "one value", "one pixel", "strided"])
def test_counts8_are_bincount(kind: str) -> None:
    """The crop check's counts (runs counted where the value changes; calcHist for noise)
    equal np.bincount on region-like maps, noise, constant maps, one pixel and a strided view."""
    rng = np.random.default_rng(len(kind))
    if kind == "runs":  # regions, upsampled as a nearest resize does
        x = rng.integers(0, 256, (9, 12)).astype(np.uint8).repeat(7, 0).repeat(10, 1)
    elif kind == "noise":
        x = rng.integers(0, 256, (50, 61)).astype(np.uint8)
    elif kind == "one value":
        x = np.full((33, 20), 255, np.uint8)
    elif kind == "one pixel":
        x = np.array([[0]], np.uint8)
    else:
        x = rng.integers(0, 4, (40, 80)).astype(np.uint8).repeat(3, 1)[:, ::2]
    from rankseg_core.utils.counting import run_starts

    # Both ways of counting are exercised: by runs, and the histogram for noise.
    assert (run_starts(x.ravel()) is None) == (kind in ("noise", "strided"))
    got = augment._counts8(x)
    assert got.dtype == np.int64 and got.shape == (256,)
    assert np.array_equal(got, np.bincount(x.ravel(), minlength=256))


def test_label_crops_answer_and_cut_as_mmseg_on_the_resized_label() -> None:
    """`LabelCrops` (the check on a shifted uint8 copy, the chosen crop through a table back)
    against mmseg's np.unique test and `cv2.resize` + slicing, on labels whose classes stay
    below 255 (the 8-bit path), reach it (the general path), or are all ignored."""
    def mmseg_ok(x: np.ndarray) -> bool:
        labels, counts = np.unique(x, return_counts=True)
        counts = counts[labels != IGNORE]
        return len(counts) > 1 and counts.max() / counts.sum() < 0.75

    rng = np.random.default_rng(8)
    outcomes, paths = set(), set()
    for case in range(200):
        h, w = (int(x) for x in rng.integers(6, 40, 2))
        top = int(rng.choice([3, 254, 255, 1000]))
        k = int(rng.integers(1, 5))
        blocks = rng.choice(np.array([*rng.integers(0, top + 1, k), IGNORE], np.uint16),
                            ((h + 3) // 4, (w + 3) // 4), p=rng.dirichlet(np.ones(k + 1)))
        src = blocks.repeat(4, 0).repeat(4, 1)[:h, :w].copy()
        size = (int(rng.integers(4, 80)), int(rng.integers(4, 80)))
        full = cv2.resize(src, (size[1], size[0]), interpolation=cv2.INTER_NEAREST)
        crops = augment.LabelCrops(src, size, crop=int(rng.integers(4, 60)))  # small crops gather, large resize whole
        paths.add(type(crops.shifted()))
        for _ in range(3):
            y1, x1 = int(rng.integers(0, size[0])), int(rng.integers(0, size[1]))
            box = (y1, int(rng.integers(y1 + 1, size[0] + 1)), x1, int(rng.integers(x1 + 1, size[1] + 1)))
            want = full[box[0]:box[1], box[2]:box[3]]
            outcomes.add(mmseg_ok(want))
            assert crops.ok(box, 0.75) == mmseg_ok(want), (case, box)
            got = crops.crop(box)  # the crop just tried, through the table
            assert got.dtype == np.uint16 and np.array_equal(got, want)
        other = (0, size[0], 0, size[1])  # not the last one tried: gathered
        assert np.array_equal(crops.crop(other), full)
    assert outcomes == {True, False} and paths == {type(None), augment.NearestResized, np.ndarray}
    for top in (253, 254, 255, 256):  # 254 is the largest class of the 8-bit path
        for share in (0.74, 0.76):
            src = np.full(400, IGNORE, np.uint16)
            src[: int(share * 300)], src[int(share * 300):300] = top, 7
            src = src.reshape(20, 20)
            crops = augment.LabelCrops(src, (30, 25))
            want = cv2.resize(src, (25, 30), interpolation=cv2.INTER_NEAREST)
            assert crops.ok((0, 30, 0, 25), 0.75) == mmseg_ok(want), (top, share)
            assert np.array_equal(crops.crop((0, 30, 0, 25)), want)
    lazy = augment.LabelCrops(src, (30, 25))
    augment.random_crop_box(lazy, 10, rng, cat_max_ratio=1.0)  # no tries: no shifted copy is made
    assert not lazy._made
    src = np.full((5, 5), 2, np.uint16)
    assert augment.LabelCrops(src, (9, 9), ignore=2).shifted() is None  # another ignore value: the general path


def loader_cfg(root: Path, crop: int, panoptic: bool = False) -> TrainConfig:
    cfg = TrainConfig()
    cfg.data.root, cfg.data.num_workers = str(root), 0
    cfg.model.img_size, cfg.model.num_classes = crop, 40
    cfg.aug.scale, cfg.aug.mean, cfg.aug.std = [96, 32], MEAN, STD
    cfg.schedule.batch_size = 3
    cfg.seed = 5
    return cfg


@pytest.mark.parametrize("panoptic", [False, True])
def test_loader_batches_normalise_to_the_old_float_crops(tmp_path: Path, panoptic: bool) -> None:
    """make_loader -> to_device equals the old float path recomputed for each global
    position (the augmentation is a function of (seed, position) alone: exact resume)."""
    root = make_synthetic(tmp_path / "d", images=6, num_classes=40, size=32, panoptic=panoptic)
    cfg = loader_cfg(root, 40)  # 40 > some resized sizes: padding occurs
    loader = make_loader(cfg, [0.0] * 3, [1.0] * 3, D.DistInfo(), start_step=2, segments=panoptic)
    assert loader.pin_memory is False
    ds = ShardDataset(root, cfg.data.train_split)
    stream = BatchStream(len(ds), 3, 1, 1, 0, cfg.seed, 2)
    tf = augment.build_train_transform(cfg, [0.0] * 3, [1.0] * 3)  # aug.mean / std win, as in training
    for batch, items in zip(loader, stream):
        assert batch["image"].dtype == torch.uint8 and batch["label"].dtype == torch.uint16
        assert batch["extent"].dtype == torch.int32 and batch["extent"].shape == (3, 2)
        assert ("segments" in batch) == panoptic
        out = to_device(batch, torch.device("cpu"), *augment.train_mean_std(cfg, [0.0] * 3, [1.0] * 3))
        for i, (g, c) in enumerate(items):
            f = ds.load(int(clip_table(ds, 1)[c][0]))
            segs = [f["segments"]] if panoptic else None
            img, lab, seg = old_transform(tf, [f["image"]], [f["label"]], np.random.default_rng([cfg.seed, 1, g]), segs)
            assert np.array_equal(bits(out["image"][i:i + 1]), bits(img))
            assert np.array_equal(out["label"][i:i + 1].numpy(), lab)
            if panoptic:
                assert seg is not None and np.array_equal(out["segments"][i:i + 1].numpy(), seg)
        if items[0][0] >= 12:  # positions 6..14: three batches
            break
    pinned = make_loader(cfg, [0.0] * 3, [1.0] * 3, D.DistInfo(), 0, pin_memory=True)
    assert pinned.pin_memory is True


def test_instances_and_clips_ship_compact() -> None:
    """The instance path shares crop_clip: uint8 image, the masks cropped with the same geometry."""
    images, labels, _ = clip(36, 44, 2, 3)
    masks = [np.stack([lab == 1, lab == 2]).astype(np.uint8) for lab in labels]
    tf = TrainTransform(crop=32, mean=np.asarray(MEAN), std=np.asarray(STD), scale=(88, 36))
    img, lab, got = tf.with_instances(images, labels, masks, np.random.default_rng(4))
    raw = tf.crop_clip(images, labels, np.random.default_rng(4))
    crop_masks = tf.crop_masks(masks, labels[0].shape, raw.geometry)
    for m, lab_f, want in zip(crop_masks, raw.label, got):
        assert np.array_equal(m, want)
        # masks follow the label: class 1 pixels are mask 0 (nearest resize of both)
        assert np.array_equal(m[0], lab_f == 1) and np.array_equal(m[1], lab_f == 2)
    with pytest.raises(ValueError, match="label's size"):
        tf.crop_masks([masks[0][:, :10]], labels[0].shape, raw.geometry)


def test_to_device_leaves_a_float_batch_as_it_was() -> None:
    """A batch built elsewhere with float images (a test, a user's loader) is only moved."""
    image = torch.randn(2, 3, 8, 8)
    out = to_device({"image": image, "label": torch.zeros(2, 8, 8, dtype=torch.int32)}, torch.device("cpu"),
                    MEAN, STD)
    assert torch.equal(out["image"], image) and out["label"].dtype == torch.int64


def test_worker_collate_writes_shared_memory_with_the_same_values() -> None:
    """In a DataLoader worker the batch is concatenated straight into shared memory (one
    copy less); the values and dtypes are those of the in-process concatenation."""
    rng = np.random.default_rng(2)
    items = [{"image": torch.from_numpy(rng.integers(0, 256, (1, 3, 6, 6), dtype=np.uint8)),
              "label": torch.from_numpy(rng.integers(0, 9, (1, 6, 6)).astype(np.uint16)),
              "extent": torch.tensor([[6, 4 + i]], dtype=torch.int32),
              "pad": torch.from_numpy(rng.random((1, 6, 6)) < 0.5)} for i in range(4)]

    class Items(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, i: int) -> dict:
            return items[i]

    from rankseg_core.data.loading import collate_clips

    loader = torch.utils.data.DataLoader(Items(), batch_size=2, num_workers=1, collate_fn=collate_clips)
    got = next(iter(loader))
    want = collate_clips(items[:2])
    assert set(got) == set(want)
    for k in want:
        assert got[k].is_shared() and got[k].dtype == want[k].dtype and torch.equal(got[k], want[k])
        assert got[k].is_contiguous() and got[k].storage_offset() * got[k].element_size() % 64 == 0
    # One shared block for the whole batch (one file descriptor to send), without overlaps.
    assert len({got[k].untyped_storage().data_ptr() for k in got}) == 1
    spans = sorted((got[k].storage_offset() * got[k].element_size(), got[k].nbytes) for k in got)
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))
    assert not want["image"].is_shared()  # in-process: a plain torch.cat


def test_two_workers_give_the_in_process_batches_and_leave_no_shared_memory(tmp_path: Path) -> None:
    """With 2 DataLoader workers the batches are the in-process ones, and once the loader is
    gone no shared-memory block of theirs is left, not even of the batches still in flight.
    (torch's "file_system" sharing, ~3 % cheaper per sample, fails this: a block prefetched but
    never received stays until the process exits, so a long-lived process would collect them.)"""
    import gc
    import os

    shm = Path("/dev/shm")
    if not shm.is_dir():
        pytest.skip("no /dev/shm on this system")
    root = make_synthetic(tmp_path / "d", images=6, num_classes=40, size=32)
    cfg = loader_cfg(root, 40)

    def first(workers: int) -> list[dict]:
        cfg.data.num_workers = workers
        loader = make_loader(cfg, [0.0] * 3, [1.0] * 3, D.DistInfo(), start_step=0)
        it = iter(loader)
        out = [next(it) for _ in range(4)]
        if workers:
            assert len(it.worker_pids()) == 2
        return out

    before = {p.name for p in shm.iterdir()}
    got, want = first(2), first(0)
    for a, b in zip(got, want):
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in b)
    del got
    gc.collect()
    left = {p.name for p in shm.iterdir()} - before
    for _ in range(50):  # the workers exit asynchronously
        if not left:
            break
        import time

        time.sleep(0.1)
        left = {p.name for p in shm.iterdir()} - before
    assert not left, f"shared memory left behind: {sorted(left)[:5]} (pid {os.getpid()})"
