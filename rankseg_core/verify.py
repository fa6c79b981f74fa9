"""`rankseg verify`: prove a shard directory is intact and self-consistent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from .codec import class_counts, decode_image, decode_label
from .dataset import ShardIndex
from .shards import sha256_file


def verify_shards(root: str | Path, decode_images: bool = False) -> Iterator[str]:
    """Yield one problem description per problem found (nothing = all good).

    Checks each shard's sha256 and sample count against `dataset.json`, decodes every label,
    checks ids < K or ignore, and that stored classes / pixel counts equal the decoded label's.
    """
    idx = ShardIndex(root)
    k = idx.num_classes
    for split in idx.splits:
        for sh in idx.split_meta(split)["shards"]:
            path = idx.root / sh["file"]
            if not path.exists():
                yield f"{path}: missing shard (re-run `rankseg prepare` with the same options)"
                continue
            if sha256_file(path) != sh["sha256"]:
                yield f"{path}: sha256 mismatch, the file is corrupt or truncated (delete it and re-run `rankseg prepare`)"
                continue
            try:
                yield from _check_samples(path, sh["num_samples"], k, decode_images)
            except (OSError, KeyError, ValueError) as exc:
                yield f"{path}: unreadable shard ({exc})"


def _check_samples(path: Path, expected: int, k: int, decode_images: bool) -> Iterator[str]:
    with h5py.File(path, "r") as f:
        n = len(f["key"])
        if n != expected:
            yield f"{path}: holds {n} samples, dataset.json says {expected}"
            return
        keys = f["key"].asstr()[:]
        offs, cls, pix = f["class_offsets"][:], f["classes"][:], f["pixels"][:]
        heights, widths = f["height"][:], f["width"][:]
        labels = f["label"]
        for i in range(n):
            where = f"{path} sample {i} ({keys[i]})"
            try:
                label = decode_label(labels[i].tobytes())
            except ValueError as exc:
                yield f"{where}: label does not decode ({exc})"
                continue
            if label.shape != (heights[i], widths[i]):
                yield f"{where}: label is {label.shape}, stored size is {(heights[i], widths[i])}"
            try:
                present, counts = class_counts(label, k)
            except ValueError as exc:
                yield f"{where}: {exc}"
                continue
            s, e = offs[i], offs[i + 1]
            if not (np.array_equal(present, cls[s:e]) and np.array_equal(counts, pix[s:e])):
                yield f"{where}: stored classes/pixel counts do not match the label"
            if decode_images:
                try:
                    img = decode_image(f["image"][i].tobytes())
                    if img.shape[:2] != label.shape:
                        yield f"{where}: image {img.shape[:2]} and label {label.shape} differ in size"
                except ValueError as exc:
                    yield f"{where}: image does not decode ({exc})"
