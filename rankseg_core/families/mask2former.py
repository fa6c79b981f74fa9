"""The Mask2Former family: Mask2Former baseline and Mask2Former + RankSeg (model/mask2former/).

Training targets come from the batch: one segment per class present in the crop's label
(semantic task, as Mask2Former's semantic mapper) or one per non-crowd segment of the crop's
segment map (panoptic task, shard format v2). Prediction is whole-image at the test size, as
every official Mask2Former config; multi-scale / flip average the per-class scores over the
selected classes only (never K channels) and the panoptic output comes from the single-scale
pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankseg_core.errors import UserError
from rankseg_core.families.base import Family, Predictions
from rankseg_core.inference.dense import ClassMaps
from rankseg_core.inference.mask2former import panoptic_inference, semantic_inference_compact
from rankseg_core.losses.mask2former import Mask2FormerCriterion
from rankseg_core.losses.rankseg import ml_loss_fn
from rankseg_core.losses.targets import targets_from_panoptic, targets_from_semantic
from rankseg_core.model.mask2former.model import Mask2FormerOutput, build_mask2former
from rankseg_core.shards.codec import IGNORE


def _panoptic(cfg: Any) -> bool:
    return cfg.model.mask2former.task == "panoptic"


def batch_targets(batch: dict[str, Any], num_classes: int, panoptic: bool) -> list[dict[str, Tensor]]:
    """Per image {"labels": n, "masks": n x c x c} from a collated training batch: the segment
    map + records (panoptic) or the semantic label (one segment per present class)."""
    if panoptic:
        return [targets_from_panoptic(seg, info, num_classes)
                for seg, info in zip(batch["segments"], batch["segments_info"])]
    return [targets_from_semantic(lab, num_classes, IGNORE) for lab in batch["label"]]


def _criterion(cfg: Any) -> Any:
    crit = Mask2FormerCriterion(cfg.model, ml_loss_fn(cfg.loss), cfg.loss.ml_weight)
    k, panoptic = cfg.model.num_classes, _panoptic(cfg)
    return lambda out, batch: crit(out, batch_targets(batch, k, panoptic))


def _one(out: Mask2FormerOutput, i: int) -> Mask2FormerOutput:
    """The output of image i alone (inference needs no auxiliary predictions)."""
    def pick(t):
        return (None if t is None else t[i:i + 1])
    return dataclasses.replace(out, pred_logits=out.pred_logits[i:i + 1], pred_masks=out.pred_masks[i:i + 1],
                               aux=[], ml_logits=pick(out.ml_logits), topk_index=pick(out.topk_index),
                               valid=pick(out.valid))


def _scores(out: Mask2FormerOutput, size: tuple[int, int], flipped: bool) -> ClassMaps:
    """One image's per-class scores over its selected classes, as ClassMaps 1 x C x H x W
    with sorted class ids (padding columns of a variable-length selection dropped)."""
    scores, classes, valid = semantic_inference_compact(out, size)
    scores, classes = scores[0], classes[0]
    if valid is not None and valid.shape[-1] == classes.numel():
        scores, classes = scores[valid[0]], classes[valid[0]]
    order = classes.argsort()
    maps = scores[order][None]
    return ClassMaps(maps.flip(-1) if flipped else maps, classes[order])


@torch.no_grad()
def predict(model: nn.Module, cfg: Any, images: Tensor, sizes: list[tuple[int, int]], mode: str,
            scales: list[float], flip: bool, **fwd_kw) -> Predictions:
    """Semantic class maps (and panoptic segments for the panoptic task) at `sizes`.

    images N x 3 x H x W at the test size. Scores per pass: sum over queries of class
    probability x sigmoid mask, masks resized to the output size first (official
    `semantic_inference`); passes are averaged (scores of a class a pass did not select: 0).
    """
    if mode != "whole":
        raise UserError(f"eval mode {mode!r}: Mask2Former predicts whole images (every official config does); "
                        "use --mode whole")
    h, w = images.shape[-2:]
    n = images.shape[0]
    totals: list[ClassMaps | None] = [None] * n
    ml_sum, passes, panoptic = None, 0, None
    for scale in scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = images if size == (h, w) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            out = model(x.flip(-1) if flipped else x, **fwd_kw)
            for i in range(n):
                s = _scores(_one(out, i), tuple(sizes[i]), flipped)
                t = totals[i]
                if t is None:
                    totals[i] = s
                else:
                    classes = torch.unique(torch.cat([t.classes, s.classes]))
                    totals[i] = ClassMaps(t.widen(classes, 0.0) + s.widen(classes, 0.0), classes)
            if _panoptic(cfg) and size == (h, w) and not flipped:
                m = cfg.model.mask2former
                things = cfg.data.thing_classes or []
                panoptic = [panoptic_inference(_one(out, i), tuple(sizes[i]), things, m.object_mask_threshold,
                                               m.overlap_threshold)[0] for i in range(n)]
            if out.ml_logits is not None:
                p = out.ml_logits.float().sigmoid()
                ml_sum = p if ml_sum is None else ml_sum + p
            passes += 1
    semantic = [t.argmax()[0] for t in totals]  # averaging does not change the argmax: no division
    return Predictions(semantic, None if ml_sum is None else ml_sum / passes, panoptic)


MASK2FORMER = Family(
    name="mask2former",
    build=build_mask2former,
    criterion=_criterion,
    stats=("loss", "ce", "mask", "dice", "ml", "kept"),
    predict=predict,
    # The GT (train + eval) oracle has no ml head in the graph.
    find_unused_parameters=lambda m: m.oracle,
    uses_segments=lambda m: m.mask2former.task == "panoptic",
)
