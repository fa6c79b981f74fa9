"""MSDeformAttnPixelDecoder: deformable-attention encoder over res3-res5 plus one FPN level.

res3..res5 are projected to conv_dim (1x1 conv + GroupNorm), refined jointly by
`enc_layers` post-norm deformable encoder layers (queries = every position of every level,
one reference point per position), and res2 joins FPN-style (lateral 1x1 conv + bilinear
upsampling + 3x3 conv). Outputs: mask features at 1/4 and the 1/32, 1/16, 1/8 maps the
transformer decoder attends to, round-robin.
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankseg_core.config.mask2former import Mask2FormerConfig
from rankseg_core.model.mask2former.deform_attn import MSDeformAttn
from rankseg_core.model.mask2former.layers import c2_xavier_, group_norm
from rankseg_core.model.position import sine_position_embedding

N_LEVELS = 3  # res3, res4, res5 enter the deformable encoder


class DeformEncoderLayer(nn.Module):
    """Post-norm layer: deformable self-attention, then a ReLU FFN."""

    def __init__(self, dim: int, ffn: int, heads: int, points: int, dropout: float) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(dim, N_LEVELS, heads, points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.linear1 = nn.Linear(dim, ffn)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(ffn, dim)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(dim)

    def forward(self, src: Tensor, pos: Tensor, reference: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """src, pos B x S x D; reference B x S x L x 2 -> B x S x D."""
        src = self.norm1(src + self.dropout1(self.self_attn(src + pos, reference, src, shapes)))
        ffn = self.linear2(self.dropout2(F.relu(self.linear1(src))))
        return self.norm2(src + self.dropout3(ffn))


def reference_points(shapes: list[tuple[int, int]], device: torch.device) -> Tensor:
    """Pixel centres of every level in [0, 1] as (x, y), concatenated: S x 2.

    Without padding masks (valid ratio 1) every level gets the same point, so the
    B x S x L x 2 reference the layers take is this tensor expanded.
    """
    refs = []
    for h, w in shapes:
        y = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
        x = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
        yy, xx = torch.meshgrid(y, x, indexing="ij")
        refs.append(torch.stack([xx.flatten(), yy.flatten()], -1))
    return torch.cat(refs, 0)


class PixelDecoder(nn.Module):
    """[res2, res3, res4, res5] -> mask features B x mask_dim x H/4 x W/4 and the three
    decoder scales [1/32, 1/16, 1/8], each B x conv_dim x h x w."""

    def __init__(self, in_channels: list[int], cfg: Mask2FormerConfig) -> None:
        super().__init__()
        d = cfg.conv_dim
        # res5 first: the encoder and its level embeddings run from low to high resolution.
        self.input_proj = nn.ModuleList(nn.Sequential(nn.Conv2d(c, d, kernel_size=1), group_norm(d))
                                        for c in in_channels[1:][::-1])
        for proj in self.input_proj:
            conv = cast(nn.Conv2d, cast(nn.Sequential, proj)[0])  # Sequential(Conv2d, GroupNorm), just built
            assert conv.bias is not None  # Conv2d's default bias=True
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)
        self.level_embed = nn.Parameter(torch.empty(N_LEVELS, d))
        self.layers = nn.ModuleList(DeformEncoderLayer(d, cfg.enc_dim_feedforward, cfg.nheads, cfg.enc_n_points,
                                                       cfg.dropout) for _ in range(cfg.enc_layers))
        for layer in self.layers:  # xavier everywhere, then the deformable attention's own init
            for p in layer.parameters():
                if p.dim() > 1:
                    nn.init.xavier_uniform_(p)
            cast(DeformEncoderLayer, layer).self_attn.reset_parameters()
        nn.init.normal_(self.level_embed)

        # One FPN level (res2): stride 8 of the encoder's finest level -> the common stride 4.
        self.lateral_conv = nn.Conv2d(in_channels[0], d, kernel_size=1, bias=False)
        self.lateral_norm = group_norm(d)
        self.output_conv = nn.Conv2d(d, d, kernel_size=3, padding=1, bias=False)
        self.output_norm = group_norm(d)
        self.mask_features = nn.Conv2d(d, cfg.mask_dim, kernel_size=1)
        for conv in (self.lateral_conv, self.output_conv, self.mask_features):
            c2_xavier_(conv)

    def forward(self, feats: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        """feats [res2, res3, res4, res5] -> (mask features, [1/32, 1/16, 1/8] maps)."""
        # fp32 even under autocast, as the official decoder (deformable sampling is unstable in fp16)
        with torch.autocast(feats[0].device.type, enabled=False):
            return self._forward(feats)

    def _forward(self, feats: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        srcs, pos, shapes = [], [], []
        for i, f in enumerate(feats[1:][::-1]):
            x = self.input_proj[i](f.float())  # the official encoder always runs in fp32
            b, d, h, w = x.shape
            shapes.append((h, w))
            srcs.append(x.flatten(2).transpose(1, 2))
            pe = sine_position_embedding(h, w, d, x.device).flatten(1).t()  # hw x D
            pos.append((pe + self.level_embed[i])[None].expand(b, -1, -1))
        src, pos_all = torch.cat(srcs, 1), torch.cat(pos, 1)
        ref = reference_points(shapes, src.device)[None, :, None, :].expand(src.shape[0], -1, N_LEVELS, -1)
        for layer in self.layers:
            src = layer(src, pos_all, ref, shapes)
        outs = [z.transpose(1, 2).reshape(src.shape[0], -1, h, w)
                for z, (h, w) in zip(src.split([h * w for h, w in shapes], dim=1), shapes)]

        lateral = self.lateral_norm(self.lateral_conv(feats[0].float()))
        y = lateral + F.interpolate(outs[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
        y = F.relu(self.output_norm(self.output_conv(y)))
        return self.mask_features(y), outs[:N_LEVELS]
