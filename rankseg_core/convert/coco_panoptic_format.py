"""The COCO panoptic file format: RGB-encoded segment-id PNGs plus a JSON of segment records.

A segment id is stored in a PNG pixel as id = R + 256 G + 256^2 B (0 = void), and each image
has a JSON annotation `{"image_id", "file_name", "segments_info": [{"id", "category_id",
"iscrowd", "area", "bbox", "isthing"}]}` that gives every id its category. This is what
panopticapi's `pq_compute` reads (`--gt_json_file` / `--pred_json_file` with the PNGs in the
folder of the same name), so `write_coco_panoptic` output can be scored by the official tools.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from rankseg_core.errors import UserError
from rankseg_core.utils.fsio import atomic_write_bytes, atomic_write_json

MAX_SEGMENT_ID = 256 ** 3 - 1


def rgb2id(rgb: np.ndarray) -> np.ndarray:
    """H x W x 3 uint8 RGB -> H x W int64 segment ids."""
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an H x W x 3 RGB array, got shape {rgb.shape}")
    c = rgb.astype(np.int64)
    return c[..., 0] + 256 * c[..., 1] + 65536 * c[..., 2]


def id2rgb(ids: np.ndarray) -> np.ndarray:
    """H x W segment ids (0 .. 256^3 - 1) -> H x W x 3 uint8 RGB."""
    ids = np.asarray(ids, np.int64)
    if ids.size and (ids.min() < 0 or ids.max() > MAX_SEGMENT_ID):
        raise ValueError(f"segment ids must be in 0..{MAX_SEGMENT_ID} to fit in an RGB PNG")
    return np.stack([ids % 256, ids // 256 % 256, ids // 65536], axis=-1).astype(np.uint8)


def bboxes(index_map: np.ndarray, n: int) -> np.ndarray:
    """(n, 4) COCO boxes [x, y, width, height] of indices 1..n of an H x W map (zeros if absent)."""
    idx = np.asarray(index_map, np.int64)
    h, w = idx.shape
    out = np.zeros((n, 4), np.int64)
    rows = np.zeros((n + 1, h), bool)
    cols = np.zeros((n + 1, w), bool)
    rows[idx, np.arange(h)[:, None]] = True  # rows[i, y]: index i occurs in row y
    cols[idx, np.arange(w)[None, :]] = True
    for i in range(1, n + 1):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if ys.size:
            out[i - 1] = (xs[0], ys[0], xs[-1] - xs[0] + 1, ys[-1] - ys[0] + 1)
    return out


@dataclass(frozen=True)
class Category:
    """One class of the shard's table as the official JSON names it."""

    id: int  # the dataset's own category id (COCO: 1..200; ADE20K panoptic: 0..149)
    name: str
    isthing: bool


def categories_of(index: Mapping) -> list[Category]:
    """Categories of a panoptic `dataset.json` (index = train id).

    Converters record the release's category ids in `options.category_ids`; without them
    (e.g. the synthetic set) the ids are the train ids.
    """
    names = list(index["class_names"])
    things = set(index.get("thing_classes") or [])
    ids = (index.get("options") or {}).get("category_ids") or list(range(len(names)))
    # `options` is free-form in dataset.json (readers check only that it is an object).
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise UserError("dataset.json: options.category_ids must be a list of integers: re-create the "
                        "directory with `rankseg prepare`")
    if len(ids) != len(names):
        raise UserError(f"dataset.json: options.category_ids has {len(ids)} entries for {len(names)} classes")
    return [Category(int(i), str(n), t in things) for t, (i, n) in enumerate(zip(ids, names))]


def image_id_of(key: str) -> int | str:
    """The official image id of a shard key: COCO's file stems are the zero-padded ids."""
    # ASCII only: str.isdigit() is also true of '²', which int() refuses; and int() refuses
    # more than 4300 digits, far beyond any real id.
    return int(key) if key.isascii() and key.isdigit() and len(key) <= 30 else key


class CocoPanopticWriter:
    """Writes `<out_dir>/<name>/<file_name>` PNGs, then `<out_dir>/<name>.json` on `close()`.

    The JSON is written last and atomically, so its presence means the export is complete.
    """

    def __init__(self, out_dir: str | Path, categories: Sequence[Category], name: str = "predictions",
                 overwrite: bool = False) -> None:
        self.out_dir = Path(out_dir)
        self.png_dir = self.out_dir / name
        self.json_path = self.out_dir / f"{name}.json"
        if self.json_path.exists() and not overwrite:
            raise UserError(f"{self.json_path} exists: choose another output folder or remove it")
        self.categories = list(categories)
        self.annotations: list[dict] = []
        self._files: set[str] = set()
        self.png_dir.mkdir(parents=True, exist_ok=True)

    def add(self, image_id: int | str, file_name: str, segments: np.ndarray,
            segments_info: Sequence[Mapping]) -> dict:
        """Write one image: H x W segment ids (0 = void) and `[{"id", "category"}]` (train ids;
        an optional "iscrowd" is kept, e.g. to export ground truth; predictions have none).

        Records whose id has no pixel are dropped (panopticapi rejects them); an id in the map
        without a record raises ValueError. Returns the JSON annotation.
        """
        if file_name in self._files or "/" in file_name or not file_name.endswith(".png"):
            raise ValueError(f"file_name {file_name!r} must be a unique *.png name without folders")
        ids = np.asarray(segments, np.int64)
        if ids.ndim != 2:
            raise ValueError(f"segments must be H x W, got shape {ids.shape}")
        present, inverse, area = np.unique(ids, return_inverse=True, return_counts=True)
        areas = dict(zip(present.tolist(), area.tolist()))
        records = {int(r["id"]): (int(r["category"]), int(r.get("iscrowd", 0))) for r in segments_info}
        if len(records) != len(segments_info):
            raise ValueError(f"{file_name}: segment ids are not unique")
        stray = [i for i in areas if i != 0 and i not in records]
        if stray:
            raise ValueError(f"{file_name}: segment id {stray[0]} is in the map but not in segments_info")
        kept = [(sid, cat) for sid, cat in records.items() if sid != 0 and areas.get(sid, 0) > 0]
        position = {sid: i for i, (sid, _) in enumerate(kept, 1)}
        index = np.array([position.get(v, 0) for v in present.tolist()], np.int64)[inverse].reshape(ids.shape)
        boxes = bboxes(index, len(kept))
        info = []
        for (sid, (cat, crowd)), box in zip(kept, boxes):
            if not 0 <= cat < len(self.categories):
                raise ValueError(f"{file_name}: category {cat} is not a train id < {len(self.categories)}")
            c = self.categories[cat]
            info.append({"id": sid, "category_id": c.id, "iscrowd": crowd, "area": int(areas[sid]),
                         "bbox": [int(v) for v in box], "isthing": int(c.isthing)})
        ok, png = cv2.imencode(".png", id2rgb(ids)[..., ::-1])  # OpenCV writes BGR
        if not ok:  # pragma: no cover - only fails on invalid input
            raise RuntimeError("PNG encoding failed")
        atomic_write_bytes(self.png_dir / file_name, png.tobytes())
        self._files.add(file_name)
        ann = {"image_id": image_id, "file_name": file_name, "segments_info": info}
        self.annotations.append(ann)
        return ann

    def close(self) -> Path:
        cats = [{"id": c.id, "name": c.name, "isthing": int(c.isthing)} for c in self.categories]
        atomic_write_json(self.json_path, {"annotations": self.annotations, "categories": cats})
        return self.json_path


def write_coco_panoptic(out_dir: str | Path, predictions: Iterable[tuple[int | str, str, np.ndarray, Sequence[Mapping]]],
                        categories: Sequence[Category], name: str = "predictions", overwrite: bool = False) -> Path:
    """Export `(image_id, png_file_name, H x W segment ids, [{"id", "category"}])` per image.

    Writes `<out_dir>/<name>/*.png` and `<out_dir>/<name>.json` (returned), with the
    dataset's own category ids (`categories_of(dataset.json)`), ready for panopticapi's
    `pq_compute(gt_json, <out_dir>/<name>.json)`.
    """
    writer = CocoPanopticWriter(out_dir, categories, name, overwrite)
    for image_id, file_name, segments, info in predictions:
        writer.add(image_id, file_name, segments, info)
    return writer.close()
