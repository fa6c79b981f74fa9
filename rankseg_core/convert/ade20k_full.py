"""ADE20K-Full (847 classes, ADE20K_2021_17_01 release) and ADE20K-X (its X most frequent classes).

Each image `ADE_*.jpg` has a `_seg.png` next to it whose class value is (R / 10) * 256 + G
(B encodes the instance and is ignored). The value is mapped through the 847-class table used
by MaskFormer / Mask2Former (`datasets/ade20k_full/classes.json`: `id` = class value,
`train_id` 0..846); 0 and values outside the table become ignore. The tree is walked directly:
the release's 780 MB `index_ade20k.pkl` is never unpickled.

Speed: the class value is never materialised. In OpenCV's BGR(A) byte order G and R are
adjacent, so a strided little-endian uint16 view of the decoded PNG *is* `(R << 8) | G`, and a
65,536-entry LUT folds "R / 10", the table and the ignore rule into one gather.

ADE20K-X (ProtoSeg): `top_classes=X` keeps the X classes present in the most training images
(ties: lower 847 train id first), counted on the labels as stored (after the resize protocol),
remapped to 0..X-1 by decreasing frequency; the other classes become ignore. That needs a
first pass over the training labels, run with the same workers and cached in the output
directory (`class_frequency.json`) so that a resumed or partial run does not redo it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np

from rankseg_core.convert.common import ConvertOptions, claim, run_conversion
from rankseg_core.convert.png_datasets import make_encoded, remap
from rankseg_core.convert.resize import resize_image, resize_nearest, short_side_size
from rankseg_core.convert.source_io import (
    BAD,
    JPEG_QUALITY,
    check_pixels,
    check_same_size,
    decode_jpeg,
    encode_jpeg_bgr,
    read_bytes,
    stored_image_bytes,
)
from rankseg_core.errors import SampleError, UserError
from rankseg_core.shards.codec import IGNORE, check_size
from rankseg_core.shards.write import DatasetHeader, EncodedSample
from rankseg_core.utils.fsio import atomic_write_json, open_regular
from rankseg_core.utils.parallel import Skipped, ordered_map
from rankseg_core.utils.progress import Progress
from rankseg_core.utils.resources import load_json

TABLE = "ade20k_full/classes.json"
LAYOUT = ("ADE20K_2021_17_01 with images/ADE/{training,validation}/<scene folders>/ADE_*.jpg, "
          "each with its ADE_*_seg.png next to it")
SPLITS = ("training", "validation")
FREQUENCY_CACHE = "class_frequency.json"
MAX_VALUE = 26 * 256  # (255 // 10) * 256 + 255 < MAX_VALUE: every class value a _seg.png can hold


def load_table() -> tuple[list[dict], str]:
    """The 847 classes (`name`, `id` = class value, `train_id`) and the table's source note."""
    table = load_json(TABLE)
    try:
        classes, source = table["classes"], table["source"]
        ids = [int(c["id"]) for c in classes]
        train = [int(c["train_id"]) for c in classes]
        names = [str(c["name"]) for c in classes]
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"datasets/{TABLE} is malformed ({exc!r}): restore it from the repository") from None
    if train != list(range(len(classes))) or not all(0 < i < MAX_VALUE for i in ids) \
            or len(set(ids)) != len(ids) or len(set(names)) != len(names):
        raise UserError(f"datasets/{TABLE}: train_ids must be 0..K-1 in order and ids/names unique: "
                        "restore it from the repository")
    return classes, source


def value_lut(classes: Sequence[dict], remap_train: np.ndarray | None = None) -> np.ndarray:
    """MAX_VALUE-entry uint16 array: class value -> train id (after `remap_train`), else IGNORE."""
    lut = np.full(MAX_VALUE, IGNORE, np.uint16)
    ids = np.array([c["id"] for c in classes], np.int64)
    train = np.array([c["train_id"] for c in classes], np.int64)
    lut[ids] = train if remap_train is None else remap_train[train]
    return lut


def seg_lut(values_to_train: np.ndarray) -> np.ndarray:
    """65536-entry LUT indexed by `(R << 8) | G` of a `_seg.png` pixel.

    R must be a multiple of 10 in the release; any other R (a re-compressed or foreign mask)
    maps to BAD so the sample is rejected instead of silently mislabelled.
    """
    r = np.arange(256)[:, None]
    g = np.arange(256)[None, :]
    lut = values_to_train[(r // 10) * 256 + g]
    return np.where(r % 10 == 0, lut, BAD).astype(np.uint16).ravel()


def seg_codes(seg: np.ndarray) -> np.ndarray:
    """H x W uint16 `(R << 8) | G` of an H x W x C (C = 3 or 4) BGR(A) uint8 image; a view, no copy."""
    seg = np.ascontiguousarray(seg)
    return np.ndarray(seg.shape[:2], dtype="<u2", buffer=seg, offset=1,
                      strides=(seg.strides[0], seg.shape[2]))


def _describe(code: int) -> str:
    return f"(R={code >> 8}, G={code & 255})"


def decode_seg(data: bytes, path: str) -> np.ndarray:
    """H x W x C uint8 BGR(A) pixels of a `_seg.png`."""
    import cv2

    check_pixels(data, path, "segmentation mask")
    seg = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if seg is None:
        raise SampleError(f"{path}: corrupt or unsupported segmentation PNG: re-extract it from the release")
    if seg.dtype != np.uint8 or seg.ndim != 3 or seg.shape[2] not in (3, 4):
        raise SampleError(f"{path}: expected an 8-bit RGB _seg.png (class = R/10*256 + G), got "
                          f"{seg.dtype} with shape {seg.shape}")
    return seg


def _seg_path(img_path: str) -> str:
    return img_path[:-len(".jpg")] + "_seg.png"


def _label(seg: np.ndarray, size: tuple[int, int], lut: np.ndarray, num_classes: int,
           seg_path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # Nearest resize selects source pixels, so resizing the encoded mask first is exact and
    # leaves ~(512/short)^2 as many pixels to remap.
    return remap(seg_codes(resize_nearest(seg, size)), lut, num_classes, seg_path, _describe)


def make_ade20k_full_sample(key: str, *, root: str, files: Mapping[str, str], lut: np.ndarray,
                            num_classes: int, max_short_side: int) -> EncodedSample:
    """Sample `key` (image stem); `files[key]` is its JPEG's path relative to `root`."""
    img_path = os.path.join(root, files[key])
    seg_path = _seg_path(img_path)
    data = read_bytes(img_path, "image")
    image = decode_jpeg(data, img_path)
    seg = decode_seg(read_bytes(seg_path, "segmentation mask"), seg_path)
    check_same_size(image.shape, seg.shape, seg_path)
    h, w = seg.shape[:2]
    size = short_side_size(h, w, max_short_side)
    if size == (h, w):
        stored = stored_image_bytes(data, image)
    else:
        stored = encode_jpeg_bgr(resize_image(image, size), JPEG_QUALITY)
    label, classes, pixels = _label(seg, size, lut, num_classes, seg_path)
    return make_encoded(key, stored, label, classes, pixels, (h, w))


def present_classes(key: str, *, root: str, files: Mapping[str, str], lut: np.ndarray,
                    num_classes: int, max_short_side: int) -> np.ndarray:
    """Sorted train ids present in `key`'s label as it would be stored (frequency pass).

    Reads only the image header (its size), not its pixels: this pass is about labels.
    """
    from PIL import Image

    img_path = os.path.join(root, files[key])
    seg_path = _seg_path(img_path)
    try:
        with warnings.catch_warnings():  # the pixel limit below is rankseg's, not PIL's
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            # A FIFO or device in place of the image is refused before PIL would block on it.
            with open_regular(img_path, "image", SampleError) as f, Image.open(f) as im:
                w, h = im.size
    except FileNotFoundError:
        raise SampleError(f"{img_path}: image is missing") from None
    except Image.DecompressionBombError as exc:
        raise SampleError(f"{img_path}: image over the pixel limit ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises several types for bad files
        raise SampleError(f"{img_path}: corrupt or empty image ({exc}): re-extract it from the release") from None
    try:
        check_size(h, w)
    except ValueError as exc:
        raise SampleError(f"{img_path}: {exc}") from None
    seg = decode_seg(read_bytes(seg_path, "segmentation mask"), seg_path)
    check_same_size((h, w), seg.shape, seg_path)
    return _label(seg, short_side_size(h, w, max_short_side), lut, num_classes, seg_path)[1]


# --- finding the samples ------------------------------------------------------------------

def split_of(file_name: str) -> str:
    """`validation` when the name's second field is `val` (ADE_val_...), else `training`."""
    parts = file_name.split("_")
    return "validation" if len(parts) > 1 and parts[1] == "val" else "training"


def find_images(root: str | Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Keys per split and each key's JPEG path relative to `root`, by walking `images/ADE/`."""
    root = Path(root)
    base = root / "images" / "ADE"
    if not base.is_dir():
        raise UserError(f"{base}: no such directory: --root must be the release folder ({LAYOUT})")
    splits: dict[str, list[str]] = {s: [] for s in SPLITS}
    files: dict[str, str] = {}
    for top in SPLITS:
        for dirpath, dirnames, filenames in os.walk(base / top):
            # Per-image folders (ADE_train_xxx/) only hold instance masks: ~700k files not to list.
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("ADE_"))
            rel = os.path.relpath(dirpath, root)
            for name in filenames:
                if name.startswith("ADE_") and name.endswith(".jpg"):
                    key = name[:-4]
                    if key in files:
                        raise UserError(f"{root}: image {name} exists twice ({files[key]} and "
                                        f"{rel}/{name}): remove one copy")
                    files[key] = f"{rel}/{name}"
                    splits[split_of(name)].append(key)
    if not files:
        raise UserError(f"{base}: no ADE_*.jpg images found ({LAYOUT})")
    return splits, files


# --- ADE20K-X: class frequency over the training split ----------------------------------

def class_frequency(fn: Callable[[str], np.ndarray], keys: Sequence[str], num_classes: int, *,
                    workers: int = 0, on_error: str = "fail") -> tuple[np.ndarray, int]:
    """(K int64 number of images containing each class, number of unreadable samples skipped).

    `fn(key)` returns the sorted present train ids of one sample (picklable, run in `workers`
    spawned processes). Samples raising SampleError stop the pass under `on_error="fail"`
    and are left out under "skip" (the conversion skips them too).
    """
    counts = np.zeros(num_classes, np.int64)
    skipped = 0
    with Progress(len(keys), "ADE20K-Full class frequency (training)", unit="img") as bar:
        with ordered_map(fn, keys, workers) as results:
            for present in results:
                if isinstance(present, Skipped):
                    if on_error == "fail":
                        raise UserError(f"{present.reason} (fix or remove it, or re-run with --on-error skip)")
                    skipped += 1
                else:
                    counts[present] += 1
                bar.advance(1)
    return counts, skipped


def top_classes_by_frequency(counts: np.ndarray, x: int) -> np.ndarray:
    """Train ids of the `x` most frequent classes, most frequent first (ties: lower id first)."""
    order = np.lexsort((np.arange(counts.size), -counts))
    return order[:x]


def _cached_frequency(out: Path, fn: Callable[[str], np.ndarray], keys: Sequence[str],
                      num_classes: int, opts: ConvertOptions, max_short_side: int) -> np.ndarray:
    ident = {"split": "training", "max_short_side": max_short_side, "num_images": len(keys),
             "keys_sha256": hashlib.sha256("\n".join(keys).encode()).hexdigest(),
             "table": TABLE, "num_classes": num_classes}
    path = out / FREQUENCY_CACHE
    if path.exists():
        try:
            cached = json.loads(path.read_text())
            if all(cached.get(k) == v for k, v in ident.items()) and \
                    len(cached["class_images"]) == num_classes:
                return np.asarray(cached["class_images"], np.int64)
        except (json.JSONDecodeError, KeyError, TypeError):
            pass  # damaged cache: recompute it
    counts, skipped = class_frequency(fn, keys, num_classes, workers=opts.workers, on_error=opts.on_error)
    atomic_write_json(path, dict(ident, skipped=skipped, class_images=counts.tolist()))
    return counts


# --- the converter ------------------------------------------------------------------------

def prepare_ade20k_full(root: str | Path, out: str | Path, *, split: str = "all",
                        max_short_side: int = 512, top_classes: int | None = None,
                        opts: ConvertOptions | None = None) -> dict | None:
    """Convert ADE20K-Full (or ADE20K-X with `top_classes=X`) into shards at `out`.

    `split`: training | validation | all. `max_short_side`: MaskFormer's protocol (512), 0 keeps
    the full resolution and the original JPEG bytes. Returns the assembled `dataset.json`
    (None when only one `--shard-index` part was converted).
    """
    opts = opts or ConvertOptions()
    opts.validate()
    if split not in (*SPLITS, "all"):
        raise UserError(f"--split must be training, validation or all, not {split!r}")
    if max_short_side < 0:
        raise UserError("--max-short-side must be >= 0 (0 = keep the full resolution)")
    classes, source = load_table()
    k_full = len(classes)
    if top_classes is not None and not 1 <= top_classes <= k_full:
        raise UserError(f"--top-classes must be in 1..{k_full}, not {top_classes}")
    all_splits, files = find_images(root)
    wanted = list(SPLITS) if split == "all" else [split]
    for s in wanted:
        if not all_splits[s]:
            present = [o for o in SPLITS if all_splits[o]]
            hint = f"; to convert the {present[0]} images alone pass --split {present[0]}" if split == "all" and present \
                else ""
            raise UserError(f"{Path(root) / 'images' / 'ADE' / s}: no {s} images found ({LAYOUT}){hint}")
    splits = {s: sorted(all_splits[s]) for s in wanted}
    out = Path(out)
    options = {"split": split, "max_short_side": max_short_side, "top_classes": top_classes,
               "jpeg_quality": JPEG_QUALITY}
    make = functools.partial(make_ade20k_full_sample, root=str(root), files=files,
                             max_short_side=max_short_side)

    if top_classes is None:
        header = DatasetHeader("ade20k-full", [c["name"] for c in classes], options, source)
        maker = functools.partial(make, lut=seg_lut(value_lut(classes)), num_classes=k_full)
        return run_conversion(out, header, splits, maker, opts)

    train_keys = sorted(all_splits["training"])[:opts.limit] if opts.limit else sorted(all_splits["training"])
    if not train_keys:
        raise UserError(f"--top-classes needs the training split to count class frequencies, "
                        f"but {Path(root) / 'images' / 'ADE' / 'training'} has no images")
    header = DatasetHeader(f"ade20k-full-top{top_classes}", [""] * top_classes, options,
                           f"{source}; top {top_classes} classes by training-image frequency")
    claim(out, header, opts)  # before writing the frequency cache into it
    presence = functools.partial(present_classes, root=str(root), files=files,
                                 lut=seg_lut(value_lut(classes)), num_classes=k_full,
                                 max_short_side=max_short_side)
    counts = _cached_frequency(out, presence, train_keys, k_full, opts, max_short_side)
    top = top_classes_by_frequency(counts, top_classes)
    remap_train = np.full(k_full, IGNORE, np.int64)
    remap_train[top] = np.arange(top_classes)
    header.class_names = [classes[t]["name"] for t in top]
    maker = functools.partial(make, lut=seg_lut(value_lut(classes, remap_train)), num_classes=top_classes)
    return run_conversion(out, header, splits, maker, opts)
