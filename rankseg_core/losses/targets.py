"""Per-image training targets: one binary mask + class per GT segment.

Semantic (as Mask2Former's semantic dataset mapper): one segment per class present.
Panoptic (as its panoptic mapper): one segment per non-crowd record; crowd regions are no
target (their pixels stay unsupervised background for every query). Unlike the official
mapper, records with no pixel left in the map (cropped away) are dropped too: an empty mask
would teach a query to predict a class with no mask.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def targets_from_semantic(label: Tensor, num_classes: int, ignore: int) -> dict[str, Tensor]:
    """label H x W class ids -> {"labels": n long (sorted), "masks": n x H x W bool}.

    Values outside [0, K) and `ignore` are no segment.
    """
    lab = torch.as_tensor(label).long()
    ok = (lab >= 0) & (lab < num_classes) & (lab != ignore)
    classes = torch.unique(lab[ok])
    return {"labels": classes, "masks": lab[None] == classes[:, None, None]}


def targets_from_panoptic(segments: Tensor | np.ndarray, segments_info: list[dict], num_classes: int
                          ) -> dict[str, Tensor]:
    """Segment index map H x W (0 = none, i = record i-1) + records {id, category, iscrowd,
    area} -> {"labels": n long, "masks": n x H x W bool}, non-crowd segments with pixels, in
    record order. Raises ValueError for a record whose category is outside [0, K)."""
    seg = torch.as_tensor(np.asarray(segments, dtype=np.int64) if isinstance(segments, np.ndarray) else segments).long()
    keep, labels = [], []
    for i, rec in enumerate(segments_info, start=1):
        cat = int(rec["category"])
        if not 0 <= cat < num_classes:
            raise ValueError(f"segment record {i} has category {cat}, outside [0, {num_classes})")
        if not rec.get("iscrowd", 0):
            keep.append(i)
            labels.append(cat)
    index = torch.tensor(keep, dtype=torch.long)
    masks = seg[None] == index[:, None, None]
    has = masks.flatten(1).any(1)
    return {"labels": torch.tensor(labels, dtype=torch.long)[has], "masks": masks[has]}


def ml_targets_from(targets: list[dict[str, Tensor]], num_classes: int) -> Tensor:
    """Image-level multi-label targets B x K: the classes of an image's target segments
    (the official fork uses the same set: the GT instances' classes)."""
    y = torch.zeros(len(targets), num_classes)
    for b, t in enumerate(targets):
        labels = t["labels"].cpu().long()
        y[b, labels[(labels >= 0) & (labels < num_classes)]] = 1.0
    return y.to(targets[0]["labels"].device) if targets else y
