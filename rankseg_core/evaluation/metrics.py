"""Segmentation and multi-label metrics (docs/method.md sec. 8).

IoU policy: a class with union 0 (absent from both prediction and ground truth over the
whole evaluation) has IoU NaN and is left out of the mean, as in mmseg; torchmetrics'
Jaccard would score it 0 and drag the mean down for classes that simply never occur.

Which classes enter the mean is a protocol choice (`PROTOCOLS`, docs/benchmarks/scoring.md):
- "mmseg": classes with union > 0 (mmseg 0.x `total_area_to_metrics` + `nanmean`); a class
  only predicted (never in the GT) counts with IoU 0.
- "d2-old": detectron2's SemSegEvaluator up to v0.6 (before commit f3c1bc1, July 2022):
  sum of the IoUs of the classes present in the GT, divided by the number of classes present
  in the GT or the prediction. Same mean as "mmseg" (see `miou`), but its per-class IoU of a
  predicted-only class is NaN, not 0.
- "d2": detectron2 from f3c1bc1 on: mean over the classes present in the GT only, so a
  class predicted where it never occurs costs nothing.
All three count only pixels whose GT is not ignore (prediction pixels at ignore locations
are dropped), which is what this matrix holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor
PROTOCOLS = ("mmseg", "d2-old", "d2")


def _np(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)


class ConfusionMatrix:
    """K x K counts, rows = ground truth, columns = prediction; ignore excluded.

    An `accumulators.Accumulator`: `state()` is the K x K int64 matrix, and matrices add, so
    `accumulators.reduce_across_processes` sums it over processes with one all-reduce.
    """

    # The state is one dense count array that merges by addition (one all-reduce, no gather).
    reduce_by_sum: ClassVar[bool] = True

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: ArrayLike, target: ArrayLike) -> None:
        """pred, target: same shape (any), class ids; target pixels outside [0, K) are skipped."""
        k = self.num_classes
        if isinstance(pred, torch.Tensor) and isinstance(target, torch.Tensor):
            # Count on the tensors' device; only the K x K result crosses to the host.
            t, p = target.reshape(-1).long(), pred.reshape(-1).long().to(target.device)
            ok = (t >= 0) & (t < k) & (t != self.ignore_index)
            t, p = t[ok], p[ok]
            if p.numel() and (int(p.min()) < 0 or int(p.max()) >= k):
                raise ValueError(f"predictions hold class ids outside [0, {k})")
            counts = torch.bincount(t * k + p, minlength=k * k).cpu().numpy()
        else:
            ta, pa = _np(target).reshape(-1).astype(np.int64), _np(pred).reshape(-1).astype(np.int64)
            oka = (ta >= 0) & (ta < k) & (ta != self.ignore_index)
            ta, pa = ta[oka], pa[oka]
            if pa.size and (pa.min() < 0 or pa.max() >= k):
                raise ValueError(f"predictions hold class ids outside [0, {k})")
            counts = np.bincount(ta * k + pa, minlength=k * k)
        self.matrix += counts.reshape(k, k)

    def state(self) -> np.ndarray:
        """A copy of the K x K int64 counts (picklable; what `merge` also takes)."""
        return self.matrix.copy()

    def merge(self, other: ConfusionMatrix | np.ndarray) -> ConfusionMatrix:
        """Add another matrix, or its `state()`, in place (e.g. one per process); returns self."""
        counts = other.matrix if isinstance(other, ConfusionMatrix) else np.asarray(other)
        if counts.shape != self.matrix.shape:
            raise ValueError("cannot merge confusion matrices of different sizes")
        if counts.dtype.kind not in "iu":  # a float state would round the counts silently
            raise ValueError(f"confusion matrix counts must be integers, got {counts.dtype}")
        self.matrix += counts.astype(np.int64, copy=False)
        return self

    def __add__(self, other: ConfusionMatrix) -> ConfusionMatrix:
        out = ConfusionMatrix(self.num_classes, self.ignore_index)
        out.matrix = self.matrix + other.matrix
        return out

    def reset(self) -> None:
        self.matrix[:] = 0

    def compute(self, protocol: str = "mmseg") -> dict[str, Any]:
        """{"miou", "aacc", "macc", "fwiou": float (NaN if undefined), "iou", "acc": (K,)},
        the mIoU / per-class IoU under `protocol`."""
        return {"miou": self.miou(protocol=protocol), "aacc": self.aacc(), "macc": self.macc(),
                "fwiou": self.fwiou(), "iou": self.iou(protocol), "acc": self.acc()}

    def counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(tp, gt, pred) pixel counts per class (K,) each, float64."""
        m = self.matrix
        return np.diag(m).astype(np.float64), m.sum(1).astype(np.float64), m.sum(0).astype(np.float64)

    def averaged(self, protocol: str = "mmseg") -> np.ndarray:
        """K booleans: the classes a protocol's mIoU divides by (see the module docstring)."""
        _check_protocol(protocol)
        tp, gt, pred = self.counts()
        return gt > 0 if protocol == "d2" else gt + pred - tp > 0

    def iou(self, protocol: str = "mmseg") -> np.ndarray:
        """Per-class IoU (K,) as the protocol reports it: "mmseg" NaN where union == 0 (a
        predicted-only class scores 0); "d2-old" / "d2" NaN wherever the GT lacks the class."""
        _check_protocol(protocol)
        tp, gt, pred = self.counts()
        union = gt + pred - tp
        defined = union > 0 if protocol == "mmseg" else gt > 0
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(defined, tp / np.maximum(union, 1), np.nan)

    def miou(self, classes: Sequence[int] | np.ndarray | None = None, protocol: str = "mmseg") -> float:
        """Mean IoU under `protocol`, optionally over a subset of classes (base / novel, a
        frequency group): the subset's classes that the protocol averages over.

        "mmseg" and "d2-old" give the same number: with ignore pixels excluded from both
        sides, union > 0 iff GT + prediction > 0 (tp <= min(gt, pred)), and a predicted-only
        class has tp = 0, so its 0 adds nothing to mmseg's sum and detectron2's sum skips it.
        """
        tp, gt, pred = self.counts()
        union = gt + pred - tp
        keep = self.averaged(protocol)
        if classes is not None:
            subset = np.zeros_like(keep)
            subset[np.asarray(classes, dtype=np.int64)] = True
            keep &= subset
        if not keep.any():
            return float("nan")
        return float((tp[keep] / union[keep]).mean())  # union > 0 on every kept class

    def fwiou(self) -> float:
        """Frequency-weighted IoU (detectron2): sum over GT classes of IoU x GT pixel share.
        The same under every protocol: classes absent from the GT have weight 0."""
        tp, gt, pred = self.counts()
        has = gt > 0
        total = gt.sum()
        if not total:
            return float("nan")
        return float(np.sum(tp[has] / (gt + pred - tp)[has] * gt[has] / total))

    def macc(self) -> float:
        """Mean of the per-class accuracies over classes with GT pixels (mmseg mAcc, d2 mACC)."""
        acc = self.acc()
        valid = ~np.isnan(acc)
        return float(acc[valid].mean()) if valid.any() else float("nan")

    def acc(self) -> np.ndarray:
        """Per-class pixel accuracy (recall) (K,), NaN for classes without GT pixels."""
        gt = self.matrix.sum(1).astype(np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(gt > 0, np.diag(self.matrix) / np.maximum(gt, 1), np.nan)

    def aacc(self) -> float:
        """Overall pixel accuracy over labelled pixels."""
        total = self.matrix.sum()
        return float(np.diag(self.matrix).sum() / total) if total else float("nan")


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown mIoU protocol {protocol!r}: use one of {', '.join(PROTOCOLS)}")


def _ap_one(scores: np.ndarray, positive: np.ndarray) -> float:
    """sklearn `average_precision_score` for one class: sum_n (R_n - R_{n-1}) P_n, thresholds
    at distinct scores, so tied scores enter together (order-independent, deterministic)."""
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], positive[order].astype(np.float64)
    last = np.r_[np.nonzero(np.diff(s))[0], y.size - 1]  # last index of each tie group
    tps = np.cumsum(y)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def average_precision(scores: ArrayLike, targets: ArrayLike) -> tuple[float, np.ndarray]:
    """Per-class AP over images (the paper's multi-label "mAP").

    scores, targets: N x K. Returns (mean over classes with >= 1 positive, per-class AP (K,)
    with NaN for classes without positives).
    """
    s, t = _np(scores).astype(np.float64), _np(targets) > 0
    ap = np.full(s.shape[1], np.nan)
    for k in np.nonzero(t.any(0))[0]:  # loop over classes, vectorised over images
        ap[k] = _ap_one(s[:, k], t[:, k])
    valid = ~np.isnan(ap)
    return (float(ap[valid].mean()) if valid.any() else float("nan")), ap


def recall_at_k(scores: ArrayLike, targets: ArrayLike, k: int) -> float:
    """Mean over images with >= 1 positive of |top-k ∩ positives| / |positives|."""
    s, t = _np(scores).astype(np.float64), _np(targets) > 0
    k = min(k, s.shape[1])
    top = np.argsort(-s, axis=1, kind="mergesort")[:, :k]
    hit = np.take_along_axis(t, top, axis=1).sum(1)
    npos = t.sum(1)
    has = npos > 0
    return float((hit[has] / npos[has]).mean()) if has.any() else float("nan")
