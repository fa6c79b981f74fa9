"""ADE20K panoptic (150 classes: 100 things, 50 stuff), built as MaskFormer's `prepare_ade20k_pan_seg.py` does.

Inputs (`ADEChallengeData2016` plus the Places Challenge 2017 instance annotations):
- `images/{training,validation}/ADE_*.jpg`;
- `annotations/{training,validation}/ADE_*.png`: 8-bit, value v in 1..150 = ADE20K-150 class
  v (train id v - 1), 0 = unlabelled;
- `annotations_instance/{training,validation}/ADE_*.png`: 8-bit RGB, R = one of the 100
  instance categories (1..100), G = instance number (0 = no instance; unique per image,
  whatever the category), B unused.

Per image, in the script's order: one stuff segment per stuff class present in the semantic
PNG (ascending class), then one thing segment per instance number (ascending), its class the
ADE20K-150 class its instance category stands for (`datasets/ade20k_panoptic/things.json`).
Things are painted over stuff (the two annotations overlap). Pixels of a thing class without
an instance, and unlabelled pixels, are void. Every record the script's JSON holds is kept with
the area it declares there (a stuff segment's area from before the instances were painted, so
a fully covered stuff segment keeps a record without pixels): panopticapi scores the official
ground truth with those (docs/panoptic.md). See docs/datasets.md#ade20k-panoptic for what
differs from the script's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rankseg_core.convert.common import ConvertOptions, run_conversion
from rankseg_core.convert.png_datasets import _class_table, pair_by_folder
from rankseg_core.convert.segments import panoptic_sample
from rankseg_core.convert.source_io import (
    check_same_size,
    decode_jpeg,
    decode_mask,
    decode_rgb_mask,
    read_bytes,
    stored_image_bytes,
)
from rankseg_core.errors import SampleError, UserError
from rankseg_core.shards.write import DatasetHeader, EncodedSample
from rankseg_core.utils.resources import load_json as load_dataset_json

SPLITS = ("training", "validation")
LAYOUT = ("ADEChallengeData2016/{images,annotations,annotations_instance}/{training,validation}/ "
          "with *.jpg, *.png and *.png (instance annotations of the Places Challenge 2017)")


def instance_table() -> tuple[dict[int, int], str]:
    """Instance category (R value 1..100) -> ADE20K-150 class value (1..150), and the source."""
    doc = load_dataset_json("ade20k_panoptic/things.json")
    try:
        table = {int(r["instance_id"]): int(r["ade_id"]) for r in doc["instance_to_ade"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"datasets/ade20k_panoptic/things.json is malformed ({exc!r}): restore it") from None
    return table, doc["source"]


def decode_instance_png(data: bytes, path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(R = instance category, G = instance number), both H x W uint8, of an instance PNG."""
    rgb = decode_rgb_mask(data, path, "instance PNG (R = category, G = instance)")
    return rgb[..., 0], rgb[..., 1]


def panoptic_ids(semantic: np.ndarray, inst_cat: np.ndarray, inst_num: np.ndarray,
                 instance_to_ade: dict[int, int], thing_values: set[int],
                 semantic_where: str, instance_where: str) -> tuple[np.ndarray, list[tuple[int, int, int, int]]]:
    """H x W segment ids (0 = void) and (id, train id, iscrowd=0, JSON area) records of one image.

    `semantic` holds ADE20K-150 values (0 = unlabelled); `inst_cat` / `inst_num` the R and G
    channels of the instance PNG. Segment ids are 1..n in record order. The area is the one the
    script writes: the segment's mask before later segments are painted over it. Messages name
    the PNG at fault (`semantic_where`, `instance_where`).
    """
    ids = np.zeros(semantic.shape, np.int64)
    records: list[tuple[int, int, int, int]] = []
    values, counts = np.unique(semantic, return_counts=True)
    if values.size and values[-1] > 150:
        raise SampleError(f"{semantic_where}: semantic value(s) {values[values > 150].tolist()} are not "
                          "ADE20K-150 classes (1..150): wrong or damaged annotation")
    for v, c in zip(values.tolist(), counts.tolist()):
        if v == 0 or v in thing_values:
            continue
        records.append((len(records) + 1, v - 1, 0, c))
        ids[semantic == v] = len(records)
    has = inst_num > 0
    # one (instance number, category) pair per instance: a number with two categories is broken
    pairs = np.unique(inst_num[has].astype(np.int64) * 256 + inst_cat[has])
    nums, cats = pairs // 256, pairs % 256
    if np.unique(nums).size != nums.size:
        bad = int(nums[np.flatnonzero(np.diff(nums) == 0)[0]])
        raise SampleError(f"{instance_where}: instance {bad} has pixels of several categories (R values)")
    for num, cat in zip(nums.tolist(), cats.tolist()):
        if cat not in instance_to_ade:
            raise SampleError(f"{instance_where}: instance {num} has category R={cat}, not one of the 100 "
                              "instance categories (1..100)")
        mask = inst_num == num
        # instance numbers are disjoint, so an instance's area is also its final pixel count
        records.append((len(records) + 1, instance_to_ade[cat] - 1, 0, int(mask.sum())))
        ids[mask] = len(records)  # painted over stuff, as the official script does
    return ids, records


@dataclass
class Ade20kPanopticMaker:
    """Builds one sample from its key (file stem); picklable for spawned workers."""

    root: str
    files: dict[str, tuple[str, str, str]]  # key -> (image, semantic PNG, instance PNG), relative
    instance_to_ade: dict[int, int]
    num_classes: int

    def __call__(self, key: str) -> EncodedSample:
        img_path, sem_path, inst_path = (str(Path(self.root) / p) for p in self.files[key])
        data = read_bytes(img_path, "image")
        image = decode_jpeg(data, img_path)
        semantic = decode_mask(read_bytes(sem_path, "semantic annotation"), sem_path)
        check_same_size(image.shape, semantic.shape, sem_path)
        inst_cat, inst_num = decode_instance_png(read_bytes(inst_path, "instance annotation"), inst_path)
        check_same_size(image.shape, inst_cat.shape, inst_path)
        ids, records = panoptic_ids(semantic, inst_cat, inst_num, self.instance_to_ade,
                                    set(self.instance_to_ade.values()), sem_path, inst_path)
        # Kept as the official JSON has them: a stuff record fully covered by instances (no
        # pixel left) and pre-painting stuff areas, which panopticapi scores with.
        return panoptic_sample(key, stored_image_bytes(data, image), ids, records, self.num_classes,
                               f"{sem_path} + {inst_path}", json_areas=True)


def prepare_ade20k_panoptic(root: str | Path, out: str | Path, opts: ConvertOptions | None = None) -> dict | None:
    """ADE20K panoptic from ADEChallengeData2016 + annotations_instance (both splits)."""
    root = Path(root)
    classes, source = _class_table("ade20k/classes.json")
    instance_to_ade, things_source = instance_table()
    splits, pairs = pair_by_folder(root, {s: (f"images/{s}", f"annotations/{s}") for s in SPLITS},
                                   expected=LAYOUT)
    for s in SPLITS:
        if not (root / "annotations_instance" / s).is_dir():
            raise UserError(f"{root / 'annotations_instance' / s}: no such directory: download the instance "
                            f"annotations (annotations_instance.tar) into {root} ({LAYOUT})")
    files = {key: (img, sem, f"annotations_instance/{sem.split('/', 1)[1]}") for key, (img, sem) in pairs.items()}
    header = DatasetHeader(
        name="ade20k-panoptic", class_names=[c["name"] for c in classes],
        source=f"{source}; things: {things_source}",
        # the official panoptic JSON's category ids are the train ids (0..149)
        options={"category_ids": list(range(len(classes)))},
        thing_classes=sorted(v - 1 for v in instance_to_ade.values()))
    maker = Ade20kPanopticMaker(str(root), files, instance_to_ade, len(classes))
    return run_conversion(out, header, splits, maker, opts or ConvertOptions())
