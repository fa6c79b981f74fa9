"""COCO+LVIS (ESSNet, 1,284 classes): LVIS instance polygons + COCO-Stuff stuff -> semantic labels.

Per image (ESSNet's rule, without its bugs; see docs/datasets.md):
1. LVIS annotations in file order, each painted only into still-empty pixels (first wins);
2. COCO-Stuff stuff annotations, first wins among themselves, mapped through ESSNet's
   `coco2lvis` table (183 "other" and 255 -> 0), fill the pixels LVIS left empty;
3. stored value 0 = unlabeled -> IGNORE, train id = value - 1.

LVIS v1 train is a ~1 GB JSON with 1.27 M polygon annotations. Pickling that to each spawned
worker would cost GBs per worker, so the annotations are packed once into flat files
(coordinates, RLE bytes, offsets) in a temporary directory that every worker memory-maps: the
operating system shares the pages, and a worker's pickled state is only the per-image table.
"""

from __future__ import annotations

import re
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from ..codec import IGNORE
from ..errors import UserError
from ..resources import load_json as load_dataset_json
from ..shards import DatasetHeader, EncodedSample, SampleError, encode_sample
from .common import ConvertOptions, run_conversion
from .source_io import decode_jpeg, load_json, read_bytes, stored_image_bytes

NUM_LVIS_V1 = 1203
_POLY, _RLE = 0, 1


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


def vocabulary_for(doc: dict, json_path: Path) -> Vocabulary:
    """LVIS v1 when the JSON's categories are v1's (or absent), else the JSON's own categories."""
    v1 = v1_vocabulary()
    cats = doc.get("categories")
    if not cats:
        return v1
    if not isinstance(cats, list):
        raise UserError(f"{json_path}: 'categories' must be a list")
    try:
        pairs = sorted((int(c["id"]), str(c["name"])) for c in cats)
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{json_path}: 'categories' entries need an integer 'id' and a 'name'") from None
    if pairs == v1.categories:
        return v1
    return json_vocabulary(cats, json_path)


# --------------------------------------------------------------------------- packed annotations

class _Packer:
    """Appends annotations (polygons or compressed RLE) to flat files `root/<name>.*`."""

    def __init__(self, root: Path, name: str) -> None:
        self.prefix = root / name
        self.values: list[int] = []
        self.kinds: list[int] = []
        # per annotation: its range in the polygon list (polygons) or in the RLE bytes (RLE)
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.poly_ends: list[int] = []  # per polygon: end in the coordinate array
        self._xy = open(f"{self.prefix}.xy.f64", "wb")
        self._rle = open(f"{self.prefix}.rle.u8", "wb")
        self._xy_buf: list[float] = []
        self.n_xy = 0
        self.n_rle = 0

    def __len__(self) -> int:
        return len(self.values)

    def add(self, value: int, seg: object, h: int, w: int) -> None:
        """Append one segmentation; raises ValueError (with the reason) when it is malformed."""
        if isinstance(seg, list):  # polygons [[x0, y0, x1, y1, ...], ...], kept as given
            start = len(self.poly_ends)
            for poly in seg:
                if not isinstance(poly, list) or not all(isinstance(x, (int, float)) for x in poly):
                    raise ValueError("polygon is not a list of numbers")
                if len(poly) < 6 or len(poly) % 2:
                    # fewer than 3 points has no area; pycocotools would misread a 4-number
                    # polygon as a box, so such degenerate polygons are dropped
                    continue
                self._xy_buf.extend(poly)
                self.n_xy += len(poly)
                self.poly_ends.append(self.n_xy)
            if len(self._xy_buf) > 1 << 20:
                self._flush()
            self._push(value, _POLY, start, len(self.poly_ends))
            return
        if not (isinstance(seg, dict) and "counts" in seg and "size" in seg):
            raise ValueError("segmentation is neither polygons nor RLE {counts, size}")
        if list(seg["size"]) != [h, w]:
            raise ValueError(f"RLE size {seg['size']} differs from the image size {[h, w]}")
        counts = seg["counts"]
        if isinstance(counts, list):  # uncompressed RLE -> compressed, as pycocotools does
            counts = mask_utils.frPyObjects(seg, h, w)["counts"]
        data = counts.encode() if isinstance(counts, str) else bytes(counts)
        self._rle.write(data)
        self._push(value, _RLE, self.n_rle, self.n_rle + len(data))
        self.n_rle += len(data)

    def _push(self, value: int, kind: int, start: int, end: int) -> None:
        self.values.append(value)
        self.kinds.append(kind)
        self.starts.append(start)
        self.ends.append(end)

    def _flush(self) -> None:
        if self._xy_buf:
            # float64: the exact values pycocotools would get from the JSON (rounding matters)
            self._xy.write(np.asarray(self._xy_buf, np.float64).tobytes())
            self._xy_buf = []

    def close(self) -> None:
        self._flush()
        self._xy.close()
        self._rle.close()
        for suffix, data, dt in (("values.i32", self.values, np.int32),
                                 ("kinds.u8", self.kinds, np.uint8),
                                 ("starts.i64", self.starts, np.int64),
                                 ("ends.i64", self.ends, np.int64),
                                 ("polys.i64", self.poly_ends, np.int64)):
            np.asarray(data, dt).tofile(f"{self.prefix}.{suffix}")


def _mmap(path: str, dtype: type) -> np.ndarray:
    size = Path(path).stat().st_size
    return np.memmap(path, dtype, mode="r") if size else np.zeros(0, dtype)


class _Packed:
    """Read side of `_Packer`: memory-mapped, opened lazily in whichever process uses it."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self._arrays: dict | None = None

    def __getstate__(self) -> dict:
        return {"prefix": self.prefix, "_arrays": None}  # never pickle the memory maps

    def _a(self) -> dict:
        if self._arrays is None:
            p = self.prefix
            self._arrays = {"values": _mmap(f"{p}.values.i32", np.int32),
                            "kinds": _mmap(f"{p}.kinds.u8", np.uint8),
                            "starts": _mmap(f"{p}.starts.i64", np.int64),
                            "ends": _mmap(f"{p}.ends.i64", np.int64),
                            "polys": _mmap(f"{p}.polys.i64", np.int64),
                            "xy": _mmap(f"{p}.xy.f64", np.float64),
                            "rle": _mmap(f"{p}.rle.u8", np.uint8)}
        return self._arrays

    def paint(self, label: np.ndarray, lo: int, hi: int) -> None:
        """Paint annotations lo..hi-1 into `label` (H x W) so that the first one wins.

        Painting in reverse order, each annotation over everything, leaves every pixel with the
        first annotation covering it: the same result as "paint only empty pixels" in file order,
        with one masked assignment per annotation.
        """
        a = self._a()
        h, w = label.shape
        for i in range(hi - 1, lo - 1, -1):
            start, end = int(a["starts"][i]), int(a["ends"][i])
            if a["kinds"][i] == _POLY:
                # one list per polygon, as in the JSON: what lvis-api's ann_to_mask passes
                polys = [a["xy"][(int(a["polys"][j - 1]) if j > 0 else 0):int(a["polys"][j])].tolist()
                         for j in range(start, end)]
                if not polys:
                    continue
                rle = mask_utils.merge(mask_utils.frPyObjects(polys, h, w))
            else:
                rle = {"size": [h, w], "counts": a["rle"][start:end].tobytes()}
            np.copyto(label, int(a["values"][i]), where=mask_utils.decode(rle).view(bool))


# --------------------------------------------------------------------------- per-image maker

@dataclass
class CocoLvisMaker:
    """Builds one sample from its key (the COCO file stem); picklable for spawned workers."""

    coco_root: str
    images: dict[str, tuple]  # key -> (relpath, h, w, lvis_lo, lvis_hi, stuff_lo, stuff_hi)
    lvis: _Packed
    stuff: _Packed
    lut: np.ndarray  # 256, uint16: COCO-Stuff id -> stored value
    num_classes: int

    def __call__(self, key: str) -> EncodedSample:
        rel, h, w, lo, hi, slo, shi = self.images[key]
        path = Path(self.coco_root) / rel
        if slo < 0:
            raise SampleError(f"{path}: image is in none of the --stuff-json files (pass the COCO-Stuff "
                              "JSON of its folder, e.g. stuff_train2017.json)")
        data = read_bytes(path, "image")
        pixels = decode_jpeg(data, path)  # SampleError for corrupt / truncated files
        if pixels.shape[:2] != (h, w):
            raise SampleError(f"{path}: image is {pixels.shape[0]}x{pixels.shape[1]} (H x W), the LVIS "
                              f"JSON says {h}x{w}: the image and the JSON do not belong together")
        value = self.rasterise(h, w, lo, hi, slo, shi)
        label = np.ascontiguousarray(np.where(value == 0, IGNORE, value - 1), np.uint16)
        return encode_sample(key, stored_image_bytes(data, pixels), label, self.num_classes)

    def rasterise(self, h: int, w: int, lo: int, hi: int, slo: int, shi: int) -> np.ndarray:
        """H x W int32 of stored values (0 = unlabeled), column-major.

        Column-major because pycocotools decodes masks that way: the masked writes then run
        over contiguous memory (about 3x faster than into a row-major array).
        """
        value = np.zeros((h, w), np.int32, order="F")
        self.lvis.paint(value, lo, hi)
        if shi > slo:
            stuff = np.zeros((h, w), np.uint8, order="F")  # raw COCO-Stuff ids, first wins (as ESSNet)
            self.stuff.paint(stuff, slo, shi)
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


def _images_of(doc: dict, path: Path) -> list[dict]:
    imgs = doc.get("images")
    if not isinstance(imgs, list) or not isinstance(doc.get("annotations"), list):
        raise UserError(f"{path}: not a COCO/LVIS annotation file (needs 'images' and 'annotations' lists)")
    return imgs


@dataclass
class _Record:
    key: str
    rel: str
    h: int
    w: int
    lo: int = 0
    hi: int = 0
    slo: int = -1
    shi: int = -1
    stuff_json: str = ""


def _index_lvis(doc: dict, path: Path, vocab: Vocabulary, packer: _Packer,
                records: dict[int, _Record], keys: list[str], seen: dict[str, Path]) -> None:
    """Add one LVIS JSON's images (to `records`, `keys`) and annotations (to `packer`)."""
    new: list[int] = []
    for img in _images_of(doc, path):
        try:
            iid, h, w, rel = int(img["id"]), int(img["height"]), int(img["width"]), image_relpath(img)
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: image entry {str(img)[:80]} lacks id/height/width/coco_url") from None
        key = Path(rel).stem
        if iid in records or key in seen:
            raise UserError(f"{path}: image {iid} ({rel}) is also in {seen.get(key, path)}: "
                            "pass each LVIS JSON once")
        records[iid] = _Record(key, rel, h, w)
        seen[key] = path
        new.append(iid)
        keys.append(key)
    by_img: dict[int, list[dict]] = {iid: [] for iid in new}
    for ann in doc["annotations"]:
        try:
            iid, cat = int(ann["image_id"]), int(ann["category_id"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: annotation {ann.get('id')} lacks image_id/category_id") from None
        if cat not in vocab.lvis_values:
            raise UserError(f"{path}: annotation {ann.get('id')} has unknown category id {cat} "
                            f"(not among the {len(vocab.lvis_values)} categories of "
                            f"{'LVIS v1' if vocab.version == 'lvis_v1' else 'this JSON'}): "
                            "fix the file or pass the matching official LVIS JSON")
        if iid not in by_img:
            raise UserError(f"{path}: annotation {ann.get('id')} refers to image {iid}, "
                            "which is not in its 'images'")
        by_img[iid].append(ann)
    for iid in new:
        rec = records[iid]
        rec.lo = len(packer)
        for ann in by_img[iid]:
            try:
                packer.add(vocab.lvis_values[int(ann["category_id"])], ann.get("segmentation"),
                           rec.h, rec.w)
            except (ValueError, TypeError) as exc:
                raise UserError(f"{path}: annotation {ann.get('id')}: {exc}") from None
        rec.hi = len(packer)


def _index_stuff(doc: dict, path: Path, valid_ids: set[int], packer: _Packer,
                 records: dict[int, _Record]) -> None:
    """Pack one COCO-Stuff JSON's annotations of the images LVIS needs."""
    mine: list[int] = []
    for img in _images_of(doc, path):
        try:
            iid = int(img["id"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: image entry {str(img)[:80]} has no integer id") from None
        rec = records.get(iid)
        if rec is None:
            continue
        if rec.slo >= 0:
            raise UserError(f"{path}: image {iid} is also in {rec.stuff_json}: pass each stuff JSON once")
        if (int(img.get("height", rec.h)), int(img.get("width", rec.w))) != (rec.h, rec.w):
            raise UserError(f"{path}: image {iid} is {img.get('height')}x{img.get('width')} here but "
                            f"{rec.h}x{rec.w} in the LVIS JSON: the files do not belong together")
        rec.stuff_json = path.name
        mine.append(iid)
    by_img: dict[int, list[dict]] = {iid: [] for iid in mine}
    for ann in doc["annotations"]:
        try:
            iid, cat = int(ann["image_id"]), int(ann["category_id"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: annotation {ann.get('id')} lacks image_id/category_id") from None
        if cat not in valid_ids:
            raise UserError(f"{path}: annotation {ann.get('id')} has category id {cat}, which is not "
                            "a COCO-Stuff stuff class (92..183): pass stuff_{train,val}2017.json, not "
                            "the instances or stuff+thing files")
        if iid in by_img:
            by_img[iid].append(ann)
    for iid in mine:
        rec = records[iid]
        rec.slo = len(packer)
        for ann in by_img[iid]:
            try:
                packer.add(int(ann["category_id"]), ann.get("segmentation"), rec.h, rec.w)
            except (ValueError, TypeError) as exc:
                raise UserError(f"{path}: annotation {ann.get('id')} of image {iid}: {exc}") from None
        rec.shi = len(packer)


def prepare_coco_lvis(coco_root: str | Path, lvis_jsons: Sequence[str | Path],
                      stuff_jsons: Sequence[str | Path], out: str | Path, *,
                      essnet_compat: bool = False, split: str | None = None,
                      opts: ConvertOptions | None = None,
                      note: Callable[[str], None] = lambda s: None) -> dict | None:
    """Convert COCO 2017 images + LVIS + COCO-Stuff annotations into COCO+LVIS shards.

    One split per LVIS JSON (named from its file name, or `split` with a single JSON). Every
    LVIS image must be listed in one of `stuff_jsons` (under --on-error skip the others are
    skipped and recorded). Returns `dataset.json` (None when converting one part).
    """
    opts = opts or ConvertOptions()
    opts.validate()
    coco_root = Path(coco_root)
    if not coco_root.is_dir():
        raise UserError(f"{coco_root}: no such directory: --coco-root must hold train2017/ and val2017/")
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
        lvis_pack, stuff_pack = _Packer(Path(tmp), "lvis"), _Packer(Path(tmp), "stuff")
        records: dict[int, _Record] = {}
        splits: dict[str, list[str]] = {}
        seen: dict[str, Path] = {}
        vocab: Vocabulary | None = None
        first = None
        for p in map(Path, lvis_jsons):
            note(f"reading {p}")
            doc = load_json(p, "LVIS JSON")
            v = vocabulary_for(doc, p)
            if vocab is None:
                vocab, first = v, p
            elif (v.version, v.names) != (vocab.version, vocab.names):
                raise UserError(f"{p} and {first} have different category lists (LVIS v1 vs v0.5?): "
                                "convert them separately")
            name = split or split_of(p)
            if name in splits:
                raise UserError(f"{p}: split '{name}' comes from two LVIS JSONs: pass --split or one JSON per split")
            splits[name] = []
            _index_lvis(doc, p, vocab, lvis_pack, records, splits[name], seen)
            del doc
        assert vocab is not None
        if essnet_compat and vocab.version != "lvis_v1":
            raise UserError("--essnet-compat reproduces ESSNet's LVIS v1 masks; it does not apply to "
                            f"{first} (not LVIS v1)")
        for p in map(Path, stuff_jsons):
            note(f"reading {p}")
            _index_stuff(load_json(p, "COCO-Stuff JSON"), p, valid_stuff, stuff_pack, records)
        lvis_pack.close()
        stuff_pack.close()

        missing = [r for r in records.values() if r.slo < 0]
        if missing and opts.on_error == "fail":
            r = missing[0]
            raise UserError(f"{len(missing)} of {len(records)} LVIS images are in none of the --stuff-json "
                            f"files (first: {r.rel}): pass the COCO-Stuff JSON of every folder the LVIS "
                            "JSONs use (LVIS v1 val draws from train2017 and val2017), or --on-error skip")
        lut = stuff_lut(vocab.stuff_values, chained=essnet_compat)
        maker = CocoLvisMaker(str(coco_root), {r.key: (r.rel, r.h, r.w, r.lo, r.hi, r.slo, r.shi)
                                               for r in records.values()},
                              _Packed(str(lvis_pack.prefix)), _Packed(str(stuff_pack.prefix)),
                              lut, vocab.num_classes)
        header = DatasetHeader(
            name="coco_lvis", class_names=vocab.names, source=vocab.source,
            options={"vocabulary": vocab.version, "essnet_compat": essnet_compat,
                     "splits": sorted(splits)})
        return run_conversion(out, header, splits, maker, opts)
