"""Weak-shot metrics: mIoU / accuracy over the base and the novel classes (docs/weak-shot.md).

As SimFormer's `WeakShotSemSegEvaluator` (prop_former/evaluation.py, on detectron2's
SemSegEvaluator up to v0.6): the model predicts all K classes; from the one K x K confusion
matrix, a class's IoU and accuracy are defined only when the class has GT pixels in the
evaluated split (a class only predicted, never in the GT, is NaN, not 0), and

    BaseIoU  = mean IoU over the base classes with GT pixels,  NovelIoU likewise (the headline);
    BaseACC  = mean pixel accuracy (tp / GT pixels) over the same base classes, NovelACC likewise.

So these means skip a class absent from the GT even if it is predicted, while the overall
mIoU (protocol "mmseg" = "d2-old", metrics.py) counts such a class with IoU 0. The official
evaluator has no harmonic mean of the two, so none is reported.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rankseg_core.evaluation.metrics import ConfusionMatrix


def _mean_defined(values: np.ndarray, ids: np.ndarray) -> float:
    picked = values[ids]
    picked = picked[~np.isnan(picked)]
    return float(picked.mean()) if picked.size else float("nan")


def base_novel_scores(cm: ConfusionMatrix, novel: Sequence[int]) -> dict[str, float | int]:
    """{"base_iou", "novel_iou", "base_acc", "novel_acc": fractions (NaN when no class of the
    group has GT pixels), "num_base", "num_novel": the groups' sizes, "base_averaged",
    "novel_averaged": how many of them had GT pixels (entered the means)}."""
    k = cm.num_classes
    is_novel = np.zeros(k, bool)
    is_novel[np.asarray(list(novel), np.int64)] = True
    base_ids, novel_ids = np.flatnonzero(~is_novel), np.flatnonzero(is_novel)
    iou = cm.iou("d2-old")  # NaN wherever the GT lacks the class, as the official evaluator
    acc = cm.acc()
    has_gt = ~np.isnan(acc)
    return {"base_iou": _mean_defined(iou, base_ids), "novel_iou": _mean_defined(iou, novel_ids),
            "base_acc": _mean_defined(acc, base_ids), "novel_acc": _mean_defined(acc, novel_ids),
            "num_base": int(base_ids.size), "num_novel": int(novel_ids.size),
            "base_averaged": int(has_gt[base_ids].sum()), "novel_averaged": int(has_gt[novel_ids].sum())}
