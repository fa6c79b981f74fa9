"""UperNet's decode head (mmsegmentation 0.x `UPerHead`): PPM + FPN fused at the finest scale.

The head turns a 4-level pyramid (strides 4/8/16/32) into one pixel-embedding map at stride
4. It stops where mmseg's `BaseDecodeHead.cls_seg` begins (dropout 0.1, then the 1x1
`conv_seg`): the family puts its own classifier (a 1x1 conv over K, or RankSeg's selected
class embeddings) on top, so the same head serves the baseline and RankSeg.

Submodule names follow mmseg (`psp_modules.<i>.1.conv`, `bottleneck.bn`, `lateral_convs`,
`fpn_convs`, `fpn_bottleneck`; `layers.py` `ConvModule` is mmcv's conv -> BN -> ReLU with
its names), so the `decode_head.*` weights of an mmseg UperNet checkpoint (without
`conv_seg`) load into `UperHead` by name.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankseg_core.model.convseg.layers import ConvModule


class PPM(nn.ModuleList):
    """PSPNet's pooling pyramid (mmseg `PPM`): per scale s, adaptive average pool to s x s,
    1x1 ConvModule, bilinear upsampling back to the input size.

    forward: B x C_in x h x w -> list of len(pool_scales) maps B x channels x h x w.
    """

    def __init__(self, pool_scales: Sequence[int], in_channels: int, channels: int, align_corners: bool) -> None:
        super().__init__([nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1))
                          for s in pool_scales])
        self.align_corners = align_corners

    def forward(self, x: Tensor) -> list[Tensor]:
        return [F.interpolate(branch(x), size=x.shape[2:], mode="bilinear", align_corners=self.align_corners)
                for branch in self]


class UperHead(nn.Module):
    """UperNet head: feats [B x C_i x H/s_i x W/s_i] (finest first) -> B x channels x H/s_0 x W/s_0.

    1. PSP on the coarsest map: concat [x, PPM(x)] -> 3x3 `bottleneck`.
    2. 1x1 `lateral_convs` on the other levels; top-down: each level += the bilinearly
       upsampled level above it (coarsest first).
    3. 3x3 `fpn_convs` on every level but the coarsest (the PSP output is used as it is).
    4. Everything upsampled bilinearly to the finest level, concatenated, 3x3 `fpn_bottleneck`.

    The output is the pixel embedding BEFORE mmseg's dropout and `conv_seg`.
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 512, pool_scales: Sequence[int] = (1, 2, 3, 6),
                 align_corners: bool = False) -> None:
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError(f"UperHead needs at least 2 pyramid levels, got in_channels={list(in_channels)}")
        self.in_channels = [int(c) for c in in_channels]
        self.channels = channels
        self.align_corners = align_corners
        self.psp_modules = PPM(pool_scales, self.in_channels[-1], channels, align_corners)
        self.bottleneck = ConvModule(self.in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList([ConvModule(c, channels, 1) for c in self.in_channels[:-1]])
        self.fpn_convs = nn.ModuleList([ConvModule(channels, channels, 3) for _ in self.in_channels[:-1]])
        self.fpn_bottleneck = ConvModule(len(self.in_channels) * channels, channels, 3)

    def _resize(self, x: Tensor, size: torch.Size) -> Tensor:
        return F.interpolate(x, size=size, mode="bilinear", align_corners=self.align_corners)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        """feats: len(in_channels) maps, finest first -> B x channels x H_0 x W_0 (size of feats[0])."""
        if len(feats) != len(self.in_channels):
            raise ValueError(f"UperHead built for {len(self.in_channels)} levels, got {len(feats)} feature maps")
        top = feats[-1]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, feats[:-1])]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))
        # Top-down, coarsest first, so each level also carries everything above it.
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + self._resize(laterals[i], laterals[i - 1].shape[2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])]
        outs.append(laterals[-1])
        size = outs[0].shape[2:]
        fused = torch.cat([outs[0], *(self._resize(o, size) for o in outs[1:])], dim=1)
        return self.fpn_bottleneck(fused)
