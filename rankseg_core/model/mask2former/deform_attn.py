"""Multi-scale deformable attention (Deformable DETR) in plain PyTorch.

The official code calls a CUDA kernel and keeps `ms_deform_attn_core_pytorch` "for debug and
test only"; here the grid_sample path is the implementation, so the pixel decoder runs on
CPU (and on GPU, slower than the fused kernel but numerically the same function).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def ms_deform_sample(value: Tensor, shapes: list[tuple[int, int]], locations: Tensor, weights: Tensor) -> Tensor:
    """Attention-weighted bilinear samples of every level.

    value: B x S x M x Dh (S = sum of h_l * w_l, levels concatenated row-major, M heads);
    locations: B x Lq x M x L x P x 2 as (x, y) in [0, 1] of each level's extent (0 = left /
    top border, 1 = right / bottom border; pixel centres at (i + 0.5) / w); samples outside
    the map read zeros; weights: B x Lq x M x L x P (softmaxed over L*P).
    Returns B x Lq x (M * Dh).
    """
    b, _, m, dh = value.shape
    _, lq, _, n_levels, n_points, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2.0 * locations - 1.0  # grid_sample's [-1, 1] with align_corners=False
    sampled = []
    for lvl, (h, w) in enumerate(shapes):
        v = per_level[lvl].permute(0, 2, 3, 1).reshape(b * m, dh, h, w)
        g = grids[:, :, :, lvl].transpose(1, 2).reshape(b * m, lq, n_points, 2)
        sampled.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))  # BM x Dh x Lq x P
    stacked = torch.stack(sampled, dim=-2).flatten(-2)  # BM x Dh x Lq x (L*P)
    wts = weights.transpose(1, 2).reshape(b * m, 1, lq, n_levels * n_points)
    out = (stacked * wts).sum(-1)  # BM x Dh x Lq
    return out.reshape(b, m * dh, lq).transpose(1, 2)


@functools.lru_cache(maxsize=32)
def level_sizes(shapes: tuple[tuple[int, int], ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """L x 2 (w, h) of each level, as a tensor on `device`.

    Cached per (shapes, dtype, device): building it is a host-to-device copy, which on CUDA
    blocks the host; training crops have one set of shapes, so the step copies nothing (issue 24:
    no host sync in the step). Made outside inference mode, so a tensor first built during a
    `torch.inference_mode()` prediction can still be saved for a later backward."""
    with torch.inference_mode(False):
        return torch.tensor([[w, h] for h, w in shapes], dtype=dtype, device=device)


class MSDeformAttn(nn.Module):
    """Deformable attention over L levels: each query reads P points per level and head
    around its reference point, at offsets and with weights predicted from the query."""

    def __init__(self, dim: int, n_levels: int, n_heads: int, n_points: int) -> None:
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim {dim} is not divisible by {n_heads} heads")
        self.n_levels, self.n_heads, self.n_points = n_levels, n_heads, n_points
        self.sampling_offsets = nn.Linear(dim, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(dim, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Deformable DETR's init: head h starts looking along direction 2*pi*h/M, point p at
        # distance p+1 (in pixels of each level); uniform attention weights.
        nn.init.zeros_(self.sampling_offsets.weight)
        theta = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        grid = torch.stack([theta.cos(), theta.sin()], -1)
        grid = grid / grid.abs().max(-1, keepdim=True).values
        grid = grid[:, None, None, :].repeat(1, self.n_levels, self.n_points, 1)
        grid = grid * torch.arange(1, self.n_points + 1, dtype=torch.float32)[None, None, :, None]
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        for lin in (self.value_proj, self.output_proj):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)

    def forward(self, query: Tensor, reference: Tensor, value_in: Tensor, shapes: list[tuple[int, int]]) -> Tensor:
        """query B x Lq x D, reference B x Lq x L x 2 ((x, y) in [0, 1]), value_in B x S x D -> B x Lq x D."""
        b, lq, d = query.shape
        m, n_levels, n_points = self.n_heads, self.n_levels, self.n_points
        value = self.value_proj(value_in).reshape(b, value_in.shape[1], m, d // m)
        offsets = self.sampling_offsets(query).reshape(b, lq, m, n_levels, n_points, 2)
        weights = self.attention_weights(query).reshape(b, lq, m, n_levels * n_points).softmax(-1)
        weights = weights.reshape(b, lq, m, n_levels, n_points)
        # Offsets are in pixels of each level: divide by (w, h) to get [0, 1] coordinates.
        norm = level_sizes(tuple(shapes), query.dtype, query.device)
        locations = reference[:, :, None, :, None, :] + offsets / norm[None, None, None, :, None, :]
        return self.output_proj(ms_deform_sample(value, shapes, locations, weights))
