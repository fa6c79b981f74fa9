"""MultiScaleMaskedTransformerDecoder: object queries with masked cross-attention.

Layer i cross-attends to scale i mod 3 (1/32, 1/16, 1/8, 1/32, ...), only inside the mask
the previous prediction draws (sigmoid >= 0.5 at that scale); a query whose mask is empty
attends everywhere. Then self-attention among queries, then an FFN, all post-norm. A mask
is predicted from the learnable queries before the first layer and after every layer (deep
supervision). The class head is NOT applied here: the model applies it afterwards to the
normalised query embeddings of every layer, so that RankSeg can compute only the selected
classes' logits (the selection needs the queries of a middle layer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankseg_core.config.mask2former import Mask2FormerConfig
from rankseg_core.model.mask2former.layers import MLP, c2_xavier_
from rankseg_core.model.position import sine_position_embedding

N_SCALES = 3


def _xavier_(module: nn.Module) -> None:
    for p in module.parameters():
        if p.dim() > 1:
            nn.init.xavier_uniform_(p)


class CrossAttentionLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        _xavier_(self)

    def forward(self, tgt: Tensor, memory: Tensor, mask: Tensor | None, pos: Tensor, query_pos: Tensor) -> Tensor:
        """tgt B x Q x D, memory / pos B x S x D, mask (B*heads) x Q x S (True = blocked)."""
        out = self.multihead_attn(tgt + query_pos, memory + pos, memory, attn_mask=mask, need_weights=False)[0]
        return self.norm(tgt + self.dropout(out))


class SelfAttentionLayer(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        _xavier_(self)

    def forward(self, tgt: Tensor, query_pos: Tensor) -> Tensor:
        q = tgt + query_pos
        out = self.self_attn(q, q, tgt, need_weights=False)[0]
        return self.norm(tgt + self.dropout(out))


class FFNLayer(nn.Module):
    def __init__(self, dim: int, ffn: int, dropout: float) -> None:
        super().__init__()
        self.linear1 = nn.Linear(dim, ffn)
        self.linear2 = nn.Linear(ffn, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)
        _xavier_(self)

    def forward(self, tgt: Tensor) -> Tensor:
        return self.norm(tgt + self.dropout(self.linear2(self.dropout(F.relu(self.linear1(tgt))))))


@dataclass
class DecoderOutput:
    """Per prediction step (learnable queries, then after each of the L layers), L+1 entries.

    embeds: decoder-normed query embeddings B x Q x D (what the class head reads);
    masks: mask logits B x Q x H/4 x W/4;
    queries: raw query features after each layer (B x Q x D, L entries; the ml head reads one).
    """

    embeds: list[Tensor]
    masks: list[Tensor]
    queries: list[Tensor]


class MaskedTransformerDecoder(nn.Module):
    def __init__(self, in_channels: int, cfg: Mask2FormerConfig, num_queries: int) -> None:
        super().__init__()
        d = cfg.hidden_dim
        self.num_heads = cfg.nheads
        self.cross_layers = nn.ModuleList(CrossAttentionLayer(d, cfg.nheads, cfg.dropout) for _ in range(cfg.dec_layers))
        self.self_layers = nn.ModuleList(SelfAttentionLayer(d, cfg.nheads, cfg.dropout) for _ in range(cfg.dec_layers))
        self.ffn_layers = nn.ModuleList(FFNLayer(d, cfg.dim_feedforward, cfg.dropout) for _ in range(cfg.dec_layers))
        self.decoder_norm = nn.LayerNorm(d)
        self.query_feat = nn.Embedding(num_queries, d)
        self.query_embed = nn.Embedding(num_queries, d)
        self.level_embed = nn.Embedding(N_SCALES, d)
        self.input_proj: nn.ModuleList | None
        if in_channels != d:
            self.input_proj = nn.ModuleList(nn.Conv2d(in_channels, d, kernel_size=1) for _ in range(N_SCALES))
            for conv in self.input_proj:
                c2_xavier_(cast(nn.Conv2d, conv))  # the Conv2d layers just built
        else:
            self.input_proj = None
        self.mask_embed = MLP(d, d, cfg.mask_dim, 3)

    def _predict(self, output: Tensor, mask_features: Tensor, attn_size: tuple[int, int]
                 ) -> tuple[Tensor, Tensor, Tensor]:
        """-> (normed embeddings B x Q x D, mask logits B x Q x H x W, attention mask (B*heads) x Q x hw)."""
        emb = self.decoder_norm(output)
        masks = torch.einsum("bqc,bchw->bqhw", self.mask_embed(emb), mask_features)
        with torch.no_grad():
            small = F.interpolate(masks.detach(), size=attn_size, mode="bilinear", align_corners=False)
            blocked = small.sigmoid().flatten(2) < 0.5  # B x Q x hw, True = may not attend
            # A query whose mask is empty at this scale attends everywhere (official rule).
            blocked &= ~blocked.all(-1, keepdim=True)
            attn = blocked.repeat_interleave(self.num_heads, dim=0)
        return emb, masks, attn

    def forward(self, scales: list[Tensor], mask_features: Tensor) -> DecoderOutput:
        """scales: [1/32, 1/16, 1/8] maps B x C x h x w; mask_features B x mask_dim x H/4 x W/4."""
        b = mask_features.shape[0]
        srcs, pos, sizes = [], [], []
        d = self.decoder_norm.normalized_shape[0]
        for i, x in enumerate(scales):
            h, w = x.shape[-2:]
            sizes.append((h, w))
            pos.append(sine_position_embedding(h, w, d, x.device).flatten(1).t()[None].expand(b, -1, -1))
            x = self.input_proj[i](x) if self.input_proj is not None else x
            srcs.append(x.flatten(2).transpose(1, 2) + self.level_embed.weight[i])
        return self._layers(srcs, pos, sizes, mask_features, self._predict)

    def _layers(self, srcs: list[Tensor], pos: list[Tensor], sizes: list[tuple[int, int]], mask_features: Tensor,
                predict: Callable[[Tensor, Tensor, tuple[int, int]], tuple[Tensor, Tensor, Tensor]]) -> DecoderOutput:
        """The queries through the layers, round-robin over the scales' keys `srcs` (B x N x D,
        positions `pos`); `predict(queries, mask_features, size)` gives each prediction and the
        next attention mask (per image, or per clip for the video decoder)."""
        b = srcs[0].shape[0]
        # repeat, not expand: a view of a parameter made under no_grad trips torch's module
        # tracker (FlopCounterMode) when it enters a module.
        query_pos = self.query_embed.weight[None].repeat(b, 1, 1)
        output = self.query_feat.weight[None].repeat(b, 1, 1)

        emb, masks, attn = predict(output, mask_features, sizes[0])
        out = DecoderOutput([emb], [masks], [])
        for i, (cross, self_attn, ffn) in enumerate(zip(self.cross_layers, self.self_layers, self.ffn_layers)):
            level = i % N_SCALES
            output = cross(output, srcs[level], attn, pos[level], query_pos)
            output = ffn(self_attn(output, query_pos))
            emb, masks, attn = predict(output, mask_features, sizes[(i + 1) % N_SCALES])
            out.embeds.append(emb)
            out.masks.append(masks)
            out.queries.append(output)
        return out
