"""`rankseg export`: a shard directory -> the files detectron2-based projects read.

For every sample: the stored image bytes, unchanged (no second JPEG generation), and one file
per label folder of the dataset's layout (`layouts.LAYOUTS`), written with PIL as the
reference preparation scripts write them (uint16 TIFF / 8- or 16-bit PNG).

`images="maskformer"` (ADE20K-Full shards kept at full resolution, `--max-short-side 0`) runs
MaskFormer's `prepare_ade20k_full_sem_seg.py` image path instead: PIL decode, OpenCV bilinear
resize to short side 512, PIL JPEG at its default quality 75, and the nearest resize of the
label, so that both files are byte for byte what that script writes.

Safety: every file is written atomically (temp, fsync, rename), so a file with its final name
is complete and a re-run skips it (resume). `OUT/.rankseg-export.json` claims the directory
and records the source; a non-empty directory without it, or made from other shards, is
refused; `OUT` may not be inside the shard directory or hold it, and two exports into one
`OUT` at once are refused (`utils.lock`). Names from the shards become paths only after
`shards.check.check_name`: the dataset name (a generic layout's top folder), split names
(checked with `dataset.json`) and every sample's file name. `OUT/rankseg_export.json` is
written last and says what the export holds.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rankseg_core.convert.detectron2_format import LabelFiles, Layout, file_stem, layout_for, value_table
from rankseg_core.errors import UserError
from rankseg_core.shards.check import check_name
from rankseg_core.shards.codec import decode_label
from rankseg_core.shards.read import ShardDataset, ShardIndex
from rankseg_core.utils import jsonio
from rankseg_core.utils.fsio import atomic_write_bytes, atomic_write_json
from rankseg_core.utils.lock import DirLock, acquire, is_lock_file
from rankseg_core.utils.progress import Progress

MARKER = ".rankseg-export.json"
SUMMARY = "rankseg_export.json"
LAYOUT_NAMES = ("detectron2",)
IMAGE_MODES = ("copy", "maskformer")
MASKFORMER_SHORT_SIDE = 512


@dataclass
class ExportSummary:
    out: Path
    layout: Layout
    written: int  # files written by this run
    skipped: int  # files already complete (resume)
    samples: dict[str, int]  # shard split -> samples


def image_suffix(data: bytes) -> str:
    if data[:3] == b"\xff\xd8\xff":
        return ".jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return ".png"
    raise UserError("a stored image is neither JPEG nor PNG: run `rankseg verify` on the shards")


def encode_label_file(values: np.ndarray, files: LabelFiles) -> bytes:
    """PIL-encoded label file (TIFF or PNG) of H x W stored values."""
    from PIL import Image

    arr = values.astype(np.uint16 if files.bits == 16 else np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="TIFF" if files.suffix == ".tif" else "PNG")
    return buf.getvalue()


def maskformer_image(img_b: bytes, label: np.ndarray) -> tuple[bytes, np.ndarray]:
    """MaskFormer's ADE20K-Full treatment of one full-resolution sample: (JPEG bytes, label)."""
    import cv2
    from PIL import Image

    from rankseg_core.convert.resize import resize_nearest, short_side_size

    try:
        with Image.open(io.BytesIO(img_b)) as im:
            img = np.asarray(im)
    except Exception as exc:  # noqa: BLE001 - PIL raises several types for bad files
        raise UserError(f"a stored image does not decode ({exc}): run `rankseg verify` on the shards") from None
    h, w = img.shape[:2]
    size = short_side_size(h, w, MASKFORMER_SHORT_SIDE)
    if size != (h, w):
        img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
        label = resize_nearest(label, size)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG")
    return buf.getvalue(), label


def _has_content(out: Path) -> bool:
    return out.is_dir() and any(not is_lock_file(e.name) for e in out.iterdir())


def claim_export_dir(out: Path, shards: Path, dataset: str, layout: str, images: str = "copy") -> DirLock:
    """Create or reuse `out` and lock it for this export (release the returned lock when done);
    refuse a foreign non-empty directory, another source, a place where writing could touch
    the shards, or a directory another export is writing."""
    src, dst = shards.resolve(), out.resolve()
    if dst.is_relative_to(src) or src.is_relative_to(dst):
        raise UserError(f"{out}: --out must be outside the shard directory {shards} and not contain it")
    want = {"format": "rankseg-export", "source": str(src), "dataset": dataset, "layout": layout, "images": images}
    marker = out / MARKER
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file, not a directory: choose another --out")
    foreign = f"{out} is not empty and was not made by `rankseg export`: choose an empty or new --out"
    # Checked before the lock file is created: nothing is written into a foreign directory.
    if _has_content(out) and not marker.is_file():
        raise UserError(foreign)
    out.mkdir(parents=True, exist_ok=True)
    lock = acquire(out, "export")
    try:
        # Again under the lock: another export may have claimed `out` since the check above.
        if not _has_content(out):
            atomic_write_json(marker, want)
            return lock
        if not marker.is_file():
            raise UserError(foreign)
        try:
            have = jsonio.loads(marker.read_bytes())
        except (ValueError, UnicodeDecodeError):
            have = None
        if not isinstance(have, dict):
            raise UserError(f"{marker} is damaged: choose a new --out")
        if have != want:
            raise UserError(f"{out} holds an export of {have.get('source')} ({have.get('dataset')}, "
                            f"{have.get('layout')}): use the same shards and layout to resume, or another --out")
    except BaseException:
        lock.release()
        raise
    return lock


def export_shards(shards: str | Path, out: str | Path, layout: str = "detectron2", splits: list[str] | None = None,
                  images: str = "copy", progress: bool = True) -> ExportSummary:
    """Write `shards` (all splits, or `splits`) as the dataset's detectron2 layout under `out`.
    `images`: "copy" (the stored bytes) or "maskformer" (see the module docstring)."""
    if layout not in LAYOUT_NAMES:
        raise UserError(f"--layout {layout!r}: use one of {', '.join(LAYOUT_NAMES)}")
    if images not in IMAGE_MODES:
        raise UserError(f"--images {images!r}: use one of {', '.join(IMAGE_MODES)}")
    shards, out = Path(shards), Path(out)
    index = ShardIndex(shards)
    k = index.num_classes
    if images == "maskformer" and (index.name != "ade20k-full" or index.meta["options"].get("max_short_side") != 0):
        raise UserError(f"--images maskformer reproduces MaskFormer's ADE20K-Full script from the original pixels: "
                        f"it needs ADE20K-Full shards prepared with --max-short-side 0 ({shards} holds "
                        f"{index.name}, max_short_side={index.meta['options'].get('max_short_side')})")
    lay = layout_for(index.name, k, shards / "dataset.json")
    splits = list(splits or index.splits)
    for s in splits:
        index.split_meta(s)  # UserError for an unknown split
    tables = [value_table(f, k, index.name) for f in lay.labels]
    lock = claim_export_dir(out, shards, index.name, layout, images)
    try:
        written, skipped, counts = _export_splits(shards, out, lay, splits, tables, k, images, progress)
        summary = {
            "format": "rankseg-export", "source": str(shards.resolve()), "dataset": index.name, "layout": layout,
            "images_from": "MaskFormer's script (PIL JPEG quality 75)" if images == "maskformer" else "stored bytes",
            "follows": lay.follows, "num_classes": k, "class_names": index.class_names,
            "images": lay.images, "labels": [{"folder": f.folder, "suffix": f.suffix, "values": f.kind,
                                              "ignore": f.ignore, "bits": f.bits} for f in lay.labels],
            "splits": {lay.folder_split(s): {"shard_split": s, "samples": n} for s, n in counts.items()},
        }
        atomic_write_json(out / SUMMARY, summary)
    finally:
        lock.release()
    return ExportSummary(out, lay, written, skipped, counts)


def _export_splits(shards: Path, out: Path, lay: Layout, splits: list[str], tables: list[np.ndarray], k: int,
                   images: str, progress: bool) -> tuple[int, int, dict[str, int]]:
    """Write every sample of `splits` (`out` claimed); (files written, skipped, samples per split)."""
    written = skipped = 0
    counts = {}
    for split in splits:
        ds = ShardDataset(shards, split)
        fsplit = lay.folder_split(split)
        dirs = [out / lay.images.format(split=fsplit)] + [out / f.folder.format(split=fsplit) for f in lay.labels]
        names = [file_stem(key) for key in ds.arrays.keys]
        for key, name in zip(ds.arrays.keys, names):
            # The longest name written is the stem plus a 4-character suffix (.jpg .png .tif).
            check_name(f"{name}.png", f"sample {key[:60]!r} -> file name", shards, "a sample key becomes a file "
                       "name; rename the sample (or re-create the shards with `rankseg prepare`)")
        if len(set(names)) != len(names):
            raise UserError(f"{shards}: two samples of '{split}' get the same file name ('/' -> '__'): "
                            "rename them before exporting")
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        counts[split] = len(names)
        with Progress(len(names), f"export {split}", unit="img", enabled=progress) as bar:
            for i, name in enumerate(names):
                label_paths = [d / f"{name}{f.suffix}" for d, f in zip(dirs[1:], lay.labels)]
                todo_labels = [not p.exists() for p in label_paths]
                image_done = any((dirs[0] / f"{name}{s}").exists() for s in (".jpg", ".png"))
                if image_done and not any(todo_labels):
                    skipped += 1 + len(label_paths)
                    bar.advance(1)
                    continue
                img_b, lab_b = ds.raw(i)
                try:
                    label = decode_label(lab_b)
                except ValueError as exc:
                    raise UserError(f"{ds.paths[ds.arrays.shard[i]]}: the label of {ds.arrays.keys[i]} does "
                                    f"not decode ({exc}); run `rankseg verify`") from None
                if images == "maskformer":
                    img_b, label = maskformer_image(img_b, label)
                if image_done:
                    skipped += 1
                else:
                    atomic_write_bytes(dirs[0] / f"{name}{image_suffix(img_b)}", img_b)
                    written += 1
                ids = np.where(label == 65535, k, label).astype(np.int64)
                if ids.max() > k:
                    raise UserError(f"{shards}: sample {ds.arrays.keys[i]} holds label {int(label.max())} >= "
                                    f"K={k}; run `rankseg verify`")
                for path, todo, files, table in zip(label_paths, todo_labels, lay.labels, tables):
                    if todo:
                        atomic_write_bytes(path, encode_label_file(table[ids], files))
                        written += 1
                    else:
                        skipped += 1
                bar.advance(1)
    return written, skipped, counts
