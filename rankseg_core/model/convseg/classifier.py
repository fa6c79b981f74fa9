"""Pixel classifiers of the conv decoders: mmseg's 1x1 `conv_seg` (baseline) and RankSeg's.

RankSeg on a conv decoder (supplement sec. C, Fig. 1 (a)-(c); the fork's `ASPPRankSegHead` and
`RankSegEncoderHead`, docs/architectures.md):

1. Multi-label branch (`MultiLabelEncoder`, one TranEnc layer): the last backbone map, pooled
   to ml_pool x ml_pool (DeepLabv3: 16; UperNet: not pooled), through a depthwise-separable
   1x1 conv (`proj_dec`, ReLU after each part) to ml_dim tokens; concatenated with the K class
   tokens; one pre-norm transformer block; the K class outputs -> LayerNorm -> GroupWiseLinear
   -> ml logits B x K. The class tokens are the pixel classifier's own class embeddings (shared)
   or, for BEiT, embeddings of the branch itself, through `cls_proj` (a bias-free
   ml_dim x ml_dim projection: not in the fork's released forward, in Table 7's counts).
2. Selection: the top-kappa classes of the ml logits, in rank order (model/selection.py).
3. Pixel classification with the ORIGINAL class embeddings (not the ml branch's refined ones:
   the supplement found them better): logits_{b,r,h,w} = <x_{b,:,h,w}, E_{c_r}> + b_{c_r} for
   the selected classes c_r, x the decoder's pixel embeddings after Dropout2d, then a
   LayerNorm over the kappa axis with per-rank affine (RankNorm: the learned 1/tau per rank).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from rankseg_core.model.convseg.fcn_aux import conv_seg
from rankseg_core.model.heads import FILL_LOGIT, GroupWiseLinear, RankNorm, SegOutput
from rankseg_core.model.selection import NO_SELECTION, Selection, allowed_classes, resolve_override, select_for


def _restrict(logits: Tensor, override: list[Tensor] | None, num_classes: int) -> tuple[Tensor, Tensor | None]:
    """Class-ordered logits B x K x h x w under a GT (eval) selection: the classes outside each
    image's list get FILL_LOGIT, so the argmax keeps to the list. -> (logits, valid B x K)."""
    if override is None:
        return logits, None
    valid = allowed_classes(override, num_classes, logits.device)
    return logits.masked_fill(~valid[:, :, None, None], FILL_LOGIT), valid


class LinearClassifier(nn.Module):
    """The baseline: BaseDecodeHead's Dropout2d + 1x1 `conv_seg` over all K classes."""

    def __init__(self, channels: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = conv_seg(channels, num_classes)

    def forward(self, pixels: Tensor, ml_feats: Tensor, selection: Selection = NO_SELECTION) -> SegOutput:
        """pixels B x C x h x w -> SegOutput with K class-ordered logits B x K x h x w
        (`ml_feats` unused: no multi-label branch)."""
        override = resolve_override(selection, False, None, pixels.shape[0])
        logits, valid = _restrict(self.conv_seg(self.dropout(pixels)), override, self.num_classes)
        return SegOutput(mask_logits=logits, valid=valid)


class SeparableProjection(nn.Module):
    """mmcv's DepthwiseSeparableConvModule(in, out, 1) without norm: depthwise 1x1 conv + ReLU,
    pointwise 1x1 conv + ReLU (the fork's `proj_dec`). B x C_in x h x w -> B x C_out x h x w."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.depthwise_conv = nn.Conv2d(in_channels, in_channels, 1, groups=in_channels)
        self.pointwise_conv = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.pointwise_conv(F.relu(self.depthwise_conv(x))))


class MultiLabelEncoder(nn.Module):
    """RankSeg's multi-label branch on a conv decoder (step 1 of the module docstring)."""

    def __init__(self, in_channels: int, dim: int, num_classes: int, dropout: float, pool: int = 0,
                 own_embedding: bool = False, cls_proj: bool = True) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.pool = nn.AdaptiveAvgPool2d(pool) if pool else None
        self.proj_dec = SeparableProjection(in_channels, dim)
        self.cls_emb = nn.Parameter(trunc_normal_(torch.zeros(1, num_classes, dim), std=0.02)) if own_embedding else None
        # Bias-free, as the Segmenter head's proj_classes: Table 7 counts exactly dim x dim here.
        self.cls_proj = nn.Linear(dim, dim, bias=False) if cls_proj else None
        self.block = Block(dim, num_heads=max(1, dim // 64), mlp_ratio=4.0, qkv_bias=True, proj_drop=dropout,
                           attn_drop=dropout, norm_layer=nn.LayerNorm)
        self.norm = nn.LayerNorm(dim)
        self.fc = GroupWiseLinear(num_classes, dim)

    def forward(self, feats: Tensor, shared_emb: Tensor | None = None) -> Tensor:
        """feats B x C_in x h x w (the last backbone map), shared_emb 1 x K x dim (the pixel
        classifier's class embeddings; ignored with an own embedding) -> ml logits B x K."""
        x = self.pool(feats) if self.pool is not None else feats
        tokens = self.proj_dec(x).flatten(2).transpose(1, 2)  # B x p x dim
        emb = self.cls_emb if self.cls_emb is not None else shared_emb
        if emb is None:
            raise ValueError("a multi-label branch without class embeddings of its own needs shared_emb")
        if self.cls_proj is not None:
            emb = self.cls_proj(emb)
        x = self.block(torch.cat([tokens, emb.expand(tokens.shape[0], -1, -1)], dim=1))
        return self.fc(self.norm(x[:, -self.num_classes:]))


class RankSegClassifier(nn.Module):
    """RankSeg's pixel classifier (steps 2-3 of the module docstring) and its ml branch.

    Variants, as in the Segmenter head: RankSeg (select, rank-adaptive RankNorm(kappa)); shared
    tau (`tau_shared`: one gamma / beta); +MT (`selects` False: ml branch and loss, logits over
    all K in class order, LayerNorm(K)); oracle (no ml branch; the image's GT classes by id).
    """

    def __init__(self, channels: int, num_classes: int, kappa: int, dropout: float,
                 ml_head: MultiLabelEncoder | None, selects: bool, oracle: bool = False,
                 tau_shared: bool = False, cosine: bool = False) -> None:
        super().__init__()
        self.num_classes, self.oracle, self.cosine = num_classes, oracle, cosine
        self.selects = selects or oracle
        self.kappa = kappa if self.selects else num_classes
        if ml_head is None and not oracle:
            raise ValueError("a RankSeg classifier ranks by its ml branch; only the oracle has none")
        self.ml_head = ml_head
        # The fork's ASPPRankSegHead: cls_emb and cls_bias_emb, both trunc-normal (std 0.02).
        self.cls_emb = nn.Parameter(trunc_normal_(torch.zeros(1, num_classes, channels), std=0.02))
        self.cls_bias = nn.Parameter(trunc_normal_(torch.zeros(1, num_classes), std=0.02))
        self.dropout = nn.Dropout2d(dropout)
        self.norm = RankNorm(self.kappa, shared=self.selects and tau_shared)

    def forward(self, pixels: Tensor, ml_feats: Tensor, selection: Selection = NO_SELECTION) -> SegOutput:
        """pixels B x C x h x w (decoder output), ml_feats B x C_in x h' x w' (last backbone
        map) -> SegOutput: kappa logits in rank order (selecting) or K in class order."""
        b, c, h, w = pixels.shape
        ml_logits = self.ml_head(ml_feats, self.cls_emb) if self.ml_head is not None else None
        override = resolve_override(selection, self.oracle, ml_logits, b)
        index = valid = None
        emb, bias = self.cls_emb.expand(b, -1, -1), self.cls_bias.expand(b, -1)
        if self.selects:
            index, valid = select_for(selection, ml_logits, self.num_classes, self.kappa, pixels.device, override, by_id=self.oracle)
            emb = emb.gather(1, index[:, :, None].expand(-1, -1, c))  # B x C' x D, any batch size
            bias = bias.gather(1, index)
        x = self.dropout(pixels)
        if self.cosine:
            x, emb = F.normalize(x, dim=1), F.normalize(emb, dim=-1)
        scores = torch.einsum("bdp,bcd->bpc", x.flatten(2), emb) + bias[:, None, :]  # B x hw x C'
        if self.selects:
            scores = self.norm(scores, valid)
        else:
            scores = self.norm(scores)
        logits = scores.transpose(1, 2).reshape(b, -1, h, w).contiguous()
        if not self.selects:
            logits, valid = _restrict(logits, override, self.num_classes)
        return SegOutput(mask_logits=logits, topk_index=index, ml_logits=ml_logits, valid=valid)
