"""Segmenter / RankSeg model: config, backbone, heads, builder."""

from rankseg_core.model.backbone import ViTBackbone, load_backbone_weights
from rankseg_core.model.config import BACKBONES, ModelConfig
from rankseg_core.model.heads import FILL_LOGIT, GroupWiseLinear, MaskTransformerHead, RankNorm, SegOutput
from rankseg_core.model.segmenter import RankSegModel, build_model

__all__ = [
    "BACKBONES",
    "FILL_LOGIT",
    "GroupWiseLinear",
    "MaskTransformerHead",
    "ModelConfig",
    "RankNorm",
    "RankSegModel",
    "SegOutput",
    "ViTBackbone",
    "build_model",
    "load_backbone_weights",
]
