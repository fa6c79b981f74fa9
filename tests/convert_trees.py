"""Small dataset trees in the official release layouts, for converter tests and benchmarks.

Every writer takes the *raw* mask values it should store (ADE class values, PNG values) and
returns them per key, so a test can compute the expected train ids independently of the
converter. Images are written with OpenCV, masks with PIL (an independent PNG writer).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from PIL import Image


def random_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """H x W x 3 uint8 smooth colour noise (JPEG-friendly, like a photo's low frequencies)."""
    small = rng.integers(0, 256, (max(2, h // 16), max(2, w // 16), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def random_label(rng: np.random.Generator, h: int, w: int, values: Sequence[int], cell: int = 8) -> np.ndarray:
    """H x W int64 map of `cell`-sized blocks drawn from `values`; every value gets a block."""
    gh, gw = -(-h // cell), -(-w // cell)
    grid = rng.choice(np.asarray(values), (gh, gw))
    flat = grid.reshape(-1)
    n = min(len(values), flat.size)
    flat[rng.choice(flat.size, n, replace=False)] = np.asarray(values)[:n]
    return np.kron(grid, np.ones((cell, cell), np.int64))[:h, :w]


def write_jpeg(path: Path, image_rgb: np.ndarray, quality: int = 90) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ok, buf = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert ok
    path.write_bytes(buf.tobytes())


def write_mask_png(path: Path, mask: np.ndarray, palette: bool = False) -> None:
    """Single-channel 8-bit PNG (greyscale, or palette indices like VOC's masks)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(mask.astype(np.uint8))
    if palette:  # putpalette turns an "L" image into "P" with the same indices
        im.putpalette([c for i in range(256) for c in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    im.save(path)


def ade_seg_rgb(values: np.ndarray, rng: np.random.Generator | None = None) -> np.ndarray:
    """H x W x 3 uint8 RGB `_seg.png` pixels: R = value // 256 * 10, G = value % 256, B = instance."""
    seg = np.zeros((*values.shape, 3), np.uint8)
    seg[..., 0] = (values // 256) * 10
    seg[..., 1] = values % 256
    seg[..., 2] = rng.integers(0, 256, values.shape) if rng is not None else 0
    return seg


@dataclass
class Sample:
    """One generated sample: where it went and the raw mask values it holds."""

    key: str
    split: str
    values: np.ndarray  # H x W raw values as written (ADE class value / PNG value)
    image_path: Path
    mask_path: Path
    extra: dict = field(default_factory=dict)


# --- ADE20K-Full (ADE20K_2021_17_01) ------------------------------------------------------

ADE_FULL_IDS = (2978, 312, 2420, 2855, 2131, 976, 447, 165, 2377, 838, 350, 1831, 1125, 3055, 401)  # table ids


def write_ade_full(root: Path, key: str, values: np.ndarray, *, scene: str = "urban/street",
                   rng: np.random.Generator, image_size: tuple[int, int] | None = None) -> Sample:
    """Write `images/ADE/<split>/<scene>/<key>.jpg` + `_seg.png` (+ an instance folder)."""
    split = "validation" if key.split("_")[1] == "val" else "training"
    folder = root / "images" / "ADE" / split / scene
    h, w = image_size or values.shape
    img = folder / f"{key}.jpg"
    write_jpeg(img, random_image(rng, h, w))
    seg = folder / f"{key}_seg.png"
    Image.fromarray(ade_seg_rgb(values, rng), "RGB").save(seg)
    inst = folder / key  # per-image instance masks: the converter must not descend here
    inst.mkdir(exist_ok=True)
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(inst / f"instance_000_{key}.png")
    (folder / f"{key}.json").write_text("{}")
    return Sample(key, split, values, img, seg)


def ade_full_tree(root: Path, n_train: int = 5, n_val: int = 2, size: tuple[int, int] = (40, 56),
                  seed: int = 0, extra_values: Iterable[int] = (0, 5, 3200)) -> dict[str, Sample]:
    """A small ADE20K-Full tree: table classes plus unlabeled (0) and values outside the table."""
    rng = np.random.default_rng(seed)
    out = {}
    scenes = ("urban/street", "home_or_hotel/bedroom", "nature_landscape/coast")
    for i in range(n_train + n_val):
        key = f"ADE_train_{i:08d}" if i < n_train else f"ADE_val_{i:08d}"
        k = int(rng.integers(3, 8))
        vals = list(rng.choice(ADE_FULL_IDS, k, replace=False)) + list(extra_values)
        out[key] = write_ade_full(root, key, random_label(rng, *size, vals, cell=4),
                                  scene=scenes[i % len(scenes)], rng=rng)
    return out


# --- ADE20K-150 (ADEChallengeData2016) ----------------------------------------------------

def ade150_tree(root: Path, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (32, 48),
                seed: int = 0) -> dict[str, Sample]:
    rng = np.random.default_rng(seed)
    out = {}
    for i in range(n_train + n_val):
        split, tag = ("training", "train") if i < n_train else ("validation", "val")
        key = f"ADE_{tag}_{i:08d}"
        values = random_label(rng, *size, [0, 1, 150, *rng.choice(np.arange(2, 150), 4, replace=False)])
        img = root / "images" / split / f"{key}.jpg"
        mask = root / "annotations" / split / f"{key}.png"
        write_jpeg(img, random_image(rng, *size))
        write_mask_png(mask, values)
        out[key] = Sample(key, split, values, img, mask)
    return out


# --- COCO-Stuff-164k ------------------------------------------------------------------------

COCO_STUFF_UNUSED = (12, 26, 29, 30, 45, 66, 68, 69, 71, 83, 91)  # COCO-Stuff ids never used


def coco_stuff_tree(root: Path, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (32, 40),
                    seed: int = 0) -> dict[str, Sample]:
    rng = np.random.default_rng(seed)
    used_values = [i - 1 for i in range(1, 183) if i not in COCO_STUFF_UNUSED]
    out = {}
    for i in range(n_train + n_val):
        split = "train2017" if i < n_train else "val2017"
        key = f"{1000 + i:012d}"
        values = random_label(rng, *size, [255, 0, 181, *rng.choice(used_values, 5, replace=False)])
        img = root / split / f"{key}.jpg"
        mask = root / "stuffthingmaps_trainval2017" / split / f"{key}.png"
        write_jpeg(img, random_image(rng, *size))
        write_mask_png(mask, values)
        out[key] = Sample(key, "train" if i < n_train else "val", values, img, mask)
    return out


# --- PASCAL-Context (mmseg's converted layout) ----------------------------------------------

def pascal_context_tree(root: Path, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (30, 44),
                        seed: int = 0, palette: bool = False) -> dict[str, Sample]:
    rng = np.random.default_rng(seed)
    out = {}
    lists: dict[str, list[str]] = {"train": [], "val": []}
    for i in range(n_train + n_val):
        split = "train" if i < n_train else "val"
        key = f"2008_{i:06d}"
        values = random_label(rng, *size, [0, 1, 59, *rng.choice(np.arange(2, 59), 4, replace=False)])
        img = root / "JPEGImages" / f"{key}.jpg"
        mask = root / "SegmentationClassContext" / f"{key}.png"
        write_jpeg(img, random_image(rng, *size))
        write_mask_png(mask, values, palette=palette)
        lists[split].append(key)
        out[key] = Sample(key, split, values, img, mask)
    lst = root / "ImageSets" / "SegmentationContext"
    lst.mkdir(parents=True, exist_ok=True)
    for split, keys in lists.items():
        (lst / f"{split}.txt").write_text("".join(k + "\n" for k in keys))
    return out


# --- reading converted shards back (independently of rankseg's reader) ---------------------

def read_shards(out: Path) -> dict[str, dict]:
    """key -> stored fields of every sample of every split, labels decoded with PIL."""
    import io
    import json

    import h5py

    index = json.loads((out / "dataset.json").read_text())
    samples = {}
    for split, meta in index["splits"].items():
        for sh in meta["shards"]:
            with h5py.File(out / sh["file"], "r") as f:
                offs, cls = f["class_offsets"][:], f["classes"][:]
                for i, key in enumerate(f["key"].asstr()[:]):
                    label = np.asarray(Image.open(io.BytesIO(f["label"][i].tobytes())))
                    samples[key] = {
                        "split": split, "label": label.astype(np.uint16),
                        "image": f["image"][i].tobytes(),
                        "classes": cls[offs[i]:offs[i + 1]].tolist(),
                        "size": (int(f["height"][i]), int(f["width"][i])),
                        "orig_size": (int(f["orig_height"][i]), int(f["orig_width"][i])),
                    }
    return samples


def decode_rgb(data: bytes) -> np.ndarray:
    """H x W x 3 uint8 RGB via PIL (no EXIF transpose)."""
    import io

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))
