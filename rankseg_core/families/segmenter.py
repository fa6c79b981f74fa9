"""The Segmenter family: Segmenter baseline, RankSeg and their ablations (model/, losses.py).

Prediction follows the official mmseg protocol (`inference.predict_probs`: whole or sliding
window, logits resized to the original size before the softmax, multi-scale / flip averaging
the softmax) over each image's selected classes only, never over all K channels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from rankseg_core.data.augment import rescale_size
from rankseg_core.families.base import Family, Predictions
from rankseg_core.inference.dense import predict_probs
from rankseg_core.losses.rankseg import RankSegCriterion
from rankseg_core.model.segmenter import build_model
from rankseg_core.shards.codec import IGNORE


def _criterion(cfg: Any) -> Any:
    lo = cfg.loss
    # A frozen selector does not learn: its ASL on the crop is logged ("ml"), never added to the loss.
    ml_weight = 0.0 if cfg.model.has_selector else lo.ml_weight
    crit = RankSegCriterion(cfg.model.num_classes, IGNORE, lo.ml_loss, ml_weight, lo.seg_loss_norm,
                            cfg.model.clip_len, lo.asl_gamma_neg, lo.asl_gamma_pos, lo.asl_clip)
    return lambda out, batch: crit(out, batch["label"])


def scale_sizes(cfg: Any, images: Tensor, sizes: list[tuple[int, int]], scales: list[float]
                ) -> list[tuple[int, int]] | None:
    """The image size of each test scale, as mmseg's MultiScaleFlipAug computes it: the
    ORIGINAL image (sizes[0]) keep-ratio resized to (max_long x r, short_side x r).

    None (= scale the input size, `inference.scaled_size`) when the batch's images differ in
    original size or were not resized by the test transform (scale 1 must give the input size).
    """
    h, w = images.shape[-2:]
    e = cfg.eval
    if len(set(map(tuple, sizes))) != 1 or not e.short_side or not e.max_long:
        return None
    oh, ow = sizes[0]
    if rescale_size(oh, ow, e.max_long, e.short_side) != (h, w):
        return None
    return [rescale_size(oh, ow, int(e.max_long * r), int(e.short_side * r)) for r in scales]


@torch.no_grad()
def predict(model: nn.Module, cfg: Any, images: Tensor, sizes: list[tuple[int, int]], mode: str,
            scales: list[float], flip: bool, **fwd_kw) -> Predictions:
    """Class maps at `sizes` and ml probabilities for a batch of equally sized images."""
    probs, ml = predict_probs(model, images, cfg.model.num_classes, sizes, tuple(scales), flip, mode,
                              cfg.eval.crop, cfg.eval.stride, scale_sizes(cfg, images, sizes, scales), **fwd_kw)
    return Predictions([p.argmax()[0] for p in probs], ml)


@torch.no_grad()
def predict_fast(model: nn.Module, images: Tensor, sizes: list[tuple[int, int]], **fwd_kw
                 ) -> tuple[list[Tensor], Tensor | None]:
    """Single-scale whole-image prediction (mmseg's `whole_inference` + argmax): per image an
    (h x w) long class map at sizes[i], and the ml probabilities (None without an ml branch).
    Equals `predict_whole` + resize + argmax at kappa/K of the memory."""
    probs, ml = predict_probs(model, images, model.cfg.num_classes, sizes, **fwd_kw)
    return [p.argmax()[0] for p in probs], ml


SEGMENTER = Family(
    name="segmenter",
    build=build_model,
    criterion=_criterion,
    stats=("loss", "seg", "ml", "coverage", "recall", "precision"),
    predict=predict,
    # The GT (train+eval) oracle has no ml branch in the graph of some steps.
    find_unused_parameters=lambda m: m.oracle,
)
