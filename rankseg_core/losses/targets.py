"""Per-image training targets: one binary mask + class per GT segment.

Semantic (as Mask2Former's semantic dataset mapper): one segment per class present.
Panoptic (as its panoptic mapper): one segment per non-crowd record; crowd regions are no
target (their pixels stay unsupervised background for every query). Unlike the official
mapper, records with no pixel left in the map (cropped away) are dropped too: an empty mask
would teach a query to predict a class with no mask.

Built on the device of the maps. How many targets an image has decides every shape after it
(the masks, the matcher's cost matrix), so the host must learn it once: the batch functions
(`semantic_targets`, `panoptic_targets`) make that ONE device-to-host copy per batch, of a
B x K (or per-record) presence table, instead of one sync per image (`torch.unique`, boolean
indexing); the host-made index tensors go back with non-blocking copies.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from rankseg_core.losses.rankseg import class_histogram
from rankseg_core.utils.transfer import host_to


def semantic_targets(labels: Tensor, num_classes: int, ignore: int) -> list[dict[str, Tensor]]:
    """labels B x H x W class ids -> per image {"labels": n long (sorted), "masks": n x H x W
    bool} on labels' device. Values outside [0, K) and `ignore` are no segment."""
    lab = labels.long()
    present = (class_histogram(lab, num_classes, ignore) > 0).cpu()  # the one sync of the batch
    out = []
    for b in range(lab.shape[0]):
        classes = host_to(present[b].nonzero().flatten(), lab.device)
        out.append({"labels": classes, "masks": lab[b][None] == classes[:, None, None]})
    return out


def targets_from_semantic(label: Tensor, num_classes: int, ignore: int) -> dict[str, Tensor]:
    """label H x W class ids -> {"labels": n long (sorted), "masks": n x H x W bool}.

    Values outside [0, K) and `ignore` are no segment.
    """
    return semantic_targets(torch.as_tensor(label)[None], num_classes, ignore)[0]


def _kept_records(segments_info: list[dict], num_classes: int) -> tuple[list[int], list[int]]:
    """(segment indices, categories) of the non-crowd records (index i = record i-1).
    Raises ValueError for a record whose category is outside [0, K)."""
    keep, labels = [], []
    for i, rec in enumerate(segments_info, start=1):
        cat = int(rec["category"])
        if not 0 <= cat < num_classes:
            raise ValueError(f"segment record {i} has category {cat}, outside [0, {num_classes})")
        if not rec.get("iscrowd", 0):
            keep.append(i)
            labels.append(cat)
    return keep, labels


def panoptic_targets(segments: list[Tensor | np.ndarray] | Tensor, segments_info: list[list[dict]],
                     num_classes: int) -> list[dict[str, Tensor]]:
    """Per image: segment index map H x W (0 = none, i = record i-1) + its records {id,
    category, iscrowd, area} -> {"labels": n long, "masks": n x H x W bool}, the non-crowd
    segments with pixels, in record order, on the map's device. Raises ValueError for a
    record whose category is outside [0, K)."""
    maps, masks, cats = [], [], []
    for seg, info in zip(segments, segments_info, strict=True):
        s = torch.as_tensor(np.asarray(seg, dtype=np.int64) if isinstance(seg, np.ndarray) else seg).long()
        keep, labels = _kept_records(info, num_classes)
        index = host_to(torch.tensor(keep, dtype=torch.long), s.device)
        maps.append(s)
        masks.append(s[None] == index[:, None, None])
        cats.append(torch.tensor(labels, dtype=torch.long))
    if not maps:
        return []
    # Which records kept pixels, for the whole batch in one transfer.
    has = torch.cat([m.flatten(1).any(1) for m in masks]).cpu().split([len(c) for c in cats])
    out = []
    for m, c, h in zip(masks, cats, has, strict=True):
        rows = h.nonzero().flatten()
        out.append({"labels": host_to(c[rows], m.device), "masks": m.index_select(0, host_to(rows, m.device))})
    return out


def targets_from_panoptic(segments: Tensor | np.ndarray, segments_info: list[dict], num_classes: int
                          ) -> dict[str, Tensor]:
    """Segment index map H x W (0 = none, i = record i-1) + records {id, category, iscrowd,
    area} -> {"labels": n long, "masks": n x H x W bool}, non-crowd segments with pixels, in
    record order. Raises ValueError for a record whose category is outside [0, K)."""
    return panoptic_targets([segments], [segments_info], num_classes)[0]


def ml_targets_from(targets: list[dict[str, Tensor]], num_classes: int) -> Tensor:
    """Image-level multi-label targets B x K: the classes of an image's target segments
    (the official fork uses the same set: the GT instances' classes). On the targets' device,
    without a host copy: labels outside [0, K) write into a spare column K, dropped."""
    if not targets:
        return torch.zeros(0, num_classes)
    device = targets[0]["labels"].device
    y = torch.zeros(len(targets), num_classes + 1, device=device)
    for b, t in enumerate(targets):
        labels = t["labels"].long().to(device)
        y[b].scatter_(0, torch.where((labels >= 0) & (labels < num_classes), labels, num_classes), 1.0)
    return y[:, :num_classes]
