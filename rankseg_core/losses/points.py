"""Point sampling for the mask losses (PointRend, as detectron2's point_features does it).

Coordinates are (x, y) in [0, 1] of a map's extent, read with bilinear `grid_sample`
(align_corners=False, zeros outside): pixel (i, j) of an h x w map has its centre at
((j + 0.5) / w, (i + 0.5) / h), where the sample equals the pixel value exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def point_sample(maps: Tensor, coords: Tensor) -> Tensor:
    """maps N x C x H x W, coords N x P x 2 -> N x C x P bilinear samples."""
    return F.grid_sample(maps, 2.0 * coords[:, :, None, :] - 1.0, mode="bilinear", align_corners=False)[..., 0]


def uncertain_points(logits: Tensor, num_points: int, oversample_ratio: float, importance_ratio: float,
                     generator: torch.Generator | None = None) -> Tensor:
    """Importance sampling of points on mask logits N x 1 x H x W -> N x P x 2.

    Draw num_points * oversample_ratio uniform points, keep the importance_ratio *
    num_points most uncertain (uncertainty = -|logit| of the point's own bilinear sample,
    not of the coarse map) and fill up with fresh uniform points.
    """
    n = logits.shape[0]
    n_sampled = int(num_points * oversample_ratio)
    coords = torch.rand(n, n_sampled, 2, device=logits.device, generator=generator)
    uncertainty = -point_sample(logits, coords)[:, 0].abs()  # N x n_sampled
    n_uncertain = int(importance_ratio * num_points)
    idx = uncertainty.topk(n_uncertain, dim=1).indices
    picked = coords.gather(1, idx[:, :, None].expand(-1, -1, 2))
    n_random = num_points - n_uncertain
    if n_random > 0:
        picked = torch.cat([picked, torch.rand(n, n_random, 2, device=logits.device, generator=generator)], dim=1)
    return picked
