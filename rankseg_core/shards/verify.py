"""`rankseg verify`: prove a shard directory is intact and self-consistent."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import h5py
import numpy as np

from rankseg_core.errors import SampleError
from rankseg_core.shards.check import ShardFormatError, check_shard_layout, check_shard_size, check_shard_values
from rankseg_core.shards.codec import class_counts, decode_image, decode_label
from rankseg_core.shards.read import ShardIndex
from rankseg_core.shards.write import check_segments, normalise_segments_info, sha256_file
from rankseg_core.utils import jsonio


def verify_shards(root: str | Path, decode_images: bool = False) -> Iterator[str]:
    """Yield one problem description per problem found (nothing = all good).

    First the structure (`shard_check`): `dataset.json`'s fields, each shard's size against its
    record (before hashing it), its HDF5 attributes, array dtypes and lengths, class offsets.
    Then each shard's sha256, and per sample: the label decodes, its ids are < K or ignore,
    the stored classes / pixel counts equal the decoded label's. Panoptic (v2) shards: every
    segment map is also checked against its records and the label (`shards.check_segments`).
    """
    try:
        idx = ShardIndex(root)
    except ShardFormatError as exc:  # a damaged index is a finding, not a usage error
        yield str(exc)
        return
    for split in idx.splits:
        # key -> where it was first seen: a key names one sample of its split (predictions are
        # saved, scored and looked up by it), so a second sample of the same key is a problem.
        seen: dict[str, str] = {}
        for position, sh in enumerate(idx.split_meta(split)["shards"]):
            path = idx.root / sh["file"]
            try:
                check_shard_size(path, sh)
            except ShardFormatError as exc:
                yield str(exc)
                continue
            if sha256_file(path) != sh["sha256"]:
                yield f"{path}: sha256 mismatch, the file is corrupt or truncated (delete it and re-run `rankseg prepare`)"
                continue
            try:
                with h5py.File(path, "r") as f:
                    check_shard_layout(f, path, idx.meta, split, position)
                    yield from _duplicate_keys(f, path, split, seen)
                    yield from _check_samples(f, path, idx.num_classes, decode_images, idx.is_panoptic)
            except ShardFormatError as exc:
                yield str(exc)
            except (OSError, KeyError, ValueError) as exc:
                yield f"{path}: unreadable shard ({exc})"


def _duplicate_keys(f: h5py.File, path: Path, split: str, seen: dict[str, str]) -> Iterator[str]:
    for i, key in enumerate(f["key"].asstr()[:]):
        where = f"{path} sample {i}"
        if key in seen:
            yield f"{where}: key {key!r} is also {seen[key]} of split '{split}' (sample keys must be unique)"
        else:
            seen[key] = where


def _check_samples(f: h5py.File, path: Path, k: int, decode_images: bool,
                   panoptic: bool) -> Iterator[str]:
    keys = f["key"].asstr()[:]
    offs, cls, pix = f["class_offsets"][:], f["classes"][:], f["pixels"][:]
    heights, widths = f["height"][:], f["width"][:]
    check_shard_values(path, k, offs, len(cls), cls, heights, widths, pix)
    labels = f["label"]
    for i in range(len(keys)):
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
        if panoptic:
            yield from _check_segments(f, i, label, k, where)
        if decode_images:
            try:
                img = decode_image(f["image"][i].tobytes())
                if img.shape[:2] != label.shape:
                    yield f"{where}: image {img.shape[:2]} and label {label.shape} differ in size"
            except ValueError as exc:
                yield f"{where}: image does not decode ({exc})"


def _check_segments(f: h5py.File, i: int, label: np.ndarray, k: int, where: str) -> Iterator[str]:
    try:
        segments = decode_label(f["segments"][i].tobytes())
        records = normalise_segments_info(jsonio.loads(f["segments_info"].asstr()[i]), where)
    except ValueError as exc:  # a PNG that does not decode, or JSON that does not parse (or nests too deep)
        yield f"{where}: segments do not decode ({exc})"
        return
    except SampleError as exc:
        yield str(exc)
        return
    problem = check_segments(segments, records, label, k)
    if problem:
        yield f"{where}: {problem}"
