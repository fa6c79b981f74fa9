"""Mask2Former (+ RankSeg): backbone -> pixel decoder -> masked-attention decoder -> heads.

Variants, as for Segmenter (`ModelConfig.head`, `select`, `tau`, `oracle`):
- baseline   ("segmenter"): linear class head over K + 1 (no-object last).
- RankSeg    ("rankseg"):   ml head on the queries after layer `ml_query_layer`; the top-kappa
  classes + no-object are the class columns (rank order), cosine logits (the fork's
  USE_LAYERNORM) normalised by QueryRankNorm(kappa + 1). Only those columns are computed.
- +MT        ("rankseg", select=False): ml head + loss, all K + 1 columns in class order
  through the same cosine logits and LayerNorm(K + 1).
- oracle     (GT train+eval, the fork's USE_GT): the image's GT classes (by id) + no-object,
  linear class head, no ml head, no LayerNorm; needs `gt_classes` at every forward.

MaskFormer (decoder="standard", the family's maskformer-* models): the same model with
MaskFormer's FPN pixel decoder and standard (DETR) transformer decoder (maskformer.py); the
heads and every variant above are unchanged, the ml head reading the decoder's queries.

SeMask (the family's mask2former-semask* models): a `SeMaskSwin` backbone (semask.py); its
stages' class logits ride along to the output (`sem_logits`) for the semantic-prior loss
(losses/semask.py); heads, variants and inference are unchanged.

Video (later): frames stay the batch dimension everywhere below; a clip model would pool the
ml head over a clip's frames and share its selection, as the Segmenter family does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar, cast

import torch
from torch import Tensor, nn

from rankseg_core.config.model import ModelConfig
from rankseg_core.model.heads import FILL_LOGIT
from rankseg_core.model.mask2former.backbone import PyramidBackbone, load_pyramid_weights, pad_to_multiple
from rankseg_core.model.mask2former.decoder import MaskedTransformerDecoder
from rankseg_core.model.mask2former.maskformer import (
    FPNPixelDecoder,
    StandardTransformerDecoder,
    build_maskformer_heads,
)
from rankseg_core.model.mask2former.multilabel import (
    MultiLabelHead,
    QueryRankNorm,
    mask_invalid,
    selected_logits,
    with_no_object,
)
from rankseg_core.model.mask2former.pixel_decoder import PixelDecoder
from rankseg_core.model.mask2former.semask import SeMaskSwin, load_semask_weights
from rankseg_core.model.mask2former.vit_adapter import ViTAdapter, load_vit_adapter_weights
from rankseg_core.model.selection import NO_SELECTION, Selection, allowed_classes, resolve_override, select_for


@dataclass
class Features:
    """Backbone output: [res2, res3, res4, res5] (B x C_i x H'/s x W'/s, H' W' padded to the
    size divisibility) and the (H, W) of the images before padding; a SeMask backbone adds
    its stages' class logits (B x K x H'/s x W'/s)."""

    maps: list[Tensor]
    image_size: tuple[int, int]
    sem_logits: list[Tensor] | None = None


@dataclass
class Mask2FormerOutput:
    """What the model returns (B images, Q queries).

    pred_logits: B x Q x (C+1) class logits of the last layer; the last column is no-object.
        C = K in class order (baseline / +MT), else the selected classes in rank order.
    pred_masks: B x Q x h x w mask logits at 1/4 of the padded input.
    aux: (logits, masks) of the earlier predictions (learnable queries, layers 1..L-1).
    ml_logits: B x K multi-label logits, None without the ml head.
    topk_index: B x C class id of each of the first C columns; None when they are the K classes.
    valid: B x C, False for padding columns (variable-length selections; their logits are
        FILL_LOGIT); for a class-ordered model with `select_override`, B x K allowed classes.
        None = all valid.
    image_size: (H, W) of the input before padding; pred_masks cover the padded (4h, 4w).
    num_classes: K.
    sem_logits: a SeMask backbone's class logits per stage, [B x K x h x w, ... / 2, / 4, / 8]
        at strides 4 .. 32 of the padded input (the semantic prior's loss reads them,
        losses/semask.py); None for other backbones.
    """

    pred_logits: Tensor
    pred_masks: Tensor
    aux: list[tuple[Tensor, Tensor]]
    ml_logits: Tensor | None
    topk_index: Tensor | None
    valid: Tensor | None
    image_size: tuple[int, int]
    num_classes: int
    sem_logits: list[Tensor] | None = None


# The backbone a model runs: the timm pyramid, or one its family built (ViT-Adapter, SeMask).
BackboneT = TypeVar("BackboneT", PyramidBackbone, ViTAdapter, SeMaskSwin)


class Mask2FormerModel(nn.Module, Generic[BackboneT]):
    """`forward_features` -> `forward_head`, as in timm (see the module docstring)."""

    def __init__(self, cfg: ModelConfig, arch: str, num_queries: int, decoder: str = "masked",
                 backbone: BackboneT | None = None) -> None:
        super().__init__()
        m = cfg.mask2former
        self.cfg = cfg
        self.num_classes = k = cfg.num_classes
        self.num_queries = num_queries
        self.size_divisibility = m.size_divisibility
        self.oracle = cfg.oracle
        self.uses_ml = cfg.head == "rankseg" and not cfg.oracle
        self.selects = cfg.oracle or (self.uses_ml and cfg.select)
        self.cosine = self.uses_ml and m.cosine_logits
        self.kappa = cfg.effective_kappa if self.selects else k
        self.ml_query_layer = m.ml_query_layer

        # `backbone`: one the family built (ViT-Adapter); else the timm pyramid `arch`.
        self.backbone: BackboneT = (cast(BackboneT, PyramidBackbone(arch, m, cfg.in_chans)) if backbone is None
                                    else backbone)
        self.pixel_decoder: PixelDecoder | FPNPixelDecoder
        self.decoder: MaskedTransformerDecoder | StandardTransformerDecoder
        if decoder == "standard":  # MaskFormer
            self.pixel_decoder, self.decoder = build_maskformer_heads(self.backbone.channels, m, self.num_queries)
        elif decoder == "masked":
            self.pixel_decoder = PixelDecoder(self.backbone.channels, m)
            self.decoder = MaskedTransformerDecoder(m.conv_dim, m, self.num_queries)
        else:
            raise ValueError(f"decoder={decoder!r}: use 'masked' (Mask2Former) or 'standard' (MaskFormer)")
        self.class_embed = nn.Linear(m.hidden_dim, k + 1, bias=not self.cosine)
        self.ml_head = MultiLabelHead(k, m.hidden_dim, m.ml_hidden_dim, m.ml_dropout) if self.uses_ml else None
        # +MT: LayerNorm over all K + 1 columns in class order ("rank" = class index there).
        self.ml_norm = QueryRankNorm(self.kappa, shared=cfg.tau == "shared") if self.uses_ml else None

    def forward_features(self, images: Tensor) -> Features:
        """B x 3 x H x W normalised images (any size) -> backbone pyramid of the padded images."""
        size = (int(images.shape[-2]), int(images.shape[-1]))
        padded = pad_to_multiple(images, self.size_divisibility)
        if isinstance(self.backbone, SeMaskSwin):  # its class maps feed the semantic-prior loss
            maps, sem_logits = self.backbone(padded)
            return Features(maps, size, sem_logits)
        return Features(self.backbone(padded), size)

    def forward_head(self, feats: Features, selection: Selection = NO_SELECTION) -> Mask2FormerOutput:
        """Features -> Mask2FormerOutput. Nothing here needs ground truth except the oracle.

        selection: this forward's selection options (model/selection.py); a larger kappa than
            trained repeats the last rank's gamma / beta; `override` on a class-ordered model
            restricts its K columns.
        """
        mask_features, scales = self.pixel_decoder(feats.maps)
        dec = self.decoder(scales, mask_features)
        ml_logits = self.ml_head(dec.queries[self.ml_query_layer - 1]) if self.ml_head is not None else None
        device = mask_features.device
        override = resolve_override(selection, self.oracle, ml_logits, mask_features.shape[0])
        index = valid = None
        w, b = self.class_embed.weight, self.class_embed.bias
        if self.selects:
            index, valid = select_for(selection, ml_logits, self.num_classes, self.kappa, device, override, self.oracle)
            cols, ok = with_no_object(index, valid, self.num_classes)
            logits = [selected_logits(e, w, b, cols, self.cosine) for e in dec.embeds]
            if self.ml_norm is not None:
                logits = [self.ml_norm(x, ok if valid is not None else None) for x in logits]
            else:
                logits = [mask_invalid(x, ok if valid is not None else None) for x in logits]
        else:
            cols = torch.arange(self.num_classes + 1, device=device).expand(mask_features.shape[0], -1)
            logits = [selected_logits(e, w, b, cols, self.cosine) for e in dec.embeds]
            if self.ml_norm is not None:
                logits = [self.ml_norm(x) for x in logits]
            if override is not None:  # GT (eval) on a class-ordered model: only these classes
                valid = allowed_classes(override, self.num_classes, device)
                keep = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1)
                logits = [x.masked_fill(~keep[:, None, :], FILL_LOGIT) for x in logits]
        aux = list(zip(logits[:-1], dec.masks[:-1]))
        return Mask2FormerOutput(pred_logits=logits[-1], pred_masks=dec.masks[-1], aux=aux, ml_logits=ml_logits,
                                 topk_index=index, valid=valid, image_size=feats.image_size,
                                 num_classes=self.num_classes, sem_logits=feats.sem_logits)

    def forward(self, images: Tensor, selection: Selection = NO_SELECTION) -> Mask2FormerOutput:
        return self.forward_head(self.forward_features(images), selection)

    def rank_scale(self) -> Tensor:
        """Learned 1/tau per class rank (kappa,) of the rank LayerNorm (no-object excluded)."""
        if self.ml_norm is None:
            raise ValueError("this model has no rank LayerNorm (baseline / oracle)")
        return self.ml_norm.affine(self.kappa + 1)[0][:-1]

    def data_config(self) -> dict:
        """mean/std on the 0..255 scale (ImageNet, as every official Mask2Former config)."""
        return self.backbone.data_config()


def build_mask2former(cfg: ModelConfig, arch: str, num_queries: int, decoder: str = "masked",
                      backbone: ViTAdapter | SeMaskSwin | None = None) -> Mask2FormerModel:
    """Validate `cfg`, build the model on the timm backbone `arch` (decoder "masked" =
    Mask2Former, "standard" = MaskFormer), or on `backbone` when the family built one, and
    load local backbone weights if given."""
    cfg.validate()
    model: Mask2FormerModel = Mask2FormerModel(cfg, arch, num_queries, decoder, backbone)
    if cfg.backbone_weights:
        if isinstance(model.backbone, ViTAdapter):
            load_vit_adapter_weights(model.backbone, cfg.backbone_weights)
        elif isinstance(model.backbone, SeMaskSwin):
            load_semask_weights(model.backbone, cfg.backbone_weights)
        else:
            load_pyramid_weights(model.backbone, cfg.backbone_weights)
    return model
