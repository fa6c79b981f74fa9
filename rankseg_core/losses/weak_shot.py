"""Weak-shot losses of per-pixel classifiers (issue 21; docs/weak-shot.md): base classes have
pixel labels, novel classes only image-level labels.

A weak-shot batch carries the label map with every novel pixel already set to ignore (so the
cross-entropy of `losses/rankseg.py` sees base pixels only) and `image_labels`, the B x K
presence of every class, novel ones included, in the augmented crop. On top of the usual
RankSeg / Segmenter loss the novel classes get two terms, computed over the output channels
that hold a novel class (all novel classes for a class-ordered head; the novel classes among
the top-kappa for a selecting head, in rank order):

- MIL: per (image, novel channel) an image-level score pooled over the pixels that may hold a
  novel class, BCE against the class's image label (`mil_loss`);
- the complementary loss of SimFormer (bcmi/SimFormer-Weak-Shot-Semantic-Segmentation,
  `prop_former/modeling/prop_criterion.py` `loss_masks_asm`, `LOSS.CompSupNovel`): the
  per-pixel max over the image's PRESENT novel channels, and a fixed ignore logit, must
  reproduce the not-base region, scored by MaskFormer's focal (x 20) + dice (x 1) mask loss,
  averaged over the images that have a present novel class (`complementary_loss`).

A pixel's softmax probability of channel c becomes a binary "mask logit" through
`one_vs_rest_logits` (sigmoid(l_c) = softmax_c exactly), which is what lets the official
sigmoid-based mask losses score a softmax classifier unchanged.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rankseg_core.errors import UserError
from rankseg_core.losses.maskformer import dice_loss, sigmoid_focal_loss
from rankseg_core.losses.rankseg import PAD_LOGIT, RankSegCriterion
from rankseg_core.model.heads import SegOutput

# The official fixed ignore proposal: cfg.LOSS.IgnoreInit = -2.9444 = logit(0.05), not learnable
# (IgnoreLearnable False). It floors the predicted not-base probability at 0.05, so on base
# pixels the novel channels are pushed down only until they fall below 5 %.
IGNORE_LOGIT = -2.9444
# cfg.LOSS.AssignMaskMASK / AssignMaskDICE: the comp loss is "EQ", the matched-mask loss itself.
COMP_FOCAL_WEIGHT = 20.0
COMP_DICE_WEIGHT = 1.0
MIL_POOLS = ("max", "topk")


def one_vs_rest_logits(logits: Tensor, index: Tensor | None = None) -> Tensor:
    """Softmax logits B x C x H x W -> l, l_c = z_c - log sum_{j != c} exp z_j (float32).

    sigmoid(l_c) = softmax(z)_c: the log-odds of each channel's probability. index (B x C'
    long) picks the channels to return (B x C' x H x W), so the per-channel work is paid only
    for the novel ones; the softmax is still over all C. Computed without log(1 - p) at
    p ~ 1: for a channel that is not the pixel's argmax p_c <= 1/2, so log1p(-p_c) is
    accurate; the argmax channel takes the log-sum-exp of the others directly. C must be >= 2
    (one channel has probability 1 everywhere).
    """
    if logits.shape[1] < 2:
        raise ValueError(f"one_vs_rest_logits needs >= 2 channels, got {logits.shape[1]}")
    z = logits.float()
    lse = z.logsumexp(1, keepdim=True)
    top = z.argmax(1, keepdim=True)  # B x 1 x H x W
    others = z.scatter(1, top, float("-inf")).logsumexp(1, keepdim=True)  # LSE without the argmax
    if index is None:
        index = torch.arange(z.shape[1], device=z.device).expand(z.shape[0], -1)
        zi = z
    else:
        zi = z.gather(1, index[:, :, None, None].expand(-1, -1, *z.shape[2:]))
    is_top = index[:, :, None, None] == top
    # The argmax entry is zeroed BEFORE log1p: log1p(-1) = -inf would put 0 * inf = NaN in the
    # backward pass even where torch.where discards it.
    p_rest = (zi - lse).exp().masked_fill(is_top, 0.0)
    return zi - torch.where(is_top, others, lse + torch.log1p(-p_rest))


def mil_loss(ovr: Tensor, channels: Tensor, targets: Tensor, region: Tensor, pool: str = "max",
             topk: float = 0.1) -> Tensor:
    """Multiple-instance BCE of image-level labels against pooled pixel log-odds.

    ovr: B x C x H x W one-vs-rest logits; channels: B x C bool, the (image, channel) pairs to
    score; targets: B x C 0/1, each channel's class presence; region: B x H x W bool, the pixels
    pooled over (an image without any is not scored).
    pool "max": S = max over the region of l, i.e. sigmoid(S) = the highest pixel probability,
    exactly "the class is present iff some pixel is it"; "topk": the mean of the ceil(topk * n)
    largest l of the region's n pixels (a log-odds mean, not a probability mean).
    Returns BCE-with-logits(S, y) averaged over the scored pairs; 0 (in the graph) if none.
    """
    if pool not in MIL_POOLS:
        raise UserError(f"loss.weak_shot_mil_pool={pool!r} is unknown; use one of {', '.join(MIL_POOLS)}")
    b, c = channels.shape
    flat = ovr.flatten(2).masked_fill(~region.flatten(1)[:, None, :], float("-inf"))  # B x C x HW
    n = region.flatten(1).sum(1)  # B
    scored = channels & (n > 0)[:, None]
    if not bool(scored.any()):
        return ovr.sum() * 0.0
    if pool == "max":
        score = flat.amax(2)
    else:
        k = (n.float() * topk).ceil().clamp_min(1).long().minimum(n.clamp_min(1))  # B
        top = flat.topk(int(k.max()), dim=2).values  # B x C x kmax, descending
        keep = torch.arange(top.shape[2], device=top.device)[None, :] < k[:, None]  # B x kmax
        score = top.masked_fill(~keep[:, None, :], 0.0).sum(2) / k[:, None].float()
    return F.binary_cross_entropy_with_logits(score[scored], targets.float()[scored])


def complementary_loss(ovr: Tensor, channels: Tensor, region: Tensor, ignore_logit: float = IGNORE_LOGIT,
                       focal_weight: float = COMP_FOCAL_WEIGHT, dice_weight: float = COMP_DICE_WEIGHT) -> Tensor:
    """SimFormer's complementary loss, per pixel.

    ovr: B x C x H x W one-vs-rest logits; channels: B x C bool, the image's present novel
    channels; region: B x H x W bool, the not-base target (hidden novel and unlabelled pixels:
    everything not labelled with a base class, the crop's padding excepted where it is known).
    Per image with >= 1 channel: m = max(max over its channels of l, ignore_logit) per pixel,
    loss = focal_weight * focal(m, region) + dice_weight * dice(m, region) (MaskFormer's sigmoid
    focal loss, mean over pixels, and dice with +1 smoothing); the mean over those images,
    0 (in the graph) if there are none.
    """
    used = channels.any(1)
    if not bool(used.any()):
        return ovr.sum() * 0.0
    pred = ovr.masked_fill(~channels[:, :, None, None], float("-inf")).amax(1)[used].flatten(1)
    pred = pred.clamp_min(ignore_logit)  # the fixed ignore proposal joins the max
    target = region[used].flatten(1).to(pred.dtype)
    n = pred.shape[0]
    # Each image's loss with num_masks = 1 as the official code, then the mean over images.
    return (focal_weight * sigmoid_focal_loss(pred, target, 1.0) + dice_weight * dice_loss(pred, target, 1.0)) / n


def novel_mask(novel_classes: list[int], num_classes: int, device: torch.device) -> Tensor:
    """(K + 1) bool, True at the novel train ids; the extra last entry (padding channels) False."""
    out = torch.zeros(num_classes + 1, dtype=torch.bool, device=device)
    out[torch.as_tensor(novel_classes, dtype=torch.long, device=device)] = True
    return out


@dataclass
class WeakShotCriterion:
    """`RankSegCriterion` on the hidden label map with image-level multi-label targets, plus
    mil_weight * MIL + comp_weight * complementary loss over the novel channels.

    base: the RankSeg / Segmenter criterion (its ml targets become `image_labels`).
    novel_classes: train ids of the novel classes (`data.novel_classes`).
    mil_pool / mil_topk: `mil_loss`'s pooling. ignore_logit: the fixed ignore proposal.
    """

    base: RankSegCriterion
    novel_classes: list[int]
    mil_weight: float = 1.0
    comp_weight: float = 0.2
    mil_pool: str = "max"
    mil_topk: float = 0.1
    ignore_logit: float = IGNORE_LOGIT

    def __post_init__(self) -> None:
        k = self.base.num_classes
        if not self.novel_classes or any(not 0 <= c < k for c in self.novel_classes):
            raise UserError(f"data.novel_classes={self.novel_classes}: need >= 1 train id in [0, {k})")
        if self.mil_pool not in MIL_POOLS:
            raise UserError(f"loss.weak_shot_mil_pool={self.mil_pool!r} is unknown; use one of {', '.join(MIL_POOLS)}")
        if not 0 < self.mil_topk <= 1:
            raise UserError(f"loss.weak_shot_mil_topk={self.mil_topk}: use a fraction in (0, 1]")

    def __call__(self, out: SegOutput, labels: Tensor, image_labels: Tensor, pad: Tensor | None = None
                 ) -> dict[str, Tensor]:
        """out: model output; labels: B x H x W hidden label map (novel pixels ignore);
        image_labels: B x K float presence of every class in the crop; pad: B x H x W bool, the
        crop's padding where the batch marks it (then left out of the not-base region, as the
        official `pad_region`; without it padding counts as not-base)."""
        k = self.base.num_classes
        if image_labels.shape != (labels.shape[0], k):
            raise ValueError(f"image_labels must be {labels.shape[0]} x {k}, got {tuple(image_labels.shape)}")
        # Resized once: the base loss skips its own resize when the logits are at label size.
        up = F.interpolate(out.mask_logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        res = self.base(dataclasses.replace(out, mask_logits=up), labels, image_labels)
        # Padding channels of a variable-length selection: probability ~0, never novel.
        logits = up if out.valid is None else up.masked_fill(~out.valid[:, :, None, None], PAD_LOGIT)
        b, c = logits.shape[:2]
        if out.topk_index is None:
            classes = torch.arange(c, device=labels.device).expand(b, c)
        else:
            classes = out.topk_index if out.valid is None else out.topk_index.masked_fill(~out.valid, k)
        is_novel = novel_mask(self.novel_classes, k, labels.device)[classes]  # B x C
        # Each channel's class presence from the image labels (column K, padding: absent).
        present = torch.cat([image_labels.float(), image_labels.new_zeros(b, 1).float()], 1).gather(1, classes) > 0
        lab = labels.long()
        region = (lab < 0) | (lab >= k) | (lab == self.base.ignore_index)  # not labelled with a base class
        if pad is not None:
            region = region & ~pad.bool()
        # Only the novel channels are scored: gather them to the front (B x C', C' = the most
        # novel channels of any image), the rest of each row masked out. (A sync point.)
        cmax = int(is_novel.sum(1).max())
        order = is_novel.float().argsort(dim=1, descending=True, stable=True)[:, :max(cmax, 1)]
        scored, present = is_novel.gather(1, order), present.gather(1, order)
        ovr = one_vs_rest_logits(logits, order)
        mil = mil_loss(ovr, scored, present, region, self.mil_pool, self.mil_topk)
        comp = complementary_loss(ovr, scored & present, region, self.ignore_logit)
        res["loss"] = res["loss"] + self.mil_weight * mil + self.comp_weight * comp
        res["mil"], res["comp"] = mil.detach(), comp.detach()
        return res

