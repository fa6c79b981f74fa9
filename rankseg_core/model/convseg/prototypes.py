"""ProtoSeg's nearest-prototype pixel classifier on the conv decoders (DeepLabv3, UperNet; issue 20).

ProtoSeg's released models are conv nets (`HRNet_W48_Proto`: HRNet-W48 features -> a 3x3 conv,
BN, ReLU, Dropout2d(0.1) -> ProjectionHead -> prototypes). Here the decode head (ASPP / UperHead,
whose 3x3 bottleneck ConvModule plays the part of that 3x3 conv) gives the pixels:

    pixels B x C x h x w -> Dropout2d (BaseDecodeHead's dropout, = the released cls_head's)
      -> projection head "convmlp" (1x1 conv, BN, ReLU, 1x1 conv; proj_dim = C, the decoder width,
         as the released proj_dim = 720 = HRNet-W48's concatenated width)
      -> L2 -> feat_norm LayerNorm(C) -> L2 = unit embeddings e (B x hw x C)
    score[b, i, k] = max_m e[b, i] . P[k, m]   (P: a K x M x C buffer of unit rows)
    logits = LayerNorm over the K classes (protoseg), or over the selected classes in rank order
             with RankSeg's rank-adaptive affine (rankproto)

`model.head=rankproto` adds the family's RankSeg multi-label branch (`MultiLabelEncoder`, one
TranEnc layer on the last backbone map) with class tokens of its own (prototypes are no class
embeddings to share), selects each image's top-kappa classes by its logits, and scores pixels
against those classes' kappa*M prototypes only. `--no-select` keeps all K classes in class order.

The math is model/protoseg.py's (the Segmenter prototype heads'): the projection head, the unit
embedding, the prototype init, the bank, the chunked max cosine and the normalisation; the
prototypes change only through the loss's online clustering (losses/protoseg.py).
"""

from __future__ import annotations

from torch import Tensor, nn

from rankseg_core.model.convseg.classifier import MultiLabelEncoder
from rankseg_core.model.heads import RankNorm
from rankseg_core.model.protoseg import (
    ProtoSegOutput,
    init_prototypes,
    projection_head,
    prototype_logits,
    scoring_bank,
    unit_embedding,
)
from rankseg_core.model.selection import NO_SELECTION, Selection, resolve_override, select_for


class PrototypeClassifier(nn.Module):
    """Decoder pixels -> unit embeddings -> nearest-prototype logits (module docstring).

    Submodules: `dropout`, `proj_head`, `feat_norm`, `norm` (LayerNorm(K) / RankNorm(kappa)),
    `ml_head` (rankproto only); buffer `prototypes` (K x M x C, in the state dict, no parameter).
    """

    prototypes: Tensor

    def __init__(self, channels: int, num_classes: int, num_prototypes: int, kappa: int, dropout: float,
                 ml_head: MultiLabelEncoder | None, selects: bool, tau_shared: bool = False) -> None:
        super().__init__()
        if selects and ml_head is None:
            raise ValueError("a selecting prototype classifier ranks the classes by its ml branch; give it one")
        self.num_classes, self.num_prototypes = num_classes, num_prototypes
        self.selects = selects
        self.kappa = kappa if selects else num_classes
        self.ml_head = ml_head
        self.dropout = nn.Dropout2d(dropout)
        self.proj_head = projection_head(channels, channels)
        self.feat_norm = nn.LayerNorm(channels)
        self.register_buffer("prototypes", init_prototypes(num_classes, num_prototypes, channels))
        self.norm = RankNorm(self.kappa, shared=selects and tau_shared)

    def embed(self, pixels: Tensor) -> Tensor:
        """pixels B x C x h x w (decoder output) -> unit embeddings B x hw x C (row-major)."""
        x = self.proj_head(self.dropout(pixels)).flatten(2).transpose(1, 2)
        return unit_embedding(x, self.feat_norm)

    def forward(self, pixels: Tensor, ml_feats: Tensor, selection: Selection = NO_SELECTION) -> ProtoSegOutput:
        """pixels B x C x h x w, ml_feats B x C_in x h' x w' (last backbone map, read by the ml
        branch only) -> ProtoSegOutput: K logits B x K x h x w in class order (protoseg, rankproto
        --no-select; a GT override restricts them), or kappa logits in rank order (rankproto)."""
        b, _, h, w = pixels.shape
        ml_logits = self.ml_head(ml_feats) if self.ml_head is not None else None
        override = resolve_override(selection, False, ml_logits, b)
        index = valid = None
        if self.selects:
            index, valid = select_for(selection, ml_logits, self.num_classes, self.kappa, pixels.device, override)
        bank = scoring_bank(self.prototypes, index)
        emb = self.embed(pixels)
        logits, valid = prototype_logits(emb, bank, self.norm, self.selects, valid, override, self.num_classes)
        mask_logits = logits.transpose(1, 2).reshape(b, logits.shape[-1], h, w).contiguous()
        return ProtoSegOutput(mask_logits=mask_logits, topk_index=index, ml_logits=ml_logits, valid=valid,
                              embeddings=emb, bank=bank, prototypes=self.prototypes)
