"""The paper's ViT models and per-dataset recipes, shared by the Segmenter and classifier families.

The classifier of the independent scheme uses the Segmenter's backbones and is trained at the
crop, kappa and schedule of the segmenter it will drive, so both families read them here.
"""

from __future__ import annotations

from typing import Any

VIT_SIZES = {"vitt": "vit_tiny_patch16_384", "vits": "vit_small_patch16_384", "vitb": "vit_base_patch16_384",
             "vitl": "vit_large_patch16_384"}
# Backbone names follow the paper (Segmenter ViT-*/16 at 384 px pretraining); the position
# embeddings are resized to `img_size`, so the "_384" only names the timm architecture.

# The official Segmenter + RankSeg recipes (openseg-group/RankSeg mmseg configs; docs/method.md
# sec. 4-5). Test protocol of every official config: keep-ratio resize to (4 x crop, crop) -- the
# derived eval.short_side / eval.max_long -- then slide with window = stride = crop, single
# scale, no flip; aug.scale derives to the same (4 x crop, crop). "*" applies to any dataset.
# ADE20K-Full and COCO+LVIS have no released config: they follow the ADE20K one.
_ADE = {"optim.weight_decay": 1e-6, "model.img_size": 512}
RECIPES: dict[str, dict[str, Any]] = {
    "*": {"eval.mode": "slide"},
    "ade20k-full": {**_ADE, "model.kappa": 100, "loss.ml_weight": 100.0, "schedule.iters": 160000},
    "coco-lvis": {**_ADE, "model.kappa": 100, "loss.ml_weight": 300.0, "schedule.iters": 320000},
    "ade20k": {**_ADE, "model.kappa": 50, "loss.ml_weight": 10.0, "schedule.iters": 160000},
    # The ViT-B 80k COCO-Stuff-10k config: BCE (loss.ml_loss resolves to it), weight 5, no
    # weight decay and no ml-branch custom key.
    "coco-stuff": {"optim.weight_decay": 0.0, "optim.ml_wd_mult": 1.0, "model.img_size": 512, "model.kappa": 50,
                   "loss.ml_weight": 5.0, "schedule.iters": 80000},
    # img_scale (4160, 520) for training and test, crop 480 (pascal_context_meanstd0.5*.py).
    "pascal-context": {"optim.weight_decay": 1e-6, "aug.scale": [4160, 520], "model.img_size": 480,
                       "eval.short_side": 520, "eval.max_long": 4160,
                       "model.kappa": 25, "loss.ml_weight": 5.0, "schedule.iters": 80000},
    # Synthetic: 128 px images with <= 10 classes each; small enough to learn on a CPU. Our
    # own cheap protocol: one whole-image forward at the crop size.
    "synthetic": {"model.kappa": 25, "loss.ml_weight": 10.0, "model.img_size": 128, "eval.mode": "whole",
                  "schedule.iters": 2000, "schedule.batch_size": 8, "eval.every": 500},
}
