"""Shard format v1 / v2 (panoptic): reading.

`ShardIndex` reads `dataset.json` and the small per-shard arrays (keys, sizes, class lists)
without decoding anything. `ShardDataset` is the `torch.utils.data.Dataset` over one split:
it opens the HDF5 files lazily in whichever process first reads them (never before the
DataLoader forks or spawns its workers, because an HDF5 handle must not cross a fork) and
keeps up to `max_open` of them open (least recently used closed first), each with row readers
for its encoded blobs that skip h5py's per-sample lookups (`_BlobReader`).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from h5py import h5s, h5t

from rankseg_core.errors import SampleError, UserError
from rankseg_core.shards.check import (
    FIX_SHARD,
    check_regular_file,
    check_shard_layout,
    check_shard_size,
    check_shard_values,
    read_index,
)
from rankseg_core.shards.codec import IGNORE, decode_image, decode_label
from rankseg_core.shards.write import normalise_segments_info
from rankseg_core.utils import jsonio

# Read-only shards on NFS/Lustre: HDF5's file locking fails or serialises there.
os.environ.setdefault("HDF5_USE_FILE_LOCKING", "FALSE")


def load_index(root: str | Path) -> dict:
    """Parse and check `root/dataset.json` (every field readers use; see `shard_check`)."""
    root = Path(root)
    path = root / "dataset.json"
    if not root.is_dir():
        raise UserError(f"{root}: no such shard directory (create it with `rankseg prepare ...`)")
    if not path.exists():
        hint = " (the conversion did not finish: re-run the same `rankseg prepare` to resume)" \
            if (root / ".rankseg-shards.json").exists() else " (create it with `rankseg prepare ...`)"
        raise UserError(f"{path} is missing: {root} is not a finished shard directory{hint}")
    return read_index(root)


def open_shard(path: Path) -> h5py.File:
    """Open a shard read-only; a FIFO, device or non-HDF5 file is a one-line UserError."""
    check_regular_file(path, FIX_SHARD)
    try:
        return h5py.File(path, "r")
    except (OSError, FileNotFoundError) as exc:
        raise UserError(f"{path}: cannot open shard ({exc.__class__.__name__}: {exc}); "
                        f"{FIX_SHARD}") from None


@dataclass
class SplitArrays:
    """Per-sample metadata of a split, column-wise (N samples, CSR class lists)."""

    keys: list[str]
    shard: np.ndarray  # N, index into the split's shard list
    row: np.ndarray  # N, row inside that shard
    height: np.ndarray
    width: np.ndarray
    video: list[str]
    frame: np.ndarray
    class_offsets: np.ndarray  # N + 1
    classes: np.ndarray  # concatenated sorted train ids
    pixels: np.ndarray  # aligned with classes

    def classes_of(self, i: int) -> np.ndarray:
        return self.classes[self.class_offsets[i]:self.class_offsets[i + 1]]

    def pixels_of(self, i: int) -> np.ndarray:
        return self.pixels[self.class_offsets[i]:self.class_offsets[i + 1]]

    def num_classes_per_image(self) -> np.ndarray:
        return np.diff(self.class_offsets)


class ShardIndex:
    """`dataset.json` plus helpers to read per-sample metadata without decoding images."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.meta = load_index(self.root)

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def num_classes(self) -> int:
        return int(self.meta["num_classes"])

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def thing_classes(self) -> list[int] | None:
        """Sorted train ids of the thing classes of a panoptic (v2) dataset; None otherwise."""
        return [int(c) for c in self.meta["thing_classes"]] if self.is_panoptic else None

    @property
    def is_panoptic(self) -> bool:
        return bool(self.meta.get("panoptic"))

    @property
    def palette(self) -> np.ndarray:
        return np.asarray(self.meta["palette"], np.uint8)

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    def split_meta(self, split: str) -> dict:
        if split not in self.meta["splits"]:
            raise UserError(f"{self.root}: no split '{split}' (available: {', '.join(self.splits)})")
        return self.meta["splits"][split]

    def shard_paths(self, split: str) -> list[Path]:
        return [self.root / s["file"] for s in self.split_meta(split)["shards"]]

    def open_checked(self, split: str, position: int) -> h5py.File:
        """Open shard `position` of `split` after checking its size, attributes and array layout."""
        record = self.split_meta(split)["shards"][position]
        path = self.root / record["file"]
        check_shard_size(path, record)
        f = open_shard(path)
        try:
            check_shard_layout(f, path, self.meta, split, position)
        except BaseException:
            f.close()
            raise
        return f

    def class_counts_only(self, split: str) -> np.ndarray:
        """Number of classes per image, reading only the class lists and sizes (fast path for stats)."""
        out = []
        for si, p in enumerate(self.shard_paths(split)):
            with self.open_checked(split, si) as f:
                offs, classes, heights, widths = (_read(f, name, p) for name in
                                                  ("class_offsets", "classes", "height", "width"))
            check_shard_values(p, self.num_classes, offs, len(classes), classes, heights, widths)
            out.append(np.diff(offs))
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def segment_counts(self, split: str) -> np.ndarray | None:
        """Number of segments per sample of a panoptic split (None for semantic datasets)."""
        if not self.is_panoptic:
            return None
        out = []
        for si, p in enumerate(self.shard_paths(split)):
            with self.open_checked(split, si) as f:
                infos = _read(f, "segments_info", p, asstr=True)
            for x in infos:
                try:
                    records = jsonio.loads(x)
                except ValueError as exc:  # syntax, NaN, too deep: all ValueError
                    raise UserError(f"{p}: shard is damaged (segments_info: {exc}); {FIX_SHARD}") from None
                if not isinstance(records, list):
                    raise UserError(f"{p}: shard is damaged (segments_info is not a list); {FIX_SHARD}")
                out.append(len(records))
        return np.asarray(out, np.int64)

    def arrays(self, split: str) -> SplitArrays:
        """Every sample's key, size, video / frame and class list, checked for consistency."""
        keys: list[str] = []
        video: list[str] = []
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("shard", "row", "height", "width", "frame",
                                                                "classes", "pixels", "offsets")}
        base = 0
        for si, p in enumerate(self.shard_paths(split)):
            with self.open_checked(split, si) as f:
                k = list(_read(f, "key", p, asstr=True))
                n = len(k)
                keys += k
                video += list(_read(f, "video", p, asstr=True))
                cols = {name: _read(f, name, p) for name in ("height", "width", "frame", "classes",
                                                              "pixels", "class_offsets")}
            offs = cols["class_offsets"]
            check_shard_values(p, self.num_classes, offs, len(cols["classes"]), cols["classes"],
                               cols["height"], cols["width"], cols["pixels"])
            parts["shard"].append(np.full(n, si))
            parts["row"].append(np.arange(n))
            for name in ("height", "width", "frame", "classes", "pixels"):
                parts[name].append(cols[name])
            parts["offsets"].append(offs[1:] + base)
            base += int(offs[-1])
        def cat(xs):
            return (np.concatenate(xs) if xs else np.zeros(0, np.int64))
        return SplitArrays(keys, cat(parts["shard"]), cat(parts["row"]), cat(parts["height"]),
                           cat(parts["width"]), video, cat(parts["frame"]),
                           np.concatenate([[0], cat(parts["offsets"])]).astype(np.int64),
                           cat(parts["classes"]), cat(parts["pixels"]))


def _records_problem(segments: np.ndarray, records: list[dict], k: int) -> str:
    """'' if the normalised `records` of an index map can be used to index with; else the problem."""
    if segments.size and int(segments.max()) > len(records):
        return f"segment index {int(segments.max())} in the map, only {len(records)} records"
    if len({rec["id"] for rec in records}) != len(records):
        return "segment ids are not unique"
    for n, rec in enumerate(records, 1):
        if not 0 <= rec["category"] < k:
            return f"segment {n} (id {rec['id']}): category {rec['category']} is not a train id < K={k}"
        if rec["iscrowd"] not in (0, 1):
            return f"segment {n} (id {rec['id']}): iscrowd must be 0 or 1, not {rec['iscrowd']}"
    return ""


def _read(f: h5py.File, name: str, path: Path, asstr: bool = False) -> Any:
    try:
        ds = f[name]
        return ds.asstr()[:] if asstr else ds[:]
    except (KeyError, OSError, ValueError) as exc:
        raise UserError(f"{path}: shard is damaged (cannot read '{name}': {exc}); {FIX_SHARD}") from None


# Shard files a `ShardDataset` keeps open per process. Each open HDF5 file holds a descriptor
# and its metadata cache; the default 1000 samples per shard makes this 128k samples before a
# random order starts reopening files (a reopen costs about as much as decoding a sample).
MAX_OPEN_SHARDS = 128


class _BlobReader:
    """Row r of a 1-D variable-length uint8 dataset (an encoded image, label or segment map)
    as a uint8 array.

    h5py's `dataset[r]` builds a selection, re-reads the shape and dtype and makes new
    dataspaces on every call, about 4x the read itself for a 20 kB JPEG; here the dataspaces
    and the memory type are made once and only the hyperslab moves. A dataset of another
    layout (only a damaged shard, which `rankseg verify` names) goes through `dataset[r]`."""

    def __init__(self, ds: h5py.Dataset) -> None:
        self._ds = ds
        self._fast = ds.ndim == 1 and h5py.check_vlen_dtype(ds.dtype) == np.dtype(np.uint8)
        self._rows = int(ds.shape[0]) if ds.ndim else 0
        if self._fast:
            self._id = ds.id
            self._file_space = ds.id.get_space()
            self._mem_space = h5s.create_simple((1,))
            self._type = h5t.py_create(ds.dtype)

    def __call__(self, row: int) -> np.ndarray:
        if not self._fast:
            return np.asarray(self._ds[row])
        if not 0 <= row < self._rows:  # HDF5 would report an out-of-extent selection less clearly
            raise ValueError(f"row {row} is outside the dataset's {self._rows} rows")
        self._file_space.select_hyperslab((row,), (1,))
        out = np.empty(1, object)
        self._id.read(self._mem_space, self._file_space, out, self._type)
        return out[0]


class _OpenShard:
    """One open shard file and the blob readers of the datasets read from it so far."""

    def __init__(self, file: h5py.File) -> None:
        self.file = file
        self._readers: dict[str, _BlobReader] = {}

    def blob(self, name: str, row: int) -> np.ndarray:
        reader = self._readers.get(name)
        if reader is None:
            reader = self._readers[name] = _BlobReader(self.file[name])
        return reader(row)

    def close(self) -> None:
        self._readers.clear()
        self.file.close()


class ShardDataset:
    """`torch.utils.data.Dataset` over one split of a shard directory.

    Items are dicts: `image` H x W x 3 uint8 RGB, `label` H x W uint16 (65535 = ignore),
    `key`, `classes` (sorted train ids, int64), `video`, `frame`, `index`; panoptic (v2)
    datasets add `segments` (H x W uint16, 0 = no segment, i = record i) and `segments_info`
    (list of {"id", "category", "iscrowd", "area"}). A `transform` callable, if given, maps
    that dict to whatever the training loop needs. At most `max_open` shard files stay open
    in a process (the least recently read is closed first).
    """

    def __init__(self, root: str | Path, split: str, transform: Any = None,
                 max_open: int = MAX_OPEN_SHARDS) -> None:
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, not {max_open}")
        self.index = ShardIndex(root)
        self.split = split
        self.paths = self.index.shard_paths(split)
        self.arrays = self.index.arrays(split)
        self.num_classes = self.index.num_classes
        self.is_panoptic = self.index.is_panoptic
        self.ignore = IGNORE
        self.transform = transform
        self.max_open = max_open
        self._files: OrderedDict[int, _OpenShard] = OrderedDict()  # least recently read first
        self._pid: int | None = None

    def __len__(self) -> int:
        return len(self.arrays.keys)

    def __getstate__(self) -> dict:
        # Never ship open handles to a worker: it reopens its own.
        state = self.__dict__.copy()
        state["_files"], state["_pid"] = OrderedDict(), None
        return state

    def _open(self, shard: int) -> _OpenShard:
        if self._pid != os.getpid():  # first access in this process, or a forked child: the
            # parent's handles are not this process's to use (dropping them closes the child's copies)
            self._files, self._pid = OrderedDict(), os.getpid()
        handle = self._files.get(shard)
        if handle is not None:
            self._files.move_to_end(shard)
            return handle
        if len(self._files) >= self.max_open:
            self._files.popitem(last=False)[1].close()
        handle = self._files[shard] = _OpenShard(open_shard(self.paths[shard]))
        return handle

    def _file(self, shard: int) -> h5py.File:
        return self._open(shard).file

    def blobs(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Encoded (image, label) of sample i as 1-D uint8 arrays (what the decoders take;
        `raw` without the copy into bytes)."""
        a = self.arrays
        try:
            shard, r = self._open(int(a.shard[i])), int(a.row[i])
            return shard.blob("image", r), shard.blob("label", r)
        except (KeyError, OSError, ValueError) as exc:
            raise UserError(f"{self.paths[a.shard[i]]}: cannot read sample {a.keys[i]} ({exc}); "
                            "run `rankseg verify`") from None

    def raw(self, i: int) -> tuple[bytes, bytes]:
        """Encoded (image, label) bytes of sample i."""
        image, label = self.blobs(i)
        return image.tobytes(), label.tobytes()

    def instances_json(self, i: int) -> str:
        """Sample i's raw `instances` JSON (per-frame instance RLEs of video instance datasets;
        "" where the dataset has none, docs/shards.md)."""
        a = self.arrays
        try:
            f = self._file(int(a.shard[i]))
            return f["instances"].asstr()[int(a.row[i])] if "instances" in f else ""
        except (OSError, ValueError) as exc:
            raise UserError(f"{self.paths[a.shard[i]]}: cannot read the instances of sample {a.keys[i]} ({exc}); "
                            "run `rankseg verify`") from None

    def has_instances(self) -> bool:
        """Whether any sample of the split has a non-empty `instances` list (read shard by shard,
        stopping at the first one found)."""
        for shard in np.unique(np.asarray(self.arrays.shard)):
            f = self._file(int(shard))
            if "instances" in f and any(x and x != "[]" for x in f["instances"].asstr()[:]):
                return True
        return False

    def pixels(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Sample i's decoded (image H x W x 3 uint8 RGB, label H x W uint16): what training
        reads per frame, without the rest of `load`'s item."""
        img_b, lab_b = self.blobs(i)
        try:
            return decode_image(img_b), decode_label(lab_b)
        except ValueError as exc:
            a = self.arrays
            raise UserError(f"{self.paths[a.shard[i]]}: sample {a.keys[i]} does not decode ({exc}); "
                            "run `rankseg verify`") from None

    def load(self, i: int) -> dict:
        image, label = self.pixels(i)
        a = self.arrays
        item = {"image": image, "label": label, "key": a.keys[i],
                "classes": a.classes_of(i).astype(np.int64), "video": a.video[i],
                "frame": int(a.frame[i]), "index": i}
        if self.is_panoptic:
            item["segments"], item["segments_info"] = self.segments(i)
        return item

    def segments(self, i: int) -> tuple[np.ndarray, list[dict]]:
        """Sample i's H x W uint16 segment-index map and its records (panoptic datasets only).

        The records are checked as far as training and evaluation index with them (keys and
        integer fields, unique ids, categories < K, iscrowd 0 / 1, no index in the map beyond
        the last record); areas and agreement with the label are `verify`'s deeper checks.
        """
        a = self.arrays
        shard, r = self._open(int(a.shard[i])), int(a.row[i])
        where = f"{self.paths[a.shard[i]]}: sample {a.keys[i]}"
        try:
            seg_b, info = shard.blob("segments", r), shard.file["segments_info"].asstr()[r]
            segments, records = decode_label(seg_b), normalise_segments_info(jsonio.loads(info), where)
        except (KeyError, OSError, ValueError) as exc:  # a JSONDecodeError is a ValueError
            raise UserError(f"{where}: segments do not read ({exc}); run `rankseg verify`") from None
        except SampleError as exc:
            raise UserError(f"{exc}; run `rankseg verify`") from None
        problem = _records_problem(segments, records, self.num_classes)
        if problem:
            raise UserError(f"{where}: {problem}; run `rankseg verify`")
        return segments, records

    def __getitem__(self, i: int) -> Any:
        item = self.load(i)
        return self.transform(item) if self.transform is not None else item

    def key_to_index(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.arrays.keys)}
