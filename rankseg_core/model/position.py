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


def sine_position_embedding_3d(t: int, h: int, w: int, dim: int, device: torch.device | None = None,
                               temperature: float = 10000.0) -> Tensor:
    """Video Mask2Former's normalised 3-D sine encoding of a t x h x w clip grid: t x dim x h x w.

    Channels are the 2-D encoding of (y, x) (`sine_position_embedding`: dim/2 for y, dim/2 for
    x) PLUS an encoding of the frame index over all dim channels: frame i (1-based) is scaled to
    i / t * 2*pi and channel c holds sin (c even) or cos (c odd) of it divided by
    temperature ** (2 * (c // 2) / dim). The time part is added, not concatenated, so a
    one-frame clip is the 2-D encoding plus one constant vector (which attention ignores:
    a key offset shared by every key shifts all of a query's scores equally).
    """
    eps, scale = 1e-6, 2 * math.pi
    z = torch.arange(1, t + 1, dtype=torch.float32, device=device) / (t + eps) * scale
    dim_t = temperature ** (2 * (torch.arange(dim, dtype=torch.float32, device=device) // 2) / dim)
    pz = z[:, None] / dim_t  # t x dim
    # even channels sin, odd channels cos (DETR's interleaving; dim_t pairs share a frequency)
    pz = torch.where(torch.arange(dim, device=device) % 2 == 0, pz.sin(), pz.cos())
    return sine_position_embedding(h, w, dim, device, temperature)[None] + pz[:, :, None, None]
