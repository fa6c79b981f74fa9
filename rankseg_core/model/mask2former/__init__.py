"""Mask2Former (masked-attention mask transformer) with the RankSeg multi-label head.

Modules, one concern each (data flows top to bottom):
    config.py         Mask2FormerConfig: official hyper-parameters + RankSeg options
    backbone.py       timm ResNet-50 / Swin as a stride 4/8/16/32 NCHW feature pyramid
    deform_attn.py    multi-scale deformable attention in plain PyTorch (grid_sample)
    pixel_decoder.py  6-layer deformable encoder + FPN level -> mask features, 3 scales
    decoder.py        masked-attention transformer decoder, per-layer mask predictions
    multilabel.py     RankSeg multi-label head, class selection and the rank LayerNorm
    model.py          Mask2FormerModel / Mask2FormerOutput / build_mask2former
    targets.py        per-image training targets from semantic or panoptic labels
    points.py         point sampling (uniform and importance sampling)
    matcher.py        Hungarian matching on class + sigmoid-CE + dice costs
    criterion.py      Mask2FormerCriterion: set losses with deep supervision + ASL
    inference.py      semantic and panoptic inference

`model/config.py` nests `Mask2FormerConfig`, so this package only imports its submodules on
first attribute access (importing them here eagerly would import `model/config.py` back
while it is still being defined).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Mask2FormerConfig": "config",
    "MASK2FORMER_BACKBONES": "config",
    "Mask2FormerModel": "model",
    "Mask2FormerOutput": "model",
    "build_mask2former": "model",
    "Mask2FormerCriterion": "criterion",
    "targets_from_semantic": "targets",
    "targets_from_panoptic": "targets",
    "ml_targets_from": "targets",
    "semantic_inference": "inference",
    "semantic_inference_compact": "inference",
    "semantic_map": "inference",
    "panoptic_inference": "inference",
    "full_class_logits": "inference",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
