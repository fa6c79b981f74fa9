"""DETR's sine position encoding, shared by the Segmenter's TranDec head and Mask2Former."""

from __future__ import annotations

import math

import torch
from torch import Tensor


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
