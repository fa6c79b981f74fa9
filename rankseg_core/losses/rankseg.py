"""RankSeg losses (docs/method.md sec. 4): multi-label ASL/BCE, rank-remapped CE, diagnostics."""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rankseg_core.errors import UserError
from rankseg_core.model.heads import SegOutput

# Logit for padded channels before the CE: exp() underflows to 0 yet stays finite in fp16.
PAD_LOGIT = -1e4
ML_LOSSES = ("asl", "bce")
SEG_NORMS = ("official", "valid")


def ml_targets(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Presence of each class in the (augmented) label map: B x H x W long -> B x K float.

    Values outside [0, K) (the ignore index included) are skipped.
    """
    return (class_histogram(labels, num_classes, ignore_index) > 0).float()


def class_histogram(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Pixels of each class per label map: B x H x W -> B x K float (values outside [0, K) and
    the ignore index count nowhere).

    A scatter-add into a spare bin K for skipped pixels: the output size is fixed, so on a GPU
    nothing waits for the device (bincount reads the maximum on the host, and boolean indexing
    counts the selected pixels there)."""
    b = labels.shape[0]
    flat = labels.reshape(b, -1).long()
    ok = (flat >= 0) & (flat < num_classes) & (flat != ignore_index)
    # One flat index per image row (bin K of a row takes its skipped pixels): a 1-D
    # scatter-add has a deterministic CUDA kernel. float32 counts are exact below 2^24 pixels.
    idx = torch.where(ok, flat, num_classes) + torch.arange(b, device=labels.device)[:, None] * (num_classes + 1)
    hist = torch.zeros(b * (num_classes + 1), device=labels.device)
    hist.scatter_add_(0, idx.flatten(), torch.ones(idx.numel(), device=labels.device))
    return hist.reshape(b, num_classes + 1)[:, :num_classes]


def clip_targets(targets: Tensor, clip_len: int) -> Tensor:
    """Per-frame presence (B*T) x K -> per-clip union B x K."""
    return targets.reshape(-1, clip_len, targets.shape[-1]).amax(1)


def present_classes(labels: Tensor, num_classes: int, ignore_index: int) -> list[Tensor]:
    """Class ids present in each label map, sorted (the oracle's `gt_classes`), on the host:
    one copy of the B x K presence table for the batch (how many classes each image has
    decides the selection's shape), not a sync per image."""
    table = (class_histogram(labels, num_classes, ignore_index) > 0).cpu()
    return [row.nonzero().flatten() for row in table]


def asymmetric_loss(logits: Tensor, targets: Tensor, gamma_neg: float = 2.0, gamma_pos: float = 0.0,
                    clip: float = 0.05, eps: float = 1e-5) -> Tensor:
    """Asymmetric loss averaged over B*K (the official RankSeg reduction).

    With p = sigmoid(s), p_m = max(p - clip, 0):
    L = -(1/BK) sum[ y (1-p)^g+ log(max(p, eps)) + (1-y) p_m^g- log(max(1 - p_m, eps)) ].
    Gradients flow through the focusing weights (timm's disable_torch_grad_focal_loss=False).
    The official heads: TranEnc gamma- = 2, TranDec / global pooling gamma- = 0; gamma+ = 0
    and clip = 0.05 everywhere. logits, targets: B x K.
    """
    logits, targets = logits.float(), targets.float()
    p = logits.sigmoid()
    p_m = (p - clip).clamp_min(0.0) if clip and clip > 0 else p
    pos = targets * torch.log(p.clamp_min(eps))
    neg = (1 - targets) * torch.log((1 - p_m).clamp_min(eps))
    if gamma_pos > 0:
        pos = pos * (1 - p).pow(gamma_pos)
    if gamma_neg > 0:
        neg = neg * p_m.pow(gamma_neg)
    return -(pos + neg).mean()


def bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """BCE-with-logits, mean over B*K (the COCO-Stuff ViT-B configs)."""
    return F.binary_cross_entropy_with_logits(logits.float(), targets.float())


def ml_loss_fn(loss_cfg: Any) -> Callable[[Tensor, Tensor], Tensor]:
    """The multi-label loss (logits B x K, targets B x K) -> 0-dim tensor that a resolved
    `config.LossConfig` (or anything with its fields) names: `asymmetric_loss` with
    asl_gamma_neg / asl_gamma_pos / asl_clip, or `bce_loss`."""
    if loss_cfg.ml_loss == "bce":
        return bce_loss
    if loss_cfg.ml_loss != "asl":
        raise UserError(f"loss.ml_loss={loss_cfg.ml_loss!r} is unknown; use one of {', '.join(ML_LOSSES)}")
    gneg, gpos = loss_cfg.asl_gamma_neg, loss_cfg.asl_gamma_pos
    if gneg is None or gneg < 0 or gpos < 0:
        raise UserError(f"loss.asl_gamma_neg={gneg} / asl_gamma_pos={gpos}: need numbers >= 0 "
                        "(config.resolve fills the per-head default)")
    return functools.partial(asymmetric_loss, gamma_neg=float(gneg), gamma_pos=float(gpos), clip=loss_cfg.asl_clip)


def rank_targets(labels: Tensor, topk_index: Tensor, num_classes: int, ignore_index: int,
                 valid: Tensor | None = None) -> Tensor:
    """Class labels -> rank labels: B x H x W class ids, B x C selection -> B x H x W in [0, C).

    A pixel of class c gets r where topk_index[b, r] = c; unselected classes, padding
    channels and ignore become `ignore_index`. Built as a B x (K+1) lookup table (column K
    absorbs out-of-range labels and padding) filled by scatter, then gathered.
    """
    b, c = topk_index.shape
    table = torch.full((b, num_classes + 1), ignore_index, dtype=torch.long, device=labels.device)
    ranks = torch.arange(c, device=labels.device).expand(b, c)
    index = topk_index if valid is None else topk_index.masked_fill(~valid, num_classes)
    table.scatter_(1, index, ranks)
    table[:, num_classes] = ignore_index
    lab = labels.long()
    lab = lab.masked_fill((lab < 0) | (lab >= num_classes), num_classes)
    return table.gather(1, lab.reshape(b, -1)).reshape(labels.shape)


def class_targets(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    """Labels for K class-ordered channels: out-of-range values become `ignore_index`."""
    lab = labels.long()
    return lab.masked_fill((lab < 0) | (lab >= num_classes), ignore_index)


def seg_loss(logits: Tensor, targets: Tensor, ignore_index: int, norm: str = "official",
             valid: Tensor | None = None) -> Tensor:
    """Pixel CE. logits B x C x H x W (at label size), targets B x H x W in [0, C) or ignore.

    norm="official": summed CE / all B*H*W pixels (mmseg's mean, ignored pixels count as 0);
    norm="valid": F.cross_entropy's mean over non-ignored pixels.
    valid (B x C) marks padding channels, which get a -inf-like logit first.
    """
    if valid is not None:
        logits = logits.masked_fill(~valid[:, :, None, None], PAD_LOGIT)
    if norm == "official":
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum") / targets.numel()
    if norm == "valid":
        # The mean over labelled pixels as sum / max(count, 1): no labelled pixel gives 0 (the
        # mean reduction would give 0/0 = NaN), and no `if` on a device value (a host sync).
        n = (targets != ignore_index).sum().clamp_min(1)
        return F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum") / n
    raise UserError(f"loss.seg_loss_norm={norm!r} is unknown; use one of {', '.join(SEG_NORMS)}")


@torch.no_grad()
def selection_stats(labels: Tensor, topk_index: Tensor | None, num_classes: int, ignore_index: int,
                    valid: Tensor | None = None) -> dict[str, Tensor]:
    """Logged diagnostics of the selection against the crop's labels (per image, then mean).

    coverage: fraction of labelled pixels whose class is selected (images with labels);
    recall: |selected ∩ present| / |present| (images with >= 1 class);
    precision: |selected ∩ present| / |selected|.
    No selection (baseline, +MT) = all K classes selected.
    """
    b = labels.shape[0]
    hist = class_histogram(labels, num_classes, ignore_index)
    present = hist > 0
    if topk_index is None:
        selected = torch.ones_like(present)
    else:
        selected = torch.zeros(b, num_classes + 1, dtype=torch.bool, device=labels.device)
        idx = topk_index if valid is None else topk_index.masked_fill(~valid, num_classes)
        selected.scatter_(1, idx, True)
        selected = selected[:, :num_classes]
    hit = (present & selected).sum(1).float()
    n_present = present.sum(1).float()
    # Means over the images with labels as sums / counts, never `if has.any()` or [has]
    # (host syncs); no such image: 0 / 0 = NaN, the logged "undefined".
    has = (n_present > 0).float()
    coverage = ((hist * selected).sum(1) / hist.sum(1).clamp_min(1) * has).sum() / has.sum()
    recall = (hit / n_present.clamp_min(1) * has).sum() / has.sum()
    precision = (hit / selected.sum(1).float().clamp_min(1)).mean()
    return {"coverage": coverage, "recall": recall, "precision": precision}


@dataclass
class RankSegCriterion:
    """seg + ml_weight * ml, with the selection diagnostics.

    ml_loss: "asl" (`asymmetric_loss` with asl_gamma_neg / asl_gamma_pos / asl_clip, eps 1e-5,
        mean over B*K; defaults = the official TranEnc values) or "bce".
    seg_loss_norm: "official" (sum / all pixels) or "valid" (mean over labelled pixels).
    clip_len: frames per clip; ml targets are the union over a clip's frames.
    """

    num_classes: int
    ignore_index: int = 255
    ml_loss: str = "asl"
    ml_weight: float = 10.0
    seg_loss_norm: str = "official"
    clip_len: int = 1
    asl_gamma_neg: float = 2.0
    asl_gamma_pos: float = 0.0
    asl_clip: float = 0.05

    def __post_init__(self) -> None:
        self._ml_fn = ml_loss_fn(self)
        if self.seg_loss_norm not in SEG_NORMS:
            raise UserError(f"loss.seg_loss_norm={self.seg_loss_norm!r} is unknown; use one of {', '.join(SEG_NORMS)}")

    def __call__(self, out: SegOutput, labels: Tensor, image_labels: Tensor | None = None) -> dict[str, Tensor]:
        """out: model output for (B*T) images; labels: (B*T) x H x W class ids / ignore.

        image_labels: (B*T) x K presence of every class in the crop (a weak-shot batch, whose
        label map hides the novel classes): the ml targets then come from it, not from labels.
        """
        logits = out.mask_logits  # already at label size (the weak-shot criterion resizes once for both)
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        if out.topk_index is None:
            targets = class_targets(labels, self.num_classes, self.ignore_index)
        else:
            targets = rank_targets(labels, out.topk_index, self.num_classes, self.ignore_index, out.valid)
        seg = seg_loss(logits, targets, self.ignore_index, self.seg_loss_norm, out.valid)

        if out.ml_logits is not None:
            y = ml_targets(labels, self.num_classes, self.ignore_index) if image_labels is None \
                else image_labels.float()
            if self.clip_len > 1:
                y = clip_targets(y, self.clip_len)
            ml = self._ml_fn(out.ml_logits, y)
        else:
            ml = seg.new_zeros(())
        stats = selection_stats(labels, out.topk_index, self.num_classes, self.ignore_index, out.valid)
        return {"loss": seg + self.ml_weight * ml, "seg": seg.detach(), "ml": ml.detach(), **stats}
