"""PASCAL-Context from the official release: 459 classes (PC-459), or the 59 / 60 settings.

The release (`trainval.tar.gz`) holds one MATLAB file per VOC2010 train/val image,
`trainval/<image id>.mat`, whose variable `LabelMap` is an H x W uint16 array of label ids
1..459 (0 = unlabelled), and `labels.txt` ("<id>: <name>" per line). The files are read with
`scipy.io.loadmat`: no compiled Detail API and no `trainval_merged.json` needed.

- 459 classes: 0 -> ignore, id -> train id id - 1 (NVlabs/ODISE's and Bytedance FC-CLIP's
  `prepare_pascal_ctx_full_sem_seg.py`; CAT-Seg's `prepare_pascal_context_459.py` subtracts 1
  from the uint16 map, which wraps 0 to 65535 too).
- 59 classes: the j-th of the 59 sorted ids (`context59_ids`, the `_mapping` of every 59-class
  converter) -> train id j; 0 and the other 400 classes -> ignore. The same labels as
  mmsegmentation's `SegmentationClassContext` masks with background ignored (tested).
- 60 classes: as 59 plus background (0 and the other 400 classes) = class 0.

Splits come from list files (default: VOC2010's `ImageSets/Main/{train,val}.txt`, 4,998 /
5,105 images, the split of the PASCAL-Context paper). The Detail-API pipelines (mmseg,
ODISE, FC-CLIP, CAT-Seg's `pascalcontext_val.txt`) use 4,996 / 5,104: pass their lists with
--train-list / --val-list to match them (docs/benchmarks/pc459.md).
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from rankseg_core.convert.common import ConvertOptions, run_conversion
from rankseg_core.convert.png_datasets import _class_table, make_encoded, remap
from rankseg_core.convert.source_io import (
    BAD,
    check_same_size,
    decode_jpeg,
    label_ids,
    read_bytes,
    stored_image_bytes,
)
from rankseg_core.errors import SampleError, UserError
from rankseg_core.shards.codec import IGNORE, MAX_FILE_BYTES
from rankseg_core.shards.write import DatasetHeader, EncodedSample
from rankseg_core.utils.fsio import read_regular
from rankseg_core.utils.resources import load_json

TABLE = "pascal_context/classes_459.json"
NUM_LABELS = 459
LAYOUT = ("VOCdevkit/VOC2010 with JPEGImages/*.jpg, ImageSets/Main/{train,val}.txt and the extracted "
          "trainval.tar.gz (trainval/*.mat, labels.txt)")
SPLITS = ("train", "val")


def load_table() -> tuple[list[str], list[int], str]:
    """(459 names in label order, the 59 sorted label ids of the 59-class setting, source note)."""
    doc = load_json(TABLE)
    try:
        classes, ids59, source = doc["classes"], [int(i) for i in doc["context59_ids"]], doc["source"]
        names = [str(c["name"]) for c in classes]
        ok = [int(c["id"]) for c in classes] == list(range(1, NUM_LABELS + 1))
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"datasets/{TABLE} is malformed ({exc!r}): restore it from the repository") from None
    if not ok or len(ids59) != 59 or sorted(set(ids59)) != ids59 or not 1 <= ids59[0] <= ids59[-1] <= NUM_LABELS:
        raise UserError(f"datasets/{TABLE}: ids must be 1..459 in order and context59_ids 59 sorted label ids: "
                        "restore it from the repository")
    return names, ids59, source


def label_lut(num_classes: int, ids59: list[int]) -> np.ndarray:
    """65,536-entry uint16 LUT: LabelMap value -> train id / IGNORE; values above 459 -> BAD."""
    lut = np.full(65536, BAD, np.uint16)
    ids = np.asarray(ids59)
    if num_classes == 459:
        lut[0] = IGNORE
        lut[1:NUM_LABELS + 1] = np.arange(NUM_LABELS)
    elif num_classes == 59:
        lut[:NUM_LABELS + 1] = IGNORE
        lut[ids] = np.arange(59)
    elif num_classes == 60:
        lut[:NUM_LABELS + 1] = 0
        lut[ids] = np.arange(1, 60)
    else:
        raise UserError(f"--classes must be 459, 59 or 60, not {num_classes}")
    return lut


def read_label_map(path: str, listed_in: str) -> np.ndarray:
    """The H x W uint16 `LabelMap` of one release `.mat`; SampleError naming the file otherwise."""
    import scipy.io

    try:
        data = read_regular(path, "label map", MAX_FILE_BYTES, SampleError)
    except FileNotFoundError:
        raise SampleError(f"{path}: label map is missing ({listed_in} lists it; the release has one .mat per "
                          "VOC2010 train/val image: re-extract trainval.tar.gz, or fix the list)") from None
    except OSError as exc:
        raise SampleError(f"{path}: cannot read label map ({exc.strerror or exc})") from None
    try:
        mat = scipy.io.loadmat(io.BytesIO(data), variable_names=["LabelMap"])
    except NotImplementedError:  # MATLAB v7.3 (HDF5): never used by the release
        raise SampleError(f"{path}: MATLAB v7.3 file; the PASCAL-Context release uses v5 .mat files: "
                          "re-extract trainval.tar.gz") from None
    except Exception as exc:  # noqa: BLE001 - scipy raises several types for damaged files
        raise SampleError(f"{path}: not a readable .mat file ({exc.__class__.__name__}: {exc}): re-extract "
                          "trainval.tar.gz") from None
    return label_ids(mat.get("LabelMap"), path, "LabelMap", "PASCAL-Context label")


def make_mat_sample(key: str, *, root: str, mat_dir: str, listed_in: dict[str, str], lut: np.ndarray,
                    num_classes: int) -> EncodedSample:
    """Sample `key` (VOC2010 image id): JPEGImages/<key>.jpg and <mat_dir>/<key>.mat."""
    img_path = f"{root}/JPEGImages/{key}.jpg"
    data = read_bytes(img_path, "image")
    image = decode_jpeg(data, img_path)
    mat_path = f"{mat_dir}/{key}.mat"
    values = read_label_map(mat_path, listed_in[key])
    check_same_size(image.shape, values.shape, mat_path)
    label, classes, pixels = remap(values, lut, num_classes, mat_path)
    return make_encoded(key, stored_image_bytes(data, image), label, classes, pixels, values.shape)


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def check_labels_txt(path: Path, names: list[str]) -> None:
    """The release's labels.txt must list our 459 names (compared without case, spaces or
    punctuation) under ids 1..459, or the label ids would mean other classes."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    found: dict[int, str] = {}
    for line in text.splitlines():
        m = re.match(r"\s*(\d+)\s*:\s*(.*?)\s*$", line)
        if m:
            found[int(m.group(1))] = m.group(2)
    if sorted(found) != list(range(1, NUM_LABELS + 1)):
        raise UserError(f"{path}: expected 459 lines '<id>: <name>' with ids 1..459 (found {len(found)}): "
                        "is this the PASCAL-Context trainval release's labels.txt?")
    for i, name in enumerate(names, 1):
        if _norm(found[i]) != _norm(name):
            raise UserError(f"{path}: id {i} is '{found[i]}', rankseg's table says '{name}': this labels.txt "
                            "does not belong to the PASCAL-Context release rankseg knows")


def read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"{path}: missing split list ({LAYOUT}; or pass --train-list / --val-list)")
    keys = [x.strip() for x in path.read_text(errors="replace").split() if x.strip()]
    if not keys:
        raise UserError(f"{path}: the list is empty")
    return keys


def prepare_pascal_context_mat(root: str | Path, out: str | Path, num_classes: int = 459, *,
                               mat_dir: str | Path | None = None, lists: Mapping[str, str | Path] | None = None,
                               opts: ConvertOptions | None = None) -> dict | None:
    """PASCAL-Context-459 / 59 / 60 shards from the release `.mat` label maps.

    `root`: VOCdevkit/VOC2010 (JPEGImages, ImageSets/Main); `mat_dir`: the extracted
    `trainval/` (default root/trainval); `lists`: split -> list file (default
    ImageSets/Main/<split>.txt). labels.txt, when found next to `mat_dir` or in `root`, is
    checked against rankseg's table.
    """
    root = Path(root)
    names, ids59, source = load_table()
    lut = label_lut(num_classes, ids59)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory: pass --root ({LAYOUT})")
    mat_dir = Path(mat_dir) if mat_dir else root / "trainval"
    for d in (root / "JPEGImages", mat_dir):
        if not d.is_dir():
            raise UserError(f"{d}: no such directory: {root} does not have the expected layout ({LAYOUT})")
    for cand in (mat_dir.parent / "labels.txt", root / "labels.txt"):
        if cand.is_file():
            check_labels_txt(cand, names)
            break
    list_paths = {s: Path(p) for s, p in (lists or {}).items()}
    splits: dict[str, list[str]] = {}
    listed_in: dict[str, str] = {}
    for split in SPLITS:
        lst = list_paths.get(split, root / "ImageSets" / "Main" / f"{split}.txt")
        keys = read_list(lst)
        for k in keys:
            if k in listed_in:
                raise UserError(f"{lst}: image '{k}' is listed twice (or in both splits)")
            listed_in[k] = str(lst)
        splits[split] = keys
    if num_classes == 459:
        class_names = names
    else:
        classes, source59 = _class_table("pascal_context/classes.json", "classes" if num_classes == 59 else "classes_60")
        class_names = [c["name"] for c in classes]
        source = f"{source59}; label ids from {TABLE}"
    header = DatasetHeader(f"pascal-context-{num_classes}", class_names, source=source,
                           options={"classes": num_classes, "labels": "trainval .mat",
                                    "lists": {s: str(list_paths.get(s, f"ImageSets/Main/{s}.txt")) for s in SPLITS}})
    maker = functools.partial(make_mat_sample, root=str(root), mat_dir=str(mat_dir), listed_in=listed_in,
                              lut=lut, num_classes=num_classes)
    return run_conversion(out, header, splits, maker, opts or ConvertOptions())
