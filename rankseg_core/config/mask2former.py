"""Mask2Former options (official ADE20K configs) and the RankSeg options on top of it.

Defaults are the official values of facebookresearch/Mask2Former's ADE20K configs
(`maskformer2_R50_bs16_160k.yaml` and its Swin variants) and of the RankSeg fork's
`*-rankseg.yaml` (openseg-group/RankSeg, `mask2former/`). The small knobs (hidden_dim,
dec_layers, enc_layers, num_queries, train_num_points) exist for tiny CPU models and tests.
It imports nothing of rankseg but errors (config/model.py nests it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rankseg_core.errors import UserError

TASKS = ("semantic", "panoptic", "instance")
MASKFORMER_PIXEL_DECODERS = ("fpn", "transformer_fpn")
# Mask2Former options a MaskFormer (model.model=maskformer-*) does not read: its own values are
# `maskformer.*`; the family refuses these when changed (they would be ignored silently).
MASK2FORMER_ONLY = ("dec_layers", "dropout", "enc_dim_feedforward", "enc_n_points", "class_weight", "mask_weight",
                    "dice_weight", "train_num_points", "oversample_ratio", "importance_sample_ratio",
                    "object_mask_threshold")


@dataclass
class MaskFormerConfig:
    """MaskFormer's own options (`model.mask2former.maskformer.*`, maskformer-* models only):
    those whose official values differ from Mask2Former's. Defaults: facebookresearch/MaskFormer's
    ADE20K configs (`maskformer_R50_bs16_160k.yaml`, the Swin and panoptic configs on top); every
    other option (widths, heads, FFN 2048, 100 queries, no-object 0.1, the RankSeg ones) is
    shared with Mask2Former and has the same official value (docs/mask2former.md, "MaskFormer").
    """

    # "fpn" (BasePixelDecoder) | "transformer_fpn" (TransformerEncoderPixelDecoder, enc_layers
    # encoder layers on res5); None = official: transformer_fpn for the panoptic task, else fpn
    pixel_decoder: str | None = None
    dec_layers: int = 6  # DEC_LAYERS: 6 layers, 6 predictions (no prediction on the learnable queries)
    dropout: float = 0.1  # DROPOUT of the decoder and of the pixel decoder's encoder
    # Loss weights (also the matching costs): CE 1 (hard-coded), sigmoid focal 20, dice 1.
    class_weight: float = 1.0
    mask_weight: float = 20.0
    dice_weight: float = 1.0
    object_mask_threshold: float = 0.7  # TEST.OBJECT_MASK_THRESHOLD of the ADE20K panoptic config

    def validate(self) -> None:
        """Raise `UserError` naming the first bad option and how to fix it."""
        p = "model.mask2former.maskformer."
        if self.pixel_decoder is not None and self.pixel_decoder not in MASKFORMER_PIXEL_DECODERS:
            raise UserError(f"{p}pixel_decoder={self.pixel_decoder!r} is unknown; use one of "
                            f"{', '.join(MASKFORMER_PIXEL_DECODERS)} (or null for the official one)")
        if self.dec_layers < 1:
            raise UserError(f"{p}dec_layers={self.dec_layers} must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"{p}dropout={self.dropout} must be in [0, 1)")
        for name in ("class_weight", "mask_weight", "dice_weight"):
            if getattr(self, name) < 0:
                raise UserError(f"{p}{name}={getattr(self, name)} must be >= 0")
        if not 0.0 <= self.object_mask_threshold <= 1.0:
            raise UserError(f"{p}object_mask_threshold={self.object_mask_threshold} must be in [0, 1]")


# "off", not "none": the --set / YAML reader reads the text none as null (the default).
PIXEL_PAIRS = ("cross", "self", "off")
DISTILL_FUNCS = ("cce", "ce")
STUDENT_PAIRS = ("cross", "within")


@dataclass
class SimFormerConfig:
    """SimFormer's pixel-pixel similarity transfer (`model.mask2former.simformer.*`), read in
    weak-shot runs only (data.novel_classes set; docs/weak-shot.md). Values: the official
    CROSS_IMG_SIM options of bcmi/SimFormer-Weak-Shot-Semantic-Segmentation `_1Prop_Cfgs`."""

    # "cross" (pairs across two images of the batch), "self" (an image with itself: supplement
    # Table 2), "off" (proposal-pixel transfer only: the "basic model"); None = cross in a
    # weak-shot run of a model that can hold the pair net (timm-backbone MaskFormer /
    # Mask2Former), else off
    pixel_pairs: str | None = None
    pair_weight: float = 1.0  # BASE_LOSS, 1.0 in every *_crosim config
    # DISTILL_LOSS; None = official per dataset: ADE20K 0.5, COCO-Stuff 0.1 (splits 2-9; split 1: 0)
    distill_weight: float | None = None
    distill_func: str | None = None  # DISTILL_FUNC "cce" | "ce"; None = cce (every config but COCO split 3)
    points: int = 100  # J: BASE_POINT_NUM = NOVEL_POINT_NUM, points per image (supplement Table 1)
    sim_layers: int = 3  # LayerNum: residual blocks of the pair net (width = mask_dim, 256 officially)
    # "cross": the student pairs are the teacher's cross-image pairs (supplement A5); "within":
    # the official code's student, which pairs the input image's J points with themselves
    student_pairs: str = "cross"

    def validate(self) -> None:
        """Raise `UserError` naming the first bad option and how to fix it."""
        p = "model.mask2former.simformer."
        for name, value, allowed in (("pixel_pairs", self.pixel_pairs, PIXEL_PAIRS),
                                     ("distill_func", self.distill_func, DISTILL_FUNCS),
                                     ("student_pairs", self.student_pairs, STUDENT_PAIRS)):
            if value is not None and value not in allowed:
                raise UserError(f"{p}{name}={value!r} is unknown; use one of {', '.join(allowed)}")
        if self.pair_weight < 0 or (self.distill_weight or 0.0) < 0:
            raise UserError(f"{p}pair_weight / distill_weight must be >= 0")
        if self.points < 5 or self.sim_layers < 1:
            raise UserError(f"{p}points={self.points} must be >= 5 and sim_layers={self.sim_layers} >= 1")


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
    # MaskFormer (model.model=maskformer-*): the options whose official values differ
    maskformer: MaskFormerConfig = field(default_factory=MaskFormerConfig)
    # SimFormer's pixel-pixel transfer in weak-shot runs (both architectures)
    simformer: SimFormerConfig = field(default_factory=SimFormerConfig)
    # The ml loss (weight 10, ASL gamma- 2 / gamma+ 0) and the ml head's lr multiplier (0.1) are
    # the engine's loss.* / optim.ml_lr_mult, set by the family's recipe (config.py).

    def validate(self, maskformer: bool = False) -> None:
        """Raise `UserError` naming the first bad option and how to fix it. maskformer: the
        model is a MaskFormer (its family says so by name), which reads `maskformer.*` instead
        of the MASK2FORMER_ONLY options."""
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
        layers, which = (self.maskformer.dec_layers, "maskformer.dec_layers") if maskformer else (self.dec_layers,
                                                                                                 "dec_layers")
        if not 1 <= self.ml_query_layer <= layers:
            raise UserError(f"{p}ml_query_layer={self.ml_query_layer} must be in [1, {which}={layers}]")
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
        self.maskformer.validate()
        self.simformer.validate()
        # Options the chosen architecture would ignore are refused rather than dropped silently.
        official = Mask2FormerConfig()
        if maskformer:
            for name in MASK2FORMER_ONLY:
                if getattr(self, name) != getattr(official, name):
                    own = f"; set {p}maskformer.{name}" if hasattr(self.maskformer, name) else ""
                    raise UserError(f"{p}{name}={getattr(self, name)} is a Mask2Former option a MaskFormer does not "
                                    f"read{own} (or use a mask2former-* model)")
        elif self.maskformer != official.maskformer:
            raise UserError(f"{p}maskformer.* is read by maskformer-* models only; use one (e.g. model.model="
                            "maskformer-r50) or leave model.mask2former.maskformer at its defaults")
