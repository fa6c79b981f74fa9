"""ESSNet's training loss: softmax over the target and the k nearest class embeddings of each
pixel, plus a margin regulariser on the class embeddings (shipra25jain/ESSNet
`utils/loss_kdtree_contrastive.py` `NNCrossEntropy`; the RankSeg fork's ESSNet head).

Per labelled pixel with target t: the k classes whose logits are highest (for the "distance"
logits -T * ||p - c||: the k nearest class embeddings) are searched without gradient, and the
CE is taken over k + 1 slots [t, n_1, ..., n_k] with target slot 0. The target is an EXTRA
slot, not a replacement of the k-th neighbour. Both official codes then replace a neighbour that
equals t by class t - 1 (t = 0: by class 0, i.e. the target a second time); "distinct" (our
default) instead takes the k nearest classes other than t, so every slot is a different class.

Regulariser (ESSNet's, weight 1): (1/K) sum_c max(0, margin - min_{c' != c} ||e_c - e_c'||) over
the unit class embeddings; on Segmenter they are refined per image, so it is averaged over B.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from rankseg_core.config.model import ESS_CANDIDATES, ModelConfig
from rankseg_core.errors import UserError
from rankseg_core.losses.rankseg import SEG_NORMS, class_targets, seg_loss, selection_stats
from rankseg_core.model.essnet import EssNetOutput, pairwise_distance


def neighbours(m: ModelConfig) -> int:
    """k of the loss: model.essnet.k, else model.kappa (the supplement sets k = kappa)."""
    return m.essnet.k if m.essnet.k is not None else m.kappa


@torch.no_grad()
def candidate_index(logits: Tensor, targets: Tensor, k: int, mode: str = "distinct") -> Tensor:
    """Classes of the k + 1 loss slots: logits B x K x H x W (higher = nearer), targets B x H x W
    class ids (anything outside [0, K) is ignored) -> B x (k' + 1) x H x W long, slot 0 the
    target (0 at ignored pixels), slots 1.. the neighbours by decreasing logit.

    k' = min(k, K - 1) for "distinct", min(k, K) for "official" (a set cannot hold more).
    """
    num = logits.shape[1]
    valid = (targets >= 0) & (targets < num)
    t = targets.long().masked_fill(~valid, 0)[:, None]  # B x 1 x H x W
    if mode == "distinct":
        # -inf on the target's own logit: it can never be a neighbour (ignored pixels mask class 0,
        # which changes nothing since they are ignored).
        near = logits.scatter(1, t, float("-inf")).topk(min(k, num - 1), dim=1).indices
    elif mode == "official":
        near = logits.topk(min(k, num), dim=1).indices
        hit = (near == t) & valid[:, None]
        near = torch.where(hit, near - 1, near).clamp_min(0)  # the officials' target - 1, and -1 -> 0
    else:
        raise UserError(f"model.essnet.candidates={mode!r} is unknown; use one of {', '.join(ESS_CANDIDATES)}")
    return torch.cat([t, near], dim=1)


@torch.no_grad()
def knn_hits(logits: Tensor, targets: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(labelled pixels whose target is among their k highest logits, labelled pixels), 0-dim
    each: how often the kNN search alone would have found the right class (logged "coverage")."""
    num = logits.shape[1]
    valid = (targets >= 0) & (targets < num)
    t = targets.long().masked_fill(~valid, 0)[:, None]
    above = (logits > logits.gather(1, t)).sum(1)  # classes strictly nearer than the target
    return ((above < k) & valid).sum(), valid.sum()


def margin_regulariser(class_emb: Tensor, margin: float) -> Tensor:
    """ESSNet's class-separation hinge: class_emb B x K x d -> mean over B of
    (1/K) sum_c max(0, margin - distance to the nearest other class embedding)."""
    b, num, _ = class_emb.shape
    dist = pairwise_distance(class_emb, class_emb)
    eye = torch.eye(num, dtype=torch.bool, device=class_emb.device)
    nearest = dist.masked_fill(eye, float("inf")).amin(-1)  # B x K (inf for K = 1: no other class)
    return (margin - nearest).clamp_min(0.0).sum(-1).div(num).mean()


@dataclass
class EssNetCriterion:
    """kNN softmax CE + margin regulariser, logged as "seg" and "ml" (ESSNet has no ml branch:
    its "ml" column is the regulariser) and "coverage" (labelled pixels whose class is among
    their k nearest; recall / precision as for any head over all K classes).

    k: neighbours per pixel (`neighbours(cfg.model)`); candidates: "distinct" or "official".
    seg_loss_norm: "official" (sum / all pixels, mmseg's mean; the fork's head) or "valid"
        (F.cross_entropy's mean over labelled pixels, ESSNet's own code).
    """

    num_classes: int
    ignore_index: int
    k: int
    margin: float = 0.2
    candidates: str = "distinct"
    seg_loss_norm: str = "official"

    def __post_init__(self) -> None:
        if self.seg_loss_norm not in SEG_NORMS:
            raise UserError(f"loss.seg_loss_norm={self.seg_loss_norm!r} is unknown; use one of {', '.join(SEG_NORMS)}")
        if self.candidates not in ESS_CANDIDATES:
            raise UserError(f"model.essnet.candidates={self.candidates!r} is unknown; use one of "
                            f"{', '.join(ESS_CANDIDATES)}")
        if self.k < 1:
            raise UserError(f"model.essnet.k={self.k} must be >= 1")

    def __call__(self, out: EssNetOutput, labels: Tensor) -> dict[str, Tensor]:
        """out: the ESSNet head's output (all K classes, class order); labels B x H x W."""
        if out.topk_index is not None:
            raise ValueError("EssNetCriterion needs class-ordered logits over all K classes (the essnet head)")
        targets = class_targets(labels, self.num_classes, self.ignore_index)
        size = labels.shape[-2:]
        slots, hits, counted = [], labels.new_zeros((), dtype=torch.long), labels.new_zeros((), dtype=torch.long)
        # One image's K x H x W resized logits at a time: the gather keeps only its index for
        # the backward, so the batch never holds B x K x H x W (the baseline's CE does).
        for i in range(labels.shape[0]):
            up = F.interpolate(out.mask_logits[i:i + 1].float(), size=size, mode="bilinear", align_corners=False)
            index = candidate_index(up.detach(), targets[i:i + 1], self.k, self.candidates)
            slots.append(up.gather(1, index))
            h, n = knn_hits(up.detach(), targets[i:i + 1], self.k)
            hits, counted = hits + h, counted + n
        logits = torch.cat(slots)  # B x (k + 1) x H x W, the target in slot 0
        slot_targets = torch.where(targets == self.ignore_index, targets, torch.zeros_like(targets))
        seg = seg_loss(logits, slot_targets, self.ignore_index, self.seg_loss_norm)
        if self.margin > 0 and out.class_emb is not None:
            reg = margin_regulariser(out.class_emb, self.margin)
        else:
            reg = seg.new_zeros(())
        stats = selection_stats(labels, None, self.num_classes, self.ignore_index)
        stats["coverage"] = hits.float() / counted.float()  # 0 / 0 = NaN without labelled pixels, as selection_stats
        return {"loss": seg + reg, "seg": seg.detach(), "ml": reg.detach(), **stats}
