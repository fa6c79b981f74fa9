"""The Segmenter family: Segmenter baseline, RankSeg and their ablations (model/, losses.py).

Prediction is single-scale whole-image on the fast path (only the selected channels are
upsampled) and otherwise multi-scale / flip / sliding window over the selected classes only
(`inference.predict_compact`), never over all K channels.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankseg_core.codec import IGNORE
from rankseg_core.families.base import Family, Predictions
from rankseg_core.inference import predict_compact
from rankseg_core.losses import RankSegCriterion
from rankseg_core.model import build_model


def _criterion(cfg: Any) -> Any:
    crit = RankSegCriterion(cfg.model.num_classes, IGNORE, cfg.loss.ml_loss, cfg.loss.ml_weight,
                            cfg.loss.seg_loss_norm, cfg.model.clip_len)
    return lambda out, batch: crit(out, batch["label"])


@torch.no_grad()
def predict_fast(model: nn.Module, images: Tensor, sizes: list[tuple[int, int]], **fwd_kw
                 ) -> tuple[list[Tensor], Tensor | None]:
    """Single-scale whole-image prediction without materialising K channels.

    images N x 3 x H' x W' -> per image an (h x w) long class map at sizes[i], and the ml
    probabilities (N x K, clips x K for video; None without an ml branch). Equals
    `predict_whole` + upsample + argmax (the -100 channels never win), at kappa/K of the
    memory: upsample only the selected channels, then map ranks to class ids.
    """
    h, w = images.shape[-2:]
    p = getattr(model, "patch_size", 16)
    ph, pw = -h % p, -w % p
    x = F.pad(images, (0, pw, 0, ph)) if ph or pw else images
    out = model(x, **fwd_kw)
    logits = F.interpolate(out.mask_logits.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)[..., :h, :w]
    preds = []
    for i, size in enumerate(sizes):
        li = F.interpolate(logits[i:i + 1], size=size, mode="bilinear", align_corners=False)[0]
        if out.valid is not None:
            li = li.masked_fill(~out.valid[i][:, None, None], float("-inf"))
        ch = li.argmax(0)
        preds.append(out.topk_index[i][ch] if out.topk_index is not None else ch)
    ml = out.ml_logits.float().sigmoid() if out.ml_logits is not None else None
    return preds, ml


@torch.no_grad()
def predict(model: nn.Module, cfg: Any, images: Tensor, sizes: list[tuple[int, int]], mode: str,
            scales: list[float], flip: bool, **fwd_kw) -> Predictions:
    """Class maps at `sizes` and ml probabilities for a batch of equally sized images."""
    if mode == "whole" and list(scales) == [1.0] and not flip:
        preds, ml = predict_fast(model, images, sizes, **fwd_kw)
        return Predictions(preds, ml)
    probs, ml = predict_compact(model, images, cfg.model.num_classes, scales=tuple(scales), flip=flip, mode=mode,
                                crop=cfg.eval.crop, stride=cfg.eval.stride, **fwd_kw)
    preds = [probs.classes[F.interpolate(probs.maps[i:i + 1], size=s, mode="bilinear", align_corners=False)[0].argmax(0)]
             for i, s in enumerate(sizes)]
    return Predictions(preds, ml)


SEGMENTER = Family(
    name="segmenter",
    build=build_model,
    criterion=_criterion,
    stats=("loss", "seg", "ml", "coverage", "recall", "precision"),
    predict=predict,
    # The GT (train+eval) oracle has no ml branch in the graph of some steps.
    find_unused_parameters=lambda m: m.oracle,
)
