"""ProtoSeg's non-parametric prototype head on the Segmenter decoder (`model.head=protoseg`, issue 20).

ProtoSeg ("Rethinking Semantic Segmentation: A Prototype View"; released code tfzhou/ProtoSeg,
`HRNet_W48_Proto`) classifies a pixel by its nearest class prototype:

    decoder patch features B x p x D -> proj head (1x1 conv, BN, ReLU, 1x1 conv; as a map)
      -> L2-normalise -> feat_norm LayerNorm(D) -> L2-normalise = embedding e (B x p x D)
    prototypes P: K x M x D, unit rows, a BUFFER (never touched by the optimizer)
    cosines c[b, i, k, m] = e[b, i] . P[k, m];  logits = mask_norm LayerNorm(K)( max_m c )

Here the backbone is the Segmenter ViT and the features are the Segmenter decoder's patch
outputs (its class tokens still join the decoder's attention, so the decoder is the baseline's;
their outputs are not used). The prototypes change only through the training loss's online
clustering and momentum update (losses/protoseg.py), which writes the buffer in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from rankseg_core.config.model import ModelConfig
from rankseg_core.model.encnet import ConvBNReLU
from rankseg_core.model.heads import FILL_LOGIT, MaskTransformerHead, SegOutput
from rankseg_core.model.selection import NO_SELECTION, Selection, allowed_classes, resolve_override


@dataclass
class ProtoSegOutput(SegOutput):
    """`SegOutput` (mask_logits B x K x h x w in class order) plus what the ProtoSeg loss needs.

    embeddings: B x p x D unit pixel embeddings (p = h * w, row-major as mask_logits).
    proto_cos: B x p x K x M cosines of each pixel to every prototype (PPC / PPD logits).
    prototypes: the head's K x M x D prototype buffer itself (the loss updates it in place).
    """

    embeddings: Tensor | None = None
    proto_cos: Tensor | None = None
    prototypes: Tensor | None = None


class ProtoSegHead(MaskTransformerHead):
    """Segmenter decoder -> projected unit embeddings -> nearest-prototype logits over all K."""

    prototypes: Tensor

    def __init__(self, cfg: ModelConfig, embed_dim: int) -> None:
        super().__init__(cfg, embed_dim)  # head "protoseg" builds the baseline decoder (no ml branch)
        d, k, m = embed_dim, cfg.num_classes, cfg.protoseg.prototypes
        # The prototypes replace the class-embedding projections: no parameter may sit unused (DDP).
        del self.proj_patch, self.proj_classes
        self.num_prototypes = m
        # ProtoSeg's ProjectionHead ("convmlp"): proj_dim = D, as the released config's 720 = HRNet-W48's width.
        self.proj_head = nn.Sequential(ConvBNReLU(d, d, 1), nn.Conv2d(d, d, 1))
        self.feat_norm = nn.LayerNorm(d)
        protos = torch.empty(k, m, d)
        trunc_normal_(protos, std=0.02)  # the released init; only the direction matters after normalising
        self.register_buffer("prototypes", F.normalize(protos, dim=-1))

    def embed(self, feats: Tensor) -> Tensor:
        """feats B x D x h x w -> unit pixel embeddings B x p x D."""
        b, _, h, w = feats.shape
        patches = self.proj_dec(feats.flatten(2).transpose(1, 2))  # B x p x D
        x, _ = self.decoder_tokens(patches, self.cls_emb.expand(b, -1, -1))
        x = self.proj_head(x.transpose(1, 2).reshape(b, -1, h, w)).flatten(2).transpose(1, 2)
        return F.normalize(self.feat_norm(F.normalize(x, dim=-1)), dim=-1)

    def forward(self, feats: Tensor, selection: Selection = NO_SELECTION, *, clip_len: int = 1,
                selector_logits: Tensor | None = None) -> ProtoSegOutput:
        """feats B x D x h x w -> ProtoSegOutput (mask_logits B x K x h x w in class order).

        selection: only `override` (GT eval) is honoured: classes outside it get FILL_LOGIT.
        """
        if clip_len != 1 or selector_logits is not None:
            raise ValueError("the ProtoSeg head segments single images and takes no selector")
        b, _, h, w = feats.shape
        emb = self.embed(feats)
        # A copy: the loss updates the buffer in place after this forward, and the backward of
        # the cosines needs the prototypes this forward used.
        protos = self.prototypes.clone() if torch.is_grad_enabled() else self.prototypes
        cos = torch.einsum("bpd,kmd->bpkm", emb, protos.to(emb.dtype))
        logits = self.mask_norm(cos.amax(-1))  # B x p x K
        valid = None
        override = resolve_override(selection, False, None, b)
        if override is not None:  # GT (eval): restrict the argmax, as the class-ordered baseline does
            valid = allowed_classes(override, self.num_classes, feats.device)
            logits = logits.masked_fill(~valid[:, None, :], FILL_LOGIT)
        mask_logits = logits.transpose(1, 2).reshape(b, self.num_classes, h, w)
        return ProtoSegOutput(mask_logits=mask_logits, valid=valid, embeddings=emb, proto_cos=cos,
                              prototypes=self.prototypes)
