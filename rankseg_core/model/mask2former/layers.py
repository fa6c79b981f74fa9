"""Small pieces shared by the pixel decoder and the transformer decoder."""

from __future__ import annotations

import itertools
import math

import torch.nn.functional as F
from torch import Tensor, nn


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
