"""EncNet's training loss on Segmenter: pixel CE over all K classes + 0.2 x SE-loss.

As the RankSeg fork's `MaskTransformerEncHead.losses`: the decode head's CE (the Segmenter seg
loss, logits resized to the label) plus mmseg's `loss_se_decode` = `CrossEntropyLoss(use_sigmoid=
True, loss_weight=0.2)`: BCE-with-logits, mean over B x K, of the SE logits against the crop's
class presence (`_convert_to_onehot_labels`, which is `ml_targets` here).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from rankseg_core.errors import UserError
from rankseg_core.losses.rankseg import SEG_NORMS, bce_loss, class_targets, ml_targets, seg_loss, selection_stats
from rankseg_core.model.heads import SegOutput


@dataclass
class EncNetCriterion:
    """seg + se_weight * se, logged as "seg" and "ml" (the SE-loss is EncNet's multi-label loss).

    seg_loss_norm: "official" (sum / all pixels, mmseg's mean) or "valid" (mean over labelled).
    """

    num_classes: int
    ignore_index: int
    se_weight: float = 0.2
    seg_loss_norm: str = "official"

    def __post_init__(self) -> None:
        if self.seg_loss_norm not in SEG_NORMS:
            raise UserError(f"loss.seg_loss_norm={self.seg_loss_norm!r} is unknown; use one of {', '.join(SEG_NORMS)}")

    def __call__(self, out: SegOutput, labels: Tensor) -> dict[str, Tensor]:
        """out: the EncNet head's output (ml_logits = SE logits B x K); labels B x H x W."""
        if out.ml_logits is None or out.topk_index is not None:
            raise ValueError("EncNetCriterion needs a class-ordered output with SE logits (the encnet head)")
        logits = F.interpolate(out.mask_logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        seg = seg_loss(logits, class_targets(labels, self.num_classes, self.ignore_index), self.ignore_index,
                       self.seg_loss_norm, out.valid)
        se = bce_loss(out.ml_logits, ml_targets(labels, self.num_classes, self.ignore_index))
        stats = selection_stats(labels, None, self.num_classes, self.ignore_index)
        return {"loss": seg + self.se_weight * se, "seg": seg.detach(), "ml": se.detach(), **stats}
