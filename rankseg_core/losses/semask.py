"""SeMask's semantic-prior loss on top of a Mask2Former criterion.

Official (SeMask-Mask2Former `modeling/criterion.py` `SeMaskSetCriterion.loss_cate`,
`semask_mask_former_model.py`): the semantic prior (the four stages' class maps summed and
upsampled to the padded input, model/mask2former/semask.py `semantic_prior`) against the
semantic label, `F.cross_entropy(prior, label, ignore_index=255)` (mean over labelled pixels),
weighted by MODEL.MASK_FORMER.CATE_WEIGHT = 0.4 and added once: the auxiliary decoder
predictions carry no prior (their `loss_cate_i` are zero tensors).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.nn.functional as F
from torch import Tensor

from rankseg_core.model.mask2former.model import Mask2FormerOutput
from rankseg_core.model.mask2former.semask import semantic_prior

SEMANTIC_PRIOR_WEIGHT = 0.4  # MODEL.MASK_FORMER.CATE_WEIGHT of SeMask-Mask2Former's config.py (no config overrides it)


def semantic_prior_loss(class_maps: list[Tensor], labels: Tensor, ignore_index: int) -> Tensor:
    """Cross-entropy of the semantic prior, mean over labelled pixels (0 when there is none).

    class_maps: the backbone's [B x K x H'/s x W'/s] (s = 4 .. 32) of the padded input H' x W'.
    labels: B x H x W class ids (H <= H', W <= W': the input before the model padded it;
        `ignore_index` = unlabelled). The padding is cropped off the prior, as the official
        loss ignores it (its mapper pads the label with 255).
    """
    h, w = labels.shape[-2:]
    prior = semantic_prior(class_maps)
    if prior.shape[-2] < h or prior.shape[-1] < w:
        raise ValueError(f"labels are {h}x{w}, larger than the prior {tuple(prior.shape[-2:])}")
    logits = prior[..., :h, :w].float()
    target = labels.to(logits.device).long()
    total = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum")
    # The official mean divides by the labelled pixels; with none it would be NaN, here 0.
    count = (target != ignore_index).sum().clamp(min=1)
    return total / count


class SemanticPriorCriterion:
    """`crit(out, batch)`: the wrapped criterion's parts, with "loss" + weight x "sem" and the
    unweighted "sem" added, for outputs of a SeMask backbone (`out.sem_logits`; other outputs
    pass through unchanged). batch["label"]: B x H x W semantic labels."""

    def __init__(self, inner: Callable[[Any, dict[str, Any]], dict[str, Tensor]], ignore_index: int,
                 weight: float = SEMANTIC_PRIOR_WEIGHT) -> None:
        self.inner, self.ignore_index, self.weight = inner, ignore_index, weight

    def __call__(self, out: Mask2FormerOutput, batch: dict[str, Any]) -> dict[str, Tensor]:
        parts = self.inner(out, batch)
        if out.sem_logits is None:
            return parts
        sem = semantic_prior_loss(out.sem_logits, batch["label"], self.ignore_index)
        return {**parts, "loss": parts["loss"] + self.weight * sem, "sem": sem.detach()}
