"""The multi-label classifier family (`classifier-vit{t,s,b,l}`): the first model of the
independent scheme (model/classifier.py), trained and evaluated by the same engine.

Training target: the classes present in the augmented crop's label (ignore excluded), the
multi-label target RankSeg's joint branch learns from (`losses.ml_targets`), so the classifier
learns to rank what the segmenter it will drive is asked to segment. Evaluation: mAP and
recall@kappa of the sigmoid probabilities against each image's stored GT classes.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankseg_core.config.model import ModelConfig
from rankseg_core.config.train import TrainConfig
from rankseg_core.errors import UserError
from rankseg_core.families.base import Family, InferenceProtocol, Predictions
from rankseg_core.families.vit import RECIPES as SEGMENTER_RECIPES
from rankseg_core.families.vit import VIT_SIZES
from rankseg_core.inference.dense import mmseg_scale_sizes
from rankseg_core.losses.rankseg import clip_targets, ml_loss_fn, ml_targets, selection_stats
from rankseg_core.model.classifier import MultiLabelClassifier, build_classifier
from rankseg_core.model.selection import Selection
from rankseg_core.shards.codec import IGNORE


def _criterion(cfg: TrainConfig) -> Any:
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
def predict(model: nn.Module, cfg: TrainConfig, images: Tensor, sizes: list[tuple[int, int]], protocol: InferenceProtocol,
            selection: Selection) -> Predictions:
    """Multi-label probabilities N x K (clips x K for video) of whole images: the sigmoid of
    each pass (scale, flip) averaged over passes, as the Segmenter's ml probabilities. A
    classifier selects nothing: `selection` does not apply (the engine refuses its options)."""
    if protocol.mode != "whole":
        raise UserError(f"eval mode {protocol.mode!r}: a classifier predicts whole images; use --mode whole")
    h, w = images.shape[-2:]
    scales = list(protocol.scales)
    sized = mmseg_scale_sizes(cfg.eval, images, sizes, scales) or [
        (max(1, int(h * s + 0.5)), max(1, int(w * s + 0.5))) for s in scales]
    total: Tensor | None = None
    passes = 0
    for size in sized:
        x = images if tuple(size) == (h, w) else F.interpolate(images, size=tuple(size), mode="bilinear",
                                                               align_corners=False)
        for flipped in ((False, True) if protocol.flip else (False,)):
            patch = cast(MultiLabelClassifier, model).patch_size  # this family's model
            p = model(_pad16(x.flip(-1) if flipped else x, patch)).float().sigmoid()
            total = p if total is None else total + p
            passes += 1
    return Predictions(semantic=None, ml=cast(Tensor, total) / passes)  # None only without scales


MODELS = {f"classifier-{size}": arch for size, arch in VIT_SIZES.items()}
# The official Query2Label recipe where the engine has it (AdamW lr 1e-4, weight decay 1e-2 on
# every parameter, ASL gamma- 2 / gamma+ 0 / clip 0.05: loss.* resolves to those), our poly
# schedule instead of its one-cycle, whole-image test; kappa = the recall@kappa it is scored at
# and the kappa of the segmenter it will drive (the Segmenter recipes' kappa per dataset).
RECIPES: dict[str, dict[str, Any]] = {
    "*": {"optim.name": "adamw", "optim.lr": 1e-4, "optim.weight_decay": 1e-2, "eval.mode": "whole"},
    **{name: {k: v for k, v in recipe.items() if k in ("model.kappa", "model.img_size", "schedule.iters")}
       for name, recipe in SEGMENTER_RECIPES.items() if name != "*"},
    "synthetic": {"model.kappa": 25, "model.img_size": 128, "schedule.iters": 2000, "schedule.batch_size": 8,
                  "eval.every": 500},
}


def _validate(m: ModelConfig) -> None:
    if m.oracle:
        raise UserError("model.oracle: the GT oracle is a segmentation variant; a classifier has no selection "
                        "to replace (drop --oracle)")


def _build(m: ModelConfig) -> nn.Module:
    _validate(m)
    return build_classifier(m, CLASSIFIER.arch(m.model))


CLASSIFIER = Family(
    name="classifier",
    models=MODELS,
    build=_build,
    criterion=_criterion,
    stats=("loss", "recall", "precision"),
    predict=predict,
    data_config=lambda model: cast(MultiLabelClassifier, model).data_config(),
    recipes=RECIPES,
    validate=_validate,
    segments=False,
    ranks=lambda m: True,
    describe=lambda m: f"multi-label classifier (recall@{m.effective_kappa})",
)
