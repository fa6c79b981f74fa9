"""Datasets released as "image + single-channel PNG mask": ADE20K-150, COCO-Stuff-164k, PASCAL-Context.

All three reduce to: find (image, mask) pairs per split, map every mask value through a lookup
table (LUT) to a train id or ignore, count, store. The pieces that ADE20K-Full shares (reading
bytes, checking the JPEG, remapping through a LUT, building the sample) live here too.

A LUT is a uint16 array indexed by the raw mask value: a train id, `IGNORE`, or `BAD` for a
value the release never uses (the sample is then rejected with the offending values named).
Remapping is one NumPy gather and counting one `bincount`: no per-class Python loop.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from rankseg_core.convert.common import ConvertOptions, run_conversion
from rankseg_core.convert.source_io import (
    BAD,
    check_header_sizes,
    check_same_size,
    decode_jpeg,
    decode_mask,
    read_bytes,
    read_list,
    stored_image_bytes,
)
from rankseg_core.errors import SampleError, UserError
from rankseg_core.shards.codec import IGNORE, class_counts, encode_label
from rankseg_core.shards.write import DatasetHeader, EncodedSample
from rankseg_core.utils.resources import load_json


def remap(values: np.ndarray, lut: np.ndarray, num_classes: int, path: str | Path,
          describe: Callable[[int], str] | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map H x W raw mask values through `lut`; return (H x W uint16 label, classes, pixels).

    `classes` (uint16) are the sorted present train ids, `pixels` (int64) their counts. A value
    whose LUT entry is `BAD` raises SampleError naming `path` and the values (`describe(v)`
    renders one raw value, e.g. ADE's (R, G) pair).
    """
    if values.dtype == np.uint16 and lut.size < 65536:
        lut = np.concatenate([lut, np.full(65536 - lut.size, BAD, np.uint16)])
    label = lut[values]
    try:
        classes, pixels = class_counts(label, num_classes)
    except ValueError:
        bad = np.unique(values[label == BAD])
        shown = ", ".join(describe(int(v)) if describe else str(int(v)) for v in bad[:8])
        raise SampleError(f"{path}: label value(s) {shown}{' ...' if bad.size > 8 else ''} are not "
                          "used by this dataset's release: wrong dataset or a damaged mask") from None
    return label, classes, pixels


def make_encoded(key: str, image: bytes, label: np.ndarray, classes: np.ndarray, pixels: np.ndarray,
                 orig_size: tuple[int, int]) -> EncodedSample:
    """`EncodedSample` from an already counted label (avoids counting the label twice)."""
    h, w = label.shape
    return EncodedSample(key, image, encode_label(label), h, w, orig_size[0], orig_size[1],
                         classes, pixels)


# --- the generic "image + PNG mask" dataset -----------------------------------------------

def make_png_sample(key: str, *, root: str, files: Mapping[str, tuple[str, str]], lut: np.ndarray,
                    num_classes: int) -> EncodedSample:
    """Sample `key`: `files[key]` = (image, mask) paths relative to `root`; labels via `lut`."""
    img_rel, mask_rel = files[key]
    img_path, mask_path = os.path.join(root, img_rel), os.path.join(root, mask_rel)
    data, mask_bytes = read_bytes(img_path, "image"), read_bytes(mask_path, "mask")
    check_header_sizes(data, mask_bytes, mask_path)  # before decoding either
    image = decode_jpeg(data, img_path)
    mask = decode_mask(mask_bytes, mask_path)
    check_same_size(image.shape, mask.shape, mask_path)
    label, classes, pixels = remap(mask, lut, num_classes, mask_path)
    return make_encoded(key, stored_image_bytes(data, image), label, classes, pixels, mask.shape)


def lut_from_pairs(pairs: Mapping[int, int], ignore_values: Sequence[int] = (), size: int = 256) -> np.ndarray:
    """A LUT where `pairs` maps value -> train id, `ignore_values` -> IGNORE, everything else BAD."""
    lut = np.full(size, BAD, np.uint16)
    lut[list(ignore_values)] = IGNORE
    for value, train_id in pairs.items():
        lut[value] = train_id
    return lut


def _list_dir(path: Path, suffix: str) -> dict[str, str]:
    """stem -> file name for the files of `path` ending in `suffix` (scandir: fast on 100k files)."""
    with os.scandir(path) as it:
        return {e.name[:-len(suffix)]: e.name for e in it if e.name.endswith(suffix) and e.is_file()}


def pair_by_folder(root: Path, layout: Mapping[str, tuple[str, str]], mask_suffix: str = ".png",
                   image_suffix: str = ".jpg", expected: str = "") -> tuple[dict[str, list[str]], dict[str, tuple[str, str]]]:
    """Keys per split and (image, mask) relative paths from `split -> (image dir, mask dir)`.

    Every image of an image folder is a sample; a missing mask is that sample's problem
    (SampleError at conversion), a missing or empty image folder the whole run's (UserError).
    """
    if not root.is_dir():
        raise UserError(f"{root}: no such directory: pass the dataset root with --root ({expected})")
    splits: dict[str, list[str]] = {}
    files: dict[str, tuple[str, str]] = {}
    for split, (img_dir, mask_dir) in layout.items():
        for d in (img_dir, mask_dir):
            if not (root / d).is_dir():
                raise UserError(f"{root / d}: no such directory: {root} does not have the expected "
                                f"layout ({expected})")
        images = _list_dir(root / img_dir, image_suffix)
        if not images:
            raise UserError(f"{root / img_dir}: no *{image_suffix} images found ({expected})")
        for stem, name in images.items():
            if stem in files:
                raise UserError(f"{root}: image '{stem}' appears in two splits: the layout is broken")
            files[stem] = (f"{img_dir}/{name}", f"{mask_dir}/{stem}{mask_suffix}")
        splits[split] = sorted(images)
    return splits, files


def _convert(out: str | Path, header: DatasetHeader, splits: dict[str, list[str]],
             files: dict[str, tuple[str, str]], root: Path, lut: np.ndarray,
             opts: ConvertOptions | None) -> dict | None:
    maker = functools.partial(make_png_sample, root=str(root), files=files, lut=lut,
                              num_classes=header.num_classes)
    return run_conversion(out, header, splits, maker, opts or ConvertOptions())


def _class_table(name: str, key: str = "classes") -> tuple[list[dict], str]:
    table = load_json(name)
    try:
        classes, source = table[key], table["source"]
        _ = [(c["name"], int(c["id"]), int(c["train_id"])) for c in classes]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"datasets/{name} is malformed ({exc!r}): restore it from the repository") from None
    return classes, source


# --- ADE20K-150 (ADEChallengeData2016) ----------------------------------------------------

ADE20K_LAYOUT = "ADEChallengeData2016/{images,annotations}/{training,validation}/ with *.jpg and *.png"


def prepare_ade20k(root: str | Path, out: str | Path, opts: ConvertOptions | None = None) -> dict | None:
    """ADE20K-150 (SceneParsing): PNG value 0 = unlabelled -> ignore, 1..150 -> train id value-1."""
    root = Path(root)
    classes, source = _class_table("ade20k/classes.json")
    splits, files = pair_by_folder(root, {s: (f"images/{s}", f"annotations/{s}")
                                          for s in ("training", "validation")}, expected=ADE20K_LAYOUT)
    lut = lut_from_pairs({c["id"]: c["train_id"] for c in classes}, ignore_values=[0])
    header = DatasetHeader("ade20k-150", [c["name"] for c in classes], source=source)
    return _convert(out, header, splits, files, root, lut, opts)


# --- COCO-Stuff-164k ----------------------------------------------------------------------

COCO_STUFF_LAYOUT = ("COCO root with train2017/, val2017/ (*.jpg) and "
                     "stuffthingmaps_trainval2017/{train2017,val2017}/ (*.png)")


def coco_stuff_lut(classes: list[dict]) -> np.ndarray:
    """PNG value (COCO-Stuff id - 1) -> train id; 255 unlabelled -> ignore; unused ids -> BAD."""
    return lut_from_pairs({c["id"] - 1: c["train_id"] for c in classes}, ignore_values=[255])


def prepare_coco_stuff(root: str | Path, out: str | Path, opts: ConvertOptions | None = None) -> dict | None:
    """COCO-Stuff-164k, 171 classes (182 COCO-Stuff ids minus the 11 unused thing ids)."""
    root = Path(root)
    classes, source = _class_table("coco_stuff/classes.json")
    layout = {"train": ("train2017", "stuffthingmaps_trainval2017/train2017"),
              "val": ("val2017", "stuffthingmaps_trainval2017/val2017")}
    splits, files = pair_by_folder(root, layout, expected=COCO_STUFF_LAYOUT)
    header = DatasetHeader("coco-stuff-164k", [c["name"] for c in classes], source=source)
    return _convert(out, header, splits, files, root, coco_stuff_lut(classes), opts)


# --- PASCAL-Context -----------------------------------------------------------------------

PASCAL_CONTEXT_LAYOUT = ("VOCdevkit/VOC2010 with JPEGImages/*.jpg, SegmentationClassContext/*.png and "
                         "ImageSets/SegmentationContext/{train,val}.txt (mmsegmentation's converter)")


def pascal_context_lut(num_classes: int) -> np.ndarray:
    """59: 0 (background) -> ignore, v -> v-1. 60: v -> v. Both: 255 (void) -> ignore."""
    if num_classes == 59:
        return lut_from_pairs({v: v - 1 for v in range(1, 60)}, ignore_values=[0, 255])
    if num_classes == 60:
        return lut_from_pairs({v: v for v in range(60)}, ignore_values=[255])
    raise UserError(f"--classes must be 59 or 60, not {num_classes}")


def prepare_pascal_context(root: str | Path, out: str | Path, num_classes: int = 59,
                           opts: ConvertOptions | None = None) -> dict | None:
    """PASCAL-Context (VOC2010 images, mmsegmentation's SegmentationClassContext masks)."""
    root = Path(root)
    lut = pascal_context_lut(num_classes)
    classes, source = _class_table("pascal_context/classes.json",
                                   "classes" if num_classes == 59 else "classes_60")
    if not root.is_dir():
        raise UserError(f"{root}: no such directory: pass --root ({PASCAL_CONTEXT_LAYOUT})")
    for d in ("JPEGImages", "SegmentationClassContext"):
        if not (root / d).is_dir():
            raise UserError(f"{root / d}: no such directory: {root} does not have the expected "
                            f"layout ({PASCAL_CONTEXT_LAYOUT})")
    splits, files = {}, {}
    for split in ("train", "val"):
        lst = root / "ImageSets" / "SegmentationContext" / f"{split}.txt"
        if not lst.is_file():
            raise UserError(f"{lst}: missing list file: {root} does not have the expected layout "
                            f"({PASCAL_CONTEXT_LAYOUT})")
        keys = [x.strip() for x in read_list(lst).split() if x.strip()]
        if not keys:
            raise UserError(f"{lst}: the list is empty")
        for k in keys:
            if k in files:
                raise UserError(f"{lst}: image '{k}' is listed twice (or in both splits)")
            files[k] = (f"JPEGImages/{k}.jpg", f"SegmentationClassContext/{k}.png")
        splits[split] = keys
    header = DatasetHeader(f"pascal-context-{num_classes}", [c["name"] for c in classes], source=source,
                           options={"classes": num_classes})
    return _convert(out, header, splits, files, root, lut, opts)
