"""EncNet's context encoding on the Segmenter decoder (supplement Table 1, `model.head=encnet`).

The RankSeg fork's `MaskTransformerEncHead` (mmseg/models/decode_heads/mask_transformer_enc_head.py
in openseg-group/RankSeg): mmseg's `EncHead` pieces, with the Segmenter mask transformer as the
pixel classifier instead of EncHead's 1x1 `conv_seg`:

    patch map B x D x h x w -> bottleneck (3x3 conv + BN + ReLU, D -> D)
      -> EncModule: 1x1 conv + BN + ReLU -> Encoding (code-words) -> BN1d -> ReLU -> mean over
         code-words = encode_feat B x D;  gamma = sigmoid(fc(encode_feat));  x -> relu(x + x * gamma)
      -> the Segmenter decoder over all K classes (heads.MaskTransformerHead, head "segmenter")
    encode_feat -> se_layer (Linear D -> K) = the SE-loss logits, returned as `ml_logits`.

Parameter names follow the fork (`bottleneck.conv/bn`, `enc_module.encoding_project`,
`enc_module.encoding.0.codewords`, `se_layer`, and the Segmenter head's own names), so mmcv's
custom-keys rule treats them as the official configs did ("norm" does not match `bn`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.init import trunc_normal_

from rankseg_core.config.model import ModelConfig
from rankseg_core.model.heads import MaskTransformerHead, SegOutput
from rankseg_core.model.selection import NO_SELECTION, Selection


def _init_linear(lin: nn.Linear) -> None:
    # The fork's init_weights, applied to the whole head: every Linear trunc-normal(0.02), zero bias.
    trunc_normal_(lin.weight, std=0.02)
    nn.init.zeros_(lin.bias)


class ConvBNReLU(nn.Module):
    """mmcv's `ConvModule` with a BN norm: conv (no bias, BN follows) -> BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        # mmcv ConvModule's own init: kaiming normal, fan_out, for the ReLU that follows.
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        """B x C_in x H x W -> B x C_out x H' x W'."""
        return F.relu(self.bn(self.conv(x)))


class Encoding(nn.Module):
    """Residual encoding layer (Zhang et al., EncNet; mmseg `ops/encoding.py` semantics).

    With code-words c_k (K_c x C) and smoothing factors s_k (K_c,), for the N = H*W features x_i:
        a_ik = softmax_k( s_k * ||x_i - c_k||^2 ),     e_k = sum_i a_ik (x_i - c_k).
    """

    def __init__(self, channels: int, num_codes: int) -> None:
        super().__init__()
        self.channels, self.num_codes = channels, num_codes
        std = 1.0 / math.sqrt(num_codes * channels)  # mmseg's init
        self.codewords = nn.Parameter(torch.empty(num_codes, channels).uniform_(-std, std))
        self.scale = nn.Parameter(torch.empty(num_codes).uniform_(-1.0, 0.0))

    def assignment(self, x: Tensor) -> Tensor:
        """Soft assignment a: B x N x C features -> B x N x K_c (rows sum to 1)."""
        c = self.codewords.to(x.dtype)
        # ||x - c||^2 expanded into matmuls: mmseg materialises B x N x K_c x C (1.6 GB for a
        # batch of 8 ViT-B maps with 64 code-words); this is the same sum at B x N x K_c.
        sq = (x * x).sum(-1, keepdim=True) - 2.0 * x @ c.t() + (c * c).sum(-1)
        return F.softmax(self.scale.to(x.dtype) * sq, dim=2)

    def forward(self, x: Tensor) -> Tensor:
        """B x C x H x W -> encoded features B x K_c x C."""
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ValueError(f"Encoding expects B x {self.channels} x H x W, got {tuple(x.shape)}")
        # The expansion cancels large terms: half-precision matmuls would swamp the softmax.
        with torch.autocast(x.device.type, enabled=False):
            feats = x.to(torch.promote_types(x.dtype, torch.float32)).flatten(2).transpose(1, 2)  # B x N x C
            a = self.assignment(feats)
            # sum_i a_ik (x_i - c_k) = (A^T X)_k - (sum_i a_ik) c_k
            return a.transpose(1, 2) @ feats - a.sum(1)[:, :, None] * self.codewords.to(feats.dtype)


class EncModule(nn.Module):
    """mmseg's `EncModule`: encode, then gate the channels of the input by the encoding.

    forward: B x C x H x W -> (encode_feat B x C, relu(x + x * gamma) B x C x H x W).
    """

    def __init__(self, channels: int, num_codes: int) -> None:
        super().__init__()
        self.encoding_project = ConvBNReLU(channels, channels, 1)
        # BN over the code-word axis of B x K_c x C (mmseg turns its BN config into BN1d here).
        self.encoding = nn.Sequential(Encoding(channels, num_codes), nn.BatchNorm1d(num_codes), nn.ReLU(inplace=True))
        linear = nn.Linear(channels, channels)
        _init_linear(linear)
        self.fc = nn.Sequential(linear, nn.Sigmoid())

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        encode_feat = self.encoding(self.encoding_project(x)).mean(dim=1)  # B x C
        gamma = self.fc(encode_feat).to(x.dtype)
        return encode_feat, F.relu(x + x * gamma[:, :, None, None])


class EncNetHead(MaskTransformerHead):
    """Segmenter decoder over all K classes on EncNet-gated features, plus the SE-loss branch.

    Returns a class-ordered `SegOutput` (mask_logits B x K x h x w, topk_index None) whose
    `ml_logits` are the SE logits B x K: image-level class presence, trained by the SE-loss and
    scored as multi-label predictions (mAP) at evaluation; they select nothing.
    """

    def __init__(self, cfg: ModelConfig, embed_dim: int) -> None:
        super().__init__(cfg, embed_dim)  # head "encnet" builds the baseline decoder (no ml branch)
        d = embed_dim
        self.bottleneck = ConvBNReLU(d, d, 3, padding=1)
        self.enc_module = EncModule(d, cfg.encnet.codewords)
        self.se_layer = nn.Linear(d, cfg.num_classes)
        _init_linear(self.se_layer)

    def forward(self, feats: Tensor, selection: Selection = NO_SELECTION, *, clip_len: int = 1,
                selector_logits: Tensor | None = None) -> SegOutput:
        """feats B x D x h x w -> SegOutput (mask_logits B x K x h x w, ml_logits = SE logits B x K)."""
        encode_feat, gated = self.enc_module(self.bottleneck(feats))
        out = super().forward(gated, selection, clip_len=clip_len, selector_logits=selector_logits)
        out.ml_logits = self.se_layer(encode_feat)
        return out
