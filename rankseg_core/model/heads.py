"""Segmenter mask-transformer head with the RankSeg multi-label branch (docs/method.md sec. 2-3).

One head class covers every variant so that parameter names match across them and the
official code (`cls_emb`, `proj_dec`, `blocks`, `decoder_norm(2)`, `ml_fc`, `mask_norm`):

- baseline   ("segmenter"): decoder over [patches; cls_emb], LayerNorm(K).
- +MT        (rankseg, select=False): ml branch + loss, decoder over all K in class order.
- RankSeg    (rankseg): ml branch -> top-kappa rows in rank order -> LayerNorm(kappa) whose
  affine is per rank ("rank") or one scalar ("shared").
- oracle     (GT train+eval): the image's GT classes (sorted by id), raw `cls_emb`, no ml branch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from rankseg_core.config.model import RANKING_HEADS, ModelConfig
from rankseg_core.model.position import sine_position_embedding
from rankseg_core.model.selection import NO_SELECTION, Selection, allowed_classes, resolve_override, select_for

# Logit given to padding / unselected channels; the official scatter uses the same value.
FILL_LOGIT = -100.0
ML_POOL_TRANENC = 8  # 64 multi-label tokens whatever the input size (not 1/32 as in the paper)
ML_POOL_TRANDEC = 16


@dataclass
class SegOutput:
    """What the model returns.

    mask_logits: B x C x h x w at patch-grid resolution. C = kappa channels in RANK order for
        selecting models, C = K in class order for the baseline / +MT.
    topk_index: B x C long, class id of each channel; None when the channels are the K classes.
    ml_logits: B x K multi-label logits (B = clips in video mode); None for baseline / oracle.
    valid: B x C bool, False for padding channels (variable-length selection); None = all valid.
    """

    mask_logits: Tensor
    topk_index: Tensor | None = None
    ml_logits: Tensor | None = None
    valid: Tensor | None = None


def _init_weights(m: nn.Module) -> None:
    # Same init as the official head: trunc-normal linears, unit LayerNorms.
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class GroupWiseLinear(nn.Module):
    """Per-class linear classifier (Query2Label): s_k = <W_k, E_k> + b_k. B x K x D -> B x K."""

    def __init__(self, num_classes: int, dim: int) -> None:
        super().__init__()
        bound = 1.0 / math.sqrt(dim)
        self.W = nn.Parameter(torch.empty(1, num_classes, dim).uniform_(-bound, bound))
        self.b = nn.Parameter(torch.empty(1, num_classes).uniform_(-bound, bound))

    def forward(self, x: Tensor) -> Tensor:
        return (self.W * x).sum(-1) + self.b


class RankNorm(nn.Module):
    """LayerNorm over the channel axis of B x p x C cosine scores with per-rank affine.

    `weight` is the learned 1/tau per rank (Fig. 7), `bias` the per-rank beta. With `shared`
    both are one scalar on top of a non-affine LayerNorm (the paper's shared tau). When C
    exceeds the trained size (eval kappa > train kappa) the last gamma/beta are repeated.
    With a `valid` mask (B x C) mean/variance are taken over valid columns only, so padded
    selections give the same result as an unpadded per-image run; invalid columns get FILL_LOGIT.
    """

    def __init__(self, size: int, shared: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        n = 1 if shared else size
        self.size, self.shared, self.eps = size, shared, eps
        self.weight = nn.Parameter(torch.ones(n))
        self.bias = nn.Parameter(torch.zeros(n))

    def affine(self, c: int) -> tuple[Tensor, Tensor]:
        """gamma, beta for c ranks (c,)."""
        if self.shared:
            return self.weight.expand(c), self.bias.expand(c)
        if c <= self.size:
            return self.weight[:c], self.bias[:c]
        extra = c - self.size
        return (torch.cat([self.weight, self.weight[-1:].expand(extra)]),
                torch.cat([self.bias, self.bias[-1:].expand(extra)]))

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        c = x.shape[-1]
        gamma, beta = self.affine(c)
        if valid is None:
            return F.layer_norm(x, (c,), gamma, beta, self.eps)
        v = valid[:, None, :].to(x.dtype)
        n = v.sum(-1, keepdim=True).clamp_min(1.0)
        mean = (x * v).sum(-1, keepdim=True) / n
        var = ((x - mean).square() * v).sum(-1, keepdim=True) / n  # biased, like nn.LayerNorm
        y = (x - mean) * torch.rsqrt(var + self.eps) * gamma + beta
        return y.masked_fill(~valid[:, None, :], FILL_LOGIT)


class CrossAttnDecoderLayer(nn.Module):
    """Post-norm transformer decoder layer without self-attention (Query2Label)."""

    def __init__(self, dim: int, heads: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)

    def forward(self, tgt: Tensor, memory: Tensor, pos: Tensor, query_pos: Tensor) -> Tensor:
        """tgt B x K x D, memory B x M x D, pos 1|B x M x D, query_pos 1|B x K x D."""
        out = self.multihead_attn(tgt + query_pos, memory + pos, memory, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(out))
        out = self.linear2(self.dropout(F.relu(self.linear1(tgt))))
        return self.norm3(tgt + self.dropout3(out))


class TranDecMLHead(nn.Module):
    """"2x TranDec" multi-label head: class embeddings query a 16x16 pooled map (Table 6)."""

    pos: Tensor  # buffer (registered in __init__)

    def __init__(self, dim: int, num_classes: int, dropout: float, heads: int = 8, ffn: int = 2048,
                 depth: int = 2) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(ML_POOL_TRANDEC)
        self.input_proj = nn.Conv2d(dim, dim, kernel_size=1)
        self.register_buffer("pos", sine_position_embedding(ML_POOL_TRANDEC, ML_POOL_TRANDEC, dim).flatten(1).t()[None],
                             persistent=False)
        self.layers = nn.ModuleList([CrossAttnDecoderLayer(dim, heads, ffn, dropout) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = GroupWiseLinear(num_classes, dim)

    def forward(self, feats: Tensor, cls_emb: Tensor, clip_len: int) -> Tensor:
        """feats (B*T) x D x h x w, cls_emb 1 x K x D -> ml logits B x K."""
        mem = self.input_proj(self.pool(feats)).flatten(2).transpose(1, 2)  # BT x 256 x D
        b = mem.shape[0] // clip_len
        mem = mem.reshape(b, -1, mem.shape[-1])  # a clip attends to all its frames
        pos = self.pos.repeat(1, clip_len, 1)
        tgt = torch.zeros(b, cls_emb.shape[1], cls_emb.shape[2], dtype=mem.dtype, device=mem.device)
        for layer in self.layers:
            tgt = layer(tgt, mem, pos, cls_emb)
        return self.fc(self.norm(tgt))


class GapMLHead(nn.Module):
    """"GAP+Linear" multi-label head: global pool -> 1x1 conv + ReLU -> 1x1 conv to K."""

    def __init__(self, dim: int, num_classes: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(dim, dim, kernel_size=1)
        self.cls = nn.Conv2d(dim, num_classes, kernel_size=1)

    def forward(self, feats: Tensor, clip_len: int) -> Tensor:
        """feats (B*T) x D x h x w -> B x K (pooled over the clip's frames too)."""
        pooled = feats.mean((2, 3))
        pooled = pooled.reshape(-1, clip_len, pooled.shape[1]).mean(1)[:, :, None, None]
        return self.cls(F.relu(self.conv(pooled))).flatten(1)


def _key_mask(valid: Tensor, n_patches: int, dtype: torch.dtype) -> Tensor:
    """Additive attention mask B x 1 x 1 x (p + C) hiding padded class tokens as keys."""
    keep = torch.cat([valid.new_ones(valid.shape[0], n_patches), valid], dim=1)
    mask = torch.zeros(keep.shape, dtype=dtype, device=valid.device).masked_fill(~keep, float("-inf"))
    return mask[:, None, None, :]


class MaskTransformerHead(nn.Module):
    """Segmenter decoder + RankSeg multi-label branch and rank-adaptive selection."""

    def __init__(self, cfg: ModelConfig, embed_dim: int) -> None:
        super().__init__()
        d, k = embed_dim, cfg.num_classes
        self.num_classes = k
        self.oracle = cfg.oracle
        # A segmenter with a selector (independent scheme) ranks by the frozen classifier's
        # logits, passed to `forward` as `selector_logits`, instead of an ml branch of its own.
        self.external = cfg.has_selector
        self.uses_ml = cfg.head in RANKING_HEADS and not cfg.oracle and not self.external
        self.selects = cfg.oracle or self.external or (self.uses_ml and cfg.select)
        self.ml_head = cfg.ml_head if self.uses_ml else None
        self.kappa = cfg.effective_kappa if self.selects else k

        self.cls_emb = nn.Parameter(torch.zeros(1, k, d))
        self.proj_dec = nn.Linear(d, d)
        n_blocks = cfg.decoder_depth + (1 if self.ml_head == "tranenc" else 0)
        self.blocks = nn.ModuleList([
            Block(d, num_heads=max(1, d // 64), mlp_ratio=4.0, qkv_bias=True, proj_drop=cfg.dropout,
                  attn_drop=cfg.dropout, norm_layer=nn.LayerNorm)
            for _ in range(n_blocks)
        ])
        self.decoder_norm = nn.LayerNorm(d)
        if self.ml_head == "tranenc":
            self.pool = nn.AdaptiveAvgPool2d(ML_POOL_TRANENC)
            self.decoder_norm2 = nn.LayerNorm(d)
        elif self.ml_head == "trandec":
            self.ml_branch: TranDecMLHead | GapMLHead = TranDecMLHead(d, k, cfg.dropout)
        elif self.ml_head == "gap":
            self.ml_branch = GapMLHead(d, k)
        self.apply(_init_weights)  # before the GroupWiseLinear / projections get their own init
        if self.ml_head == "tranenc":
            self.ml_fc = GroupWiseLinear(k, d)
        # D^-0.5 only sets the init scale; the cosine below removes any magnitude.
        self.proj_patch = nn.Parameter(d**-0.5 * torch.randn(d, d))
        self.proj_classes = nn.Parameter(d**-0.5 * torch.randn(d, d))
        trunc_normal_(self.cls_emb, std=0.02)
        self.mask_norm = RankNorm(self.kappa, shared=self.selects and cfg.tau == "shared")

    @property
    def seg_blocks(self) -> nn.ModuleList:
        return self.blocks[1:] if self.ml_head == "tranenc" else self.blocks

    # ---- multi-label branch -------------------------------------------------------------
    def _multilabel(self, feats: Tensor, clip_len: int) -> tuple[Tensor, Tensor]:
        """-> ml logits B x K and the class embeddings the decoder uses, B x K x D (B = clips)."""
        b = feats.shape[0] // clip_len
        if self.ml_head == "tranenc":
            pooled = self.proj_dec(self.pool(feats).flatten(2).transpose(1, 2))  # BT x 64 x D
            pooled = pooled.reshape(b, -1, pooled.shape[-1])
            tokens = torch.cat([pooled, self.cls_emb.expand(b, -1, -1)], dim=1)
            emb = self.decoder_norm2(self.blocks[0](tokens)[:, -self.num_classes:])
            return self.ml_fc(emb), emb
        if self.ml_head == "trandec":
            logits = self.ml_branch(feats, self.cls_emb, clip_len)
        else:
            logits = self.ml_branch(feats, clip_len)
        # The supplement found raw class embeddings better for these heads (official code too).
        return logits, self.cls_emb.expand(b, -1, -1)

    # ---- forward -------------------------------------------------------------------------
    def forward(self, feats: Tensor, selection: Selection = NO_SELECTION, *, clip_len: int = 1,
                selector_logits: Tensor | None = None) -> SegOutput:
        """feats (B*T) x D x h x w -> SegOutput (see its docstring for shapes).

        selection: this forward's selection options (model/selection.py); a baseline / +MT
            head ignores them except `override`, which restricts its K class-ordered channels.
        selector_logits: B x K ranking scores of a frozen classifier (required by, and only
            used by, a head built with a selector); returned as `ml_logits`.
        """
        bt, d, h, w = feats.shape
        if bt % clip_len:
            raise ValueError(f"batch of {bt} frames is not a whole number of clips of {clip_len}")
        b = bt // clip_len
        patches = self.proj_dec(feats.flatten(2).transpose(1, 2))  # BT x p x D

        ml_logits, emb = self._multilabel(feats, clip_len) if self.uses_ml else (None, None)
        if self.external:
            if selector_logits is None or tuple(selector_logits.shape) != (b, self.num_classes):
                raise ValueError(f"a segmenter with a selector needs selector_logits of shape {(b, self.num_classes)}")
            ml_logits = selector_logits.detach()
        if emb is None:
            emb = self.cls_emb.expand(b, -1, -1)
        override = resolve_override(selection, self.oracle, ml_logits, b, clip_len)

        index = valid = None
        if self.selects:
            index, valid = select_for(selection, ml_logits, self.num_classes, self.kappa, feats.device, override, by_id=self.oracle)
            emb = emb.gather(1, index[:, :, None].expand(-1, -1, d))  # B x C x D, any batch size
        if clip_len > 1:  # the T frames of a clip share its class tokens and selection
            emb = emb.repeat_interleave(clip_len, dim=0)
            index = index.repeat_interleave(clip_len, dim=0) if index is not None else None
            valid = valid.repeat_interleave(clip_len, dim=0) if valid is not None else None

        masks = self._decode(patches, emb, valid)  # BT x p x C
        if self.selects:
            masks = self.mask_norm(masks, valid)
        else:
            masks = self.mask_norm(masks)
            if override is not None:  # GT (eval) on a class-ordered model: restrict the argmax
                valid = allowed_classes(override, self.num_classes, feats.device).repeat_interleave(clip_len, dim=0)
                masks = masks.masked_fill(~valid[:, None, :], FILL_LOGIT)
        # Contiguous: the losses upsample these to the label size, 1.35x faster than from the
        # transposed layout (bench/bench_protoseg.py); a copy at the patch grid is cheap.
        mask_logits = masks.transpose(1, 2).reshape(bt, masks.shape[-1], h, w).contiguous()
        return SegOutput(mask_logits=mask_logits, topk_index=index, ml_logits=ml_logits, valid=valid)

    def decoder_tokens(self, patches: Tensor, emb: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The Segmenter decoder blocks over [patches; class tokens], then `decoder_norm`:
        patches BT x p x D (after `proj_dec`), class tokens BT x C x D -> (BT x p x D, BT x C x D).
        valid: BT x C, False for padding class tokens (hidden as keys)."""
        p = patches.shape[1]
        x = torch.cat([patches, emb], dim=1)
        mask = _key_mask(valid, p, x.dtype) if valid is not None else None
        for blk in self.seg_blocks:
            x = blk(x, attn_mask=mask)
        x = self.decoder_norm(x)
        return x[:, :p], x[:, p:]

    def _decode(self, patches: Tensor, emb: Tensor, valid: Tensor | None) -> Tensor:
        """Segmenter decoder: patches BT x p x D, class tokens BT x C x D -> cosine BT x p x C."""
        x_pix, x_cls = self.decoder_tokens(patches, emb, valid)
        pix = F.normalize(x_pix @ self.proj_patch, dim=-1)
        cls = F.normalize(x_cls @ self.proj_classes, dim=-1)
        return pix @ cls.transpose(1, 2)
