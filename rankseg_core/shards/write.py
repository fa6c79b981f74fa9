"""Shard format (v1; v2 = v1 + panoptic segments): writing.

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

from rankseg_core import __version__
from rankseg_core.errors import SampleError, UserError
from rankseg_core.shards.codec import IGNORE, MAX_CLASSES, class_counts, encode_label
from rankseg_core.utils import jsonio, lock

# Re-exported: other modules write their files through `shards.atomic_write_*`.
from rankseg_core.utils.fsio import (
    atomic_write_bytes,
    atomic_write_json,
    check_writable_target,
    fsync_dir,
    os_error,
    remove_quietly,
    write_synced,
)  # noqa: F401
from rankseg_core.utils.palette import make_palette
from rankseg_core.utils.parallel import Skipped
from rankseg_core.utils.progress import Progress

FORMAT = "rankseg-shards"
VERSION = 1  # semantic datasets (the layout of every release before v2 existed)
VERSION_PANOPTIC = 2  # v1 + per-sample segment maps and records, thing classes in dataset.json
VERSIONS = (VERSION, VERSION_PANOPTIC)  # what the reader accepts
MAX_SEGMENTS = 65534  # per image: indices 1..n in a uint16 map (0 = no segment)
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
    segments: bytes = b""  # v2: 16-bit PNG of segment indices (0 = none, i = segments_info[i-1])
    segments_info: str = ""  # v2: JSON list of {"id", "category", "iscrowd", "area"}, index order


def encode_sample(key: str, image: bytes, label: np.ndarray, num_classes: int, *,
                  orig_size: tuple[int, int] | None = None, video: str = "", frame: int = -1,
                  instances: str = "", segments: np.ndarray | None = None,
                  segments_info: list[dict] | None = None) -> EncodedSample:
    """Count classes and PNG-encode an H x W uint16 label; the image bytes are kept as given.

    Panoptic samples also pass `segments` (H x W uint16, 0 = no segment, i = the i-th record)
    and `segments_info` (one record per index: id, category, iscrowd, area); both are checked
    against each other and against the label (see `check_segments`).
    """
    try:
        classes, pixels = class_counts(label, num_classes)
    except ValueError as exc:
        raise SampleError(f"{key}: {exc}") from None
    h, w = label.shape
    oh, ow = orig_size or (h, w)
    seg_png, seg_json = b"", ""
    if segments is not None or segments_info is not None:
        if segments is None or segments_info is None:
            raise ValueError("encode_sample: pass both segments and segments_info, or neither")
        if not (isinstance(segments, np.ndarray) and segments.dtype == np.uint16 and segments.ndim == 2):
            raise SampleError(f"{key}: segment map must be a 2-D uint16 array")
        records = normalise_segments_info(segments_info, key)
        problem = check_segments(segments, records, label, num_classes)
        if problem:
            raise SampleError(f"{key}: {problem}")
        seg_png, seg_json = encode_label(segments), segments_json(records)
    return EncodedSample(key, image, encode_label(label), h, w, oh, ow, classes, pixels,
                         video, frame, instances, seg_png, seg_json)


_SEGMENT_KEYS = ("id", "category", "iscrowd", "area")
# Kept where a converter gives it: the area the official JSON declares when it differs from the
# pixel count (ADE20K panoptic stuff painted over by instances; panopticapi scores with it).
_OPTIONAL_SEGMENT_KEYS = ("json_area",)


def normalise_segments_info(records: object, where: str) -> list[dict]:
    """Segment records as plain `{"id", "category", "iscrowd", "area"}` dicts of Python ints,
    plus `json_area` where a record has it (docs/shards.md).

    Other keys are dropped. Raises SampleError naming `where` when a record lacks a key or holds
    a non-integer.
    """
    if not isinstance(records, list):
        raise SampleError(f"{where}: segments_info must be a list of records")
    if len(records) > MAX_SEGMENTS:
        raise SampleError(f"{where}: {len(records)} segments, at most {MAX_SEGMENTS} per image")
    out = []
    for i, r in enumerate(records):
        if not isinstance(r, dict) or any(k not in r for k in _SEGMENT_KEYS):
            raise SampleError(f"{where}: segment record {i + 1} must have keys {', '.join(_SEGMENT_KEYS)}")
        vals = {k: r[k] for k in _SEGMENT_KEYS}
        vals.update({k: r[k] for k in _OPTIONAL_SEGMENT_KEYS if k in r})
        if any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in vals.values()):
            raise SampleError(f"{where}: segment record {i + 1} has a non-integer field: {vals}")
        out.append({k: int(v) for k, v in vals.items()})
    return out


def segments_json(records: list[dict]) -> str:
    """The stored form of normalised records (compact, so shard bytes depend only on content)."""
    return json.dumps(records, separators=(",", ":"))


def check_segments(segments: np.ndarray, records: list[dict], label: np.ndarray,
                   num_classes: int) -> str:
    """'' when an H x W segment-index map, its records and the H x W label agree; else the problem.

    Agreement: same size as the label; every index <= n = len(records); record i's area is the
    pixel count of index i; ids unique; iscrowd 0 or 1; categories < K; and the label equals
    the segment's category wherever a segment exists. Used by the writer and by `verify`.
    """
    n = len(records)
    if segments.shape != label.shape:
        return f"segment map is {segments.shape[0]}x{segments.shape[1]}, label is {label.shape[0]}x{label.shape[1]}"
    counts = np.bincount(segments.ravel(), minlength=n + 1)
    if counts.size > n + 1:
        return f"segment index {int(np.nonzero(counts[n + 1:])[0][0]) + n + 1} in the map, only {n} records"
    ids = [r["id"] for r in records]
    if len(set(ids)) != n:
        return "segment ids are not unique"
    for i, r in enumerate(records, 1):
        if r["iscrowd"] not in (0, 1):
            return f"segment {i} (id {r['id']}): iscrowd must be 0 or 1, not {r['iscrowd']}"
        if not 0 <= r["category"] < num_classes:
            return f"segment {i} (id {r['id']}): category {r['category']} is not a train id < K={num_classes}"
        if r["area"] != counts[i]:
            return f"segment {i} (id {r['id']}): area {r['area']} but {int(counts[i])} pixels in the map"
        if "json_area" in r and r["json_area"] < r["area"]:
            return f"segment {i} (id {r['id']}): json_area {r['json_area']} is less than its area {r['area']}"
    cats = np.array([IGNORE] + [r["category"] for r in records], np.int64)
    inside = segments > 0
    if not np.array_equal(label[inside], cats[segments[inside]]):
        return "the label differs from the segments' categories where a segment exists"
    return ""


@dataclass
class DatasetHeader:
    """What `dataset.json` says about the dataset as a whole."""

    name: str
    class_names: list[str]
    options: dict = field(default_factory=dict)  # converter options: a re-run must match them
    source: str = ""  # where the class table comes from
    thing_classes: list[int] | None = None  # panoptic datasets: sorted train ids of thing classes

    def __post_init__(self) -> None:
        # Every converter builds one of these: K and the thing classes are checked where they enter.
        k = len(self.class_names)
        if not 1 <= k <= MAX_CLASSES:
            raise UserError(f"{self.name}: {k} classes; K must be 1..{MAX_CLASSES} "
                            f"(train ids are stored as uint16 and {IGNORE} means ignore)")
        if self.thing_classes is not None:
            things = self.thing_classes
            if (not isinstance(things, list) or any(isinstance(c, bool) or not isinstance(c, (int, np.integer))
                                                    or not 0 <= c < k for c in things)
                    or len(set(things)) != len(things)):
                raise UserError(f"{self.name}: thing_classes must be distinct train ids in 0..{k - 1}")
            self.thing_classes = sorted(int(c) for c in things)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def is_panoptic(self) -> bool:
        return self.thing_classes is not None

    @property
    def version(self) -> int:
        return VERSION_PANOPTIC if self.is_panoptic else VERSION


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}-{index:05d}-of-{count:05d}.h5"


def shard_count(num_keys: int, samples_per_shard: int) -> int:
    """Number of shards `plan_shards` cuts `num_keys` keys into (at least one)."""
    return max(1, -(-num_keys // samples_per_shard))


def plan_shards(keys: Sequence[str], samples_per_shard: int) -> list[list[str]]:
    """Deterministic partition of a split's keys (sorted) into contiguous shards."""
    keys = sorted(keys)
    if len(set(keys)) != len(keys):
        raise UserError("duplicate sample keys in the input: every image needs a unique name")
    n = shard_count(len(keys), samples_per_shard)
    per = -(-len(keys) // n) if keys else 0
    return [keys[i * per:(i + 1) * per] for i in range(n)]


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_VLEN_BYTES = h5py.vlen_dtype(np.uint8)
_VLEN_STR = h5py.string_dtype("utf-8")


def write_shard(path: Path, samples: list[EncodedSample], skipped: list[Skipped], *,
                split: str, index: int, count: int, header: DatasetHeader) -> dict:
    """Write one shard atomically and return its sidecar record.

    On any failure (full disk, read-only file system, Ctrl-C) the temp file is removed and
    nothing with the shard's final name is left; an OSError becomes a one-line UserError.
    """
    tmp = path.with_name(path.name + ".tmp")
    check_writable_target(path)
    try:
        return _write_shard(path, tmp, samples, skipped, split=split, index=index, count=count,
                            header=header)
    except OSError as exc:
        remove_quietly(tmp)
        raise os_error(path, exc) from None
    except BaseException:
        remove_quietly(tmp)
        raise


def _write_shard(path: Path, tmp: Path, samples: list[EncodedSample], skipped: list[Skipped], *,
                 split: str, index: int, count: int, header: DatasetHeader) -> dict:
    n = len(samples)
    offsets = np.zeros(n + 1, np.int64)
    offsets[1:] = np.cumsum([len(s.classes) for s in samples])
    def cat(xs, dt):
        return (np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    # track_times=False keeps the bytes a function of the content, so a resumed conversion
    # produces byte-identical shards (verified by tests/test_shards.py).
    panoptic = header.is_panoptic
    for s in samples:
        if panoptic != bool(s.segments):
            raise ValueError(f"sample {s.key}: a {'panoptic' if panoptic else 'semantic'} dataset "
                             f"needs samples {'with' if panoptic else 'without'} segments")
    # The HDF5 file is built in memory and written with plain OS calls: HDF5 writing to a disk
    # that fills up fails again when the file is closed (RuntimeError "Can't decrement id ref
    # count") and leaves the library in a state that crashes the interpreter at exit. In memory
    # nothing can fail but memory; the bytes are those the file driver would have written.
    with h5py.File(tmp.name, "w", libver=("earliest", "v110"), track_order=False, driver="core",
                   backing_store=False) as f:
        f.attrs.update(format=FORMAT, version=header.version, dataset=header.name, split=split,
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
        if panoptic:  # v2 only: v1 shards stay byte-identical to what older releases wrote
            put_vlen("segments", [np.frombuffer(s.segments, np.uint8) for s in samples], _VLEN_BYTES)
            put_vlen("segments_info", [s.segments_info for s in samples], _VLEN_STR)
        f.flush()
        image = f.id.get_file_image()
    write_synced(tmp, image)

    k = header.num_classes
    class_images = np.zeros(k, np.int64)
    class_pixels = np.zeros(k, np.int64)
    for s in samples:
        class_images[s.classes] += 1
        class_pixels[s.classes] += s.pixels
    record = {
        "file": path.name, "split": split, "index": index, "count": count, "num_samples": n,
        "bytes": len(image), "sha256": hashlib.sha256(image).hexdigest(),
        "class_images": class_images.tolist(), "class_pixels": class_pixels.tolist(),
        "skipped": [asdict(s) for s in skipped],
    }
    # Sidecar first, then the rename: a shard with its final name always has its record.
    atomic_write_json(path.with_name(path.name + ".json"), record)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return record


def read_sidecar(side: Path, num_classes: int | None = None) -> dict | None:
    """A shard's sidecar record, or None when it is missing, damaged (or of another K)."""
    try:
        rec = jsonio.loads(side.read_bytes())
    except (OSError, ValueError):
        return None
    counts = ("index", "count", "num_samples", "bytes")
    per_class = ("class_images", "class_pixels")
    ok = (isinstance(rec, dict) and isinstance(rec.get("file"), str) and rec["file"] + ".json" == side.name
          and all(isinstance(rec.get(k), int) and not isinstance(rec.get(k), bool) and rec[k] >= 0
                  for k in counts)
          and isinstance(rec.get("sha256"), str)
          and isinstance(rec.get("skipped"), list) and all(isinstance(x, dict) for x in rec["skipped"])
          and all(isinstance(rec.get(k), list) and all(isinstance(v, int) for v in rec[k])
                  and (num_classes is None or len(rec[k]) == num_classes) for k in per_class))
    return rec if ok else None


def shard_is_complete(path: Path) -> bool:
    """True when `path` is a regular file with a valid sidecar recording its size (finished)."""
    rec = read_sidecar(path.with_name(path.name + ".json"))
    try:
        return rec is not None and path.is_file() and rec["bytes"] == path.stat().st_size
    except OSError:
        return False


def claim_output(out: Path, header: DatasetHeader, part: tuple[int, int] | None = None) -> None:
    """Create or reuse `out` and take its writer lock; refuse a foreign directory or other options.

    The lock (`lock.py`) is held until `release_output(out)` or the end of the process, so two
    conversions into one directory cannot interleave. `part` = (index, count) of a
    `--shard-index` run: parts hold the directory lock shared (they write disjoint shards side
    by side) and their own part's lock exclusively; a whole run holds it exclusively.
    """
    want = jsonio.loads(jsonio.dumps({"format": FORMAT, "version": header.version, "dataset": header.name,
                                      "num_classes": header.num_classes, "options": header.options}))
    _claimed(out, want)  # refuses before writing anything (even a lock file) into a foreign directory
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(out, exc, "cannot create the output directory") from None
    locks = [(lock.LOCK_NAME, part is not None)]
    if part is not None:
        locks.append((f"{lock.LOCK_NAME}.part-{part[0]:05d}-of-{part[1]:05d}", False))
    lock.hold(out, "prepare", locks)
    if not _claimed(out, want):  # checked again under the lock: another run may have claimed it
        atomic_write_json(out / MARKER, want)


def release_output(out: Path) -> None:
    """Release the writer lock `claim_output` took on `out` (no-op if none)."""
    lock.release_held(out)


def _claimed(out: Path, want: dict) -> bool:
    """True if `out` holds our marker with these options, False if it is new or empty.

    UserError for anything else: a file, a foreign non-empty directory, other options.
    """
    marker = out / MARKER
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a directory: choose another --out")
    try:
        content = [p for p in out.iterdir() if not lock.is_lock_file(p.name)] if out.exists() else []
    except OSError as exc:
        raise os_error(out, exc, "cannot list the output directory") from None
    if not content:
        return False
    if not marker.is_file():
        raise UserError(f"{out} is not empty and was not made by rankseg: choose an empty or new --out")
    try:
        have = jsonio.loads(marker.read_bytes())
    except (OSError, ValueError):
        raise UserError(f"{marker} is damaged: delete {out} and convert again, or choose another --out") from None
    if have != want:
        got = have if isinstance(have, dict) else {}
        raise UserError(f"{out} holds a conversion with different options ({got.get('dataset')}, "
                        f"{got.get('options')}): use the same options to resume, or another --out")
    return True


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
        "format": FORMAT, "version": header.version, "name": header.name, "rankseg_version": __version__,
        "num_classes": header.num_classes, "class_names": header.class_names,
        "class_source": header.source, "ignore": IGNORE,
        "palette": make_palette(header.num_classes).tolist(), "options": header.options,
    }
    if header.thing_classes is not None:  # header.is_panoptic
        index.update(panoptic=True, thing_classes=sorted(header.thing_classes))
    index["splits"] = {}
    skipped_all = []
    for split in splits:
        sides = sorted(out.glob(f"{split}-*-of-*.h5.json"))
        if not sides:
            raise UserError(f"{out}: no finished shards for split '{split}': run the conversion first")
        read = [read_sidecar(p, header.num_classes) for p in sides]
        bad = [p for p, r in zip(sides, read) if r is None]
        if bad:
            raise UserError(f"{bad[0]} is damaged: delete it and its shard "
                            f"{bad[0].name[:-len('.json')]}, then re-run the same command")
        recs = [r for r in read if r is not None]  # all of them (none is damaged)
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
                           "".join(jsonio.dumps(s) + "\n" for s in skipped_all).encode())
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
