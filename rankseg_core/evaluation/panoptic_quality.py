"""Panoptic quality (PQ, SQ, RQ) as panopticapi's `pq_compute` defines it (docs/panoptic.md).

Per image, a predicted and a ground-truth segment of the same category match when their IoU
exceeds 0.5 (so a match is unique), where the union leaves out the prediction's pixels on
unlabelled ground truth and takes a ground-truth record's declared `area` where it has one
(the JSON area panopticapi uses: ADE20K panoptic's official stuff areas exceed the pixel
counts). Unmatched non-crowd ground truth, a record without pixels included, is a false
negative; an unmatched prediction is a false positive unless more than half of it lies on
unlabelled ground truth or on the crowd region of its category. Per category
PQ = sum IoU / (TP + FP/2 + FN/2),
SQ = sum IoU / TP (0 without TP), RQ = TP / (TP + FP/2 + FN/2); averages run over the
categories with TP + FP + FN > 0.

The accumulator keeps per-category sums (TP, FP, FN, IoU), so per-process accumulators merge
exactly (`state()` / `merge()`): `accumulators.reduce_across_processes` gathers the states and
merges them in rank order, so every process gets the same float sums.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import ClassVar

import numpy as np

VOID = 0  # segment id meaning "no segment" in both maps (unlabelled / not predicted)


def _as_map(x: object, what: str) -> np.ndarray:
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 2 or arr.dtype.kind not in "iu":
        raise ValueError(f"{what} must be an H x W integer map of segment ids, got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64, copy=False)


def _int(v: object) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
        raise TypeError(v)
    return int(v)


def _compact(seg: np.ndarray, info: Sequence[Mapping], num_classes: int, what: str,
             crowd: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(H x W index map: 0 = void, i = info[i-1]; categories (n,); iscrowd (n,) bool)."""
    try:
        ids = np.array([_int(r["id"]) for r in info], np.int64)
        cats = np.array([_int(r["category"]) for r in info], np.int64)
        iscrowd = np.array([_int(r.get("iscrowd", 0)) if crowd else 0 for r in info], np.int64)
    except (KeyError, TypeError, AttributeError):
        keys = '"id", "category"' + (', "iscrowd"' if crowd else "")
        raise ValueError(f"{what} info must be a list of dicts with integer {keys}") from None
    n = len(ids)
    if n and (ids.min() <= VOID):
        raise ValueError(f"{what} segment ids must be > 0 (0 means void)")
    if len(np.unique(ids)) != n:
        raise ValueError(f"{what} segment ids are not unique")
    if n and (cats.min() < 0 or cats.max() >= num_classes):
        raise ValueError(f"{what} categories must be train ids in 0..{num_classes - 1}")
    if np.any((iscrowd != 0) & (iscrowd != 1)):
        raise ValueError(f"{what} iscrowd must be 0 or 1")
    uniq, inverse = np.unique(seg, return_inverse=True)
    # position (1..n) in `info` of every id present in the map; 0 for void
    order = np.argsort(ids)
    sorted_ids = np.append(ids[order], VOID)  # sentinel: keeps the lookup in range when n = 0
    pos = np.minimum(np.searchsorted(ids[order], uniq), n)
    known = (sorted_ids[pos] == uniq) & (pos < n)
    stray = uniq[~known & (uniq != VOID)]
    if stray.size:
        raise ValueError(f"{what} segment id {int(stray[0])} is in the map but not in its info")
    lut = np.where(known, np.append(order, -1)[pos] + 1, 0)
    return lut[inverse].reshape(seg.shape), cats, iscrowd.astype(bool)


def _declared_areas(info: Sequence[Mapping], pixels: np.ndarray) -> np.ndarray:
    """Each ground-truth record's area for the union: its "area" if it has one, else its pixels."""
    out = pixels.astype(np.int64, copy=True)
    for i, r in enumerate(info):
        if "area" not in r:
            continue
        try:
            a = _int(r["area"])
        except TypeError:
            raise ValueError(f"ground-truth segment {r['id']}: area must be an integer") from None
        # panopticapi would take a smaller area too, but then IoU can exceed 1: a broken record
        if a < pixels[i]:
            raise ValueError(f"ground-truth segment {r['id']}: area {a} is less than its {int(pixels[i])} "
                             "pixels in the map")
        out[i] = a
    return out


def image_stats(pred_segments: object, pred_info: Sequence[Mapping], gt_segments: object,
                gt_info: Sequence[Mapping], num_classes: int) -> dict[str, np.ndarray]:
    """Per-category TP, FP, FN counts and matched-IoU sums (each (K,)) for one image.

    pred_segments, gt_segments: H x W segment ids (0 = void). pred_info: [{"id", "category"}];
    gt_info: [{"id", "category", "iscrowd"}, optionally "area"]; categories are train ids
    0..K-1. A GT record's "area" (the official JSON's, at least its pixel count) replaces its
    pixel count in the union, as panopticapi reads areas from the GT JSON; without it the
    pixel count is used. A non-crowd GT record without pixels is a false negative (as in
    panopticapi); a predicted record without pixels is ignored (panopticapi would reject it).
    An id in a map without a record is a ValueError.
    """
    pred, gt = _as_map(pred_segments, "pred_segments"), _as_map(gt_segments, "gt_segments")
    if pred.shape != gt.shape:
        raise ValueError(f"pred_segments {pred.shape} and gt_segments {gt.shape} differ in size")
    p_idx, p_cat, _ = _compact(pred, pred_info, num_classes, "prediction", crowd=False)
    g_idx, g_cat, g_crowd = _compact(gt, gt_info, num_classes, "ground-truth", crowd=True)
    n, m = len(p_cat), len(g_cat)
    # inter[g, p] = pixels of ground-truth index g predicted as index p (row/column 0 = void)
    inter = np.bincount((g_idx * (n + 1) + p_idx).ravel(), minlength=(m + 1) * (n + 1)).reshape(m + 1, n + 1)
    p_area, g_area = inter.sum(0), inter.sum(1)
    g_area[1:] = _declared_areas(gt_info, g_area[1:])

    k = num_classes
    tp, fp, fn = np.zeros(k, np.int64), np.zeros(k, np.int64), np.zeros(k, np.int64)
    iou_sum = np.zeros(k, np.float64)
    gs, ps = np.nonzero(inter[1:, 1:])
    gs, ps = gs + 1, ps + 1
    same = (g_cat[gs - 1] == p_cat[ps - 1]) & ~g_crowd[gs - 1]
    gs, ps = gs[same], ps[same]
    i = inter[gs, ps]
    iou = i / (p_area[ps] + g_area[gs] - i - inter[0, ps])
    hit = iou > 0.5  # > 0.5 makes every match unique: no assignment problem to solve
    np.add.at(tp, g_cat[gs[hit] - 1], 1)
    np.add.at(iou_sum, g_cat[gs[hit] - 1], iou[hit])
    g_matched = np.zeros(m + 1, bool)
    p_matched = np.zeros(n + 1, bool)
    g_matched[gs[hit]] = True
    p_matched[ps[hit]] = True

    missed = ~g_matched[1:] & ~g_crowd
    np.add.at(fn, g_cat[missed], 1)

    # As pq_compute: the crowd region of a category is its last crowd record in info order.
    crowd_of = {int(g_cat[g]): g + 1 for g in range(m) if g_crowd[g]}
    for p in range(1, n + 1):
        if p_matched[p] or p_area[p] == 0:
            continue
        ignored = inter[0, p]
        g = crowd_of.get(int(p_cat[p - 1]))
        if g is not None:
            ignored += inter[g, p]
        if ignored / p_area[p] > 0.5:
            continue
        fp[p_cat[p - 1]] += 1
    return {"tp": tp, "fp": fp, "fn": fn, "iou": iou_sum}


def _summary(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray, iou: np.ndarray) -> dict:
    """Mean PQ / SQ / RQ over the given categories that occur (None when none does)."""
    seen = (tp + fp + fn) > 0
    n = int(seen.sum())
    if n == 0:
        return {"pq": None, "sq": None, "rq": None, "n": 0}
    tp, fp, fn, iou = tp[seen], fp[seen], fn[seen], iou[seen]
    denom = tp + 0.5 * fp + 0.5 * fn
    sq = np.where(tp > 0, iou / np.maximum(tp, 1), 0.0)
    return {"pq": float(np.mean(iou / denom)), "sq": float(np.mean(sq)), "rq": float(np.mean(tp / denom)),
            "n": n}


class PanopticQuality:
    """Accumulates panoptic quality over images; `compute()` gives strict-JSON results.

    Usage: `pq = PanopticQuality(K, thing_classes)`; per image
    `pq.update(pred_segments, pred_info, gt_segments, gt_info)` (see `image_stats`);
    across processes `pq.merge(other.state())`; finally `pq.compute()`. An
    `accumulators.Accumulator`.
    """

    # The IoU sums are floats: gathering and merging in rank order (not an all-reduce, whose
    # summation order is the backend's) keeps the result identical to a sequential merge.
    reduce_by_sum: ClassVar[bool] = False

    def __init__(self, num_classes: int, thing_classes: Iterable[int]) -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        things = sorted({int(c) for c in thing_classes})
        if things and (things[0] < 0 or things[-1] >= num_classes):
            raise ValueError(f"thing_classes must be train ids in 0..{num_classes - 1}")
        self.num_classes = num_classes
        self.thing_classes = things
        self.is_thing = np.zeros(num_classes, bool)
        self.is_thing[things] = True
        self.reset()

    def reset(self) -> None:
        k = self.num_classes
        self.tp, self.fp, self.fn = (np.zeros(k, np.int64) for _ in range(3))
        self.iou = np.zeros(k, np.float64)
        self.num_images = 0

    def update(self, pred_segments: object, pred_info: Sequence[Mapping], gt_segments: object,
               gt_info: Sequence[Mapping]) -> None:
        """Add one image: H x W id maps (0 = void) and their records (see `image_stats`)."""
        s = image_stats(pred_segments, pred_info, gt_segments, gt_info, self.num_classes)
        self.tp += s["tp"]
        self.fp += s["fp"]
        self.fn += s["fn"]
        self.iou += s["iou"]
        self.num_images += 1

    def state(self) -> dict:
        """The sums as plain lists (picklable, JSON-able): what `merge` takes."""
        return {"num_classes": self.num_classes, "thing_classes": list(self.thing_classes),
                "tp": self.tp.tolist(), "fp": self.fp.tolist(), "fn": self.fn.tolist(),
                "iou": self.iou.tolist(), "num_images": self.num_images}

    def merge(self, other: "PanopticQuality | Mapping") -> "PanopticQuality":
        """Add another accumulator (or its `state()`) in place; returns self."""
        s = other.state() if isinstance(other, PanopticQuality) else other
        if s["num_classes"] != self.num_classes or list(s["thing_classes"]) != self.thing_classes:
            raise ValueError("cannot merge panoptic accumulators with different classes")
        self.tp += np.asarray(s["tp"], np.int64)
        self.fp += np.asarray(s["fp"], np.int64)
        self.fn += np.asarray(s["fn"], np.int64)
        self.iou += np.asarray(s["iou"], np.float64)
        self.num_images += int(s["num_images"])
        return self

    def compute(self) -> dict:
        """{"all"|"things"|"stuff": {"pq","sq","rq","n"}, "per_class": [...], "num_images"}.

        Values are fractions in [0, 1]; None where undefined (no category occurs, or a
        category with TP + FP + FN = 0 in `per_class`). `n` = categories averaged.
        """
        tp, fp, fn, iou = self.tp, self.fp, self.fn, self.iou
        stuff = ~self.is_thing
        per_class = []
        for c in range(self.num_classes):
            denom = tp[c] + 0.5 * fp[c] + 0.5 * fn[c]
            entry: dict[str, float | None] = {"pq": None, "sq": None, "rq": None}
            if denom > 0:
                entry = {"pq": float(iou[c] / denom), "sq": float(iou[c] / tp[c]) if tp[c] else 0.0,
                         "rq": float(tp[c] / denom)}
            per_class.append({**entry, "tp": int(tp[c]), "fp": int(fp[c]), "fn": int(fn[c]),
                              "isthing": bool(self.is_thing[c])})
        return {"all": _summary(tp, fp, fn, iou),
                "things": _summary(tp[self.is_thing], fp[self.is_thing], fn[self.is_thing], iou[self.is_thing]),
                "stuff": _summary(tp[stuff], fp[stuff], fn[stuff], iou[stuff]),
                "per_class": per_class, "num_images": self.num_images}


def gt_from_shard(segments: np.ndarray, segments_info: Sequence[Mapping]) -> tuple[np.ndarray, list[dict]]:
    """A shard sample's ground truth as `update` takes it: the H x W index map is the id map
    (index i = record i), so the records get ids 1..n.

    A record's `json_area` (the official JSON's area where it differs from the pixel count:
    ADE20K panoptic's stuff painted over by things) becomes its "area", so PQ is panopticapi's
    on the official ground truth; other datasets' records score with their pixel counts.
    """
    out = []
    for i, r in enumerate(segments_info, 1):
        rec = {"id": i, "category": int(r["category"]), "iscrowd": int(r["iscrowd"])}
        if "json_area" in r:
            rec["area"] = int(r["json_area"])
        out.append(rec)
    return segments, out
