"""COCO panoptic 2017 (133 categories: 80 things, 53 stuff) -> panoptic shards (v2).

Inputs, as released (detectron2's layout): `annotations/panoptic_{train,val}2017.json`, the
PNGs in `panoptic_{train,val}2017/` (or `annotations/panoptic_{train,val}2017/`, where the
release's inner zip unpacks), the images in `{train,val}2017/`. A PNG pixel holds the segment
id R + 256 G + 256^2 B (0 = unlabelled); the JSON's `segments_info` gives each id its
category, `iscrowd`, `area` and `bbox`.

Train ids are the categories' positions in the official list (detectron2's contiguous ids);
the official ids are kept in `dataset.json` (`options.category_ids`) for exporting
predictions. Every inconsistency between a PNG and its records is that sample's error
(docs/datasets.md#coco-panoptic); a broken JSON stops the run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rankseg_core.convert.coco_panoptic_format import MAX_SEGMENT_ID, rgb2id
from rankseg_core.convert.common import ConvertOptions, run_conversion
from rankseg_core.convert.segments import panoptic_sample
from rankseg_core.convert.source_io import decode_jpeg, decode_rgb_mask, load_json, read_bytes, stored_image_bytes
from rankseg_core.errors import SampleError, UserError
from rankseg_core.shards.check import check_name
from rankseg_core.shards.write import DatasetHeader, EncodedSample
from rankseg_core.utils import jsonio
from rankseg_core.utils.resources import load_json as load_dataset_json

SPLITS = ("train", "val")
MAX_AREA = 1 << 53  # above any image's pixel count, and exact as a float
LAYOUT = ("COCO root with annotations/panoptic_{train,val}2017.json, panoptic_{train,val}2017/*.png "
          "(or annotations/panoptic_{train,val}2017/) and {train,val}2017/*.jpg")


def class_table() -> tuple[list[dict], str]:
    doc = load_dataset_json("coco_panoptic/classes.json")
    return doc["classes"], doc["source"]


def decode_panoptic_png(data: bytes, path: str | Path) -> np.ndarray:
    """H x W int64 segment ids of a COCO panoptic PNG (8-bit RGB)."""
    return rgb2id(decode_rgb_mask(data, path, "panoptic PNG (id = R + 256 G + 256^2 B)"))


def pack_records(segments: object, category_to_train: dict[int, int], where: str) -> np.ndarray:
    """n x 4 int64 (id, train id, iscrowd, JSON area or -1) of one image's segments_info.

    Raises SampleError naming `where` for a malformed record, an unknown category or a bad
    iscrowd. Packed arrays keep what the spawned workers receive small (COCO train holds
    ~1.1 M segments; as Python dicts they would cost hundreds of MB per worker).
    """
    if not isinstance(segments, list):
        raise SampleError(f"{where}: segments_info of this image is not a list")
    out = np.empty((len(segments), 4), np.int64)
    for i, s in enumerate(segments):
        try:
            sid, cat, crowd = (s[k] for k in ("id", "category_id", "iscrowd"))
            area = s.get("area", -1)
            if any(isinstance(v, bool) or not isinstance(v, int) for v in (sid, cat, crowd)) \
                    or isinstance(area, bool) or not isinstance(area, (int, float)) or not 0 < sid <= MAX_SEGMENT_ID:
                raise TypeError
        except (KeyError, TypeError, AttributeError):
            raise SampleError(f"{where}: segment record {str(s)[:80]} needs integer id (1..{MAX_SEGMENT_ID}), "
                              "category_id and iscrowd") from None
        if not area <= MAX_AREA:  # also NaN and infinity, which `json` parses
            raise SampleError(f"{where}: segment {sid} has area {str(area)[:40]}, more pixels than any image")
        if cat not in category_to_train:
            raise SampleError(f"{where}: segment {sid} has category_id {cat}, not one of the 133 COCO "
                              "panoptic categories")
        if crowd not in (0, 1):
            raise SampleError(f"{where}: segment {sid} has iscrowd {crowd}; it must be 0 or 1")
        out[i] = (sid, category_to_train[cat], crowd, int(area) if area >= 0 else -1)
    return out


@dataclass
class CocoPanopticMaker:
    """Builds one sample from its key (the image file stem); picklable for spawned workers."""

    # key -> (image path, png path, h, w, first record, end record, problem found while indexing)
    images: dict[str, tuple[str, str, int, int, int, int, str]]
    records: np.ndarray  # N x 4 (id, train id, iscrowd, JSON area or -1) of every image, packed
    num_classes: int

    def __call__(self, key: str) -> EncodedSample:
        img_path, png_path, h, w, lo, hi, problem = self.images[key]
        if problem:
            raise SampleError(problem)
        data = read_bytes(img_path, "image")
        pixels = decode_jpeg(data, img_path)
        if pixels.shape[:2] != (h, w):
            raise SampleError(f"{img_path}: image is {pixels.shape[1]}x{pixels.shape[0]} (W x H), the JSON "
                              f"says {w}x{h}: the image and the JSON do not belong together")
        ids = decode_panoptic_png(read_bytes(png_path, "panoptic PNG"), png_path)
        if ids.shape != (h, w):
            raise SampleError(f"{png_path}: panoptic PNG is {ids.shape[1]}x{ids.shape[0]} but its image is "
                              f"{w}x{h} (W x H): the pair does not belong together")
        records = [(sid, cat, crowd, None if area < 0 else area)
                   for sid, cat, crowd, area in self.records[lo:hi].tolist()]
        return panoptic_sample(key, stored_image_bytes(data, pixels), ids, records, self.num_classes,
                               str(png_path))


def _check_categories(doc: dict, path: Path, table: list[dict]) -> None:
    cats = doc.get("categories")
    if cats is None:
        return
    try:
        theirs = sorted((int(c["id"]), int(c["isthing"])) for c in cats)
    except (KeyError, TypeError, ValueError, OverflowError):  # OverflowError: int() of an infinite float
        raise UserError(f"{path}: 'categories' entries need integer 'id' and 'isthing'") from None
    if theirs != sorted((c["id"], c["isthing"]) for c in table):
        raise UserError(f"{path}: its categories are not the 133 COCO panoptic 2017 categories (ids and "
                        "isthing of panoptic_coco_categories.json): pass the official panoptic JSON")


def _find_png_dir(root: Path, split: str) -> Path:
    for d in (root / f"panoptic_{split}2017", root / "annotations" / f"panoptic_{split}2017"):
        if d.is_dir():
            return d
    raise UserError(f"{root}: no panoptic_{split}2017/ folder of PNGs (nor annotations/panoptic_{split}2017/): "
                    f"unzip annotations/panoptic_{split}2017.zip ({LAYOUT})")


def _load_json(path: Path) -> dict:
    """`source_io.load_json`, bounded: Python's `json` raises ValueError for an integer of more
    than 4300 digits and RecursionError past ~1000 levels, and what it parses must nest no
    deeper than jsonio.MAX_DEPTH (records are printed and walked later). NaN and infinite
    numbers it lets through are refused field by field (`_size`, `pack_records`)."""
    try:
        doc = load_json(path, "COCO panoptic JSON")
    except (ValueError, RecursionError) as exc:
        raise UserError(f"{path} is not valid JSON ({str(exc)[:120]}): re-download or re-extract it") from None
    if jsonio.depth(doc) > jsonio.MAX_DEPTH:
        raise UserError(f"{path} is not a COCO panoptic JSON (nested deeper than {jsonio.MAX_DEPTH} levels): "
                        "re-download or re-extract it")
    return doc


def _is_id(value: object) -> bool:
    """An image id must be hashable and JSON-plain: COCO's are integers, other releases' strings."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


def _size(value: object) -> int:
    """A height / width of the JSON: a positive integer (an integral float such as 480.0 too)."""
    if isinstance(value, float) and value.is_integer():  # is_integer() is False for inf and NaN
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"not a positive integer: {str(value)[:40]}")
    return value


def index_split(root: Path, split: str, table: list[dict], images: dict, packed: list[np.ndarray],
                seen: dict[str, str], hint: str = "") -> list[str]:
    """Read one split's JSON; add its samples to `images` and their records to `packed`."""
    json_path = root / "annotations" / f"panoptic_{split}2017.json"
    if not json_path.is_file():
        raise UserError(f"{json_path}: no such file: {root} does not have the expected layout ({LAYOUT}){hint}")
    image_dir = root / f"{split}2017"
    if not image_dir.is_dir():
        raise UserError(f"{image_dir}: no such directory: {root} does not have the expected layout ({LAYOUT})")
    png_dir = _find_png_dir(root, split)
    doc = _load_json(json_path)
    if not isinstance(doc.get("images"), list) or not isinstance(doc.get("annotations"), list):
        raise UserError(f"{json_path}: not a COCO panoptic annotation file (needs 'images' and 'annotations' lists)")
    _check_categories(doc, json_path, table)
    to_train = {c["id"]: c["train_id"] for c in table}
    by_id: dict[int | str, tuple[str, int, int]] = {}
    fix = "pass the official panoptic JSON (file names are plain names inside their folder)"
    for img in doc["images"]:
        try:
            iid, name, h, w = img["id"], img["file_name"], _size(img["height"]), _size(img["width"])
            if not _is_id(iid):
                raise TypeError
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{json_path}: image entry {str(img)[:80]} lacks id (integer or string), file_name, "
                            "or height / width (positive integers)") from None
        check_name(name, "image file_name", json_path, fix)
        if iid in by_id:
            raise UserError(f"{json_path}: image id {iid} is listed twice in 'images'")
        by_id[iid] = (name, h, w)
    keys = []
    offset = sum(len(r) for r in packed)  # where this split's records start in the packed array
    for ann in doc["annotations"]:
        try:
            iid, png = ann["image_id"], ann["file_name"]
            segments = ann["segments_info"]
            if not _is_id(iid):
                raise TypeError
        except (KeyError, TypeError):
            raise UserError(f"{json_path}: annotation {str(ann)[:80]} lacks image_id (integer or string), "
                            "file_name or segments_info") from None
        check_name(png, "annotation file_name", json_path, fix)
        if iid not in by_id:
            raise UserError(f"{json_path}: annotation {png} refers to image {iid}, which is not in its 'images'")
        name, h, w = by_id[iid]
        key = Path(name).stem
        if key in seen:
            raise UserError(f"{json_path}: image {name} has two annotations (or is also in {seen[key]})")
        seen[key] = json_path.name
        png_path = png_dir / png
        try:
            recs, problem = pack_records(segments, to_train, str(png_path)), ""
        except SampleError as exc:  # this image's problem, raised when (and if) it is converted
            recs, problem = np.zeros((0, 4), np.int64), str(exc)
        packed.append(recs)
        images[key] = (str(image_dir / name), str(png_path), h, w, offset, offset + len(recs), problem)
        offset += len(recs)
        keys.append(key)
    return keys


def prepare_coco_panoptic(root: str | Path, out: str | Path, *, split: str = "all",
                          opts: ConvertOptions | None = None) -> dict | None:
    """Convert COCO panoptic 2017 (`split`: train, val or all) into panoptic shards."""
    root = Path(root)
    if split not in ("all", *SPLITS):
        raise UserError(f"--split must be train, val or all, not {split!r}")
    if not root.is_dir():
        raise UserError(f"{root}: no such directory: pass the COCO root with --root ({LAYOUT})")
    table, source = class_table()
    images: dict[str, tuple] = {}
    packed: list[np.ndarray] = []
    seen: dict[str, str] = {}
    hint = " (or pass --split train / --split val to convert one split)" if split == "all" else ""
    splits = {s: index_split(root, s, table, images, packed, seen, hint)
              for s in (SPLITS if split == "all" else (split,))}
    header = DatasetHeader(
        name="coco-panoptic", class_names=[c["name"] for c in table], source=source,
        options={"splits": sorted(splits), "category_ids": [c["id"] for c in table]},
        thing_classes=[c["train_id"] for c in table if c["isthing"]])
    maker = CocoPanopticMaker(images, np.concatenate(packed) if packed else np.zeros((0, 4), np.int64),
                              len(table))
    return run_conversion(out, header, splits, maker, opts or ConvertOptions())
