"""ProtoSeg's non-parametric prototype head on the Segmenter decoder (issue 20, docs/protoseg.md).

ProtoSeg ("Rethinking Semantic Segmentation: A Prototype View"; released code tfzhou/ProtoSeg,
`HRNet_W48_Proto`) classifies a pixel by its nearest class prototype:

    decoder patch features B x p x D -> proj head (1x1 conv, BN, ReLU, 1x1 conv; as a map)
      -> L2-normalise -> feat_norm LayerNorm(D) -> L2-normalise = embedding e (B x p x D)
    prototypes P: K x M x D, unit rows, a BUFFER (never touched by the optimizer)
    score[b, i, k] = max_m e[b, i] . P[k, m];  logits = LayerNorm over the classes of the scores

Two heads share this module:
- `model.head=protoseg`: all K classes in class order, LayerNorm(K) (ProtoSeg).
- `model.head=rankproto` (RankSeg + prototypes, in neither paper): RankSeg's multi-label branch
  ranks the K classes, the decoder attends to the top-kappa class tokens only (as RankSeg), and
  pixels are classified among those kappa classes' kappa*M prototypes, with the rank-adaptive
  LayerNorm(kappa) (per-rank 1/tau and beta). `--no-select` keeps all K in class order.

The K x M cosines of a pixel are never all kept: `max_cosine` works through chunks of pixels and,
under autograd, recomputes each chunk in the backward (activation checkpointing), so the peak is
one chunk's cosines (`CHUNK_COSINES`) whatever K, M and the image size. The prototypes change only
through the training loss's online clustering and momentum update (losses/protoseg.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import trunc_normal_
from torch.utils.checkpoint import checkpoint

from rankseg_core.config.model import ModelConfig
from rankseg_core.model.encnet import ConvBNReLU
from rankseg_core.model.heads import FILL_LOGIT, MaskTransformerHead, SegOutput
from rankseg_core.model.selection import NO_SELECTION, Selection, allowed_classes, resolve_override, select

# Pixel-prototype cosines computed at once (64 MiB in float32): K = 847, M = 10 -> 1,980 pixels.
CHUNK_COSINES = 1 << 24


def bank_rows(bank: Tensor) -> Tensor:
    """bank B' x C x M x D -> B' x C*M x D (B' = 1: one bank shared by the batch)."""
    return bank.reshape(bank.shape[0], -1, bank.shape[-1])


def cosines(emb: Tensor, bank: Tensor) -> Tensor:
    """emb B x n x D, bank 1|B x C x M x D -> B x n x C*M (column c*M + m). A shared bank (1 x ...)
    is one matrix product over all B*n pixels, without copying it per image."""
    flat = bank_rows(bank).to(emb.dtype)
    if flat.shape[0] == 1:
        return (emb.reshape(-1, emb.shape[-1]) @ flat[0].t()).reshape(emb.shape[0], emb.shape[1], -1)
    return torch.bmm(emb, flat.transpose(1, 2))


def _max_cos(emb: Tensor, bank: Tensor) -> Tensor:
    c, m = bank.shape[1], bank.shape[2]
    return cosines(emb, bank).unflatten(-1, (c, m)).amax(-1)


def chunk_pixels(batch: int, classes: int, prototypes: int) -> int:
    """Pixels per chunk so that batch x chunk x classes x prototypes cosines fit `CHUNK_COSINES`."""
    return max(1, CHUNK_COSINES // max(1, batch * classes * prototypes))


def max_cosine(emb: Tensor, bank: Tensor) -> Tensor:
    """emb B x p x D (unit), bank 1|B x C x M x D (unit) -> B x p x C: each class's best prototype.

    Chunked over pixels; with grad each chunk is checkpointed (its B x n x C x M cosines are
    recomputed in the backward instead of kept), so memory is bounded by `CHUNK_COSINES`."""
    n = chunk_pixels(emb.shape[0], bank.shape[1], bank.shape[2])
    if emb.shape[1] <= n and not torch.is_grad_enabled():
        return _max_cos(emb, bank)
    parts = []
    for chunk in emb.split(n, dim=1):
        if torch.is_grad_enabled() and chunk.requires_grad:
            parts.append(checkpoint(_max_cos, chunk, bank, use_reentrant=False))
        else:
            parts.append(_max_cos(chunk, bank))
    return torch.cat(parts, dim=1)


@dataclass
class ProtoSegOutput(SegOutput):
    """`SegOutput` (mask_logits B x C x h x w; C = K in class order, or kappa in rank order with
    `topk_index`) plus what the ProtoSeg loss needs.

    embeddings: B x p x D unit pixel embeddings (p = h * w, row-major as mask_logits).
    bank: the prototypes this forward scored against, 1 x K x M x D (all classes) or
        B x C x M x D (each image's selected classes, rows as `topk_index`); a copy under grad.
    prototypes: the head's K x M x D prototype buffer itself (the loss updates it in place).
    """

    embeddings: Tensor | None = None
    bank: Tensor | None = None
    prototypes: Tensor | None = None


class ProtoSegHead(MaskTransformerHead):
    """Segmenter decoder -> projected unit embeddings -> nearest-prototype logits."""

    prototypes: Tensor

    def __init__(self, cfg: ModelConfig, embed_dim: int) -> None:
        super().__init__(cfg, embed_dim)  # protoseg: the baseline decoder; rankproto: + the ml branch
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

    def embed(self, feats: Tensor, cls: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
        """feats B x D x h x w -> unit pixel embeddings B x p x D. cls: the B x C x D class tokens
        the decoder attends to (default: all K), valid B x C marks padding tokens."""
        b, _, h, w = feats.shape
        patches = self.proj_dec(feats.flatten(2).transpose(1, 2))  # B x p x D
        x, _ = self.decoder_tokens(patches, self.cls_emb.expand(b, -1, -1) if cls is None else cls, valid)
        x = self.proj_head(x.transpose(1, 2).reshape(b, -1, h, w)).flatten(2).transpose(1, 2)
        return F.normalize(self.feat_norm(F.normalize(x, dim=-1)), dim=-1)

    def forward(self, feats: Tensor, selection: Selection = NO_SELECTION, *, clip_len: int = 1,
                selector_logits: Tensor | None = None) -> ProtoSegOutput:
        """feats B x D x h x w -> ProtoSegOutput.

        protoseg (and rankproto --no-select): mask_logits B x K x h x w in class order; only
        `selection.override` (GT eval) is honoured: classes outside it get FILL_LOGIT.
        rankproto: mask_logits B x C x h x w in rank order, `topk_index` / `valid` as RankSeg's.
        """
        if clip_len != 1 or selector_logits is not None:
            raise ValueError("the prototype heads segment single images and take no selector")
        b, d, h, w = feats.shape
        ml_logits, cls = self._multilabel(feats, 1) if self.uses_ml else (None, None)
        override = resolve_override(selection, False, ml_logits, b)
        # A copy under grad: the loss updates the buffer in place after this forward, and the
        # backward (and the checkpointed recomputation) needs the prototypes this forward used.
        protos = self.prototypes.clone() if torch.is_grad_enabled() else self.prototypes
        index = valid = None
        if self.selects:
            kappa = selection.kappa if selection.kappa is not None else self.kappa
            index, valid = select(ml_logits, self.num_classes, kappa, feats.device,
                                  dynamic_threshold=selection.dynamic_threshold, override=override)
            assert cls is not None
            cls = cls.gather(1, index[:, :, None].expand(-1, -1, d))
            bank = protos[index]  # B x C x M x D: only the selected classes' prototypes
        else:
            bank = protos[None]
        emb = self.embed(feats, cls, valid)
        scores = max_cosine(emb, bank)  # B x p x C
        if self.selects:
            logits = self.mask_norm(scores, valid)
        else:
            logits = self.mask_norm(scores)
            if override is not None:  # GT (eval): restrict the argmax, as the class-ordered baseline does
                valid = allowed_classes(override, self.num_classes, feats.device)
                logits = logits.masked_fill(~valid[:, None, :], FILL_LOGIT)
        mask_logits = logits.transpose(1, 2).reshape(b, logits.shape[-1], h, w)
        return ProtoSegOutput(mask_logits=mask_logits, topk_index=index, ml_logits=ml_logits, valid=valid,
                              embeddings=emb, bank=bank, prototypes=self.prototypes)


@torch.no_grad()
def prototype_assignment(out: ProtoSegOutput) -> tuple[Tensor, Tensor]:
    """Which prototype each pixel took: (class B x h x w, prototype B x h x w in [0, M)), the
    predicted class and the nearest of that class's M prototypes (what `rankseg viz prototypes` draws)."""
    assert out.embeddings is not None and out.bank is not None
    b, _, h, w = out.mask_logits.shape
    channel = out.mask_logits.argmax(1).flatten(1)  # B x p
    bank = out.bank.expand(b, -1, -1, -1)
    chosen = bank[torch.arange(b, device=channel.device)[:, None], channel]  # B x p x M x D
    proto = torch.einsum("bpd,bpmd->bpm", out.embeddings, chosen.to(out.embeddings.dtype)).argmax(-1)
    cls = channel if out.topk_index is None else out.topk_index.gather(1, channel)
    return cls.reshape(b, h, w), proto.reshape(b, h, w)
