"""`rankseg prepare detectron2`: shards from a detectron2-style folder (images + train-id labels).

Reads what `rankseg export` writes, and what MaskFormer's / ODISE's / SAN's preparation
scripts write (e.g. `ADE20K_2021_17_01/images_detectron2` + `annotations_detectron2`): for each
split folder, every image `<stem>.jpg|.png` pairs with `<labels folder>/<stem><suffix>` of the
dataset's layout (`layouts.LAYOUTS`, the first label folder: train ids, its ignore value).
Class names come from `rankseg_export.json` when the folder is a rankseg export, else from the
table of the named dataset. Keys are the file stems.
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path

import numpy as np

from rankseg_core.convert.common import ConvertOptions, run_conversion
from rankseg_core.convert.detectron2_format import CLASS_TABLES, LabelFiles, Layout, layout_for, read_table
from rankseg_core.convert.png_datasets import make_encoded, remap
from rankseg_core.convert.source_io import (
    BAD,
    check_header_sizes,
    check_same_size,
    decode_jpeg,
    read_bytes,
    stored_image_bytes,
)
from rankseg_core.errors import SampleError, UserError
from rankseg_core.shards.codec import check_size
from rankseg_core.shards.write import DatasetHeader, EncodedSample
from rankseg_core.utils import jsonio
from rankseg_core.utils.resources import load_json

SUMMARY = "rankseg_export.json"
IMAGE_SUFFIXES = (".jpg", ".png")


def read_label_file(data: bytes, path: str, files: LabelFiles) -> np.ndarray:
    """H x W values of a single-channel label TIFF / PNG, read with PIL as detectron2's
    `load_image_into_numpy_array` does; an 8-bit file where 16 bits are expected is refused
    (ids >= 256 would have wrapped)."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            check_size(im.size[1], im.size[0], "label file")  # from the header, before decoding
            arr = np.asarray(im)
    except ValueError as exc:
        raise SampleError(f"{path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises several types for bad files
        raise SampleError(f"{path}: corrupt label file ({exc.__class__.__name__}: {exc})") from None
    if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer) or arr.dtype == bool:
        raise SampleError(f"{path}: expected a single-channel integer label image, got {arr.dtype} {arr.shape}")
    if files.bits == 16 and arr.dtype.itemsize == 1:
        raise SampleError(f"{path}: 8-bit label file where this dataset needs 16 bits (class ids >= 256 would "
                          "have wrapped): re-create it as a uint16 TIFF/PNG")
    if arr.min() < 0 or arr.max() >= (1 << files.bits):
        raise SampleError(f"{path}: values outside 0..{(1 << files.bits) - 1}")
    return arr.astype(np.uint16)


def make_layout_sample(key: str, *, files: dict[str, tuple[str, str]], label_files: LabelFiles, lut: np.ndarray,
                       num_classes: int) -> EncodedSample:
    img_path, lab_path = files[key]
    data, lab_bytes = read_bytes(img_path, "image"), read_bytes(lab_path, "label")
    check_header_sizes(data, lab_bytes, lab_path)  # before decoding either
    image = decode_jpeg(data, img_path)
    values = read_label_file(lab_bytes, lab_path, label_files)
    check_same_size(image.shape, values.shape, lab_path)
    label, classes, pixels = remap(values, lut, num_classes, lab_path)
    return make_encoded(key, stored_image_bytes(data, image), label, classes, pixels, values.shape)


def _class_names(root: Path, dataset: str | None) -> tuple[str, list[str], str]:
    """(dataset name, class names, source note) from a rankseg export summary or a built-in table."""
    summary = root / SUMMARY
    if summary.is_file():
        try:
            doc = jsonio.loads(summary.read_bytes())
            name, names = doc["dataset"], doc["class_names"]
            if not isinstance(name, str) or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise TypeError("dataset must be a string and class_names a list of strings")
        except (ValueError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise UserError(f"{summary} is damaged ({exc!r}): export again, or remove it and pass --dataset") from None
        if dataset and dataset != name:
            raise UserError(f"{summary}: this export holds {name}, not {dataset}: drop --dataset or fix it")
        return name, names, f"rankseg export ({doc.get('source', '?')})"
    if not dataset:
        raise UserError(f"{root}: no {SUMMARY} (not a rankseg export): pass --dataset "
                        f"({', '.join(CLASS_TABLES)})")
    if dataset not in CLASS_TABLES:
        raise UserError(f"--dataset {dataset!r}: use one of {', '.join(CLASS_TABLES)}")
    table, key = CLASS_TABLES[dataset]
    doc = load_json(table)
    return dataset, [c["name"] for c in sorted(doc[key], key=lambda c: c["train_id"])], doc["source"]


def find_pairs(root: Path, lay: Layout) -> tuple[dict[str, list[str]], dict[str, tuple[str, str]]]:
    """Keys per shard split and (image, label) paths, from the layout's folders under `root`."""
    images_parent = (root / lay.images.format(split="_")).parent
    if not images_parent.is_dir():
        raise UserError(f"{images_parent}: no such directory: {root} does not hold {lay.images.format(split='<split>')}")
    files: dict[str, tuple[str, str]] = {}
    splits: dict[str, list[str]] = {}
    lab = lay.labels[0]
    # Hidden folders (.ipynb_checkpoints, ...) are no splits; the others become split names.
    for fsplit in sorted(e.name for e in os.scandir(images_parent) if e.is_dir() and not e.name.startswith(".")):
        img_dir, lab_dir = root / lay.images.format(split=fsplit), root / lab.folder.format(split=fsplit)
        if not lab_dir.is_dir():
            raise UserError(f"{lab_dir}: no such directory: every image folder needs its label folder")
        keys = []
        with os.scandir(img_dir) as it:
            for e in sorted(it, key=lambda e: e.name):
                stem, suffix = os.path.splitext(e.name)
                if suffix.lower() not in IMAGE_SUFFIXES or not e.is_file():
                    continue
                if stem in files:
                    raise UserError(f"{img_dir}: image '{stem}' appears twice (or in two splits): remove one copy")
                files[stem] = (str(img_dir / e.name), str(lab_dir / f"{stem}{lab.suffix}"))
                keys.append(stem)
        if keys:
            splits[lay.shard_split(fsplit)] = keys
    if not splits:
        raise UserError(f"{images_parent}: no split folder with images ({', '.join(IMAGE_SUFFIXES)})")
    return splits, files


def prepare_detectron2_layout(root: str | Path, out: str | Path, dataset: str | None = None,
                              opts: ConvertOptions | None = None) -> dict | None:
    """Shards from a detectron2-style folder; `dataset` names the layout and class table when
    `root` is not a rankseg export."""
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    name, names, source = _class_names(root, dataset)
    k = len(names)
    lay = layout_for(name, k, root / SUMMARY)
    splits, files = find_pairs(root, lay)
    lut = read_table(lay.labels[0], k, BAD)
    header = DatasetHeader(name, names, source=source, options={"source": "detectron2 layout"})
    maker = functools.partial(make_layout_sample, files=files, label_files=lay.labels[0], lut=lut, num_classes=k)
    return run_conversion(out, header, splits, maker, opts or ConvertOptions())

