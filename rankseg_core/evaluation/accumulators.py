"""Metric accumulators: `update` per batch, `merge` across processes, `compute` at the end.

Every accumulator here satisfies `Accumulator`: `update(...)` adds data, `state()` returns
a picklable snapshot, `merge(other_or_state)` adds another accumulator or a state in place,
`reset()` empties it and `compute()` gives the metrics. Three kinds exist:

- `metrics.ConfusionMatrix`: K x K pixel counts (mIoU, aAcc, ...); its state is a dense int64
  array, summed over processes with one all-reduce.
- `MultiLabelAccumulator` (here): per-image class probabilities and GT classes, for per-class
  AP (mAP) and recall@kappa; exact AP needs every score, so the states are gathered.
- `panoptic_quality.PanopticQuality`: per-category TP / FP / FN / IoU sums; states gathered
  (small, and merging them in rank order keeps the float sums identical on every rank).

`reduce_across_processes` merges one accumulator over all DDP ranks (a no-op for a single
process); `EvalAccumulators` bundles the three for `rankseg eval`'s loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, TypeVar, runtime_checkable

import numpy as np
import torch

from rankseg_core.evaluation.metrics import ConfusionMatrix, average_precision, recall_at_k
from rankseg_core.evaluation.panoptic_quality import PanopticQuality
from rankseg_core.utils import distributed as D

ArrayLike = np.ndarray | torch.Tensor
A = TypeVar("A", bound="Accumulator")


@runtime_checkable
class Accumulator(Protocol):
    """What `reduce_across_processes` needs of a metric accumulator.

    An accumulator may set the class attribute `reduce_by_sum = True` when its `state()` is
    one numeric array whose `merge` is elementwise addition: it is then reduced with one
    all-reduce instead of gathering every process's state.
    """

    def update(self, *args: Any, **kwargs: Any) -> None:
        """Add a batch (arguments depend on the metric)."""

    def state(self) -> Any:
        """A picklable snapshot of the accumulated data; `merge` takes it."""

    def merge(self: A, other: Any) -> A:
        """Add another accumulator of the same kind, or its `state()`, in place; returns self."""

    def reset(self) -> None:
        """Forget everything added."""

    def compute(self) -> Any:
        """The metrics of everything added (and merged) so far."""


def reduce_across_processes(acc: A, device: torch.device | None = None) -> A:
    """Merge `acc` over all DDP processes in place; every process gets the same result.

    A collective: every process must call it, for the same accumulators in the same order,
    once after its last `update` (reducing twice would count the other processes twice).
    `device`: where the all-reduce runs under nccl (ignored under gloo). Without an
    initialised process group (one process) it returns `acc` untouched.
    """
    if not D.current().enabled:
        return acc
    if getattr(acc, "reduce_by_sum", False):
        states = [D.all_reduce_sum_np(np.asarray(acc.state()), device)]
    else:
        states = D.all_gather_objects(acc.state())  # rank order: the same merge order everywhere
    acc.reset()
    for state in states:
        acc.merge(state)
    return acc


# ---------------------------------------------------------------------------------------
# Multi-label ranking metrics


class MultiLabelScores(NamedTuple):
    """`MultiLabelAccumulator.compute()`: NaN where undefined (no image, no positive)."""

    map: float  # mean of `ap` over classes with >= 1 positive image
    ap: np.ndarray  # (K,) float64 per-class AP, NaN for classes without positives
    recall_at_kappa: float  # mean over images with >= 1 GT class of |top-kappa ∩ GT| / |GT|
    num_images: int


class MultiLabelAccumulator:
    """Per-class AP over images ("mAP") and recall@kappa of multi-label class probabilities.

    Holds, per image added, its K probabilities as float32 and its GT class set as a packed
    bit row (ceil(K / 8) bytes): N x K x 4 + N x ceil(K / 8) bytes in all. The N x K scores
    are inherent to exact AP (each class ranks all N images); the targets are 32x smaller
    than a float32 one-hot. `compute` briefly makes float64 / bool N x K copies.
    """

    reduce_by_sum = False  # the state is the scores themselves: gathered, not summed

    def __init__(self, num_classes: int, kappa: int) -> None:
        if num_classes < 1:
            raise ValueError("num_classes must be >= 1")
        if kappa < 1:
            raise ValueError("kappa must be >= 1")
        self.num_classes = num_classes
        self.kappa = kappa
        self.reset()

    def reset(self) -> None:
        # Chunks as added (one per update / merge): appending is O(1) and `compute` joins them once.
        self._probs: list[np.ndarray] = []
        self._targets: list[np.ndarray] = []

    @property
    def num_images(self) -> int:
        return sum(len(p) for p in self._probs)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored scores and targets."""
        return sum(p.nbytes for p in self._probs) + sum(t.nbytes for t in self._targets)

    def update(self, probs: ArrayLike, gt_classes: Sequence[ArrayLike | Sequence[int]]) -> None:
        """Add N images.

        probs: N x K class probabilities (tensor on any device, or array); stored as float32.
        gt_classes: N arrays (or lists) of the image's GT class ids in [0, K), any order,
        repeats allowed; an empty one is an image without positives (it still counts for AP).
        """
        p = _to_float32(probs)
        if p.ndim != 2 or p.shape[1] != self.num_classes:
            raise ValueError(f"probs must be N x {self.num_classes}, got {tuple(p.shape)}")
        if len(gt_classes) != len(p):
            raise ValueError(f"{len(p)} rows of probs but {len(gt_classes)} GT class lists")
        if not len(p):
            return
        targets = np.packbits(self._one_hot(gt_classes), axis=1)  # validates before anything is kept
        self._probs.append(p)
        self._targets.append(targets)

    def _one_hot(self, gt_classes: Sequence[ArrayLike | Sequence[int]]) -> np.ndarray:
        """N x K bool (transient: only the packed bits are kept)."""
        hot = np.zeros((len(gt_classes), self.num_classes), bool)
        for row, ids in zip(hot, gt_classes):
            ids = ids.detach().cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
            ids = ids.reshape(-1)
            if not ids.size:  # np.asarray([]) is float64, which cannot index
                continue
            if ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= self.num_classes:
                # a negative id would index from the end and mark the wrong class
                raise ValueError(f"GT class ids must be integers in [0, {self.num_classes}), got {ids.tolist()}")
            row[ids] = True
        return hot

    def state(self) -> dict[str, Any]:
        """{"num_classes", "kappa", "probs": N x K float32, "targets": N x ceil(K/8) uint8
        (np.packbits of the N x K GT indicator along K)}; picklable, what `merge` takes."""
        k = self.num_classes
        probs = np.concatenate(self._probs) if self._probs else np.zeros((0, k), np.float32)
        targets = np.concatenate(self._targets) if self._targets else np.zeros((0, (k + 7) // 8), np.uint8)
        self._probs, self._targets = [probs], [targets]  # joined once; later calls reuse it
        return {"num_classes": k, "kappa": self.kappa, "probs": probs, "targets": targets}

    def merge(self, other: MultiLabelAccumulator | dict[str, Any]) -> MultiLabelAccumulator:
        """Append another accumulator's images (or its `state()`) in place; returns self."""
        s = other.state() if isinstance(other, MultiLabelAccumulator) else other
        if s["num_classes"] != self.num_classes or s["kappa"] != self.kappa:
            raise ValueError("cannot merge multi-label accumulators with different num_classes or kappa")
        probs = np.asarray(s["probs"], np.float32)
        targets = np.asarray(s["targets"], np.uint8)
        if probs.shape[1:] != (self.num_classes,) or targets.shape != (len(probs), (self.num_classes + 7) // 8):
            raise ValueError("malformed multi-label state")
        if len(probs):
            self._probs.append(probs)
            self._targets.append(targets)
        return self

    def compute(self) -> MultiLabelScores:
        """mAP, per-class AP and recall@kappa: exactly `metrics.average_precision` and
        `metrics.recall_at_k` on the N x K scores and GT indicator."""
        k = self.num_classes
        if not self._probs:
            return MultiLabelScores(float("nan"), np.full(k, np.nan), float("nan"), 0)
        s = self.state()
        targets = np.unpackbits(s["targets"], axis=1, count=k).astype(bool)
        m_ap, ap = average_precision(s["probs"], targets)
        return MultiLabelScores(m_ap, ap, recall_at_k(s["probs"], targets, self.kappa), len(targets))


def _to_float32(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to(torch.float32).cpu().numpy()  # cast on the device: half the copy for bf16
    return np.asarray(x, np.float32)


# ---------------------------------------------------------------------------------------
# The bundle `rankseg eval` uses


@dataclass
class EvalAccumulators:
    """The accumulators of one evaluation; those that are None are not measured.

    Per image (or batch) in the loop:
      - `confusion.update(pred, target)`: H x W predicted train ids and GT train ids (tensors on
        one device or arrays; GT ignore pixels are skipped);
      - `multilabel.update(probs, gt_classes)`: probs N x K multi-label probabilities, gt_classes
        N arrays of the images' GT class ids;
      - `panoptic.update(pred_segments, pred_info, gt_segments, gt_info)`: H x W segment-id maps
        and their records (`panoptic_quality.image_stats`).
    Then `reduce(device)` once (every process, DDP) and `compute()`.
    """

    confusion: ConfusionMatrix | None = None
    multilabel: MultiLabelAccumulator | None = None
    panoptic: PanopticQuality | None = None

    @classmethod
    def create(cls, num_classes: int, *, ignore_index: int, kappa: int,
               thing_classes: Sequence[int] | None = None) -> EvalAccumulators:
        """Confusion matrix and multi-label accumulator over K classes; PQ as well when
        `thing_classes` is given (a panoptic dataset; [] = panoptic without things)."""
        pq = PanopticQuality(num_classes, thing_classes) if thing_classes is not None else None
        return cls(ConfusionMatrix(num_classes, ignore_index), MultiLabelAccumulator(num_classes, kappa), pq)

    def present(self) -> list[Accumulator]:
        return [a for a in (self.confusion, self.multilabel, self.panoptic) if a is not None]

    def reduce(self, device: torch.device | None = None) -> EvalAccumulators:
        """Merge every present accumulator over all DDP processes (see
        `reduce_across_processes`); every process must hold the same ones. Returns self."""
        for acc in self.present():
            reduce_across_processes(acc, device)
        return self

    def compute(self) -> dict[str, Any]:
        """{"miou", "aacc"} (with a confusion matrix), {"map", "ap" (K,), "recall_at_kappa"}
        (with the multi-label accumulator; NaN without images) and "pq" (`PanopticQuality.compute()`,
        None when no image was added or PQ is not measured)."""
        out: dict[str, Any] = {}
        if self.confusion is not None:
            out.update(miou=self.confusion.miou(), aacc=self.confusion.aacc())
        if self.multilabel is not None:
            ml = self.multilabel.compute()
            out.update(map=ml.map, ap=ml.ap, recall_at_kappa=ml.recall_at_kappa)
        out["pq"] = self.panoptic.compute() if self.panoptic is not None and self.panoptic.num_images else None
        return out
