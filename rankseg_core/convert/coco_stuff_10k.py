"""COCO-Stuff-10K (the 9K / 1K release split) from the official `.mat` annotations: 171 classes.

The release (nightrome/cocostuff10k) unpacks to

    images/<name>.jpg          10,000 COCO train2014 / val2014 images
    annotations/<name>.mat     per image a MATLAB file whose variable `S` is the H x W label map
    imageLists/train.txt, test.txt (9,000 / 1,000 names; all.txt is not needed)

Two releases label `S` differently, both with the same 171 classes (the 80 COCO things and 91
stuff classes; datasets/coco_stuff/classes.json):

- v1.1 (`cocostuff-10k-v1.1.zip`, the current download; mmsegmentation's converter): 0 =
  unlabelled, 1..182 = COCO-Stuff ids, so train id = the id's row of the 171-class table; the
  11 COCO ids without masks never occur. MATLAB v5 files (`scipy.io.loadmat`).
- v1.0 (`cocostuff-10k-v1.0.zip`; MaskFormer's `prepare_coco_stuff_10k_v1.0_sem_seg.py`, used
  by SimFormer): 1 = unlabelled, 2..172 = the 171 classes in id order, so train id = S - 2.
  MATLAB v7.3 (HDF5) files, read with h5py; HDF5 stores MATLAB's column-major arrays
  transposed.

`--release` says which one is converted (default 1.1); either file format is read for either
release. A value outside the release's domain rejects the sample, and a file whose `names`
table has the other release's length (182 v1.1, 172 v1.0) names the right `--release`.
Shard splits keep the release's names: `train` (9,000) and `test` (1,000, the evaluation
split of every COCO-Stuff-10K paper).
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

import numpy as np

from rankseg_core.convert.common import ConvertOptions, run_conversion
from rankseg_core.convert.png_datasets import _class_table, lut_from_pairs, make_encoded, remap
from rankseg_core.convert.source_io import (
    check_same_size,
    decode_jpeg,
    label_ids,
    read_bytes,
    stored_image_bytes,
)
from rankseg_core.errors import SampleError, UserError
from rankseg_core.shards.check import check_name
from rankseg_core.shards.codec import MAX_FILE_BYTES, MAX_PIXELS
from rankseg_core.shards.write import DatasetHeader, EncodedSample
from rankseg_core.utils.fsio import read_regular

LAYOUT = ("the unpacked COCO-Stuff-10K release: images/*.jpg, annotations/*.mat and "
          "imageLists/{train,test}.txt")
SPLITS = ("train", "test")
RELEASES = ("1.1", "1.0")
# Length of the `names` table in each release's files (v1.1: 91 thing + 91 stuff ids; v1.0:
# 'unlabeled' + 80 things + 91 stuff): what tells a file of one release from the other.
NAMES_PER_RELEASE = {"1.1": 182, "1.0": 172}
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"  # a MATLAB v7.3 file: 512-byte text header, then HDF5


def release_lut(classes: list[dict], release: str) -> np.ndarray:
    """256-entry LUT: `S` value -> train id / IGNORE; values the release never uses -> BAD."""
    if release == "1.1":
        return lut_from_pairs({int(c["id"]): int(c["train_id"]) for c in classes}, ignore_values=[0])
    if release == "1.0":
        return lut_from_pairs({t + 2: t for t in range(len(classes))}, ignore_values=[1])
    raise UserError(f"--release {release!r}: use 1.1 (cocostuff-10k-v1.1.zip) or 1.0 (cocostuff-10k-v1.0.zip)")


def _as_label(values: object, path: str) -> np.ndarray:
    """`S` as an H x W uint16 array of integers; SampleError otherwise."""
    return label_ids(values, path, "S", "COCO-Stuff-10K annotation")


def _check_shape(shape: tuple[int, ...], path: str) -> None:
    """Refuse a map whose stated size is over the pixel limit before it is read (a crafted
    header would otherwise allocate it)."""
    if len(shape) == 2 and int(shape[0]) * int(shape[1]) > MAX_PIXELS:
        raise SampleError(f"{path}: 'S' is {shape[1]}x{shape[0]} = {int(shape[0]) * int(shape[1]):,} pixels, over "
                          f"rankseg's limit of {MAX_PIXELS:,}")


def _read_v73(data: bytes, path: str) -> tuple[np.ndarray, int | None]:
    import h5py

    try:
        with h5py.File(io.BytesIO(data), "r") as f:
            s = f.get("S")
            if not isinstance(s, h5py.Dataset):
                raise SampleError(f"{path}: no label map 'S': not a COCO-Stuff-10K annotation file")
            _check_shape(s.shape, path)
            values = np.asarray(s[()]).T  # HDF5 holds MATLAB's column-major array transposed
            names = f.get("names")
            count = int(names.size) if isinstance(names, h5py.Dataset) else None
    except SampleError:
        raise
    except Exception as exc:  # noqa: BLE001 - h5py raises several types for damaged files
        raise SampleError(f"{path}: not a readable MATLAB v7.3 file ({exc.__class__.__name__}: {exc}): re-extract "
                          "the release") from None
    return values, count


def _read_v5(data: bytes, path: str) -> tuple[np.ndarray, int | None]:
    import scipy.io

    try:
        shapes = {name: shape for name, shape, _ in scipy.io.whosmat(io.BytesIO(data))}
        if "S" in shapes:
            _check_shape(tuple(shapes["S"]), path)
        mat = scipy.io.loadmat(io.BytesIO(data), variable_names=["S", "names"])
    except SampleError:
        raise
    except Exception as exc:  # noqa: BLE001 - scipy raises several types for damaged files
        raise SampleError(f"{path}: not a readable .mat file ({exc.__class__.__name__}: {exc}): re-extract the "
                          "release") from None
    names = mat.get("names")
    return mat.get("S"), int(names.size) if isinstance(names, np.ndarray) else None


def read_label_map(path: str, release: str, listed_in: str) -> np.ndarray:
    """The H x W uint16 raw `S` of one release `.mat` (v5 or v7.3); SampleError naming the file."""
    try:
        data = read_regular(path, "annotation", MAX_FILE_BYTES, SampleError)
    except FileNotFoundError:
        raise SampleError(f"{path}: annotation is missing ({listed_in} lists it; the release has one .mat per "
                          "image: re-extract it, or fix the list)") from None
    except OSError as exc:
        raise SampleError(f"{path}: cannot read annotation ({exc.strerror or exc})") from None
    is_v73 = data[512:512 + len(_HDF5_SIGNATURE)] == _HDF5_SIGNATURE
    values, count = (_read_v73 if is_v73 else _read_v5)(data, path)
    other = next((r for r, n in NAMES_PER_RELEASE.items() if n == count and r != release), None)
    if other is not None:
        raise SampleError(f"{path}: its class table has {count} names, as the v{other} release: convert with "
                          f"--release {other}")
    return _as_label(values, path)


def make_sample(key: str, *, root: str, listed_in: dict[str, str], lut: np.ndarray, release: str,
                num_classes: int) -> EncodedSample:
    """Sample `key`: images/<key>.jpg and annotations/<key>.mat."""
    img_path = f"{root}/images/{key}.jpg"
    data = read_bytes(img_path, "image")
    image = decode_jpeg(data, img_path)
    mat_path = f"{root}/annotations/{key}.mat"
    values = read_label_map(mat_path, release, listed_in[key])
    check_same_size(image.shape, values.shape, mat_path)
    label, classes, pixels = remap(values, lut, num_classes, mat_path)
    return make_encoded(key, stored_image_bytes(data, image), label, classes, pixels, values.shape)


def read_list(path: Path) -> list[str]:
    """The image names of one imageLists file (one per line; a trailing .jpg is dropped)."""
    if not path.is_file():
        raise UserError(f"{path}: missing image list: the root does not have the expected layout ({LAYOUT})")
    data = read_regular(path, "image list", 1 << 24)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a text file of image names ({LAYOUT})") from None
    keys = [line.strip().removesuffix(".jpg") for line in text.splitlines() if line.strip()]
    if not keys:
        raise UserError(f"{path}: the list is empty")
    for k in keys:  # names become paths under images/ and annotations/
        check_name(k, "image name", path, "the list holds one image name per line, e.g. "
                   "COCO_train2014_000000000077")
    return keys


def prepare_coco_stuff_10k(root: str | Path, out: str | Path, release: str = "1.1",
                           opts: ConvertOptions | None = None) -> dict | None:
    """COCO-Stuff-10K shards (splits train / test) from the unpacked release at `root`."""
    root = Path(root)
    classes, source = _class_table("coco_stuff/classes.json")
    lut = release_lut(classes, release)
    if not root.is_dir():
        raise UserError(f"{root}: no such directory: pass --root ({LAYOUT})")
    for d in ("images", "annotations"):
        if not (root / d).is_dir():
            raise UserError(f"{root / d}: no such directory: {root} does not have the expected layout ({LAYOUT})")
    splits: dict[str, list[str]] = {}
    listed_in: dict[str, str] = {}
    for split in SPLITS:
        lst = root / "imageLists" / f"{split}.txt"
        keys = read_list(lst)
        for k in keys:
            if k in listed_in:
                raise UserError(f"{lst}: image '{k}' is listed twice (or in both splits)")
            listed_in[k] = str(lst)
        splits[split] = keys
    header = DatasetHeader("coco-stuff-10k", [c["name"] for c in classes], source=source,
                           options={"release": release, "labels": "annotations/*.mat",
                                    "lists": {s: f"imageLists/{s}.txt" for s in SPLITS}})
    maker = functools.partial(make_sample, root=str(root), listed_in=listed_in, lut=lut, release=release,
                              num_classes=len(classes))
    return run_conversion(out, header, splits, maker, opts or ConvertOptions())
