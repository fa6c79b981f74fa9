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

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypeAlias

import numpy as np

from rankseg_core.utils.counting import run_starts, value_counts

if TYPE_CHECKING:  # torch only for annotations: numpy-only commands (eval-predictions) never load it
    import torch

    ArrayLike: TypeAlias = np.ndarray | torch.Tensor

PROTOCOLS = ("mmseg", "d2-old", "d2")


def _is_tensor(x: object) -> bool:
    """Whether `x` is a torch tensor, without importing torch: if no module imported torch
    yet, nothing can be a tensor."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def _np(x: ArrayLike) -> np.ndarray:
    return x.detach().cpu().numpy() if _is_tensor(x) else np.asarray(x)  # type: ignore[union-attr]


def _unsigned(a: np.ndarray) -> np.ndarray:
    """An integer array viewed as unsigned (no copy): negatives become huge, so one `max`
    (or `minimum`) tests / clamps both ends of the range [0, K)."""
    if a.dtype.kind == "u":
        return a
    if a.dtype.kind != "i":  # float / bool: the old contract truncated them to integers
        a = a.astype(np.int64)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


class ConfusionMatrix:
    """K x K counts, rows = ground truth, columns = prediction; ignore excluded.

    An `accumulators.Accumulator`: `state()` is the K x K int64 matrix, and matrices add, so
    `accumulators.reduce_across_processes` sums it over processes with one all-reduce.

    `update` counts an image with one bincount in detectron2's layout with an extra row and
    column: a skipped target pixel goes to the last row and an out-of-range prediction to
    column K, so no boolean mask or compaction is needed; the extra row and column are dropped,
    the extra column checked. For 8 / 16-bit targets (every stored label) the rows are only
    the classes present in the image (one histogram finds them): a (|G|+1) x (K+1) count
    instead of (K+1)^2, which at K = 847 is the difference between ~100 kB and 5.7 MB of
    memory written and added per image.
    """

    # The state is one dense count array that merges by addition (one all-reduce, no gather).
    reduce_by_sum: ClassVar[bool] = True

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)
        self._scratch: dict[str, np.ndarray] = {}  # work arrays kept between updates (see _work)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_scratch": {}}  # work arrays are not state

    def update(self, pred: ArrayLike, target: ArrayLike, *, checked: bool = False) -> None:
        """pred, target: same shape (any), class ids; target pixels outside [0, K) or equal to
        `ignore_index` are skipped. A prediction outside [0, K) at a counted pixel raises
        ValueError (it would alias into another class otherwise).

        `checked`: the caller has verified 0 <= pred < K at every pixel (`score_files.
        read_prediction` does, once per file), so the range scan is skipped. Tensors on an
        accelerator are counted there; only the (K+1)^2 counts cross to the host (one sync).
        """
        k = self.num_classes
        rows: np.ndarray | None = None  # the classes of the count's rows; None: all K
        if _is_tensor(pred) and _is_tensor(target) and target.device.type != "cpu":  # type: ignore[union-attr]
            counts = self._device_counts(pred, target)  # type: ignore[arg-type]
        else:
            t, p = _np(target).reshape(-1), _np(pred).reshape(-1)
            if t.shape != p.shape:
                raise ValueError(f"prediction and target sizes differ ({p.size} vs {t.size} pixels)")
            if not t.size:
                return
            cols = _unsigned(p)
            if not checked and int(cols.max()) >= k:  # one reduction, no copy
                cols = np.minimum(cols, k)  # out of range -> column K, refused below if counted
            u = _unsigned(t)
            rows, idx = self._present_rows(u, t.dtype) if u.itemsize <= 2 else (None, self._all_rows(u))
            # The int64 loop (not float64 for int64 + uint64); cols <= K here, so the cast is exact.
            np.add(idx, cols, out=idx, dtype=np.intp, casting="unsafe")
            n_rows = k if rows is None else rows.size
            # By runs where pixels repeat along rows (region maps: ~1.7x a bincount there).
            counts = value_counts(idx, (n_rows + 1) * (k + 1)).reshape(n_rows + 1, k + 1)
        if counts[:-1, k].any():
            raise ValueError(f"predictions hold class ids outside [0, {k})")
        if rows is None:
            self.matrix += counts[:k, :k]
        else:
            self.matrix[rows] += counts[:-1, :k]

    def _present_rows(self, u: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
        """(G,) the counted classes present in an 8 / 16-bit target (`u`: its unsigned view, (N,))
        and (N,) int64 bin offsets: row rank * (K+1), |G| * (K+1) (the dropped row) if skipped.
        The offsets are a work array, valid until the next update."""
        import cv2  # OpenCV's histogram reads 8 / 16-bit values directly (np.bincount widens to int64 first)

        k, stride, values = self.num_classes, self.num_classes + 1, 1 << (8 * u.itemsize)
        starts = run_starts(u)
        if starts is None:
            hist = cv2.calcHist([u], [0], None, [values], [0, values], hist=self._work(f"hist{values}", values, np.float32))
            present = hist.reshape(-1) > 0
        else:  # a region map: the values at its run starts (~3x OpenCV's histogram, which waits on repeated bins)
            present = np.zeros(values, bool)
            present[u[starts]] = True
        present[k:] = False
        if dtype.kind == "i":  # the unsigned view of a negative value
            present[values >> 1:] = False
        if 0 <= self.ignore_index < values:
            present[self.ignore_index] = False
        rows = np.flatnonzero(present)
        table = self._work(f"table{values}", values, np.intp)  # value -> bin offset of its row
        table.fill(rows.size * stride)
        table[rows] = np.arange(rows.size) * stride
        # np.take widens 8 / 16-bit indices into a fresh int64 array and buffers `out` unless
        # mode != "raise": both would be page-faulted in anew per image (5.6 MB at 683 x 512).
        wide, idx = self._work("wide", u.size, np.intp), self._work("idx", u.size, np.intp)
        np.copyto(wide, u)
        return rows, np.take(table, wide, out=idx, mode="clip")  # every value has a table entry

    def _work(self, name: str, n: int, dtype: type) -> np.ndarray:
        """An (n,) work array kept between updates (grown, never shrunk: bounded by the largest
        image); reused because fresh multi-MB arrays cost a page fault per 4 kB every time."""
        buf = self._scratch.get(name)
        if buf is None or buf.size < n:
            buf = self._scratch[name] = np.empty(n, dtype)
        return buf[:n]

    def _all_rows(self, u: np.ndarray) -> np.ndarray:
        """(N,) int64 bin offsets t * (K+1), K * (K+1) (the dropped row) for skipped pixels, of
        a wider target (`u`: its unsigned view)."""
        k = self.num_classes
        rows = np.minimum(u, k)  # negatives (huge when unsigned) and >= K -> row K
        if 0 <= self.ignore_index < k:
            rows[u == self.ignore_index] = k
        return np.multiply(rows, k + 1, dtype=np.intp, casting="unsafe")  # rows <= K: exact

    def _device_counts(self, pred: torch.Tensor, target: torch.Tensor) -> np.ndarray:
        """(K+1) x (K+1) counts of tensors on an accelerator, counted there."""
        import torch

        k, ign = self.num_classes, self.ignore_index
        t, p = target.reshape(-1).long(), pred.reshape(-1).to(target.device).long()
        rows = torch.where((t < 0) | (t >= k) | (t == ign), k, t)
        cols = torch.where((p < 0) | (p >= k), k, p)
        counts = torch.bincount(rows * (k + 1) + cols, minlength=(k + 1) ** 2)
        return counts.cpu().numpy().reshape(k + 1, k + 1)

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
