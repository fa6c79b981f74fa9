"""Semantic and panoptic inference from a Mask2FormerOutput (no ground truth involved).

Masks are brought to the output size as the official code does: bilinear upsampling to the
padded input, crop to the image, bilinear resize to the requested size. RankSeg outputs
(kappa + 1 columns) are scattered back into K + 1 columns with FILL_LOGIT (-100) elsewhere,
the no-object column last, then the standard rules apply (`full_class_logits`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from rankseg_core.model.heads import FILL_LOGIT
from rankseg_core.model.mask2former.model import Mask2FormerOutput


def full_class_logits(out: Mask2FormerOutput, logits: Tensor | None = None) -> Tensor:
    """B x Q x (C+1) logits (default: the last layer's) -> B x Q x (K+1) in class order.

    Unselected classes (and padding columns) get FILL_LOGIT; the no-object column stays last.
    """
    logits = out.pred_logits if logits is None else logits
    if out.topk_index is None:
        return logits
    b, q, _ = logits.shape
    k = out.num_classes
    cols = out.topk_index if out.valid is None else out.topk_index.masked_fill(~out.valid, k + 1)
    cols = torch.cat([cols, cols.new_full((b, 1), k)], dim=1)  # padding -> spare column K+1
    full = logits.new_full((b, q, k + 2), FILL_LOGIT)
    full.scatter_(2, cols[:, None, :].expand(-1, q, -1), logits)
    return full[..., : k + 1]


def mask_logits_at(out: Mask2FormerOutput, size: tuple[int, int], index: int | None = None) -> Tensor:
    """Mask logits at `size`: B x Q x H x W (or Q x H x W of image `index`)."""
    masks = out.pred_masks if index is None else out.pred_masks[index:index + 1]
    padded = (masks.shape[-2] * 4, masks.shape[-1] * 4)
    h, w = out.image_size
    masks = F.interpolate(masks.float(), size=padded, mode="bilinear", align_corners=False)[..., :h, :w]
    masks = F.interpolate(masks, size=tuple(size), mode="bilinear", align_corners=False)
    return masks if index is None else masks[0]


def semantic_inference(out: Mask2FormerOutput, size: tuple[int, int]) -> Tensor:
    """Per-class scores B x K x H x W: sum over queries of softmax class prob (no-object
    dropped) x sigmoid mask, as the official semantic_inference."""
    probs = full_class_logits(out).float().softmax(-1)[..., :-1]
    return torch.stack([torch.einsum("qc,qhw->chw", probs[i], mask_logits_at(out, size, i).sigmoid())
                        for i in range(probs.shape[0])])


def semantic_inference_compact(out: Mask2FormerOutput, size: tuple[int, int]
                               ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Scores over the selected classes only: (B x C x H x W, class ids B x C, valid B x C or None).

    The softmax runs over the C + 1 computed columns; the K - C scattered -100 columns of
    `semantic_inference` add exp(-100)-sized terms only, so the two agree to ~1e-40 relative.
    """
    probs = out.pred_logits.float().softmax(-1)[..., :-1]
    scores = torch.stack([torch.einsum("qc,qhw->chw", probs[i], mask_logits_at(out, size, i).sigmoid())
                          for i in range(probs.shape[0])])
    if out.topk_index is not None:
        return scores, out.topk_index, out.valid
    classes = torch.arange(out.num_classes, device=scores.device).expand(scores.shape[0], -1)
    return scores, classes, out.valid


@torch.no_grad()
def panoptic_inference(out: Mask2FormerOutput, size: tuple[int, int], thing_classes: Iterable[int],
                       object_mask_threshold: float = 0.8, overlap_threshold: float = 0.8
                       ) -> list[tuple[Tensor, list[dict]]]:
    """Per image (H x W int32 segment ids, 0 = void; [{"id", "category", "isthing", "score"}]).

    Official rules: keep queries whose best class is not no-object with probability >
    object_mask_threshold; each pixel goes to the kept query maximising prob x sigmoid mask;
    a query keeps the pixels it wins where its own mask >= 0.5, and is dropped when that area
    is below overlap_threshold of its mask's area (>= 0.5); stuff queries of a class already
    placed join that segment. Ids count from 1 in query order.
    """
    things = {int(c) for c in thing_classes}
    probs = full_class_logits(out).float().softmax(-1)
    k = out.num_classes
    results = []
    for i in range(probs.shape[0]):
        scores, labels = probs[i].max(-1)
        keep = (labels != k) & (scores > object_mask_threshold)
        seg = torch.zeros(tuple(size), dtype=torch.int32, device=probs.device)
        segments: list[dict] = []
        if not bool(keep.any()):
            results.append((seg, segments))
            continue
        masks = mask_logits_at(out, size, i)[keep].sigmoid()
        cur_scores, cur_labels = scores[keep], labels[keep]
        owner = (cur_scores[:, None, None] * masks).argmax(0)
        stuff_ids: dict[int, int] = {}
        for q in range(masks.shape[0]):
            cls = int(cur_labels[q])
            won = owner == q
            own = masks[q] >= 0.5
            area, original = int(won.sum()), int(own.sum())
            region = won & own
            if area == 0 or original == 0 or not bool(region.any()):
                continue
            if area / original < overlap_threshold:
                continue
            isthing = cls in things
            if not isthing and cls in stuff_ids:
                seg[region] = stuff_ids[cls]
                continue
            new_id = len(segments) + 1
            if not isthing:
                stuff_ids[cls] = new_id
            seg[region] = new_id
            segments.append({"id": new_id, "category": cls, "isthing": isthing, "score": float(cur_scores[q])})
        results.append((seg, segments))
    return results
