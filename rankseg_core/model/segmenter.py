"""The full model (timm ViT backbone + mask-transformer head) and its builder."""

from __future__ import annotations

from torch import Tensor, nn

from rankseg_core.config.model import ModelConfig
from rankseg_core.model.backbone import ViTBackbone, load_backbone_weights
from rankseg_core.model.classifier import SELECTOR_ATTR, load_selector
from rankseg_core.model.heads import MaskTransformerHead, SegOutput


class RankSegModel(nn.Module):
    """Segmenter / RankSeg. `forward_features` -> `forward_head`, as in timm.

    Video (cfg.clip_len = T > 1): images come as (B*T) x 3 x H x W with the T frames of a
    clip consecutive; ml_logits are per clip (B x K), mask_logits / topk_index per frame.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = ViTBackbone(cfg)
        self.head = MaskTransformerHead(cfg, self.backbone.embed_dim)
        # Independent scheme: a frozen classifier run ranks the classes (not in the state dict).
        if cfg.has_selector:
            setattr(self, SELECTOR_ATTR, load_selector(cfg.selector, cfg.num_classes, cfg.clip_len))

    @property
    def patch_size(self) -> int:
        return self.backbone.patch_size

    def forward_features(self, images: Tensor) -> Tensor:
        """B x 3 x H x W -> B x D x H/16 x W/16 patch tokens (class token dropped)."""
        return self.backbone(images)

    def forward_head(self, feats: Tensor, *, gt_classes: list[Tensor] | None = None, kappa: int | None = None,
                     dynamic_threshold: float | None = None,
                     select_override: list[Tensor] | None = None, selector_logits: Tensor | None = None,
                     select_fill: int | None = None) -> SegOutput:
        """B x D x h x w -> SegOutput.

        kappa: selected classes at this forward (default: the trained kappa); may exceed the
            trained size, the last gamma/beta are then repeated.
        dynamic_threshold: select classes whose sigmoid score exceeds it (1..K per image).
        select_override: per-image class ids replacing the ml selection (GT (eval) oracle),
            ordered by ml score when the model has an ml branch.
        gt_classes: per-image GT class ids, required when cfg.oracle (GT train+eval).
        selector_logits: B x K scores of the frozen selector (`forward` computes them from the
            images when cfg.selector is set); they rank the classes instead of an ml branch.
        select_fill: with select_override, fill each image's list up to this many classes with
            the ranking's highest other classes (GT (eval) + the ranking's false positives).
        Selection options are ignored by the baseline and +MT, except select_override, which
        then restricts the K class-ordered channels (valid mask).
        """
        return self.head(feats, clip_len=self.cfg.clip_len, gt_classes=gt_classes, kappa=kappa,
                         dynamic_threshold=dynamic_threshold, select_override=select_override,
                         selector_logits=selector_logits, select_fill=select_fill)

    def forward(self, images: Tensor, **kw) -> SegOutput:
        if self.cfg.has_selector:  # the frozen classifier sees exactly the segmenter's input
            kw["selector_logits"] = getattr(self, SELECTOR_ATTR)(images)
        return self.forward_head(self.forward_features(images), **kw)

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

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay: norms, biases, pos-embed, class tokens."""
        names = set()
        for name, p in self.named_parameters():
            if p.ndim <= 1 or name.endswith(("pos_embed", "cls_token", "cls_emb", "reg_token")):
                names.add(name)
        return names

    def ml_branch_names(self) -> set[str]:
        """Parameters of the multi-label branch (block 0 + classifier for tranenc), which the
        ADE20K / Pascal recipes give 100x weight decay."""
        head = self.head
        if head.ml_head == "tranenc":
            prefixes = ("head.blocks.0.", "head.ml_fc.", "head.decoder_norm2.")
        elif head.ml_head is not None:
            prefixes = ("head.ml_branch.",)
        else:
            return set()
        return {n for n, _ in self.named_parameters() if n.startswith(prefixes)}


def build_model(cfg: ModelConfig) -> RankSegModel:
    """Validate `cfg`, build the model and load local backbone weights if given."""
    cfg.validate()
    model = RankSegModel(cfg)
    if cfg.backbone_weights:
        load_backbone_weights(model.backbone, cfg.backbone_weights)
    return model
