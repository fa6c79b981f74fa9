"""Hungarian matching of queries to GT segments (one image at a time), as the official
HungarianMatcher: cost = w_class * (-softmax prob of the GT class) + w_mask * mean sigmoid
CE + w_dice * dice loss, the mask costs over the SAME points for prediction and target
(uniform random points unless given), solved with scipy's linear_sum_assignment.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from rankseg_core.losses.points import point_sample
from rankseg_core.utils.transfer import host_to


def pairwise_sigmoid_ce(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean binary CE of every prediction against every target: Q x P, n x P -> Q x n."""
    pos = F.binary_cross_entropy_with_logits(logits, torch.ones_like(logits), reduction="none")
    neg = F.binary_cross_entropy_with_logits(logits, torch.zeros_like(logits), reduction="none")
    return (pos @ targets.t() + neg @ (1 - targets).t()) / logits.shape[1]


def pairwise_dice(logits: Tensor, targets: Tensor) -> Tensor:
    """Dice loss 1 - (2|p t| + 1) / (|p| + |t| + 1) of every pair: Q x P, n x P -> Q x n."""
    p = logits.sigmoid()
    num = 2 * p @ targets.t()
    den = p.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (num + 1) / (den + 1)


def matching_cost(logits: Tensor, masks: Tensor, labels: Tensor, tgt_masks: Tensor, coords: Tensor,
                  w_class: float, w_mask: float, w_dice: float) -> Tensor:
    """Cost matrix Q x n for one image.

    logits Q x (C+1), masks Q x h x w (logits), labels n (column indices < C),
    tgt_masks n x H x W (0/1), coords P x 2 points in [0, 1] (both masks read there).
    """
    prob = logits.float().softmax(-1)
    cost_class = -prob[:, labels]
    pts = coords[None]
    pred = point_sample(masks[:, None].float(), pts.expand(masks.shape[0], -1, -1))[:, 0]
    tgt = point_sample(tgt_masks[:, None].float(), pts.expand(tgt_masks.shape[0], -1, -1))[:, 0]
    return w_mask * pairwise_sigmoid_ce(pred, tgt) + w_class * cost_class + w_dice * pairwise_dice(pred, tgt)


def assign_pairs(targets: list[dict[str, Tensor]], num_points: int, coords: Tensor | None, device: torch.device,
                 cost_of: Callable[[int, Tensor], Tensor], on_host: bool = False) -> list[tuple[Tensor, Tensor]]:
    """The Hungarian assignment per item (image or clip): `cost_of(b, points)` -> Q x n costs
    at P x 2 points (fixed `coords`, else fresh uniform points per item, drawn in item order).
    An item without targets gets no pairs. The (query, target) index pairs are int64 on
    `device`, or on the host with `on_host` (for a caller that splits them by host data)."""
    out = []
    home = torch.device("cpu") if on_host else device
    for b, tgt in enumerate(targets):
        if tgt["labels"].numel() == 0:
            empty = torch.zeros(0, dtype=torch.long, device=home)
            out.append((empty, empty))
            continue
        pts = coords if coords is not None else torch.rand(num_points, 2, device=device)
        # scipy rejects NaN / inf; the loss of such a step is non-finite anyway and the
        # training loop skips it, so any assignment will do here.
        cost = torch.nan_to_num(cost_of(b, pts), nan=1e8, posinf=1e8, neginf=-1e8)
        rows, cols = linear_sum_assignment(cost.cpu().numpy())
        # Back to the device (or the host) without a blocking copy (on CUDA that would be another sync).
        out.append((host_to(torch.from_numpy(rows.astype(np.int64)), home),
                    host_to(torch.from_numpy(cols.astype(np.int64)), home)))
    return out


@torch.no_grad()
def hungarian_match(logits: Tensor, masks: Tensor, targets: list[dict[str, Tensor]], num_points: int,
                    w_class: float, w_mask: float, w_dice: float,
                    coords: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
    """Per image (query indices, target indices), both n long, min(Q, n) pairs.

    logits B x Q x (C+1), masks B x Q x h x w; targets[b] = {"labels": n, "masks": n x H x W}
    with labels already in column space. coords: fixed P x 2 points (tests); default fresh
    uniform points per image.
    """
    return assign_pairs(targets, num_points, coords, logits.device,
                        lambda b, pts: matching_cost(logits[b], masks[b], targets[b]["labels"], targets[b]["masks"],
                                                     pts, w_class, w_mask, w_dice))
