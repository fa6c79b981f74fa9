"""Small pieces shared by the pixel decoder and the transformer decoder."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def sine_position_embedding(h: int, w: int, dim: int, device: torch.device | None = None,
                            temperature: float = 10000.0) -> Tensor:
    """DETR's normalised sine encoding of an h x w grid (no padding mask): dim x h x w.

    The first dim/2 channels encode y, the last dim/2 encode x; each coordinate is the
    1-based row / column index scaled to (0, 2*pi].
    """
    npf = dim // 2
    eps, scale = 1e-6, 2 * math.pi
    y = torch.arange(1, h + 1, dtype=torch.float32, device=device)[:, None].expand(h, w)
    x = torch.arange(1, w + 1, dtype=torch.float32, device=device)[None, :].expand(h, w)
    y = y / (h + eps) * scale
    x = x / (w + eps) * scale
    dim_t = temperature ** (2 * (torch.arange(npf, dtype=torch.float32, device=device) // 2) / npf)
    px, py = x[..., None] / dim_t, y[..., None] / dim_t
    px = torch.stack((px[..., 0::2].sin(), px[..., 1::2].cos()), dim=3).flatten(2)
    py = torch.stack((py[..., 0::2].sin(), py[..., 1::2].cos()), dim=3).flatten(2)
    return torch.cat((py, px), dim=2).permute(2, 0, 1)


class MLP(nn.Module):
    """Linear layers with ReLU between them (DETR's box / mask embedding MLP)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [in_dim] + [hidden] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(dims))

    def forward(self, x: Tensor) -> Tensor:
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i < len(self.layers) - 1:
                x = F.relu(x)
        return x


def c2_xavier_(module: nn.Conv2d | nn.Linear) -> None:
    """Caffe2's "XavierFill" as detectron2 applies it to convs: kaiming-uniform(a=1), zero bias."""
    nn.init.kaiming_uniform_(module.weight, a=1)
    if module.bias is not None:
        nn.init.zeros_(module.bias)


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with the official 32 groups, fewer when a tiny model has fewer channels."""
    return nn.GroupNorm(math.gcd(32, channels), channels)
