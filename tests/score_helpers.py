"""Helpers for the scoring / export tests: shards with chosen labels, and metrics re-typed from
the reference evaluators (detectron2's SemSegEvaluator before and after commit f3c1bc1,
mmseg 0.x `intersect_and_union` + `total_area_to_metrics`) as plain numpy, independently of
rankseg's ConfusionMatrix."""

from __future__ import annotations

import functools
from pathlib import Path

import cv2
import numpy as np

from rankseg_core.convert.common import ConvertOptions, run_conversion
from rankseg_core.shards.write import DatasetHeader, encode_sample

IGNORE = 65535


def _make(key: str, *, labels: dict[str, np.ndarray], num_classes: int):
    label = labels[key]
    h, w = label.shape
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (label % 251).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", img)
    assert ok
    return encode_sample(key, buf.tobytes(), label.astype(np.uint16), num_classes)


def make_shards(out: Path, splits: dict[str, dict[str, np.ndarray]], class_names: list[str],
                name: str = "test", options: dict | None = None) -> Path:
    """A shard directory holding exactly `splits[split][key]` as labels (uint16, 65535 ignore)."""
    labels = {k: v for s in splits.values() for k, v in s.items()}
    header = DatasetHeader(name, list(class_names), options=dict(options or {}), source="test")
    maker = functools.partial(_make, labels=labels, num_classes=len(class_names))
    run_conversion(out, header, {s: sorted(d) for s, d in splits.items()}, maker,
                   ConvertOptions(samples_per_shard=4))
    return out


# --- reference formulas, re-typed -------------------------------------------------------


def d2_conf(preds: list[np.ndarray], gts: list[np.ndarray], k: int, ignore: int = IGNORE) -> np.ndarray:
    """detectron2's (K+1) x (K+1) matrix: rows = prediction, columns = GT, GT ignore -> column K."""
    conf = np.zeros((k + 1, k + 1), np.int64)
    for p, g in zip(preds, gts):
        g = g.astype(np.int64).copy()
        g[g == ignore] = k
        conf += np.bincount((k + 1) * p.astype(np.int64).ravel() + g.ravel(),
                            minlength=conf.size).reshape(conf.shape)
    return conf


def d2_metrics(conf: np.ndarray, new: bool) -> dict:
    """SemSegEvaluator.evaluate(): `new` = after f3c1bc1 (2022-07-06), else v0.6 and earlier."""
    k = conf.shape[0] - 1
    acc = np.full(k, np.nan)
    iou = np.full(k, np.nan)
    tp = conf.diagonal()[:-1].astype(float)
    pos_gt = np.sum(conf[:-1, :-1], axis=0).astype(float)
    class_weights = pos_gt / np.sum(pos_gt)
    pos_pred = np.sum(conf[:-1, :-1], axis=1).astype(float)
    acc_valid = pos_gt > 0
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    union = pos_gt + pos_pred - tp
    if new:
        iou_valid = np.logical_and(acc_valid, union > 0)
        iou[iou_valid] = tp[iou_valid] / union[iou_valid]
        miou = np.sum(iou[iou_valid]) / np.sum(iou_valid)
        fiou = np.sum(iou[iou_valid] * class_weights[iou_valid])
    else:
        iou_valid = (pos_gt + pos_pred) > 0
        iou[acc_valid] = tp[acc_valid] / union[acc_valid]
        miou = np.sum(iou[acc_valid]) / np.sum(iou_valid)
        fiou = np.sum(iou[acc_valid] * class_weights[acc_valid])
    macc = np.sum(acc[acc_valid]) / np.sum(acc_valid)
    pacc = np.sum(tp) / np.sum(pos_gt)
    return {"mIoU": 100 * miou, "fwIoU": 100 * fiou, "mACC": 100 * macc, "pACC": 100 * pacc,
            "IoU": 100 * iou, "ACC": 100 * acc}


def _histc(values: np.ndarray, k: int) -> np.ndarray:
    """torch.histc(x, bins=K, min=0, max=K-1) on integer values: counts of 0..K-1, others dropped."""
    v = values[(values >= 0) & (values < k)]
    return np.bincount(v, minlength=k)[:k].astype(float)


def mmseg_metrics(preds: list[np.ndarray], gts: list[np.ndarray], k: int, ignore: int = IGNORE) -> dict:
    """mmseg 0.x: per image, drop GT-ignore pixels from both maps, histogram intersection /
    prediction / label over bins 0..K-1 (values outside are not counted), then nanmean."""
    inter, area_pred, area_label = np.zeros(k), np.zeros(k), np.zeros(k)
    for p, g in zip(preds, gts):
        mask = g != ignore
        pl, lab = p[mask].astype(np.int64), g[mask].astype(np.int64)
        hit = pl[pl == lab]
        inter += _histc(hit, k)
        area_pred += _histc(pl, k)
        area_label += _histc(lab, k)
    union = area_pred + area_label - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = inter / union, inter / area_label
    return {"aAcc": inter.sum() / area_label.sum(), "IoU": iou, "Acc": acc,
            "mIoU": np.nanmean(iou), "mAcc": np.nanmean(acc)}
