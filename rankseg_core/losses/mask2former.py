"""Mask2Former set losses (+ the RankSeg multi-label loss), as the official SetCriterion.

For every prediction step (the last layer, and with deep supervision each earlier one):
Hungarian matching, then
- ce:   cross-entropy of every query's class logits; unmatched queries target no-object
        (the last column), whose class weight is `no_object_weight` (weighted mean);
- mask: sigmoid CE of matched masks at importance-sampled points, summed over masks / N;
- dice: dice loss of the same points, summed over masks / N,
with N the number of GT segments in the batch (averaged over processes, at least 1).
Total = sum over steps of (2 ce + 5 mask + 5 dice) + ml_weight * ml_loss(ml logits, image
classes), ml_loss = ASL(gamma- 2, gamma+ 0) as the official fork unless the caller passes another.

RankSeg: GT segments are renumbered to the column of their class in the selection, and
segments whose class is not selected are dropped BEFORE matching.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

from rankseg_core.config.model import ModelConfig
from rankseg_core.losses.matcher import hungarian_match
from rankseg_core.losses.points import point_sample, uncertain_points
from rankseg_core.losses.rankseg import asymmetric_loss
from rankseg_core.losses.targets import ml_targets_from
from rankseg_core.model.mask2former.model import Mask2FormerOutput
from rankseg_core.utils.transfer import host_to


def column_targets(targets: list[dict[str, Tensor]], topk_index: Tensor | None, valid: Tensor | None,
                   num_classes: int) -> list[dict[str, Tensor]]:
    """Class labels -> output column indices; segments without a column are dropped.

    topk_index B x C (valid B x C): column r holds class topk_index[b, r]; None = the K
    classes in class order (labels outside [0, K) are dropped).
    """
    all_cols = []
    for b, t in enumerate(targets):
        labels = t["labels"].long()
        if topk_index is None:
            cols = torch.where((labels >= 0) & (labels < num_classes), labels, -1)
        else:
            table = torch.full((num_classes + 1,), -1, dtype=torch.long, device=labels.device)
            idx = topk_index[b].to(labels.device)
            if valid is not None:  # padding columns write into the spare slot K
                idx = idx.masked_fill(~valid[b].to(labels.device), num_classes)
            table.scatter_(0, idx, torch.arange(idx.numel(), device=labels.device))
            table[num_classes] = -1
            cols = table[labels.clamp(0, num_classes)].masked_fill((labels < 0) | (labels >= num_classes), -1)
        all_cols.append(cols)
    if not all_cols:
        return []
    # Which segments keep a column depends on the selection (a device value) and decides the
    # shapes: one host copy for the batch, not a boolean index (a sync) per image.
    keeps = (torch.cat(all_cols) >= 0).cpu().split([len(c) for c in all_cols])
    out = []
    for t, cols, keep in zip(targets, all_cols, keeps, strict=True):
        rows = keep.nonzero().flatten()
        # Every other per-target tensor (the masks; a family's host tables) keeps its own device.
        out.append({"labels": cols.index_select(0, host_to(rows, cols.device)),
                    **{key: v.index_select(0, host_to(rows, v.device)) for key, v in t.items() if key != "labels"}})
    return out


def mask_losses(src: Tensor, tgt: Tensor, coords: Tensor, num_masks: float) -> tuple[Tensor, Tensor]:
    """Sigmoid CE (mean over points, sum over masks) and dice (sum over masks), both / num_masks.

    src N x h x w logits, tgt N x H x W (0/1), coords N x P x 2 in [0, 1].
    """
    logits = point_sample(src[:, None], coords)[:, 0]
    with torch.no_grad():
        labels = point_sample(tgt[:, None].to(logits.dtype), coords)[:, 0]
    ce = F.binary_cross_entropy_with_logits(logits, labels, reduction="none").mean(1).sum() / num_masks
    p = logits.sigmoid()
    dice = 1 - (2 * (p * labels).sum(-1) + 1) / (p.sum(-1) + labels.sum(-1) + 1)
    return ce, dice.sum() / num_masks


class Mask2FormerCriterion:
    """`crit(out, targets, ml_targets) -> {"loss", "ce", "mask", "dice", "ml", "kept"}`.

    targets: per image {"labels": n long class ids, "masks": n x H x W bool} at the input
    size before padding (`targets.targets_from_semantic / _from_panoptic`).
    ml_targets: B x K image-level targets; None = the classes of each image's segments.
    "ce" / "mask" / "dice" are the last layer's unweighted parts, "ml" the unweighted ASL,
    "kept" the fraction of GT segments whose class is selected (1 for class-ordered models).
    """

    def __init__(self, cfg: ModelConfig, ml_loss: Callable[[Tensor, Tensor], Tensor] = asymmetric_loss,
                 ml_weight: float = 10.0) -> None:
        # ml_loss / ml_weight: the engine passes the run's `loss.*` (one knob for every family);
        # the defaults are the fork's RANKSEG.LOSS_WEIGHT and AsymmetricLoss(2, 0).
        self.num_classes = cfg.num_classes
        self.m = cfg.mask2former
        self.ml_loss, self.ml_weight = ml_loss, ml_weight

    def _num_masks(self, count: int, device: torch.device) -> float:
        """The mask losses' normaliser: `count` target masks (a shape, known on the host), averaged
        over the processes."""
        if not (dist.is_available() and dist.is_initialized()):
            return max(float(count), 1.0)  # one process: no device value, no sync
        # The official normaliser is global: an all-reduce and a sync, as in detectron2.
        n = torch.tensor([float(count)], device=device)
        dist.all_reduce(n)
        return max(float((n / dist.get_world_size()).item()), 1.0)

    def _match(self, logits: Tensor, masks: Tensor, targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """(query indices, target indices) per image (the video criterion matches clips)."""
        m = self.m
        return hungarian_match(logits, masks, targets, m.train_num_points, m.class_weight, m.mask_weight,
                               m.dice_weight)

    @staticmethod
    def _frame_masks(src: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor]:
        """Matched predicted / target masks as the point-sampled mask losses take them: N x h x w
        and N x H x W (the video criterion flattens each pair's T frames into T masks)."""
        return src, tgt

    def class_loss(self, logits: Tensor, indices: list[tuple[Tensor, Tensor]], targets: list[dict[str, Tensor]]
                   ) -> Tensor:
        """CE over all queries (logits B x Q x (C + 1)): a matched query's target is its target's
        class, every other query's the no-object column, weighted by `no_object_weight`."""
        c = logits.shape[-1]
        target_cols = torch.full(logits.shape[:2], c - 1, dtype=torch.long, device=logits.device)
        for b, (q, j) in enumerate(indices):
            target_cols[b, q] = targets[b]["labels"][j]
        weight = torch.ones(c, device=logits.device)
        weight[-1] = self.m.no_object_weight
        return F.cross_entropy(logits.float().transpose(1, 2), target_cols, weight)

    def _step(self, logits: Tensor, masks: Tensor, targets: list[dict[str, Tensor]], num_masks: float
              ) -> tuple[Tensor, Tensor, Tensor]:
        """(class CE, mask loss, dice loss) of one prediction step: Hungarian matching
        (`_match`), CE over all queries with the no-object weight, mask terms of the pairs."""
        indices = self._match(logits, masks, targets)
        ce = self.class_loss(logits, indices, targets)

        src = torch.cat([masks[b, q] for b, (q, _) in enumerate(indices)])
        if src.shape[0] == 0:  # nothing to match: keep the graph, zero mask losses
            zero = masks.sum() * 0.0
            return ce, zero, zero
        tgt = torch.cat([targets[b]["masks"][j] for b, (_, j) in enumerate(indices)])
        return (ce, *self._mask_losses(src, tgt, num_masks))

    def _mask_losses(self, src: Tensor, tgt: Tensor, num_masks: float) -> tuple[Tensor, Tensor]:
        """(mask, dice) losses of the matched predicted mask logits N x h x w against their
        targets N x H x W: sigmoid CE and dice at importance-sampled points (Mask2Former)."""
        m = self.m
        src, tgt = self._frame_masks(src, tgt)
        with torch.no_grad():
            coords = uncertain_points(src[:, None].detach().float(), m.train_num_points, m.oversample_ratio,
                                      m.importance_sample_ratio)
        return mask_losses(src.float(), tgt, coords, num_masks)

    def __call__(self, out: Mask2FormerOutput, targets: list[dict[str, Tensor]],
                 ml_targets: Tensor | None = None) -> dict[str, Tensor]:
        m = self.m
        if len(targets) != out.pred_logits.shape[0]:
            raise ValueError(f"{len(targets)} target dicts for a batch of {out.pred_logits.shape[0]} images")
        padded = (out.pred_masks.shape[-2] * 4, out.pred_masks.shape[-1] * 4)
        tgts = []
        for t in targets:
            if tuple(t["masks"].shape[-2:]) != tuple(out.image_size):
                raise ValueError(f"target masks are {tuple(t['masks'].shape[-2:])}, the input was {out.image_size}")
            ph, pw = padded[0] - out.image_size[0], padded[1] - out.image_size[1]
            masks = t["masks"].to(out.pred_masks.device)
            tgts.append({"labels": t["labels"].to(out.pred_masks.device),
                         "masks": F.pad(masks, (0, pw, 0, ph)) if ph or pw else masks})
        cols = column_targets(tgts, out.topk_index, out.valid if out.topk_index is not None else None,
                              self.num_classes)
        total_segments = sum(len(t["labels"]) for t in tgts)
        kept = sum(len(t["labels"]) for t in cols) / total_segments if total_segments else 1.0
        num_masks = self._num_masks(sum(len(t["labels"]) for t in cols), out.pred_logits.device)

        steps = [(out.pred_logits, out.pred_masks)] + (out.aux[::-1] if m.deep_supervision else [])
        total = out.pred_logits.new_zeros((), dtype=torch.float32)
        parts: tuple[Tensor, Tensor, Tensor] | None = None
        for logits, masks in steps:
            ce, loss_mask, loss_dice = self._step(logits, masks, cols, num_masks)
            total = total + m.class_weight * ce + m.mask_weight * loss_mask + m.dice_weight * loss_dice
            parts = parts or (ce, loss_mask, loss_dice)

        ml = total.new_zeros(())
        if out.ml_logits is not None:
            y = ml_targets if ml_targets is not None else ml_targets_from(tgts, self.num_classes)
            ml = self.ml_loss(out.ml_logits, y.to(out.ml_logits.device))
            total = total + self.ml_weight * ml
        assert parts is not None  # steps starts with the final prediction
        ce, loss_mask, loss_dice = parts
        return {"loss": total, "ce": ce.detach(), "mask": loss_mask.detach(), "dice": loss_dice.detach(),
                "ml": ml.detach(), "kept": total.new_full((), kept)}
