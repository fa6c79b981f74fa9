"""RankSeg on Mask2Former: the multi-label head, the class selection and the rank LayerNorm.

As the official fork (openseg-group/RankSeg, `mask2former/`) applies it:
- the ml head reads the object-query features after the 3rd decoder layer: Linear to 512,
  [queries ; K class embeddings] -> one pre-norm transformer block -> LayerNorm -> the last
  K tokens -> GroupWiseLinear -> B x K logits;
- the top-kappa classes (by ml logit, rank order) plus the no-object class are the only
  class columns; each decoder layer's class logits are taken at those kappa+1 columns and
  normalised by `LayerNorm(kappa + 1)` across them, whose per-column affine is the per-rank
  1/tau (and bias), the no-object column last.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from rankseg_core.model.heads import FILL_LOGIT, GroupWiseLinear, RankNorm


class MultiLabelHead(nn.Module):
    """Object-query features B x Q x D -> multi-label logits B x K."""

    def __init__(self, num_classes: int, in_dim: int, dim: int, dropout: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.proj_dec = nn.Linear(in_dim, dim)
        self.cls_emb = nn.Parameter(torch.empty(1, num_classes, dim))
        trunc_normal_(self.cls_emb, std=0.02)
        self.block = Block(dim, num_heads=max(1, dim // 64), mlp_ratio=4.0, qkv_bias=True, proj_drop=dropout,
                           attn_drop=dropout, norm_layer=nn.LayerNorm)
        self.norm = nn.LayerNorm(dim)
        self.fc = GroupWiseLinear(num_classes, dim)

    def forward(self, queries: Tensor) -> Tensor:
        x = self.proj_dec(queries)
        x = torch.cat([x, self.cls_emb.expand(x.shape[0], -1, -1)], dim=1)
        x = self.norm(self.block(x))
        return self.fc(x[:, -self.num_classes:])


class QueryRankNorm(RankNorm):
    """`LayerNorm(kappa + 1)` over [selected classes in rank order ; no-object] class logits.

    Parameters are (kappa + 1,) like the official `ml_norm`: entry r < kappa is rank r's
    gamma / beta, entry kappa the no-object column's. With c columns at a forward (c - 1
    classes: fewer with padding, more when evaluating with a larger kappa) the class ranks
    take entries 0.. (the last class rank repeated past kappa) and the last column always
    takes the no-object entry. `shared`: one scalar gamma / beta (the paper's shared tau).
    Input B x Q x c, valid B x c (padding columns -> FILL_LOGIT, excluded from the statistics).
    """

    def __init__(self, kappa: int, shared: bool = False, eps: float = 1e-5) -> None:
        super().__init__(kappa + 1, shared=shared, eps=eps)
        self.kappa = kappa

    def affine(self, c: int) -> tuple[Tensor, Tensor]:
        if self.shared:
            return self.weight.expand(c), self.bias.expand(c)
        ranks = torch.arange(c - 1, device=self.weight.device).clamp_max(self.kappa - 1)
        index = torch.cat([ranks, ranks.new_full((1,), self.kappa)])
        return self.weight[index], self.bias[index]


def with_no_object(index: Tensor, valid: Tensor | None, num_classes: int) -> tuple[Tensor, Tensor]:
    """Append the no-object column K: index B x (C+1), valid B x (C+1) (no-object always valid)."""
    ext = torch.cat([index, index.new_full((index.shape[0], 1), num_classes)], dim=1)
    ok = torch.ones_like(ext, dtype=torch.bool)
    if valid is not None:
        ok[:, :-1] = valid
    return ext, ok


def selected_logits(emb: Tensor, weight: Tensor, bias: Tensor | None, index: Tensor, cosine: bool) -> Tensor:
    """Class logits at the selected columns only: emb B x Q x D, weight (K+1) x D, index B x C' -> B x Q x C'.

    Equals computing all K+1 logits and gathering, at C'/(K+1) of the cost: this is where
    kappa < K saves compute. cosine: both sides L2-normalised (USE_LAYERNORM of the fork).
    """
    w = F.normalize(weight, dim=-1) if cosine else weight
    x = F.normalize(emb, dim=-1) if cosine else emb
    logits = torch.einsum("bqd,bcd->bqc", x, w[index])
    if bias is not None:
        logits = logits + bias[index][:, None, :]
    return logits


def mask_invalid(logits: Tensor, valid: Tensor | None) -> Tensor:
    """Padding columns (valid False, B x C') get FILL_LOGIT."""
    return logits if valid is None else logits.masked_fill(~valid[:, None, :], FILL_LOGIT)
