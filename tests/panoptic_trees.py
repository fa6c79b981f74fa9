"""Panoptic dataset trees in the official layouts, for converter tests.

- COCO panoptic: from the real fixture files (val2017) or generated with random segments;
- ADE20K panoptic: generated `ADEChallengeData2016` trees with `annotations_instance/`.

PNGs are written with PIL and segment ids encoded by this module's own `id2rgb`, so the
tests decode them independently of rankseg.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from convert_trees import random_image, write_jpeg, write_mask_png
from PIL import Image

DATASETS = Path(__file__).resolve().parents[1] / "datasets"


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """COCO panoptic colour of segment ids: R = id mod 256, G = id / 256 mod 256, B = id / 65536."""
    ids = np.asarray(ids, np.int64)
    return np.stack([ids & 255, (ids >> 8) & 255, (ids >> 16) & 255], -1).astype(np.uint8)


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb, np.int64)
    return rgb[..., 0] | (rgb[..., 1] << 8) | (rgb[..., 2] << 16)


def read_png_ids(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return rgb2id(np.asarray(im.convert("RGB")))


def bbox(mask: np.ndarray) -> list[int]:
    ys, xs = np.nonzero(mask)
    return [int(xs.min()), int(ys.min()), int(xs.max() - xs.min() + 1), int(ys.max() - ys.min() + 1)]


def coco_categories() -> list[dict]:
    """The 133 categories (id, name, isthing), official order."""
    return json.loads((DATASETS / "coco_panoptic" / "classes.json").read_text())["classes"]


# --- COCO panoptic -------------------------------------------------------------------------

def coco_tree_from_fixtures(root: Path, fixtures: Path, png_under_annotations: bool = False) -> dict:
    """The official layout for val2017 from `coco_panoptic_sample`; returns the JSON document."""
    src = fixtures / "coco_panoptic_sample"
    (root / "annotations").mkdir(parents=True)
    doc = json.loads((src / "annotations" / "panoptic_examples.json").read_text())
    (root / "annotations" / "panoptic_val2017.json").write_text(json.dumps(doc))
    png_dir = root / ("annotations" if png_under_annotations else "") / "panoptic_val2017"
    shutil.copytree(src / "annotations" / "panoptic_examples", png_dir)
    shutil.copytree(src / "val2017", root / "val2017")
    return doc


@dataclass
class CocoImage:
    key: str
    split: str
    ids: np.ndarray  # H x W segment ids as written
    segments: list[dict]  # the JSON records
    image_path: Path
    png_path: Path


@dataclass
class CocoTree:
    root: Path
    docs: dict[str, dict] = field(default_factory=dict)  # split -> JSON document
    images: dict[str, CocoImage] = field(default_factory=dict)

    def save(self) -> None:
        for split, doc in self.docs.items():
            (self.root / "annotations" / f"panoptic_{split}2017.json").write_text(json.dumps(doc))


def coco_tree(root: Path, n_train: int = 3, n_val: int = 2, size: tuple[int, int] = (24, 32),
              seed: int = 0) -> CocoTree:
    """Random COCO panoptic images: blocks of segments with random categories, some crowd, void."""
    rng = np.random.default_rng(seed)
    cats = coco_categories()
    tree = CocoTree(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    h, w = size
    for split, n in (("train", n_train), ("val", n_val)):
        doc = {"images": [], "annotations": [], "categories": [
            {"id": c["id"], "name": c["name"], "isthing": c["isthing"], "supercategory": "x", "color": [0, 0, 0]}
            for c in cats]}
        for i in range(n):
            iid = 1000 * (split == "val") + i + 1
            key = f"{iid:012d}"
            grid = rng.integers(0, 5, (h // 4, w // 4))
            blocks = np.kron(grid, np.ones((4, 4), np.int64))
            seg_ids = rng.choice(np.arange(1, 1 << 24), 5, replace=False)
            ids = np.where(blocks == 0, 0, seg_ids[blocks])  # block value 0 = void
            segments = []
            for b in range(1, 5):
                mask = ids == seg_ids[b]
                if not mask.any():
                    continue
                c = cats[int(rng.integers(0, len(cats)))]
                segments.append({"id": int(seg_ids[b]), "category_id": c["id"],
                                 "iscrowd": int(c["isthing"] and rng.random() < 0.3),
                                 "area": int(mask.sum()), "bbox": bbox(mask)})
            img = root / f"{split}2017" / f"{key}.jpg"
            png = root / f"panoptic_{split}2017" / f"{key}.png"
            write_jpeg(img, random_image(rng, h, w))
            png.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(id2rgb(ids), "RGB").save(png)
            doc["images"].append({"id": iid, "file_name": f"{key}.jpg", "height": h, "width": w})
            doc["annotations"].append({"image_id": iid, "file_name": f"{key}.png", "segments_info": segments})
            tree.images[key] = CocoImage(key, split, ids, segments, img, png)
        tree.docs[split] = doc
    tree.save()
    return tree


# --- ADE20K panoptic (ADEChallengeData2016 + annotations_instance) ---------------------------

def ade_things() -> dict[int, int]:
    """Instance category (R, 1..100) -> ADE20K-150 class value."""
    doc = json.loads((DATASETS / "ade20k_panoptic" / "things.json").read_text())
    return {r["instance_id"]: r["ade_id"] for r in doc["instance_to_ade"]}


@dataclass
class AdeImage:
    key: str
    split: str
    semantic: np.ndarray  # H x W uint8, ADE20K-150 values
    instance: np.ndarray  # H x W x 3 uint8 RGB: R = instance category, G = instance number
    paths: dict[str, Path]


def write_ade_instance(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rgb, "RGB").save(path)


def ade_panoptic_tree(root: Path, n_train: int = 4, n_val: int = 2, size: tuple[int, int] = (32, 40),
                      seed: int = 0) -> dict[str, AdeImage]:
    """Images whose semantic PNG has stuff and thing regions (and unlabelled pixels) and whose
    instance PNG marks thing instances that overlap the semantic regions (as in the release,
    where the two annotations disagree at places), some covering a whole stuff region."""
    rng = np.random.default_rng(seed)
    things = ade_things()
    thing_values = sorted(set(things.values()))
    stuff_values = [v for v in range(1, 151) if v not in set(thing_values)]
    by_ade = {}
    for r, v in sorted(things.items()):
        by_ade.setdefault(v, r)
    out = {}
    h, w = size
    for i in range(n_train + n_val):
        split, tag = ("training", "train") if i < n_train else ("validation", "val")
        key = f"ADE_{tag}_{i:08d}"
        vals = [0, *rng.choice(stuff_values, 3, replace=False), *rng.choice(thing_values, 2, replace=False)]
        grid = rng.choice(vals, (h // 4, w // 4))
        semantic = np.kron(grid, np.ones((4, 4), np.int64)).astype(np.uint8)
        inst = np.zeros((h, w, 3), np.uint8)
        n_inst = int(rng.integers(1, 6))
        for j in range(1, n_inst + 1):
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            hh, ww = rng.integers(3, 12, 2)
            v = int(rng.choice(thing_values))
            inst[y:y + hh, x:x + ww, 0] = by_ade[v]
            inst[y:y + hh, x:x + ww, 1] = j * 7  # instance numbers need not be consecutive
        if i == 0:  # a stuff region fully covered by an instance: the official JSON keeps its record
            semantic[:4, :4] = next(v for v in stuff_values if v not in vals)
            semantic[4:8, :4] = 0
            inst[:4, :4] = (by_ade[thing_values[0]], 250, 0)
        inst[..., 2] = rng.integers(0, 256, (h, w))  # B is unused by the format
        paths = {"image": root / "images" / split / f"{key}.jpg",
                 "semantic": root / "annotations" / split / f"{key}.png",
                 "instance": root / "annotations_instance" / split / f"{key}.png"}
        write_jpeg(paths["image"], random_image(rng, h, w))
        write_mask_png(paths["semantic"], semantic)
        write_ade_instance(paths["instance"], inst)
        out[key] = AdeImage(key, split, semantic, inst, paths)
    return out


def ade_official(semantic: np.ndarray, instance: np.ndarray, things: dict[int, int]) -> tuple[np.ndarray, list[dict]]:
    """What Mask2Former's `prepare_ade20k_pan_seg.py` writes for one image, re-written here:
    (H x W segment ids, JSON `segments_info` with "id", "category_id" (= train id), "area",
    "iscrowd").

    Stuff first (one segment per stuff class of the semantic PNG, ascending), then every
    instance number of the G channel (ascending), its class from the R channel; later segments
    are painted over earlier ones, but each record keeps the area of its mask at the time it
    was painted (so a stuff record fully covered by instances stays, with its old area). Ids
    are 1..n (the script's random colours carry no meaning).
    """
    pan = np.zeros(semantic.shape, np.int64)
    segments: list[dict] = []
    thing_values = set(things.values())
    for v in sorted(set(np.unique(semantic).tolist()) - {0} - thing_values):
        mask = semantic == v
        segments.append({"id": len(segments) + 1, "category_id": v - 1, "area": int(mask.sum()), "iscrowd": 0})
        pan[mask] = len(segments)
    for num in sorted(set(np.unique(instance[..., 1]).tolist()) - {0}):
        mask = instance[..., 1] == num
        cats = np.unique(instance[..., 0][mask])
        assert len(cats) == 1
        segments.append({"id": len(segments) + 1, "category_id": things[int(cats[0])] - 1,
                         "area": int(mask.sum()), "iscrowd": 0})
        pan[mask] = len(segments)
    return pan, segments


def read_coco_panoptic(json_path: str | Path, png_dir: str | Path | None = None) -> Iterator[tuple[dict, np.ndarray]]:
    """(annotation, H x W int64 segment ids) per annotation of a COCO panoptic JSON (a reader
    of what `--save-panoptic` writes, for the tests)."""
    json_path = Path(json_path)
    png_dir = Path(png_dir) if png_dir else json_path.with_suffix("")
    doc = json.loads(json_path.read_text())
    for ann in doc["annotations"]:
        rgb = np.asarray(Image.open(png_dir / ann["file_name"]).convert("RGB")).astype(np.int64)
        yield ann, rgb[..., 0] + 256 * rgb[..., 1] + 256 * 256 * rgb[..., 2]
