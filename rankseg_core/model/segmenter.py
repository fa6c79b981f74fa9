"""The full model (timm ViT backbone + mask-transformer head) and its builder."""

from __future__ import annotations

from torch import Tensor, nn

from rankseg_core.config.model import ModelConfig
from rankseg_core.model.backbone import ViTBackbone, load_backbone_weights
from rankseg_core.model.classifier import SELECTOR_ATTR, load_selector
from rankseg_core.model.encnet import EncNetHead
from rankseg_core.model.essnet import EssNetHead
from rankseg_core.model.heads import MaskTransformerHead, SegOutput
from rankseg_core.model.protoseg import ProtoSegHead
from rankseg_core.model.selection import NO_SELECTION, Selection


class RankSegModel(nn.Module):
    """Segmenter / RankSeg. `forward_features` -> `forward_head`, as in timm.

    Video (cfg.clip_len = T > 1): images come as (B*T) x 3 x H x W with the T frames of a
    clip consecutive; ml_logits are per clip (B x K), mask_logits / topk_index per frame.
    """

    def __init__(self, cfg: ModelConfig, arch: str, selector_arch: str | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = ViTBackbone(cfg, arch)
        # The supplement's comparison heads (Table 1) reuse the Segmenter decoder's names.
        heads = {"encnet": EncNetHead, "essnet": EssNetHead, "protoseg": ProtoSegHead, "rankproto": ProtoSegHead}
        head = heads.get(cfg.head, MaskTransformerHead)
        self.head = head(cfg, self.backbone.embed_dim)
        # Independent scheme: a frozen classifier run ranks the classes (not in the state dict).
        if cfg.has_selector:
            if selector_arch is None:
                raise ValueError("a segmenter with a selector needs the selector's backbone architecture")
            setattr(self, SELECTOR_ATTR, load_selector(cfg.selector, cfg.num_classes, cfg.clip_len, selector_arch))

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    def forward_features(self, images: Tensor) -> Tensor:
        """B x 3 x H x W -> B x D x H/16 x W/16 patch tokens (class token dropped)."""
        return self.backbone(images)

    def forward_head(self, feats: Tensor, selection: Selection = NO_SELECTION,
                     selector_logits: Tensor | None = None) -> SegOutput:
        """B x D x h x w -> SegOutput.

        selection: this forward's selection options (model/selection.py: kappa, dynamic
            threshold, GT override and fill, the GT classes an oracle model needs).
        selector_logits: B x K scores of the frozen selector (`forward` computes them from the
            images when cfg.selector is set); they rank the classes instead of an ml branch.
        """
        return self.head(feats, selection, clip_len=self.cfg.clip_len, selector_logits=selector_logits)

    def forward(self, images: Tensor, selection: Selection = NO_SELECTION) -> SegOutput:
        # The frozen classifier sees exactly the segmenter's input.
        logits = getattr(self, SELECTOR_ATTR)(images) if self.cfg.has_selector else None
        return self.forward_head(self.forward_features(images), selection, logits)

    def rank_scale(self) -> Tensor:
        """Learned 1/tau per rank (kappa,), i.e. the rank LayerNorm weight (shared: repeated)."""
        norm = self.head.mask_norm
        return norm.affine(norm.size)[0]

    def rank_bias(self) -> Tensor:
        """Per-rank bias beta (kappa,)."""
        norm = self.head.mask_norm
        return norm.affine(norm.size)[1]

    def data_config(self) -> dict:
        """mean/std on the 0..255 scale for input normalisation (timm's data config)."""
        return self.backbone.data_config()


def build_model(cfg: ModelConfig, arch: str, selector_arch: str | None = None) -> RankSegModel:
    """Validate `cfg`, build the model on the timm ViT `arch` (and the frozen selector's ViT
    `selector_arch` when cfg.selector is set) and load local backbone weights if given."""
    cfg.validate()
    model = RankSegModel(cfg, arch, selector_arch)
    if cfg.backbone_weights:
        load_backbone_weights(model.backbone, cfg.backbone_weights)
    return model
