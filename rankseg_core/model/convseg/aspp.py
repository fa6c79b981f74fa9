"""DeepLabv3's ASPP decode head with mmsegmentation 0.x `ASPPHead` semantics.

Image pooling branch (global average pool -> 1x1 ConvModule, broadcast back to the map), one
ConvModule per dilation (1x1 for dilation 1, else 3x3 with padding = dilation), concatenation
and a 3x3 `bottleneck` ConvModule. It returns the pixel embeddings BEFORE mmseg's dropout /
`conv_seg`: the classifier (classifier.py) comes after it, a 1x1 conv for the baseline, the
RankSeg pixel classifier otherwise. Parameter names follow mmseg (`image_pool.1.conv`,
`aspp_modules.0.conv`, `bottleneck.conv`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankseg_core.model.convseg.layers import ConvModule


class ASPPHead(nn.Module):
    """Atrous spatial pyramid pooling: feats[-1] B x C_in x h x w -> B x channels x h x w."""

    def __init__(self, in_channels: int, channels: int = 512, dilations: tuple[int, ...] = (1, 12, 24, 36)) -> None:
        super().__init__()
        self.channels = channels
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(in_channels, channels, 1))
        self.aspp_modules = nn.ModuleList([
            ConvModule(in_channels, channels, 1 if d == 1 else 3, dilation=d, padding=0 if d == 1 else d)
            for d in dilations
        ])
        self.bottleneck = ConvModule((len(dilations) + 1) * channels, channels, 3)

    def forward(self, feats: list[Tensor]) -> Tensor:
        """The last backbone map (mmseg's in_index 3) -> pixel embeddings."""
        x = feats[-1]
        # Bilinear resizing of a 1 x 1 map is a broadcast: what mmseg's `resize` gives.
        pooled = F.interpolate(self.image_pool(x), size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.bottleneck(torch.cat([pooled, *(m(x) for m in self.aspp_modules)], dim=1))
