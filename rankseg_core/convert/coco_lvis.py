"""COCO+LVIS (ESSNet, 1,284 classes): LVIS instance polygons + COCO-Stuff stuff -> semantic labels.

Per image (ESSNet's rule, without its bugs; see docs/datasets.md):
1. LVIS annotations in file order, each painted only into still-empty pixels (first wins);
2. COCO-Stuff stuff annotations, first wins among themselves, mapped through ESSNet's
   `coco2lvis` table (183 "other" and 255 -> 0), fill the pixels LVIS left empty;
3. stored value 0 = unlabeled -> IGNORE, train id = value - 1.

LVIS v1 train is a ~1 GB JSON with 1.27 M polygon annotations: `json.load` alone would take
~7 GB. The JSONs are streamed (images, then annotations, one at a time), checked (geometry.py:
malformed geometry never reaches pycocotools) and packed into flat files (coordinates, RLE
bytes, offsets) in a temporary directory that every worker reads: a worker's pickled state is
only the per-image table.
"""

from __future__ import annotations

import os
import re
import tempfile
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from rankseg_core.convert.common import ConvertOptions, run_conversion
from rankseg_core.convert.geometry import (
    GeometryError,
    check_counts_list,
    check_image_size,
    check_rle_dict,
    polygon_lists,
    polygon_problems,
    rle_string_problems,
)
from rankseg_core.convert.source_io import decode_jpeg, read_bytes, stored_image_bytes, stream_items
from rankseg_core.errors import SampleError, UserError
from rankseg_core.shards.codec import IGNORE
from rankseg_core.shards.write import DatasetHeader, EncodedSample, encode_sample
from rankseg_core.utils.resources import load_json as load_dataset_json

NUM_LVIS_V1 = 1203
_POLY, _RLE, _BAD = 0, 1, 2


# --------------------------------------------------------------------------- vocabulary

def essnet_mapping() -> list[tuple[int, int]]:
    """ESSNet's `coco2lvis` entries (COCO-Stuff id, COCO+LVIS value) in the pickle's order."""
    doc = load_dataset_json("coco_lvis/essnet_coco2lvis.json")
    return [(int(k), int(v)) for k, v in doc["mapping"].items()]


def stuff_lut(mapping: Sequence[tuple[int, int]], *, chained: bool = False) -> np.ndarray:
    """256-entry uint16 table: COCO-Stuff id -> stored value (ids not in `mapping` -> 0).

    chained=False applies each entry once (the intended mapping). chained=True reproduces
    ESSNet's `for k, v in coco2lvis.items(): cmask[cmask == k] = v`: run in place, a pixel
    rewritten to v is matched again by a later key equal to v (93 -> 110 -> 1217,
    98 -> 181 -> 1283). Following each of the 256 possible values through the entries once gives
    the same result as the in-place loop on every pixel, so the table is applied vectorised.
    ESSNet's uint8 overflow (one stuff annotation keeps its mask uint8, ids > 255 wrap) is never
    reproduced: the composition is computed on Python ints.
    """
    lut = np.zeros(256, np.uint16)
    keys = {k for k, _ in mapping}
    for x in range(256):
        if x not in keys:
            continue
        val = x
        if chained:
            for k, v in mapping:
                if val == k:
                    val = v
        else:
            val = dict(mapping)[x]
        lut[x] = val
    return lut


@dataclass
class Vocabulary:
    """The label space: LVIS category id -> stored value, COCO-Stuff id -> stored value."""

    names: list[str]  # K class names; stored value v > 0 is train id v - 1
    lvis_values: dict[int, int]  # LVIS category id -> stored value (1-based)
    stuff_values: list[tuple[int, int]]  # (COCO-Stuff id, stored value) in ESSNet's order
    version: str  # "lvis_v1" or "lvis_json" (categories of the JSON, e.g. LVIS v0.5)
    source: str
    categories: list[tuple[int, str]] = field(default_factory=list)  # (id, name) it was built from

    @property
    def num_classes(self) -> int:
        return len(self.names)


def _table() -> list[dict]:
    return load_dataset_json("coco_lvis/classes.json")["classes"]


def v1_vocabulary() -> Vocabulary:
    """The 1,284 ESSNet classes: LVIS v1 ids 1..1203, then 81 COCO-Stuff classes."""
    doc = load_dataset_json("coco_lvis/classes.json")
    table = doc["classes"]
    return Vocabulary(names=[c["name"] for c in table],
                      lvis_values={c["id"]: c["id"] for c in table[:NUM_LVIS_V1]},
                      stuff_values=essnet_mapping(), version="lvis_v1",
                      source=doc["source"],
                      categories=[(c["id"], c["name"]) for c in table[:NUM_LVIS_V1]])


def json_vocabulary(categories: list[dict], json_path: Path) -> Vocabulary:
    """Vocabulary from an LVIS JSON's own categories (LVIS v0.5: 1,230) + COCO-Stuff.

    Categories keep their id order (value = rank + 1). A stuff class that ESSNet merges into
    an LVIS v1 class merges into the category with the same WordNet synset (else the same
    name) when the JSON has one (v0.5: 9 of 10, it has no cupboard); every other stuff class
    is appended in ascending COCO-Stuff id order (v0.5: 1,230 + 82 = 1,312 classes).
    Applied to the v1 categories this rule gives exactly ESSNet's table (tested).
    """
    table = _table()
    try:
        cats = sorted(categories, key=lambda c: int(c["id"]))
        names = [str(c["name"]) for c in cats]
        lvis_values = {int(c["id"]): i + 1 for i, c in enumerate(cats)}
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{json_path}: 'categories' entries need an integer 'id' and a 'name'") from None
    if len(lvis_values) != len(cats):
        raise UserError(f"{json_path}: duplicate category ids in 'categories'")
    by_synset = {c.get("synset"): lvis_values[int(c["id"])] for c in cats if c.get("synset")}
    by_name = {str(c["name"]): lvis_values[int(c["id"])] for c in cats}
    stuff_values: dict[int, int] = {}
    for k, v in sorted(essnet_mapping()):
        if v == 0:
            stuff_values[k] = 0
            continue
        target = table[v - 1]  # ESSNet's class for this stuff id
        merged = None
        if v <= NUM_LVIS_V1:
            merged = by_synset.get(target.get("synset")) or by_name.get(target["name"])
        if merged is None:
            names.append(target["name"])
            merged = len(names)
        stuff_values[k] = merged
    order = [k for k, _ in essnet_mapping()]
    return Vocabulary(names=names, lvis_values=lvis_values,
                      stuff_values=[(k, stuff_values[k]) for k in order], version="lvis_json",
                      source=f"LVIS categories of {json_path.name} (in id order), then the COCO-Stuff "
                             "stuff classes not merged into a same-synset LVIS class, ascending "
                             "COCO-Stuff id (rankseg rule, see docs/datasets.md)",
                      categories=[(int(c["id"]), str(c["name"])) for c in cats])


def vocabulary_for(cats: list, json_path: Path) -> Vocabulary:
    """LVIS v1 when the JSON's categories are v1's (or absent), else the JSON's own categories."""
    v1 = v1_vocabulary()
    if not cats:
        return v1
    try:
        pairs = sorted((int(c["id"]), str(c["name"])) for c in cats)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{json_path}: 'categories' entries need an integer 'id' and a 'name'") from None
    if pairs == v1.categories:
        return v1
    return json_vocabulary(cats, json_path)


# --------------------------------------------------------------------------- packed annotations

class _Packer:
    """Appends annotations (polygons or compressed RLE) to flat files `root/<name>.*`, checked.

    Annotations arrive in file order, which is not grouped by image: each carries its owner
    (the image's record index), and `close` writes `order`, the annotation indices sorted by
    owner (stable, so each image keeps its file order). Structure (geometry.py) is checked as
    annotations arrive and polygon values per chunk, vectorised; a malformed annotation is not
    stored but reported in `problems` (annotation index -> (id, reason)), so only its image
    fails. Compressed RLE strings are checked when their image is painted (`_Packed.paint`):
    decoding them costs about as much as parsing them, and there it runs in the workers, only
    for the images converted.
    """

    def __init__(self, root: Path, name: str) -> None:
        self.prefix = root / name
        self.values = array("i")
        self.kinds = array("B")
        # per annotation: its range in the polygon list (polygons) or in the RLE bytes (RLE)
        self.starts = array("q")
        self.ends = array("q")
        self.owners = array("q")
        self.ids = array("q")  # annotation ids (-1 when not an integer), for messages
        self.poly_ends = array("q")  # per polygon: end in the coordinate array
        self.problems: dict[int, tuple[object, str]] = {}  # annotation index -> (its id, reason)
        self._xy = open(f"{self.prefix}.xy.f64", "wb")
        self._rle = open(f"{self.prefix}.rle.u8", "wb")
        self._chunk_xy: list[float] = []
        self._chunk_polys: list[tuple] = []  # per polygon: (annotation index, its id, end in chunk, h, w)
        self.n_xy = 0
        self.n_rle = 0

    def __len__(self) -> int:
        return len(self.values)

    def add(self, owner: int, value: int, seg: object, h: int, w: int, ann_id: object) -> None:
        """Append one segmentation of image `owner` (h x w); a malformed one lands in `problems`."""
        index = len(self.values)
        try:
            if isinstance(seg, list):  # polygons [[x0, y0, x1, y1, ...], ...], kept as given
                start = len(self.poly_ends)
                for poly in polygon_lists(seg):
                    self._chunk_xy.extend(poly)
                    self.n_xy += len(poly)
                    self.poly_ends.append(self.n_xy)
                    self._chunk_polys.append((index, ann_id, len(self._chunk_xy), h, w))
                self._push(owner, value, _POLY, start, len(self.poly_ends))
            else:
                counts = check_rle_dict(seg, h, w)
                if isinstance(counts, list):  # uncompressed RLE -> compressed, as pycocotools does
                    check_counts_list(counts, h, w)
                    counts = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)["counts"]
                data = counts.encode() if isinstance(counts, str) else bytes(counts)
                self._rle.write(data)
                self._push(owner, value, _RLE, self.n_rle, self.n_rle + len(data))
                self.n_rle += len(data)
        except GeometryError as exc:
            self.problems[index] = (ann_id, str(exc))
            self._push(owner, value, _BAD, 0, 0)
        self.ids.append(ann_id if type(ann_id) is int and -1 <= ann_id < 1 << 63 else -1)  # noqa: E721
        if len(self._chunk_xy) > 1 << 20:
            self.flush()

    def _push(self, owner: int, value: int, kind: int, start: int, end: int) -> None:
        self.owners.append(owner)
        self.values.append(value)
        self.kinds.append(kind)
        self.starts.append(start)
        self.ends.append(end)

    def flush(self) -> None:
        """Check the pending chunk's values (vectorised) and write it out."""
        if self._chunk_polys:
            # float64: the exact values pycocotools would get from the JSON (rounding matters)
            xy = np.asarray(self._chunk_xy, np.float64)
            ends, h, w = (np.array(c) for c in list(zip(*self._chunk_polys))[2:])
            for i, reason in polygon_problems(xy, ends, h, w).items():
                self.problems.setdefault(self._chunk_polys[i][0], (self._chunk_polys[i][1], reason))
            self._xy.write(xy.tobytes())
        self._chunk_xy, self._chunk_polys = [], []

    def close(self, num_owners: int) -> tuple[np.ndarray, np.ndarray]:
        """Write the index files; returns per owner its (lo, hi) range in `order`."""
        self.flush()
        self._xy.close()
        self._rle.close()
        owners = np.frombuffer(self.owners, np.int64) if self.owners else np.zeros(0, np.int64)
        order = np.argsort(owners, kind="stable")
        counts = np.bincount(owners, minlength=num_owners)
        hi = np.cumsum(counts)
        for suffix, data, dt in (("values.i32", self.values, np.int32),
                                 ("kinds.u8", self.kinds, np.uint8),
                                 ("starts.i64", self.starts, np.int64),
                                 ("ends.i64", self.ends, np.int64),
                                 ("ids.i64", self.ids, np.int64),
                                 ("polys.i64", self.poly_ends, np.int64),
                                 ("order.i64", order, np.int64)):
            np.asarray(data, dt).tofile(f"{self.prefix}.{suffix}")
        return hi - counts, hi


def _mmap(path: str, dtype: type) -> np.ndarray:
    size = Path(path).stat().st_size
    return np.memmap(path, dtype, mode="r") if size else np.zeros(0, dtype)


class _Packed:
    """Read side of `_Packer`, opened lazily in whichever process uses it.

    The index arrays (a few tens of bytes per annotation) are memory-mapped; coordinates and
    RLE bytes are read with `pread`, so a process that paints every image does not end up
    with the whole (GB-sized) coordinate file mapped into its resident memory.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._arrays: dict | None = None

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix, "_arrays": None}  # never pickle the memory maps

    def __del__(self) -> None:
        if self._arrays is not None:  # the descriptors of xy / rle (a conversion in-process ends)
            os.close(self._arrays["xy"])
            os.close(self._arrays["rle"])

    def _a(self) -> dict:
        if self._arrays is None:
            p = self.prefix
            self._arrays = {"values": _mmap(f"{p}.values.i32", np.int32),
                            "kinds": _mmap(f"{p}.kinds.u8", np.uint8),
                            "starts": _mmap(f"{p}.starts.i64", np.int64),
                            "ends": _mmap(f"{p}.ends.i64", np.int64),
                            "ids": _mmap(f"{p}.ids.i64", np.int64),
                            "polys": _mmap(f"{p}.polys.i64", np.int64),
                            "order": _mmap(f"{p}.order.i64", np.int64),
                            "xy": os.open(f"{p}.xy.f64", os.O_RDONLY),
                            "rle": os.open(f"{p}.rle.u8", os.O_RDONLY)}
        return self._arrays

    def _rle_strings(self, indices: list[int], h: int, w: int, where: str) -> dict[int, bytes]:
        """The compressed RLE strings of these annotations, checked (SampleError naming the first bad one)."""
        a = self._a()
        rles = [i for i in indices if a["kinds"][i] == _RLE]
        data = [os.pread(a["rle"], int(a["ends"][i] - a["starts"][i]), int(a["starts"][i])) for i in rles]
        problems = rle_string_problems(np.frombuffer(b"".join(data), np.uint8), np.cumsum([len(d) for d in data]),
                                       np.full(len(data), h), np.full(len(data), w))
        if problems:
            k = min(problems)
            ann = int(a["ids"][rles[k]])
            raise SampleError(f"{where}, annotation {ann if ann >= 0 else '(without an integer id)'}: "
                              f"{problems[k]}")
        return dict(zip(rles, data))

    def paint(self, label: np.ndarray, lo: int, hi: int, where: str) -> None:
        """Paint the image's annotations order[lo..hi-1] into `label` (H x W), first one wins.

        Painting in reverse order, each annotation over everything, leaves every pixel with the
        first annotation covering it: the same result as "paint only empty pixels" in file order,
        with one masked assignment per annotation. `where` names the JSON and the image in errors.
        """
        a = self._a()
        h, w = label.shape
        indices = a["order"][lo:hi].tolist()
        rles = self._rle_strings(indices, h, w, where)
        for i in reversed(indices):
            start, end = int(a["starts"][i]), int(a["ends"][i])
            if a["kinds"][i] == _POLY:
                ends = a["polys"][start:end]
                first = int(a["polys"][start - 1]) if start > 0 else 0
                xy = np.frombuffer(os.pread(a["xy"], 8 * (int(ends[-1]) - first), 8 * first), np.float64)
                # one list per polygon, as in the JSON: what lvis-api's ann_to_mask passes
                polys = [p.tolist() for p in np.split(xy, ends[:-1] - first)]
                rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
            elif a["kinds"][i] == _RLE:
                rle = {"size": [h, w], "counts": rles[i]}
            else:  # never reached: an image with a malformed annotation fails before painting
                raise SampleError(f"annotation {i} is malformed")
            np.copyto(label, int(a["values"][i]), where=mask_utils.decode(rle).view(bool))


# --------------------------------------------------------------------------- per-image maker

@dataclass
class CocoLvisMaker:
    """Builds one sample from its key (the COCO file stem); picklable for spawned workers."""

    coco_root: str
    # key -> (relpath, h, w, lvis_lo, lvis_hi, stuff_lo, stuff_hi, error or "", image id, LVIS JSON,
    # stuff JSON); lo/hi index `order`
    images: dict[str, tuple]
    lvis: _Packed
    stuff: _Packed
    lut: np.ndarray  # 256, uint16: COCO-Stuff id -> stored value
    num_classes: int

    def __call__(self, key: str) -> EncodedSample:
        rel, h, w, lo, hi, slo, shi, error, iid, lvis_json, stuff_json = self.images[key]
        path = Path(self.coco_root) / rel
        if slo < 0:
            raise SampleError(f"{path}: image is in none of the --stuff-json files (pass the COCO-Stuff "
                              "JSON of its folder, e.g. stuff_train2017.json)")
        if error:  # malformed geometry: never handed to pycocotools
            raise SampleError(error)
        data = read_bytes(path, "image")
        pixels = decode_jpeg(data, path)  # SampleError for corrupt / truncated / oversized files
        if pixels.shape[:2] != (h, w):
            raise SampleError(f"{path}: image is {pixels.shape[0]}x{pixels.shape[1]} (H x W), the LVIS "
                              f"JSON says {h}x{w}: the image and the JSON do not belong together")
        value = self.rasterise(h, w, lo, hi, slo, shi, (f"{lvis_json}: image {iid} ({rel})",
                                                        f"{stuff_json}: image {iid} ({rel})"))
        label = np.ascontiguousarray(np.where(value == 0, IGNORE, value - 1), np.uint16)
        return encode_sample(key, stored_image_bytes(data, pixels), label, self.num_classes)

    def rasterise(self, h: int, w: int, lo: int, hi: int, slo: int, shi: int,
                  where: tuple[str, str] = ("LVIS JSON", "stuff JSON")) -> np.ndarray:
        """H x W int32 of stored values (0 = unlabeled), column-major. `where` names the
        (LVIS, stuff) JSON and the image in the SampleError of a malformed RLE string.

        Column-major because pycocotools decodes masks that way: the masked writes then run
        over contiguous memory (about 3x faster than into a row-major array).
        """
        value = np.zeros((h, w), np.int32, order="F")
        self.lvis.paint(value, lo, hi, where[0])
        if shi > slo:
            stuff = np.zeros((h, w), np.uint8, order="F")  # raw COCO-Stuff ids, first wins (as ESSNet)
            self.stuff.paint(stuff, slo, shi, where[1])
            value = np.where(value == 0, self.lut[stuff], value)
        return value


# --------------------------------------------------------------------------- planning

def split_of(path: Path) -> str:
    """`train` / `val` from an LVIS JSON's file name (lvis_v1_train.json, lvis_val_100.json)."""
    tokens = set(re.split(r"[^a-z0-9]+", path.stem.lower()))
    found = [s for s in ("train", "val", "test") if s in tokens or f"{s}2017" in tokens]
    if len(found) != 1:
        raise UserError(f"{path}: cannot tell the split (train/val) from the file name: pass --split")
    return found[0]


def image_relpath(img: dict) -> str:
    """`<folder>/<file>` under the COCO root: from `coco_url` (LVIS v1), else `file_name`."""
    url = img.get("coco_url")
    if url:
        parts = str(url).rstrip("/").split("/")
        if len(parts) >= 2:
            return f"{parts[-2]}/{parts[-1]}"
    name = img.get("file_name")
    if name:
        return str(name)
    raise KeyError("coco_url")


@dataclass
class _Record:
    key: str
    rel: str
    iid: int
    h: int
    w: int
    lvis_json: str
    error: str = ""  # first problem of the image (its size, or one of its annotations)
    stuff_json: str = ""  # the COCO-Stuff JSON that lists it


def _not_annotations(path: Path, what: str) -> UserError:
    return UserError(f"{path}: not {what} annotation file (needs a non-empty 'images' list and 'annotations')")


class _Index:
    """The images of every JSON (records) and their packed annotations, built by streaming."""

    def __init__(self, tmp: Path) -> None:
        self.records: list[_Record] = []
        self.by_id: dict[int, int] = {}  # image id -> record index
        self.seen: dict[str, Path] = {}  # key -> the LVIS JSON listing it
        self.lvis, self.stuff = _Packer(tmp, "lvis"), _Packer(tmp, "stuff")

    def _annotation_ids(self, ann: dict, path: Path, what: str) -> tuple[int, int]:
        try:
            return int(ann["image_id"]), int(ann["category_id"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: {what} annotation {str(ann.get('id') if isinstance(ann, dict) else ann)[:40]} "
                            "lacks image_id/category_id") from None

    def _blame(self, packer: _Packer, path: Path) -> None:
        """Turn the packer's problems (malformed annotations of `path`) into image errors."""
        packer.flush()
        owners = np.frombuffer(packer.owners, np.int64)
        for i in sorted(packer.problems):
            rec = self.records[int(owners[i])]
            ann_id, reason = packer.problems[i]
            if not rec.error:
                rec.error = f"{path}: image {rec.iid} ({rec.rel}), annotation {ann_id}: {reason}"
        packer.problems.clear()

    def add_lvis(self, path: Path, vocab: Vocabulary, keys: list[str]) -> None:
        """Stream one LVIS JSON: its images (to `records`, `keys`), then its annotations."""
        mine: set[int] = set()
        for img in stream_items(path, "images.item", "LVIS JSON"):
            try:
                iid, rel = int(img["id"]), image_relpath(img)
                h, w = img["height"], img["width"]
            except (KeyError, TypeError, ValueError, AttributeError):
                raise UserError(f"{path}: image entry {str(img)[:80]} lacks id/height/width/coco_url") from None
            key = Path(rel).stem
            if iid in self.by_id or key in self.seen:
                raise UserError(f"{path}: image {iid} ({rel}) is also in {self.seen.get(key, path)}: "
                                "pass each LVIS JSON once")
            rec = _Record(key, rel, iid, 0, 0, str(path))
            try:
                rec.h, rec.w = check_image_size(h, w)
            except GeometryError as exc:
                rec.error = f"{path}: image {iid} ({rel}): {exc}"
            self.by_id[iid] = len(self.records)
            self.records.append(rec)
            self.seen[key] = path
            mine.add(iid)
            keys.append(key)
        if not mine:
            raise _not_annotations(path, "an LVIS")
        for ann in stream_items(path, "annotations.item", "LVIS JSON"):
            iid, cat = self._annotation_ids(ann, path, "LVIS")
            if cat not in vocab.lvis_values:
                raise UserError(f"{path}: annotation {ann.get('id')} has unknown category id {cat} "
                                f"(not among the {len(vocab.lvis_values)} categories of "
                                f"{'LVIS v1' if vocab.version == 'lvis_v1' else 'this JSON'}): "
                                "fix the file or pass the matching official LVIS JSON")
            if iid not in mine:
                raise UserError(f"{path}: annotation {ann.get('id')} refers to image {iid}, "
                                "which is not in its 'images'")
            ri = self.by_id[iid]
            rec = self.records[ri]
            if not rec.error:  # an image that already failed needs no more annotations
                self.lvis.add(ri, vocab.lvis_values[cat], ann.get("segmentation"), rec.h, rec.w, ann.get("id"))
        self._blame(self.lvis, path)

    def add_stuff(self, path: Path, valid_ids: set[int]) -> None:
        """Stream one COCO-Stuff JSON: pack the stuff annotations of the images LVIS needs."""
        mine: set[int] = set()
        listed = 0
        for img in stream_items(path, "images.item", "COCO-Stuff JSON"):
            listed += 1
            try:
                iid = int(img["id"])
            except (KeyError, TypeError, ValueError):
                raise UserError(f"{path}: image entry {str(img)[:80]} has no integer id") from None
            ri = self.by_id.get(iid)
            if ri is None:
                continue
            rec = self.records[ri]
            if rec.stuff_json:
                raise UserError(f"{path}: image {iid} is also in {rec.stuff_json}: pass each stuff JSON once")
            if not rec.error and (img.get("height", rec.h), img.get("width", rec.w)) != (rec.h, rec.w):
                raise UserError(f"{path}: image {iid} is {img.get('height')}x{img.get('width')} here but "
                                f"{rec.h}x{rec.w} in the LVIS JSON: the files do not belong together")
            rec.stuff_json = str(path)
            mine.add(iid)
        if not listed:
            raise _not_annotations(path, "a COCO")
        for ann in stream_items(path, "annotations.item", "COCO-Stuff JSON"):
            iid, cat = self._annotation_ids(ann, path, "stuff")
            if cat not in valid_ids:
                raise UserError(f"{path}: annotation {ann.get('id')} has category id {cat}, which is not "
                                "a COCO-Stuff stuff class (92..183): pass stuff_{train,val}2017.json, not "
                                "the instances or stuff+thing files")
            if iid in mine:
                ri = self.by_id[iid]
                rec = self.records[ri]
                if not rec.error:
                    self.stuff.add(ri, cat, ann.get("segmentation"), rec.h, rec.w, ann.get("id"))
        self._blame(self.stuff, path)

    def images(self) -> dict[str, tuple]:
        """The maker's table (see CocoLvisMaker.images); slo = -1 without stuff."""
        n = len(self.records)
        (lo, hi), (slo, shi) = self.lvis.close(n), self.stuff.close(n)
        return {r.key: (r.rel, r.h, r.w, int(lo[i]), int(hi[i]),
                        int(slo[i]) if r.stuff_json else -1, int(shi[i]) if r.stuff_json else -1, r.error,
                        r.iid, r.lvis_json, r.stuff_json)
                for i, r in enumerate(self.records)}


def prepare_coco_lvis(coco_root: str | Path, lvis_jsons: Sequence[str | Path],
                      stuff_jsons: Sequence[str | Path], out: str | Path, *,
                      essnet_compat: bool = False, split: str | None = None,
                      opts: ConvertOptions | None = None,
                      note: Callable[[str], None] = lambda s: None) -> dict | None:
    """Convert COCO 2017 images + LVIS + COCO-Stuff annotations into COCO+LVIS shards.

    One split per LVIS JSON (named from its file name, or `split` with a single JSON). Every
    LVIS image must be listed in one of `stuff_jsons` (under --on-error skip the others are
    skipped and recorded). Returns `dataset.json` (None when converting one part).
    The JSONs are streamed (never loaded whole): the main process stays at a few hundred MB
    even for LVIS v1 train (docs/benchmarks.md).
    """
    opts = opts or ConvertOptions()
    opts.validate()
    coco_root = Path(coco_root)
    if not coco_root.is_dir():
        raise UserError(f"{coco_root}: no such directory: --root must hold train2017/ and val2017/")
    if not lvis_jsons:
        raise UserError("pass at least one --lvis-json (lvis_v1_train.json, lvis_v1_val.json)")
    if not stuff_jsons:
        raise UserError("pass the COCO-Stuff stuff JSONs with --stuff-json (stuff_train2017.json, "
                        "stuff_val2017.json)")
    if split is not None and len(lvis_jsons) > 1:
        raise UserError("--split names the split of a single --lvis-json; with several, each "
                        "split is named from its file name")
    if split is not None and not re.fullmatch(r"[A-Za-z0-9_.]+", split):
        raise UserError(f"--split {split!r}: use letters, digits, '_' or '.' (it names the shard files)")
    mapping = essnet_mapping()
    valid_stuff = {k for k, _ in mapping}
    with tempfile.TemporaryDirectory(prefix="rankseg-coco-lvis-") as tmp:
        index = _Index(Path(tmp))
        splits: dict[str, list[str]] = {}
        vocab: Vocabulary | None = None
        first = None
        for p in map(Path, lvis_jsons):
            note(f"reading {p}")
            v = vocabulary_for(list(stream_items(p, "categories.item", "LVIS JSON")), p)
            if vocab is None:
                vocab, first = v, p
            elif (v.version, v.names) != (vocab.version, vocab.names):
                raise UserError(f"{p} and {first} have different category lists (LVIS v1 vs v0.5?): "
                                "convert them separately")
            name = split or split_of(p)
            if name in splits:
                raise UserError(f"{p}: split '{name}' comes from two LVIS JSONs: pass --split or one JSON per split")
            splits[name] = []
            index.add_lvis(p, vocab, splits[name])
        assert vocab is not None
        if essnet_compat and vocab.version != "lvis_v1":
            raise UserError("--essnet-compat reproduces ESSNet's LVIS v1 masks; it does not apply to "
                            f"{first} (not LVIS v1)")
        for p in map(Path, stuff_jsons):
            note(f"reading {p}")
            index.add_stuff(p, valid_stuff)
        images = index.images()
        missing = [r for r in index.records if not r.stuff_json]
        if missing and opts.on_error == "fail":
            r = missing[0]
            raise UserError(f"{len(missing)} of {len(index.records)} LVIS images are in none of the --stuff-json "
                            f"files (first: {r.rel}): pass the COCO-Stuff JSON of every folder the LVIS "
                            "JSONs use (LVIS v1 val draws from train2017 and val2017), or --on-error skip")
        lut = stuff_lut(vocab.stuff_values, chained=essnet_compat)
        maker = CocoLvisMaker(str(coco_root), images, _Packed(str(index.lvis.prefix)),
                              _Packed(str(index.stuff.prefix)), lut, vocab.num_classes)
        del index  # the records and packers' lists: the maker holds what conversion needs
        header = DatasetHeader(
            name="coco_lvis", class_names=vocab.names, source=vocab.source,
            options={"vocabulary": vocab.version, "essnet_compat": essnet_compat,
                     "splits": sorted(splits)})
        result = run_conversion(out, header, splits, maker, opts)
    if result is not None and not any(s["num_samples"] for s in result["splits"].values()):
        # Every image skipped (--on-error skip): shards without samples are no result.
        skipped = sum(s.get("num_skipped", 0) for s in result["splits"].values())
        raise UserError(f"{out}: no image converted ({skipped} skipped, see {Path(out) / 'skipped.jsonl'}): "
                        f"check that --root {coco_root} holds the images the LVIS JSONs list (train2017/, val2017/)")
    return result
