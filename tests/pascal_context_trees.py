"""A small PASCAL-Context release tree in the official formats: VOC2010 JPEGs, `ImageSets/Main`
lists, `trainval/<id>.mat` files holding a uint16 `LabelMap` (written with scipy.io.savemat,
compressed as MATLAB's default v7 `save` does), `labels.txt` ("<id>: <name>"), and, for the
equivalence test, mmsegmentation's `SegmentationClassContext` PNGs derived from the same maps
the way the Detail API + mmseg's converter derive them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import scipy.io
from convert_trees import Sample, random_image, random_label, write_jpeg, write_mask_png

TABLE = Path(__file__).resolve().parents[1] / "datasets" / "pascal_context" / "classes_459.json"


def table() -> tuple[list[str], list[int]]:
    doc = json.loads(TABLE.read_text())
    return [c["name"] for c in doc["classes"]], doc["context59_ids"]


def mmseg_context_png(label_map: np.ndarray, ids59: list[int]) -> np.ndarray:
    """SegmentationClassContext values: Detail's 59-class mask (the 59 classes keep their
    label id, everything else is background 0), then mmseg's `np.digitize(mask, _mapping,
    right=True)` over the sorted 60 ids [0] + ids59 -> 0..59."""
    mapping = np.array([0] + sorted(ids59))
    merged = np.where(np.isin(label_map, mapping), label_map, 0)
    return np.digitize(merged.ravel(), mapping, right=True).reshape(label_map.shape).astype(np.uint8)


def pascal_context_release(root: Path, n_train: int = 3, n_val: int = 3, size: tuple[int, int] = (26, 38),
                           seed: int = 0, extra_val: int = 0) -> dict[str, Sample]:
    """`root` = VOCdevkit/VOC2010. Label maps mix 59-class ids, other 459 ids and 0.
    `extra_val` adds that many val list entries whose .mat is missing (the one-short case)."""
    names, ids59 = table()
    rng = np.random.default_rng(seed)
    other = [i for i in range(1, 460) if i not in set(ids59)]
    out, lists = {}, {"train": [], "val": []}
    for i in range(n_train + n_val):
        split = "train" if i < n_train else "val"
        key = f"2008_{i:06d}"
        vals = [0, 459, 1, *rng.choice(ids59, 4, replace=False), *rng.choice(other, 3, replace=False)]
        label_map = random_label(rng, *size, vals).astype(np.uint16)
        write_jpeg(root / "JPEGImages" / f"{key}.jpg", random_image(rng, *size))
        mat = root / "trainval" / f"{key}.mat"
        mat.parent.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(mat, {"LabelMap": label_map}, do_compression=True)
        png = root / "SegmentationClassContext" / f"{key}.png"
        write_mask_png(png, mmseg_context_png(label_map, ids59))
        lists[split].append(key)
        out[key] = Sample(key, split, label_map, root / "JPEGImages" / f"{key}.jpg", mat)
    for j in range(extra_val):
        key = f"2010_{j:06d}"
        write_jpeg(root / "JPEGImages" / f"{key}.jpg", random_image(rng, *size))
        lists["val"].append(key)
    for folder in ("Main", "SegmentationContext"):
        d = root / "ImageSets" / folder
        d.mkdir(parents=True, exist_ok=True)
        for split, keys in lists.items():
            ks = keys if folder == "Main" else [k for k in keys if k in out]
            (d / f"{split}.txt").write_text("".join(k + "\n" for k in ks))
    (root / "labels.txt").write_text("".join(f"{i}: {n}\n" for i, n in enumerate(names, 1)))
    return out
