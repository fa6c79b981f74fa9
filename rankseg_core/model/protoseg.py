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

The conv decoders' prototype classifier (model/convseg/prototypes.py: DeepLabv3, UperNet) calls the
same pieces: `projection_head`, `unit_embedding`, `init_prototypes`, `scoring_bank`, `prototype_logits`.
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
from rankseg_core.model.selection import NO_SELECTION, Selection, allowed_classes, resolve_override, select_for

# Pixel-prototype cosines computed at once (16 MiB in float32): K = 847, M = 10 -> 495 pixels.
# bench/bench_protoseg.py: 2^22 peaks 2.3x lower than 2^24 on this CPU at the same time.
CHUNK_COSINES = 1 << 22


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


def chunk_pixels(batch: int, classes: int, prototypes: int, pixels: int | None = None) -> int:
    """Pixels per chunk so that batch x chunk x classes x prototypes cosines fit `CHUNK_COSINES`;
    given the `pixels` to split, the fewest chunks of (nearly) equal size (no small remainder
    chunk paying a whole matrix-product call)."""
    most = max(1, CHUNK_COSINES // max(1, batch * classes * prototypes))
    if pixels is None or pixels <= 0:
        return most
    count = -(-pixels // most)
    return -(-pixels // count)


def max_cosine(emb: Tensor, bank: Tensor) -> Tensor:
    """emb B x p x D (unit), bank 1|B x C x M x D (unit) -> B x p x C: each class's best prototype.

    Chunked over pixels; with grad each chunk is checkpointed (its B x n x C x M cosines are
    recomputed in the backward instead of kept), so memory is bounded by `CHUNK_COSINES`."""
    n = chunk_pixels(emb.shape[0], bank.shape[1], bank.shape[2], emb.shape[1])
    if emb.shape[1] <= n and not torch.is_grad_enabled():
        return _max_cos(emb, bank)
    parts = []
    for chunk in emb.split(n, dim=1):
        if torch.is_grad_enabled() and chunk.requires_grad:
            parts.append(checkpoint(_max_cos, chunk, bank, use_reentrant=False))
        else:
            parts.append(_max_cos(chunk, bank))
    return torch.cat(parts, dim=1)


# ---- the pieces every prototype head shares (this Segmenter head, model/convseg/prototypes.py) ----

# The values of `model.head` that classify pixels by prototypes.
PROTOTYPE_HEADS = ("protoseg", "rankproto")


def projection_head(dim_in: int, proj_dim: int) -> nn.Sequential:
    """ProtoSeg's `ProjectionHead` ("convmlp") on a map: 1x1 conv, BN, ReLU, 1x1 conv,
    B x dim_in x h x w -> B x proj_dim x h x w. The first conv has no bias: the BN after it
    would remove it (mmcv's ConvModule rule)."""
    return nn.Sequential(ConvBNReLU(dim_in, dim_in, 1), nn.Conv2d(dim_in, proj_dim, 1))


def unit_embedding(x: Tensor, feat_norm: nn.Module) -> Tensor:
    """Projected pixels B x p x D -> L2-normalise -> feat_norm LayerNorm(D) -> L2-normalise
    (the released `HRNet_W48_Proto` order) = unit embeddings B x p x D."""
    return F.normalize(feat_norm(F.normalize(x, dim=-1)), dim=-1)


def init_prototypes(classes: int, prototypes: int, dim: int) -> Tensor:
    """A classes x prototypes x dim buffer of unit rows: the released trunc-normal(0.02) init,
    normalised (only the direction matters)."""
    protos = torch.empty(classes, prototypes, dim)
    trunc_normal_(protos, std=0.02)
    return F.normalize(protos, dim=-1)


def scoring_bank(prototypes: Tensor, index: Tensor | None) -> Tensor:
    """The bank a forward scores against: prototypes K x M x D -> 1 x K x M x D (index None) or
    B x C x M x D, the rows of `index` (B x C class ids). A copy under grad: the loss updates
    the buffer in place after the forward, and the backward (and the checkpointed
    recomputation) needs the prototypes this forward used."""
    protos = prototypes.clone() if torch.is_grad_enabled() else prototypes
    return protos[None] if index is None else protos[index]


def prototype_logits(emb: Tensor, bank: Tensor, norm: nn.Module, selects: bool, valid: Tensor | None,
                     override: list[Tensor] | None, num_classes: int) -> tuple[Tensor, Tensor | None]:
    """emb B x p x D (unit), bank 1|B x C x M x D -> (logits B x p x C, valid B x C | None).

    Each class's best prototype cosine, then `norm` over the C classes: with `selects` the
    rank-adaptive RankNorm over the selected classes (padding columns from `valid`); else the
    LayerNorm over the K classes in class order, and under a GT (eval) `override` the classes
    outside each image's list get FILL_LOGIT (valid = the allowed classes), as the baselines."""
    scores = max_cosine(emb, bank)  # B x p x C
    if selects:
        return norm(scores, valid), valid
    logits = norm(scores)
    if override is not None:
        valid = allowed_classes(override, num_classes, emb.device)
        logits = logits.masked_fill(~valid[:, None, :], FILL_LOGIT)
    return logits, valid


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
        self.proj_head = projection_head(d, d)
        self.feat_norm = nn.LayerNorm(d)
        self.register_buffer("prototypes", init_prototypes(k, m, d))

    def embed(self, feats: Tensor, cls: Tensor | None = None, valid: Tensor | None = None) -> Tensor:
        """feats B x D x h x w -> unit pixel embeddings B x p x D. cls: the B x C x D class tokens
        the decoder attends to (default: all K), valid B x C marks padding tokens."""
        b, _, h, w = feats.shape
        patches = self.proj_dec(feats.flatten(2).transpose(1, 2))  # B x p x D
        x, _ = self.decoder_tokens(patches, self.cls_emb.expand(b, -1, -1) if cls is None else cls, valid)
        x = self.proj_head(x.transpose(1, 2).reshape(b, -1, h, w)).flatten(2).transpose(1, 2)
        return unit_embedding(x, self.feat_norm)

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
        index = valid = None
        if self.selects:
            index, valid = select_for(selection, ml_logits, self.num_classes, self.kappa, feats.device, override)
            assert cls is not None
            cls = cls.gather(1, index[:, :, None].expand(-1, -1, d))
        bank = scoring_bank(self.prototypes, index)  # selecting: only the selected classes' prototypes
        emb = self.embed(feats, cls, valid)
        logits, valid = prototype_logits(emb, bank, self.mask_norm, self.selects, valid, override, self.num_classes)
        mask_logits = logits.transpose(1, 2).reshape(b, logits.shape[-1], h, w).contiguous()
        return ProtoSegOutput(mask_logits=mask_logits, topk_index=index, ml_logits=ml_logits, valid=valid,
                              embeddings=emb, bank=bank, prototypes=self.prototypes)


@torch.no_grad()
def prototype_assignment(out: ProtoSegOutput) -> tuple[Tensor, Tensor]:
    """Which prototype each pixel took: (class B x h x w, prototype B x h x w in [0, M)), the
    predicted class and the nearest of that class's M prototypes (what `rankseg viz prototypes` draws)."""
    assert out.embeddings is not None and out.bank is not None
    b, _, h, w = out.mask_logits.shape
    c, m = out.bank.shape[1], out.bank.shape[2]
    channel = out.mask_logits.argmax(1).flatten(1)  # B x p
    n = chunk_pixels(b, c, m, channel.shape[1])  # as max_cosine: never more than one chunk of B x n x C x M cosines
    parts = []
    for e, ch in zip(out.embeddings.split(n, dim=1), channel.split(n, dim=1), strict=True):
        cos = cosines(e, out.bank).unflatten(-1, (c, m))  # B x n x C x M
        parts.append(cos.gather(2, ch[:, :, None, None].expand(-1, -1, 1, m))[:, :, 0].argmax(-1))
    proto = torch.cat(parts, dim=1)
    cls = channel if out.topk_index is None else out.topk_index.gather(1, channel)
    return cls.reshape(b, h, w), proto.reshape(b, h, w)
