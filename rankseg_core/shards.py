"""Shard format v1: writing.

A shard directory holds `{split}-{index:05d}-of-{count:05d}.h5` files, one sidecar
`<shard>.h5.json` per finished shard (its sha256, counts and skipped samples), and the
`dataset.json` index assembled from the sidecars once every shard exists. See docs/shards.md.

Why this shape:
- The partition of a split's keys into shards depends only on the sorted keys and the shard
  size, so an interrupted run, a re-run, or N machines each converting `--shard-index I` all
  agree on what goes where, and finished shards are simply skipped.
- A shard only gets its final name after its bytes are fsynced and its sidecar is written, so
  a file with a final name is always complete (crash-safe resume).
- Per-sample class lists are stored column-wise (CSR: `classes` + `class_offsets`), so
  statistics over 100k images read two small arrays per shard instead of 100k objects.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import h5py
import numpy as np

from . import __version__
from .codec import IGNORE, class_counts, encode_label
from .errors import SampleError, UserError
from .parallel import Skipped
from .palette import make_palette
from .progress import Progress

FORMAT = "rankseg-shards"
VERSION = 1
MARKER = ".rankseg-shards.json"  # written first: claims the directory and records the options


@dataclass
class EncodedSample:
    """One sample ready to be written. Produced in worker processes, so it must pickle."""

    key: str
    image: bytes  # encoded JPEG/PNG exactly as stored
    label: bytes  # 16-bit PNG of train ids, IGNORE = 65535
    height: int  # stored size
    width: int
    orig_height: int  # size in the source release (differs when the protocol resizes)
    orig_width: int
    classes: np.ndarray  # sorted present train ids, uint16
    pixels: np.ndarray  # pixel count per present class, int64
    video: str = ""
    frame: int = -1
    instances: str = ""  # JSON, e.g. per-frame instance RLEs for video instance segmentation


def encode_sample(key: str, image: bytes, label: np.ndarray, num_classes: int, *,
                  orig_size: tuple[int, int] | None = None, video: str = "", frame: int = -1,
                  instances: str = "") -> EncodedSample:
    """Count classes and PNG-encode an H x W uint16 label; the image bytes are kept as given."""
    try:
        classes, pixels = class_counts(label, num_classes)
    except ValueError as exc:
        raise SampleError(f"{key}: {exc}") from None
    h, w = label.shape
    oh, ow = orig_size or (h, w)
    return EncodedSample(key, image, encode_label(label), h, w, oh, ow, classes, pixels,
                         video, frame, instances)


@dataclass
class DatasetHeader:
    """What `dataset.json` says about the dataset as a whole."""

    name: str
    class_names: list[str]
    options: dict = field(default_factory=dict)  # converter options: a re-run must match them
    source: str = ""  # where the class table comes from

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.h5"


def plan_shards(keys: Sequence[str], samples_per_shard: int) -> list[list[str]]:
    """Deterministic partition of a split's keys (sorted) into contiguous shards."""
    keys = sorted(keys)
    if len(set(keys)) != len(keys):
        raise UserError("duplicate sample keys in the input: every image needs a unique name")
    n = max(1, -(-len(keys) // samples_per_shard))
    per = -(-len(keys) // n) if keys else 0
    return [keys[i * per:(i + 1) * per] for i in range(n)]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via `<path>.tmp`, fsync, rename: readers never see a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def atomic_write_json(path: Path, obj: object) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


_VLEN_BYTES = h5py.vlen_dtype(np.uint8)
_VLEN_STR = h5py.string_dtype("utf-8")


def write_shard(path: Path, samples: list[EncodedSample], skipped: list[Skipped], *,
                split: str, index: int, count: int, header: DatasetHeader) -> dict:
    """Write one shard atomically and return its sidecar record."""
    tmp = path.with_name(path.name + ".tmp")
    n = len(samples)
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum([len(s.classes) for s in samples])
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    # track_times=False keeps the bytes a function of the content, so a resumed conversion
    # produces byte-identical shards (verified by tests/test_shards.py).
    with h5py.File(tmp, "w", libver=("earliest", "v110"), track_order=False) as f:
        f.attrs.update(format=FORMAT, version=VERSION, dataset=header.name, split=split,
                       index=index, count=count, num_classes=header.num_classes, num_samples=n)

        def put(name: str, data, dtype=None) -> None:
            f.create_dataset(name, data=data, dtype=dtype, track_times=False)

        def put_vlen(name: str, items: list, dtype) -> None:
            ds = f.create_dataset(name, (n,), dtype=dtype, track_times=False)
            # Element-wise: h5py turns an object array of equal-length arrays into a 2-D array
            # and refuses it.
            for i, x in enumerate(items):
                ds[i] = x

        put_vlen("key", [s.key for s in samples], _VLEN_STR)
        put_vlen("image", [np.frombuffer(s.image, np.uint8) for s in samples], _VLEN_BYTES)
        put_vlen("label", [np.frombuffer(s.label, np.uint8) for s in samples], _VLEN_BYTES)
        for name in ("height", "width", "orig_height", "orig_width", "frame"):
            put(name, np.array([getattr(s, name) for s in samples], np.int32))
        put_vlen("video", [s.video for s in samples], _VLEN_STR)
        put_vlen("instances", [s.instances for s in samples], _VLEN_STR)
        put("classes", cat([s.classes for s in samples], np.uint16))
        put("pixels", cat([s.pixels for s in samples], np.int64))
        put("class_offsets", offsets)
        f.flush()
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())

    k = header.num_classes
    class_images = np.zeros(k, np.int64)
    class_pixels = np.zeros(k, np.int64)
    for s in samples:
        class_images[s.classes] += 1
        class_pixels[s.classes] += s.pixels
    record = {
        "file": path.name, "split": split, "index": index, "count": count, "num_samples": n,
        "bytes": tmp.stat().st_size, "sha256": sha256_file(tmp),
        "class_images": class_images.tolist(), "class_pixels": class_pixels.tolist(),
        "skipped": [asdict(s) for s in skipped],
    }
    # Sidecar first, then the rename: a shard with its final name always has its record.
    atomic_write_json(path.with_name(path.name + ".json"), record)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return record


def shard_is_complete(path: Path) -> bool:
    side = path.with_name(path.name + ".json")
    if not (path.exists() and side.exists()):
        return False
    try:
        rec = json.loads(side.read_text())
    except json.JSONDecodeError:
        return False
    return rec.get("bytes") == path.stat().st_size


def claim_output(out: Path, header: DatasetHeader) -> None:
    """Create or reuse `out`; refuse a foreign non-empty directory or different options."""
    marker = out / MARKER
    want = {"format": FORMAT, "version": VERSION, "dataset": header.name,
            "num_classes": header.num_classes, "options": header.options}
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a directory: choose another --out")
    if out.exists() and any(out.iterdir()):
        if not marker.exists():
            raise UserError(f"{out} is not empty and was not made by rankseg: choose an empty or new --out")
        have = json.loads(marker.read_text())
        if have != json.loads(json.dumps(want)):
            raise UserError(f"{out} holds a conversion with different options ({have.get('dataset')}, "
                            f"{have.get('options')}): use the same options to resume, or another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(marker, want)


@dataclass
class PendingShard:
    """One shard still to write: its path, place in the split's plan, and sample keys."""

    path: Path
    split: str
    index: int
    count: int
    keys: list[str]


def pending_shards(out: Path, split: str, keys: Sequence[str], *, samples_per_shard: int = 1000,
                   num_parts: int = 1, part: int | None = None) -> list[PendingShard]:
    """The split's shards not yet complete in `out` (only part `part` of `num_parts` if set).

    With `part` set, only shards whose index % num_parts == part are taken (one machine of
    a SLURM array); finished shards are left out, which is what makes a re-run resume.
    """
    plan = plan_shards(keys, samples_per_shard)
    todo = [PendingShard(out / shard_name(split, i, len(plan)), split, i, len(plan), ks)
            for i, ks in enumerate(plan) if part is None or i % num_parts == part]
    return [s for s in todo if not shard_is_complete(s.path)]


def write_pending(shards: Sequence[PendingShard], results: Iterator, header: DatasetHeader, *,
                  on_error: str = "fail", desc: str = "") -> None:
    """Cut `results` (one `EncodedSample` or `Skipped` per key of `shards`, in order) into shards.

    A `Skipped` result raises UserError under `on_error="fail"` before its shard is written,
    so no shard holding a partial sample list is ever left with its final name.
    """
    if on_error not in ("fail", "skip"):
        raise UserError(f"--on-error must be 'fail' or 'skip', not {on_error!r}")
    with Progress(sum(len(s.keys) for s in shards), desc, unit="img") as bar:
        for shard in shards:
            samples, skipped = [], []
            for res in itertools.islice(results, len(shard.keys)):
                if isinstance(res, Skipped):
                    if on_error == "fail":
                        raise UserError(f"{res.reason} (fix or remove it, or re-run with --on-error skip)")
                    skipped.append(res)
                else:
                    samples.append(res)
                bar.advance(1)
            write_shard(shard.path, samples, skipped, split=shard.split, index=shard.index,
                        count=shard.count, header=header)


def assemble(out: Path, header: DatasetHeader, splits: Sequence[str]) -> dict:
    """Check every shard of every split is complete and write `dataset.json` atomically."""
    index: dict = {
        "format": FORMAT, "version": VERSION, "name": header.name, "rankseg_version": __version__,
        "num_classes": header.num_classes, "class_names": header.class_names,
        "class_source": header.source, "ignore": IGNORE,
        "palette": make_palette(header.num_classes).tolist(), "options": header.options,
        "splits": {},
    }
    skipped_all = []
    for split in splits:
        sides = sorted(out.glob(f"{split}-*-of-*.h5.json"))
        if not sides:
            raise UserError(f"{out}: no finished shards for split '{split}': run the conversion first")
        recs = [json.loads(p.read_text()) for p in sides]
        count = recs[0]["count"]
        have = {r["index"] for r in recs if r["count"] == count
                and shard_is_complete(out / r["file"])}
        missing = sorted(set(range(count)) - have)
        if missing:
            raise UserError(f"{out}: split '{split}' is missing {len(missing)} of {count} shards "
                            f"(first: {shard_name(split, missing[0], count)}): run the remaining "
                            f"--shard-index parts, then assemble again")
        recs = sorted((r for r in recs if r["count"] == count), key=lambda r: r["index"])
        skipped_all += [dict(s, split=split) for r in recs for s in r["skipped"]]
        index["splits"][split] = {
            "num_samples": sum(r["num_samples"] for r in recs),
            "num_skipped": sum(len(r["skipped"]) for r in recs),
            "shards": [{k: r[k] for k in ("file", "num_samples", "bytes", "sha256")} for r in recs],
            "class_images": np.sum([r["class_images"] for r in recs], 0).tolist(),
            "class_pixels": np.sum([r["class_pixels"] for r in recs], 0).tolist(),
        }
        videos = _video_targets(out, index["splits"][split]["shards"])
        if videos:
            index["splits"][split]["videos"] = videos
    if skipped_all:
        atomic_write_bytes(out / "skipped.jsonl",
                           "".join(json.dumps(s) + "\n" for s in skipped_all).encode())
    atomic_write_json(out / "dataset.json", index)
    return index


def _video_targets(out: Path, shards: list[dict]) -> dict:
    """Per video: frame count and the union of its frames' classes (the video-level target)."""
    videos: dict[str, set] = {}
    frames: dict[str, int] = {}
    for sh in shards:
        with h5py.File(out / sh["file"], "r") as f:
            vids = f["video"].asstr()[:] if len(f["video"]) else []
            if not any(vids):
                continue
            offs, cls = f["class_offsets"][:], f["classes"][:]
        for i, v in enumerate(vids):
            if v:
                videos.setdefault(v, set()).update(cls[offs[i]:offs[i + 1]].tolist())
                frames[v] = frames.get(v, 0) + 1
    return {v: {"frames": frames[v], "classes": sorted(c)} for v, c in sorted(videos.items())}
