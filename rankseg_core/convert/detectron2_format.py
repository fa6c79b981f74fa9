"""The directory layouts detectron2-based projects read, per dataset (docs/benchmarks/export.md).

A layout is an image folder and one or more label folders per split, with the encoding of
the label files. `rankseg export` writes them from shards; `rankseg prepare detectron2` reads
them back (the first label folder). Each entry names the registration code it follows.
File names are the sample keys with '/' -> '__' (`file_stem`), which for image datasets is
the image stem, as detectron2's `load_sem_seg` pairs image and label files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rankseg_core.errors import UserError
from rankseg_core.shards.check import check_name
from rankseg_core.shards.codec import IGNORE
from rankseg_core.utils.resources import load_json


def file_stem(key: str) -> str:
    """File name (without suffix) of sample `key` in exports and saved predictions: video keys
    `video/frame` become `video__frame` (one flat folder, as `rankseg eval --save-predictions`)."""
    return key.replace("/", "__").replace("\\", "__")


@dataclass(frozen=True)
class LabelFiles:
    """One label folder: `folder` (with {split}), file suffix, and the value encoding.

    kind: "train" = train ids; "plus1" = train id + 1 (the release / mmseg `reduce_zero_label`
    form, 0 = unlabelled); "coco_stuff" = COCO-Stuff id - 1 (stuffthingmaps). `ignore` is the
    value written for ignored pixels, `bits` the sample depth (8 or 16).
    """

    folder: str
    suffix: str
    kind: str
    ignore: int
    bits: int


@dataclass(frozen=True)
class Layout:
    images: str  # folder with {split}
    labels: tuple[LabelFiles, ...]
    splits: dict[str, str]  # shard split -> folder split name (others keep their name)
    follows: str  # whose registration / preparation script this reproduces

    def folder_split(self, split: str) -> str:
        return self.splits.get(split, split)

    def shard_split(self, folder_split: str) -> str:
        back = {v: k for k, v in self.splits.items()}
        return back.get(folder_split, folder_split)


_ADE = {"training": "training", "validation": "validation"}
_PC = {"train": "training", "val": "validation"}
_COCO = {"train": "train2017", "val": "val2017"}

LAYOUTS: dict[str, Layout] = {
    "ade20k-full": Layout(
        "ADE20K_2021_17_01/images_detectron2/{split}",
        (LabelFiles("ADE20K_2021_17_01/annotations_detectron2/{split}", ".tif", "train", IGNORE, 16),), _ADE,
        "MaskFormer/Mask2Former datasets/prepare_ade20k_full_sem_seg.py + register_ade20k_full.py "
        "(also CAT-Seg, FC-CLIP: ade20k_full_sem_seg_val, ignore_label 65535, gt_ext tif)"),
    "ade20k-150": Layout(
        "ADEChallengeData2016/images/{split}",
        (LabelFiles("ADEChallengeData2016/annotations_detectron2/{split}", ".png", "train", 255, 8),
         LabelFiles("ADEChallengeData2016/annotations/{split}", ".png", "plus1", 0, 8)), _ADE,
        "MaskFormer datasets/prepare_ade20k_sem_seg.py (annotations_detectron2) next to the release's "
        "annotations/"),
    "coco-stuff-164k": Layout(
        "coco/{split}",
        (LabelFiles("coco/stuffthingmaps_detectron2/{split}", ".png", "train", 255, 8),
         LabelFiles("coco/stuffthingmaps_trainval2017/{split}", ".png", "coco_stuff", 255, 8)), _COCO,
        "SAN / zsseg.baseline / MAFT prepare_coco_stuff_164k_sem_seg.py (coco_2017_*_stuff_sem_seg) next "
        "to the release's stuffthingmaps_trainval2017/"),
    "pascal-context-459": Layout(
        "pascal_ctx_d2/images/{split}",
        (LabelFiles("pascal_ctx_d2/annotations_ctx459/{split}", ".tif", "train", IGNORE, 16),), _PC,
        "NVlabs/ODISE and FC-CLIP prepare_pascal_ctx_full_sem_seg.py + openvocab_pascal_ctx459_sem_seg_* "
        "(ignore_label 65535, gt_ext tif)"),
    "pascal-context-59": Layout(
        "pascal_ctx_d2/images/{split}",
        (LabelFiles("pascal_ctx_d2/annotations_ctx59/{split}", ".png", "train", 255, 8),), _PC,
        "NVlabs/ODISE and FC-CLIP prepare_pascal_ctx_sem_seg.py + openvocab_pascal_ctx59_sem_seg_* "
        "(ignore_label 255)"),
    "coco_lvis": Layout(
        "coco_lvis/images/{split}",
        (LabelFiles("coco_lvis/annotations_detectron2/{split}", ".png", "train", IGNORE, 16),
         LabelFiles("coco_lvis/lvis_mask/{split}", ".png", "plus1", 0, 16)), _COCO,
        "no detectron2 project registers COCO+LVIS: annotations_detectron2 follows the A-847 conventions "
        "(uint16 train ids, 65535 ignore; register with load_sem_seg(gt_ext='png')); lvis_mask/ is what "
        "the official RankSeg code reads (configs/_base_/datasets/coco_lvis.py: ESSNet's 16-bit masks, "
        "value = id, 0 unlabelled, reduce_zero_label)"),
}

# The tables the layout reader takes class names from (same as the release converters).
CLASS_TABLES = {
    "ade20k-full": ("ade20k_full/classes.json", "classes"),
    "ade20k-150": ("ade20k/classes.json", "classes"),
    "coco-stuff-164k": ("coco_stuff/classes.json", "classes"),
    "pascal-context-459": ("pascal_context/classes_459.json", "classes"),
    "pascal-context-59": ("pascal_context/classes.json", "classes"),
    "coco_lvis": ("coco_lvis/classes.json", "classes"),
}


def generic_layout(name: str, num_classes: int) -> Layout:
    """Any other dataset: <name>/images/{split} + <name>/annotations_detectron2/{split} PNGs,
    8-bit with 255 ignore while the ids fit below 255, else 16-bit with 65535."""
    small = num_classes < 255
    return Layout(f"{name}/images/{{split}}",
                  (LabelFiles(f"{name}/annotations_detectron2/{{split}}", ".png", "train",
                              255 if small else IGNORE, 8 if small else 16),), {},
                  "generic: detectron2's load_sem_seg(gt_ext='png', image_ext='jpg')")


def layout_for(name: str, num_classes: int, source: str | Path = "dataset name") -> Layout:
    """The layout of dataset `name`, read from `source` (named in the error): a name without a
    layout of its own becomes the generic layout's top folder, so it must be a plain name."""
    if name in LAYOUTS:
        return LAYOUTS[name]
    check_name(name, "dataset name", source, "a dataset name without a layout of its own becomes a folder "
               "name: fix the name in that file (or re-create it)")
    return generic_layout(name, num_classes)


def value_table(files: LabelFiles, num_classes: int, dataset: str) -> np.ndarray:
    """K + 1 entries: stored value of train id t (entry K: of ignore), for writing."""
    if files.kind == "train":
        vals = np.arange(num_classes)
    elif files.kind == "plus1":
        vals = np.arange(1, num_classes + 1)
    elif files.kind == "coco_stuff":
        classes = load_json("coco_stuff/classes.json")["classes"]
        vals = np.array([int(c["id"]) - 1 for c in sorted(classes, key=lambda c: c["train_id"])])
        if vals.size != num_classes:
            raise UserError(f"{dataset}: {num_classes} classes but the COCO-Stuff table has {vals.size}")
    else:  # pragma: no cover - the table above only uses these kinds
        raise ValueError(files.kind)
    out = np.append(vals, files.ignore).astype(np.int64)
    if out.max() >= (1 << files.bits) or files.ignore in vals:
        raise UserError(f"{dataset}: {num_classes} classes do not fit the {files.bits}-bit files of {files.folder}")
    return out


def read_table(files: LabelFiles, num_classes: int, bad: int) -> np.ndarray:
    """2^bits entries: stored value -> train id (ignore -> IGNORE, anything else -> `bad`).
    Only for kind "train" (what the reader reads)."""
    lut = np.full(1 << files.bits, bad, np.uint16)
    lut[:num_classes] = np.arange(num_classes)
    lut[files.ignore] = IGNORE
    return lut
