"""MaskFormer's set criterion (+ the RankSeg multi-label loss), as facebookresearch/MaskFormer's
`criterion.py` and `matcher.py`.

It differs from Mask2Former's (losses/mask2former.py, whose targets, RankSeg renumbering,
deep supervision, normaliser and ml loss it reuses) in the mask terms only:
- loss: the matched mask logits are upsampled (bilinear) to the padded input size and scored
  at EVERY pixel, no point sampling: sigmoid focal loss (alpha 0.25, gamma 2; mean over the
  pixels, summed over masks / N) and dice (summed over masks / N);
- matching: cost = w_class * (-softmax prob of the GT class) + w_mask * focal + w_dice * dice,
  both mask costs at the PREDICTION's resolution, the target masks downsampled to it by
  nearest neighbour; deterministic (no random points);
- weights (loss and matching): CE 1, focal 20, dice 1 (`model.mask2former.maskformer.*`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from rankseg_core.config.model import ModelConfig
from rankseg_core.losses.mask2former import Mask2FormerCriterion
from rankseg_core.losses.matcher import assign_pairs, pairwise_dice
from rankseg_core.losses.rankseg import asymmetric_loss

FOCAL_ALPHA, FOCAL_GAMMA = 0.25, 2.0  # RetinaNet's, fixed in the official code


def sigmoid_focal_loss(logits: Tensor, targets: Tensor, num_masks: float, alpha: float = FOCAL_ALPHA,
                       gamma: float = FOCAL_GAMMA) -> Tensor:
    """Focal loss of N masks, logits / 0-1 targets N x P: mean over the P pixels, summed over
    the masks, / num_masks."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
    return (alpha_t * ce * (1 - p_t) ** gamma).mean(1).sum() / num_masks


def dice_loss(logits: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """1 - (2|p t| + 1) / (|p| + |t| + 1) per mask (N x P), summed / num_masks."""
    p = logits.sigmoid()
    dice = 1 - (2 * (p * targets).sum(-1) + 1) / (p.sum(-1) + targets.sum(-1) + 1)
    return dice.sum() / num_masks


def pairwise_focal(logits: Tensor, targets: Tensor, alpha: float = FOCAL_ALPHA, gamma: float = FOCAL_GAMMA
                   ) -> Tensor:
    """Mean focal loss of every prediction against every target: Q x P, n x P -> Q x n."""
    p = logits.sigmoid()
    pos = alpha * (1 - p) ** gamma * F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits),
                                                                        reduction="none")
    neg = (1 - alpha) * p ** gamma * F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits),
                                                                        reduction="none")
    return (pos @ targets.t() + neg @ (1 - targets).t()) / logits.shape[1]


def maskformer_cost(logits: Tensor, masks: Tensor, labels: Tensor, tgt_masks: Tensor, w_class: float, w_mask: float,
                    w_dice: float) -> Tensor:
    """Cost matrix Q x n of one image: logits Q x (C+1), masks Q x h x w (logits), labels n
    (column indices < C), tgt_masks n x H x W (0/1), brought to h x w by nearest neighbour."""
    prob = logits.float().softmax(-1)
    tgt = F.interpolate(tgt_masks[:, None].float(), size=masks.shape[-2:], mode="nearest")[:, 0].flatten(1)
    pred = masks.float().flatten(1)
    return w_mask * pairwise_focal(pred, tgt) - w_class * prob[:, labels] + w_dice * pairwise_dice(pred, tgt)


@torch.no_grad()
def maskformer_match(logits: Tensor, masks: Tensor, targets: list[dict[str, Tensor]], w_class: float, w_mask: float,
                     w_dice: float) -> list[tuple[Tensor, Tensor]]:
    """Per image (query indices, target indices), min(Q, n) pairs of the Hungarian assignment
    on `maskformer_cost`. logits B x Q x (C+1), masks B x Q x h x w, targets[b] = {"labels":
    n column indices, "masks": n x H x W}."""
    # No points to draw: an empty fixed set keeps assign_pairs from consuming the RNG.
    no_points = torch.empty(0, 2, device=logits.device)
    return assign_pairs(targets, 0, no_points, logits.device,
                        lambda b, _: maskformer_cost(logits[b], masks[b], targets[b]["labels"], targets[b]["masks"],
                                                     w_class, w_mask, w_dice))


class MaskFormerCriterion(Mask2FormerCriterion):
    """`crit(out, targets, ml_targets) -> {"loss", "ce", "mask", "dice", "ml", "kept"}` as
    `Mask2FormerCriterion`, with MaskFormer's mask terms and weights ("mask" is the focal loss)."""

    def __init__(self, cfg: ModelConfig, ml_loss: Callable[[Tensor, Tensor], Tensor] = asymmetric_loss,
                 ml_weight: float = 10.0) -> None:
        super().__init__(cfg, ml_loss, ml_weight)
        mf = cfg.mask2former.maskformer
        # The base class weighs every step's terms with self.m's weights: MaskFormer's here.
        self.m = dataclasses.replace(cfg.mask2former, class_weight=mf.class_weight, mask_weight=mf.mask_weight,
                                     dice_weight=mf.dice_weight)

    def _match(self, logits: Tensor, masks: Tensor, targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        m = self.m
        return maskformer_match(logits, masks, targets, m.class_weight, m.mask_weight, m.dice_weight)

    def _mask_losses(self, src: Tensor, tgt: Tensor, num_masks: float) -> tuple[Tensor, Tensor]:
        """MaskFormer's mask terms: focal and dice over every pixel of the predicted masks
        upsampled (bilinear) to the target size, no point sampling."""
        up = F.interpolate(src[:, None].float(), size=tgt.shape[-2:], mode="bilinear", align_corners=False)
        pred, gt = up.flatten(1), tgt.flatten(1).to(up.dtype)
        return sigmoid_focal_loss(pred, gt, num_masks), dice_loss(pred, gt, num_masks)
