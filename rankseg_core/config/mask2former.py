"""Mask2Former options (official ADE20K configs) and the RankSeg options on top of it.

Defaults are the official values of facebookresearch/Mask2Former's ADE20K configs
(`maskformer2_R50_bs16_160k.yaml` and its Swin variants) and of the RankSeg fork's
`*-rankseg.yaml` (openseg-group/RankSeg, `mask2former/`). The small knobs (hidden_dim,
dec_layers, enc_layers, num_queries, train_num_points) exist for tiny CPU models and tests.
It imports nothing of rankseg but errors (config/model.py nests it).
"""

from __future__ import annotations

from dataclasses import dataclass

from rankseg_core.errors import UserError

TASKS = ("semantic", "panoptic", "instance")


@dataclass
class Mask2FormerConfig:
    """Mask2Former + RankSeg options (`model.mask2former.*`); see docs/mask2former.md."""

    # "semantic", "panoptic" or "instance" (video tracks, clips only): the official query count,
    # targets and inference
    task: str = "semantic"
    # Transformer decoder (MultiScaleMaskedTransformerDecoder)
    hidden_dim: int = 256
    num_queries: int | None = None  # None = official (the family: 200 for Swin-L panoptic, else 100)
    nheads: int = 8
    dec_layers: int = 9  # the config says DEC_LAYERS: 10 = 9 layers + the prediction on the learnable queries
    dim_feedforward: int = 2048
    dropout: float = 0.0
    # Pixel decoder (MSDeformAttnPixelDecoder)
    conv_dim: int = 256
    mask_dim: int = 256
    enc_layers: int = 6
    enc_dim_feedforward: int = 1024  # hard-coded 1024 in the official pixel decoder
    enc_n_points: int = 4
    # Backbone
    backbone_drop_path: float = 0.3  # DROP_PATH_RATE of every official Swin config (ResNet: unused)
    freeze_bn: bool = True  # R50: detectron2's default FrozenBN (the official R50 runs)
    size_divisibility: int = 32  # inputs are zero-padded (after normalisation) to this multiple
    # Losses / matching
    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    deep_supervision: bool = True
    train_num_points: int = 12544  # 112 x 112 points per mask
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    # Inference (panoptic)
    object_mask_threshold: float = 0.8
    overlap_threshold: float = 0.8
    # RankSeg (model.head="rankseg"; kappa / select / tau / oracle live in ModelConfig)
    ml_hidden_dim: int = 512  # RANKSEG.HIDDEN_DIM; heads = 512 / 64, MLP 4x
    ml_dropout: float = 0.1
    ml_query_layer: int = 3  # the ml head reads the object queries after this decoder layer
    cosine_logits: bool = True  # SEM_SEG_HEAD.USE_LAYERNORM of the rankseg configs: cosine class logits
    # The ml loss (weight 10, ASL gamma- 2 / gamma+ 0) and the ml head's lr multiplier (0.1) are
    # the engine's loss.* / optim.ml_lr_mult, set by the family's recipe (config.py).

    def validate(self) -> None:
        """Raise `UserError` naming the first bad option and how to fix it."""
        p = "model.mask2former."
        if self.task not in TASKS:
            raise UserError(f"{p}task={self.task!r} is unknown; use one of {', '.join(TASKS)}")
        for name in ("hidden_dim", "nheads", "dec_layers", "dim_feedforward", "conv_dim", "mask_dim",
                     "enc_dim_feedforward", "enc_n_points", "train_num_points", "ml_hidden_dim", "size_divisibility"):
            if getattr(self, name) < 1:
                raise UserError(f"{p}{name}={getattr(self, name)} must be >= 1")
        if self.num_queries is not None and self.num_queries < 1:
            raise UserError(f"{p}num_queries={self.num_queries} must be >= 1 (or null for the official value)")
        if self.enc_layers < 0:
            raise UserError(f"{p}enc_layers={self.enc_layers} must be >= 0")
        if self.hidden_dim % self.nheads or self.conv_dim % self.nheads:
            raise UserError(f"{p}hidden_dim={self.hidden_dim} and conv_dim={self.conv_dim} must be multiples of "
                            f"nheads={self.nheads}")
        if self.ml_hidden_dim % 64 and self.ml_hidden_dim >= 64:
            raise UserError(f"{p}ml_hidden_dim={self.ml_hidden_dim} must be a multiple of 64 (heads = dim / 64)")
        if not 1 <= self.ml_query_layer <= self.dec_layers:
            raise UserError(f"{p}ml_query_layer={self.ml_query_layer} must be in [1, dec_layers={self.dec_layers}]")
        if self.size_divisibility % 32:
            raise UserError(f"{p}size_divisibility={self.size_divisibility} must be a multiple of 32 (stride of res5)")
        if self.oversample_ratio < 1 or not 0 <= self.importance_sample_ratio <= 1:
            raise UserError(f"{p}oversample_ratio must be >= 1 and importance_sample_ratio in [0, 1]")
        for name in ("class_weight", "mask_weight", "dice_weight", "no_object_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"{p}{name}={getattr(self, name)} must be >= 0")
        for name in ("dropout", "ml_dropout", "backbone_drop_path"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"{p}{name}={getattr(self, name)} must be in [0, 1)")
        for name in ("object_mask_threshold", "overlap_threshold"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"{p}{name}={getattr(self, name)} must be in [0, 1]")
