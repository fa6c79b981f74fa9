"""`rankseg eval-predictions`: score a directory of label files from any model against shards.

One prediction file per image of the split, holding train ids (0..K-1) as an 8- or 16-bit
single-channel PNG or TIFF at the size of the stored label. Files are matched to samples by
name (`match_predictions`); every check fails with one line naming the file. The images are
streamed: at most two labels and two predictions (the one counted, the next one being decoded by
a reader thread) are in memory next to the K x K confusion matrix.

The metrics and the three mIoU averaging rules live in `metrics.ConfusionMatrix`, the same
accumulator `rankseg eval` fills (`accumulators.EvalAccumulators.confusion`), so both commands
count pixels alike; this module reads files, groups classes by frequency and writes the reports
(docs/benchmarks/scoring.md).
"""

from __future__ import annotations

import csv
import io
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from rankseg_core.convert.detectron2_format import file_stem
from rankseg_core.errors import UserError
from rankseg_core.evaluation.metrics import PROTOCOLS, ConfusionMatrix
from rankseg_core.evaluation.weak_shot import base_novel_scores
from rankseg_core.shards.codec import IGNORE, MAX_FILE_BYTES, check_pixel_limit, check_size, decode_label
from rankseg_core.shards.read import ShardDataset, ShardIndex
from rankseg_core.utils import jsonio
from rankseg_core.utils.fsio import (
    atomic_write_bytes,
    atomic_write_json,
    check_writable_target,
    open_regular,
    os_error,
    read_regular,
)
from rankseg_core.utils.progress import Progress
from rankseg_core.utils.resources import load_json

SUFFIXES = (".png", ".tif", ".tiff")
RARE_MAX, COMMON_MAX = 10, 100  # LVIS: rare 1-10 training images, common 11-100, frequent > 100
SHOWN = 3  # names listed in a "missing / extra files" error
MAX_REPORT_BYTES = 1 << 28  # an earlier report read to recognise it (K = 65535 classes: ~30 MB)
MAX_OFFSET = IGNORE  # a file value is at most 16 bits: a larger --pred-offset leaves no class id


# ---------------------------------------------------------------------------------------
# Matching files to samples


def list_predictions(pred_dir: Path) -> dict[str, Path]:
    """name -> file for every PNG / TIFF under `pred_dir` (recursive); name = relative path
    without the suffix, '/'-separated. Two files with one name (x.png, x.tif) are refused."""
    if not pred_dir.is_dir():
        raise UserError(f"{pred_dir}: no such directory of predictions")
    out: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(pred_dir):
        dirnames.sort()
        for fn in sorted(filenames):
            stem, ext = os.path.splitext(fn)
            if ext.lower() not in SUFFIXES or fn.startswith("."):
                continue
            path = Path(dirpath) / fn
            name = path.relative_to(pred_dir).with_name(stem).as_posix()
            if name in out:
                raise UserError(f"{pred_dir}: two prediction files for '{name}' ({out[name].name} and {fn}): "
                                "keep one")
            out[name] = path
    return out


def match_predictions(keys: list[str], files: dict[str, Path], pred_dir: Path, split: str,
                      allow_extra: bool = False) -> list[Path]:
    """The prediction file of each key, in key order.

    A key matches a file named (1) `file_stem(key)` (what `rankseg eval
    --save-predictions` writes), (2) the key itself as a relative path (`video/frame.png`), or
    (3) the key's last path component, the plain image stem detectron2-based projects use. A
    key matching two files, or a file matched by two keys (the same frame stem in two videos),
    is refused as ambiguous; so are missing files and, unless `allow_extra`, unmatched ones.
    """
    owner: dict[str, str] = {}  # file name -> key
    chosen: list[Path | None] = []
    missing = []
    for key in keys:
        names = list(dict.fromkeys((file_stem(key), key, key.rsplit("/", 1)[-1])))
        found = [n for n in names if n in files]
        if len(found) > 1:
            raise UserError(f"{pred_dir}: sample {key} matches {len(found)} files "
                            f"({', '.join(files[n].name for n in found)}): keep one")
        if not found:
            missing.append(key)
            chosen.append(None)
            continue
        name = found[0]
        if name in owner:
            raise UserError(f"{files[name]}: ambiguous, it matches samples {owner[name]} and {key}: name "
                            f"predictions {file_stem(key)}.png (the sample key, '/' -> '__')")
        owner[name] = key
        chosen.append(files[name])
    if missing:
        shown = ", ".join(file_stem(k) for k in missing[:SHOWN])
        raise UserError(f"{pred_dir}: {len(missing)} of {len(keys)} '{split}' images have no prediction "
                        f"(first: {shown}{', ...' if len(missing) > SHOWN else ''}): name files <sample key>.png "
                        "as `rankseg eval --save-predictions` does, or <image stem>.png/.tif")
    extra = sorted(set(files) - set(owner))
    if extra and not allow_extra:
        shown = ", ".join(files[n].name for n in extra[:SHOWN])
        raise UserError(f"{pred_dir}: {len(extra)} prediction file(s) match no '{split}' image (first: {shown}"
                        f"{', ...' if len(extra) > SHOWN else ''}): wrong split or dataset? "
                        "(--allow-extra ignores them)")
    return [p for p in chosen if p is not None]


# ---------------------------------------------------------------------------------------
# Reading one prediction


def _check_shape(path: Path, size: tuple[int, int], expect: tuple[int, int] | None, label_of: str) -> None:
    """UserError when a prediction's (height, width) is not its label's."""
    if expect is not None and tuple(size) != tuple(expect):
        raise UserError(f"{path}: prediction is {size[1]}x{size[0]} but the label{label_of} is "
                        f"{expect[1]}x{expect[0]} (W x H): predict at the stored label's size "
                        "(`rankseg inspect --jsonl` lists them)")


def _decode(path: Path, expect: tuple[int, int] | None = None, label_of: str = "") -> np.ndarray:
    """Pixel values of a PNG / TIFF as stored (palette PNGs: the indices).

    The size is checked (limit, and `expect` when given) on the header, before decoding: a small
    file of the wrong size must not be decoded to a huge array first.
    """
    try:
        # Not a FIFO or a device, and bounded: either would block or grow memory without end.
        data = read_regular(path, "prediction", MAX_FILE_BYTES)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not data:
        raise UserError(f"{path}: empty file (0 bytes): write the prediction again")
    try:
        size = check_pixel_limit(data, "prediction")
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
    if size is not None:
        _check_shape(path, size, expect, label_of)
    is_png = data[:8] == b"\x89PNG\r\n\x1a\n"
    if is_png and not (len(data) > 25 and data[25] == 3):  # not a palette PNG: OpenCV keeps 16 bits
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is not None:
            return arr
    from PIL import (
        Image,  # TIFF (any integer layout) and palette PNGs (indices, not colours)
    )

    try:
        with Image.open(io.BytesIO(data)) as im:
            check_size(im.size[1], im.size[0], "prediction")  # from the header, before decoding
            _check_shape(path, (im.size[1], im.size[0]), expect, label_of)
            return np.asarray(im)
    except UserError:
        raise
    except ValueError as exc:
        raise UserError(f"{path}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise UserError(f"{path}: cannot decode ({exc.__class__.__name__}: {exc}): write single-channel "
                        "PNG or TIFF label images") from None


def check_pred_offset(offset: int) -> None:
    """UserError unless 0 <= `offset` <= MAX_OFFSET (a file value v means class v - offset)."""
    if isinstance(offset, bool) or not isinstance(offset, int) or not 0 <= offset <= MAX_OFFSET:
        raise UserError(f"--pred-offset {offset}: must be 0..{MAX_OFFSET} (prediction files hold 8- or 16-bit "
                        "values; mmseg's format_results writes id + 1: --pred-offset 1)")


def read_prediction(path: Path, num_classes: int, offset: int = 0, shape: tuple[int, int] | None = None,
                    label_of: str = "") -> np.ndarray:
    """H x W train ids of a prediction file, in the dtype it decodes to (uint8 / uint16 for
    PNG; no widened copy); UserError on anything that is not one. Every value is checked to lie
    in 0..K-1, so the result may go to `ConfusionMatrix.update(..., checked=True)`.

    `offset`: a file value v means class v - offset (mmseg's `format_results` writes id + 1).
    `shape`: the (height, width) the prediction must have (its label's), checked before decoding;
    `label_of` names that label in the message (" of <key>").
    """
    check_pred_offset(offset)
    arr = _decode(path, shape, label_of)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise UserError(f"{path}: {arr.shape[2] if arr.ndim == 3 else arr.ndim}-channel image: write class ids "
                        "as a single-channel 8- or 16-bit PNG/TIFF, not a colour visualisation")
    if shape is not None:  # formats without a header read before decoding
        _check_shape(path, (arr.shape[0], arr.shape[1]), shape, label_of)
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise UserError(f"{path}: {arr.dtype} pixel values: write integer class ids (uint8 or uint16)")
    if arr.dtype.itemsize == 1 and num_classes + offset > 256:
        raise UserError(f"{path}: 8-bit image, but this dataset has K={num_classes} classes (ids up to "
                        f"{num_classes - 1 + offset} need 16 bits): save predictions as 16-bit PNG or TIFF "
                        "(a 16-bit label saved as 8-bit wraps ids modulo 256)")
    if not arr.size:
        return arr
    # One reduction per bound, on the decoded dtype: an unsigned file without offset has no lower bound.
    lo = int(arr.min()) if offset or arr.dtype.kind != "u" else 0
    hi = int(arr.max())
    if lo < offset:
        raise UserError(f"{path}: value {lo} is below --pred-offset {offset}: every pixel needs a class")
    if hi - offset >= num_classes:
        n = int(np.count_nonzero(arr == hi))  # only on the way to the error
        why = " (the ignore value: a prediction must give every pixel a class)" if hi in (255, IGNORE) else ""
        raise UserError(f"{path}: value {hi} in {n} pixel(s) is not a class id 0..{num_classes - 1}"
                        f"{f' + {offset}' if offset else ''}{why}: predictions hold train ids")
    if offset:  # lo >= offset: the subtraction stays in the file's dtype without wrapping
        arr = np.subtract(arr, offset, dtype=arr.dtype)
    return arr


# ---------------------------------------------------------------------------------------
# Frequency groups


GROUP_SCHEMES = ("auto", "lvis", "train-frequency", "none")


def frequency_bins(class_images: np.ndarray) -> dict[str, list[int]]:
    """LVIS's thresholds applied to per-class training-image counts.

    rare 1-10, common 11-100, frequent > 100; classes without any training image form
    'unseen' (they can still occur in the evaluated split)."""
    c = np.asarray(class_images, np.int64)
    bins = {"frequent": c > COMMON_MAX, "common": (c > RARE_MAX) & (c <= COMMON_MAX),
            "rare": (c >= 1) & (c <= RARE_MAX), "unseen": c == 0}
    return {name: np.nonzero(m)[0].tolist() for name, m in bins.items() if m.any()}


def lvis_groups(class_names: list[str]) -> dict[str, list[int]]:
    """COCO+LVIS (1,284, LVIS v1): the LVIS frequency tag of each LVIS class; the 81 COCO-Stuff
    classes that do not merge into an LVIS class form 'stuff' (LVIS frequencies count LVIS
    instance images, which says nothing about stuff regions)."""
    table = load_json("coco_lvis/classes.json")["classes"]
    freq = {c["id"]: c["frequency"] for c in load_json("coco_lvis/lvis_v1_frequency.json")["categories"]}
    if class_names != [c["name"] for c in table]:
        raise UserError("--groups lvis needs COCO+LVIS shards with the LVIS v1 vocabulary (1,284 classes, "
                        "`rankseg prepare coco-lvis` on lvis_v1_*.json); these shards have other classes")
    tags = {"f": "frequent", "c": "common", "r": "rare"}
    groups: dict[str, list[int]] = {"frequent": [], "common": [], "rare": [], "stuff": []}
    for c in table:
        groups[tags[freq[c["id"]]] if c["origin"] == "lvis_v1" else "stuff"].append(int(c["train_id"]))
    return groups


def _training_counts(index: ShardIndex, train_split: str | None) -> tuple[np.ndarray, str] | None:
    splits = index.splits
    split = train_split or next((s for s in ("training", "train") if s in splits), None)
    if split is None or split not in splits:
        return None
    return np.asarray(index.split_meta(split)["class_images"], np.int64), split


def class_groups(index: ShardIndex, scheme: str = "auto", train_data: Path | None = None,
                 train_split: str | None = None) -> tuple[str, dict[str, list[int]]]:
    """(description of the rule used, group -> sorted train ids) for frequency-split results.

    auto: 'lvis' for COCO+LVIS v1 shards; else 'train-frequency' when a training split is at
    hand (in the scored shards or `train_data`); else no groups.
    """
    if scheme not in GROUP_SCHEMES:
        raise UserError(f"--groups {scheme!r}: use one of {', '.join(GROUP_SCHEMES)}")
    if scheme == "none":
        return "none", {}
    is_lvis = index.name == "coco_lvis" and index.meta.get("options", {}).get("vocabulary") == "lvis_v1"
    if scheme == "lvis" or (scheme == "auto" and is_lvis):
        return "lvis v1 frequency (f/c/r) + stuff", lvis_groups(index.class_names)
    source = ShardIndex(train_data) if train_data is not None else index
    if source.class_names != index.class_names:
        raise UserError(f"{train_data}: its classes differ from {index.root}'s: pass shards of the same dataset "
                        "as --train-data")
    found = _training_counts(source, train_split)
    if found is None:
        if scheme == "auto":
            return "none", {}
        where = f"{source.root} has splits {', '.join(source.splits)}"
        raise UserError(f"--groups train-frequency needs the training split's class counts, but {where}: "
                        "pass --train-data SHARDS (with a 'training' or 'train' split) or --train-split")
    counts, split = found
    return (f"training images per class ({source.root.name}:{split}): rare 1-10, common 11-100, "
            f"frequent > 100, unseen 0"), frequency_bins(counts)


# ---------------------------------------------------------------------------------------
# Scoring


def _read_pair(ds: ShardDataset, i: int, key: str, path: Path, num_classes: int,
               pred_offset: int) -> tuple[np.ndarray, np.ndarray]:
    """(prediction, label) H x W of sample i, each in its decoded dtype (see `read_prediction`)."""
    try:
        label = decode_label(ds.raw(i)[1])
    except ValueError as exc:
        raise UserError(f"{ds.paths[ds.arrays.shard[i]]}: the label of {key} does not decode ({exc}); "
                        "run `rankseg verify`") from None
    return read_prediction(path, num_classes, pred_offset, (label.shape[0], label.shape[1]), f" of {key}"), label


@dataclass
class ScoreResult:
    confusion: ConfusionMatrix
    class_names: list[str]
    num_images: int
    protocol: str
    groups: dict[str, list[int]] = field(default_factory=dict)
    group_rule: str = "none"
    info: dict[str, Any] = field(default_factory=dict)
    novel: list[int] | None = None  # a weak-shot split's novel train ids: BaseIoU / NovelIoU (weak_shot.py)


def score_predictions(pred_dir: str | Path, data: str | Path, split: str = "val", *, protocol: str = "mmseg",
                      groups: str = "auto", train_data: str | Path | None = None, train_split: str | None = None,
                      pred_offset: int = 0, allow_extra: bool = False, progress: bool = True,
                      novel: list[int] | None = None, novel_source: dict[str, Any] | None = None) -> ScoreResult:
    """Confusion matrix of the predictions in `pred_dir` against split `split` of shards `data`;
    with `novel` (train ids of a weak-shot split, `novel_source` saying which) the report adds
    the official base / novel means."""
    if protocol not in PROTOCOLS:
        raise UserError(f"--protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")
    check_pred_offset(pred_offset)
    pred_dir = Path(pred_dir)
    ds = ShardDataset(data, split)
    rule, group_ids = class_groups(ds.index, groups, Path(train_data) if train_data else None, train_split)
    keys = list(ds.arrays.keys)
    if not keys:
        raise UserError(f"{data}: split '{split}' holds no samples")
    paths = match_predictions(keys, list_predictions(pred_dir), pred_dir, split, allow_extra)
    k = ds.num_classes
    cm = ConfusionMatrix(k, IGNORE)  # one process: nothing to reduce across processes

    def read_pair(i: int) -> tuple[np.ndarray, np.ndarray]:
        return _read_pair(ds, i, keys[i], paths[i], k, pred_offset)

    # One reader thread decodes image i + 1 (OpenCV's decoder releases the GIL) while this thread
    # counts image i: at most two pairs in memory, images counted in order, and a bad file fails
    # at its turn exactly as in a sequential loop.
    with ThreadPoolExecutor(1, thread_name_prefix="read-prediction") as reader, \
            Progress(len(keys), f"score {split}", unit="img", enabled=progress) as bar:
        pending = reader.submit(read_pair, 0)
        for i in range(len(keys)):
            pred, label = pending.result()
            if i + 1 < len(keys):
                pending = reader.submit(read_pair, i + 1)
            cm.update(pred, label, checked=True)  # read_prediction checked the range once
            bar.advance(1)
    info = {"predictions": str(pred_dir), "data": str(data), "split": split, "dataset": ds.index.name,
            "num_classes": k, "pred_offset": pred_offset, **(novel_source or {})}
    return ScoreResult(cm, ds.index.class_names, len(keys), protocol, group_ids, rule, info, novel)


# ---------------------------------------------------------------------------------------
# Reports


def _num(x: float) -> float | None:
    return None if x is None or math.isnan(x) else float(x)


def _pct(x: float) -> float | None:
    return None if math.isnan(x) else 100.0 * float(x)


def unique_names(names: list[str]) -> list[str]:
    """Class names usable as dictionary keys: a repeated name gets '#<train id>' appended."""
    seen: set[str] = set()
    out = []
    for i, n in enumerate(names):
        out.append(n if n not in seen else f"{n}#{i}")
        seen.add(n)
    return out


def detectron2_results(cm: ConfusionMatrix, names: list[str], protocol: str) -> dict[str, float | None]:
    """detectron2's SemSegEvaluator dict (percent; key order and names as detectron2):
    mIoU, fwIoU, IoU-<class>..., mACC, pACC, ACC-<class>...; undefined values are None."""
    iou, acc = cm.iou(protocol), cm.acc()
    names = unique_names(names)
    res: dict[str, float | None] = {"mIoU": _pct(cm.miou(protocol=protocol)), "fwIoU": _pct(cm.fwiou())}
    res.update({f"IoU-{n}": _pct(v) for n, v in zip(names, iou.tolist())})
    res.update({"mACC": _pct(cm.macc()), "pACC": _pct(cm.aacc())})
    res.update({f"ACC-{n}": _pct(v) for n, v in zip(names, acc.tolist())})
    return res


def _group_of(groups: dict[str, list[int]], k: int) -> list[str]:
    out = [""] * k
    for name, ids in groups.items():
        for i in ids:
            out[i] = name
    return out


def report(res: ScoreResult) -> dict[str, Any]:
    """The JSON `rankseg eval-predictions` writes (fractions at the top, detectron2's percent dict
    under "sem_seg")."""
    cm, p = res.confusion, res.protocol
    tp, gt, pred = cm.counts()
    iou, acc = cm.iou(p), cm.acc()
    group = _group_of(res.groups, cm.num_classes)
    ws = base_novel_scores(cm, res.novel) if res.novel is not None else None
    means = ("base_iou", "novel_iou", "base_acc", "novel_acc")
    return {
        "protocol": p,
        "miou": _num(cm.miou(protocol=p)), "aacc": _num(cm.aacc()), "macc": _num(cm.macc()),
        "fwiou": _num(cm.fwiou()),
        "miou_by_protocol": {q: _num(cm.miou(protocol=q)) for q in PROTOCOLS},
        # The official weak-shot means (whatever --protocol: they follow SimFormer's evaluator).
        **({k: _num(ws[k]) for k in means} if ws else {}),
        **({"weak_shot": {k: v for k, v in ws.items() if k not in means}} if ws else {}),
        "classes_averaged": {q: int(cm.averaged(q).sum()) for q in PROTOCOLS},
        "group_rule": res.group_rule,
        "groups": {name: {"miou": _num(cm.miou(ids, protocol=p)), "num_classes": len(ids),
                          "classes_averaged": int(cm.averaged(p)[ids].sum())}
                   for name, ids in res.groups.items()},
        "sem_seg": detectron2_results(cm, res.class_names, p),
        "per_class": [{"id": i, "name": n, "group": group[i], "iou": _num(iou[i]), "acc": _num(acc[i]),
                       "gt_pixels": int(gt[i]), "pred_pixels": int(pred[i]), "intersection": int(tp[i])}
                      for i, n in enumerate(res.class_names)],
        "num_images": res.num_images,
        **res.info,
    }


def _cell(x: float | None) -> str:
    return "" if x is None else f"{x:.6f}"


_D2_HEADER = "metric,value\n"
_TABLE_HEADER = "id,name,group,IoU,ACC,gt_pixels,pred_pixels,intersection\n"
_REPORT_KEYS = ("protocol", "sem_seg", "per_class", "predictions")


def report_paths(json_path: str | Path) -> tuple[Path, Path, Path]:
    """The three files `write_reports` writes for `json_path`."""
    json_path = Path(json_path)
    return json_path, json_path.with_suffix(".csv"), json_path.with_name(json_path.stem + "_per_class.csv")


def _is_report(path: Path, is_json: bool, header: str) -> bool:
    """True when `path` holds a report `write_reports` wrote (JSON keys or the CSV header line)."""
    try:
        with open_regular(path, "report") as f:
            if not is_json:
                return f.readline(len(header) + 1) == header.encode()
            data = f.read(MAX_REPORT_BYTES + 1)
    except UserError:
        return False
    except OSError as exc:
        raise os_error(path, exc, "cannot read") from None
    try:
        doc = jsonio.loads(data) if len(data) <= MAX_REPORT_BYTES else None
    except ValueError:
        return False
    return isinstance(doc, dict) and all(k in doc for k in _REPORT_KEYS)


def check_report_targets(json_path: str | Path) -> None:
    """Before scoring: refuse report files that would replace anything but an earlier report.

    Whatever sits at one of the three names and is not a report this command wrote (the ground
    truth's dataset.json, a shard, a prediction, a file of the user's) is left alone: one line
    naming it. Devices and directories are refused as for every write.
    """
    for path, header in zip(report_paths(json_path), ("", _D2_HEADER, _TABLE_HEADER)):
        check_writable_target(path)
        if os.path.lexists(path) and not _is_report(path, not header, header):
            raise UserError(f"{path} exists and is not an `eval-predictions` report: it would be overwritten; "
                            "choose another --json")


def write_reports(json_path: str | Path, rep: dict[str, Any]) -> tuple[Path, Path, Path]:
    """`<json>`, `<stem>.csv` (detectron2's keys: metric,value) and `<stem>_per_class.csv`.

    Only over earlier reports (`check_report_targets`), never over an input or another file."""
    json_path, d2_csv, table_csv = report_paths(json_path)
    check_report_targets(json_path)
    try:
        json_path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise os_error(json_path.parent, exc, "cannot create the report's directory") from None
    atomic_write_json(json_path, rep)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["metric", "value"])
    for key, v in rep["sem_seg"].items():
        w.writerow([key, _cell(v)])
    atomic_write_bytes(d2_csv, buf.getvalue().encode())
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["id", "name", "group", "IoU", "ACC", "gt_pixels", "pred_pixels", "intersection"])
    for c in rep["per_class"]:
        w.writerow([c["id"], c["name"], c["group"], _cell(c["iou"]), _cell(c["acc"]), c["gt_pixels"],
                    c["pred_pixels"], c["intersection"]])
    atomic_write_bytes(table_csv, buf.getvalue().encode())
    return json_path, d2_csv, table_csv
