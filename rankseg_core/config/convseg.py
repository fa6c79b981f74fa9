"""Options of the dense conv-decoder models (DeepLabv3, UperNet) and of RankSeg on top of them.

Nested as `ModelConfig.convseg` (`--set model.convseg.channels=128`). A None value means "the
official value of the model": the convseg families (rankseg_core/families/convseg.py) fill it
from the mmsegmentation config of the architecture and from the RankSeg fork's
`deeplabv3_r50-d8_mlseg.py` / `upernet_swin_mlseg.py` / `upernet_beit_mlseg.py`
(docs/architectures.md), so config.yaml records what was built. The small knobs exist for tiny
CPU models and tests. It imports nothing of rankseg but errors (config/model.py nests it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rankseg_core.errors import UserError


@dataclass
class ConvSegConfig:
    """DeepLabv3 / UperNet + RankSeg options (`model.convseg.*`)."""

    # Decode head (mmseg ASPPHead / UPerHead) and the baseline classifier (BaseDecodeHead)
    channels: int | None = None  # pixel-embedding width; None = official (512; R18 128; BEiT-L 1024)
    dropout: float = 0.1  # Dropout2d before the pixel classifier (BaseDecodeHead dropout_ratio)
    aspp_dilations: list[int] = field(default_factory=lambda: [1, 12, 24, 36])  # DeepLabv3 (output stride 8)
    pool_scales: list[int] = field(default_factory=lambda: [1, 2, 3, 6])  # UperNet's PSP module
    # Auxiliary FCNHead on the stride-16 (stage 3) map: training only, loss weight aux_weight
    aux_channels: int | None = None  # None = official (256; R18 64)
    aux_weight: float = 0.4  # 0 = no auxiliary head at all (its parameters are not built)
    # RankSeg multi-label branch (the fork's RankSegEncoderHead, one TranEnc layer)
    ml_dim: int | None = None  # hidden width; None = official (= channels; BEiT-L 1024); heads = dim / 64
    ml_pool: int | None = None  # pool the backbone map to ml_pool x ml_pool tokens; 0 = no pooling;
    # None = official (DeepLabv3 16, UperNet 0)
    ml_own_embedding: bool | None = None  # ml class tokens of its own (BEiT) instead of the pixel
    # classifier's class embeddings; None = official (BEiT True, others False)
    ml_cls_proj: bool = True  # bias-free ml_dim x ml_dim projection of the class tokens entering the ml block
    # (docs/architectures.md: the fork builds it, Table 7 counts it; False = the fork's forward)
    cosine: bool = False  # True: L2-normalise pixel and class embeddings (the Segmenter head's
    # reading); False: dot product + class bias, as the fork's ASPPRankSegHead
    # Backbone
    backbone_drop_path: float | None = None  # None = official (ResNet 0, Swin 0.3, BEiT-L 0.2)
    layer_decay: float | None = None  # BEiT layer-wise lr decay; None = official (BEiT-L 0.95); other models: unused

    def validate(self) -> None:
        """Raise `UserError` naming the first bad option and how to fix it."""
        p = "model.convseg."
        for name in ("channels", "aux_channels", "ml_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{p}{name}={value} must be >= 1 (or null for the official value)")
        if self.ml_dim is not None and self.ml_dim >= 64 and self.ml_dim % 64:
            raise UserError(f"{p}ml_dim={self.ml_dim} must be a multiple of 64 (heads = dim / 64) or below 64")
        if self.ml_pool is not None and self.ml_pool < 0:
            raise UserError(f"{p}ml_pool={self.ml_pool} must be >= 0 (0 = no pooling, null = official)")
        if not self.aspp_dilations or min(self.aspp_dilations) < 1:
            raise UserError(f"{p}aspp_dilations={self.aspp_dilations} needs dilations >= 1, e.g. 1,12,24,36")
        if not self.pool_scales or min(self.pool_scales) < 1:
            raise UserError(f"{p}pool_scales={self.pool_scales} needs scales >= 1, e.g. 1,2,3,6")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"{p}dropout={self.dropout} must be in [0, 1)")
        if self.aux_weight < 0:
            raise UserError(f"{p}aux_weight={self.aux_weight} must be >= 0 (0 = no auxiliary head)")
        if self.backbone_drop_path is not None and not 0.0 <= self.backbone_drop_path < 1.0:
            raise UserError(f"{p}backbone_drop_path={self.backbone_drop_path} must be in [0, 1)")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise UserError(f"{p}layer_decay={self.layer_decay} must be in (0, 1] (1 = no decay)")
