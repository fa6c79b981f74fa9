"""The multi-label classifier family (`classifier-vit{t,s,b,l}`): the first model of the
independent scheme (model/classifier.py), trained and evaluated by the same engine.

Training target: the classes present in the augmented crop's label (ignore excluded), the
multi-label target RankSeg's joint branch learns from (`losses.ml_targets`), so the classifier
learns to rank what the segmenter it will drive is asked to segment. Evaluation: mAP and
recall@kappa of the sigmoid probabilities against each image's stored GT classes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankseg_core.errors import UserError
from rankseg_core.families.base import Family, Predictions
from rankseg_core.families.segmenter import scale_sizes
from rankseg_core.losses.rankseg import clip_targets, ml_loss_fn, ml_targets, selection_stats
from rankseg_core.model.classifier import build_classifier
from rankseg_core.shards.codec import IGNORE


def _criterion(cfg: Any) -> Any:
    """loss = the ml loss (ASL by default) of the logits against the crop's classes; logged
    with the recall / precision of the top-kappa against them (as the Segmenter logs its
    selection)."""
    k, clip_len, kappa = cfg.model.num_classes, cfg.model.clip_len, cfg.model.effective_kappa
    loss_fn = ml_loss_fn(cfg.loss)

    def criterion(logits: Tensor, batch: dict[str, Any]) -> dict[str, Tensor]:
        labels = batch["label"]
        y = ml_targets(labels, k, IGNORE)
        if clip_len > 1:
            y = clip_targets(y, clip_len)
        loss = loss_fn(logits, y)
        top = logits.detach().argsort(dim=1, descending=True, stable=True)[:, :kappa]
        stats = selection_stats(labels, top.repeat_interleave(clip_len, dim=0), k, IGNORE)
        return {"loss": loss, "recall": stats["recall"], "precision": stats["precision"]}

    return criterion


def _pad16(images: Tensor, patch: int) -> Tensor:
    """Zero-pad bottom / right to a multiple of the patch size (as the Segmenter's inference)."""
    h, w = images.shape[-2:]
    return F.pad(images, (0, -w % patch, 0, -h % patch))


@torch.no_grad()
def predict(model: nn.Module, cfg: Any, images: Tensor, sizes: list[tuple[int, int]], mode: str,
            scales: list[float], flip: bool, **fwd_kw) -> Predictions:
    """Multi-label probabilities N x K (clips x K for video) of whole images: the sigmoid of
    each pass (scale, flip) averaged over passes, as the Segmenter's ml probabilities."""
    if mode != "whole":
        raise UserError(f"eval mode {mode!r}: a classifier predicts whole images; use --mode whole")
    if fwd_kw.get("select_override") is not None or fwd_kw.get("gt_classes") is not None:
        raise UserError("--oracle replaces a segmenter's selection with the GT classes; a classifier has no selection "
                        "(drop --oracle)")
    if fwd_kw.get("dynamic_threshold") is not None:
        raise UserError("--dynamic-kappa selects classes for a segmenter; a classifier run is scored by mAP and "
                        "recall@kappa (use --kappa)")
    h, w = images.shape[-2:]
    sized = scale_sizes(cfg, images, sizes, scales) or [(max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5)))
                                                        for s in scales]
    total, passes = None, 0
    for size in sized:
        x = images if tuple(size) == (h, w) else F.interpolate(images, size=tuple(size), mode="bilinear",
                                                               align_corners=False)
        for flipped in ((False, True) if flip else (False,)):
            p = model(_pad16(x.flip(-1) if flipped else x, model.patch_size)).float().sigmoid()
            total = p if total is None else total + p
            passes += 1
    return Predictions(semantic=None, ml=total / passes)


CLASSIFIER = Family(
    name="classifier",
    build=build_classifier,
    criterion=_criterion,
    stats=("loss", "recall", "precision"),
    predict=predict,
)
