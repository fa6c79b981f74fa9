"""Segmenter / RankSeg model: config, backbone, heads, builder (Mask2Former: model.mask2former)."""

from rankseg_core.model.backbone import ViTBackbone, load_backbone_weights
from rankseg_core.model.config import BACKBONES, ModelConfig
from rankseg_core.model.heads import FILL_LOGIT, GroupWiseLinear, MaskTransformerHead, RankNorm, SegOutput
from rankseg_core.model.mask2former.config import Mask2FormerConfig
from rankseg_core.model.segmenter import RankSegModel, build_model

__all__ = [
    "BACKBONES",
    "FILL_LOGIT",
    "GroupWiseLinear",
    "Mask2FormerConfig",
    "MaskTransformerHead",
    "ModelConfig",
    "RankNorm",
    "RankSegModel",
    "SegOutput",
    "ViTBackbone",
    "build_model",
    "load_backbone_weights",
]
