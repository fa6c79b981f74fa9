"""Video Mask2Former set losses (+ clip-level RankSeg), as the official VideoSetCriterion.

A target is a TRACK of a clip: one class and a T-frame mask (empty in frames where the track
is absent). Per prediction step:
- matching (VideoHungarianMatcher): cost = w_class * (-softmax prob of the GT class) +
  w_mask * mean sigmoid CE + w_dice * dice, the mask costs over the T x P values read at the
  SAME P uniform random points in every frame of the clip (one point set per clip, shared by
  all queries and tracks);
- ce: as the image criterion (unmatched queries -> no-object, weight `no_object_weight`);
- mask / dice: every matched (query, track) pair gives T frame masks; each frame mask gets its
  own importance-sampled points (the official code flattens N x T to N*T masks), sigmoid CE
  (mean over points) and dice are summed over the N*T frame masks and divided by the number of
  TRACKS in the batch (not N*T), as the official normaliser.
RankSeg: tracks are renumbered to their class's column of the clip's selection and tracks
whose class is not selected are dropped before matching (the fork's video criterion); the ml
target is the union of the clip's classes (`ml_targets_from` over clip targets).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rankseg_core.losses.mask2former import Mask2FormerCriterion
from rankseg_core.losses.matcher import assign_pairs, pairwise_dice, pairwise_sigmoid_ce
from rankseg_core.losses.points import point_sample
from rankseg_core.losses.targets import semantic_targets
from rankseg_core.model.mask2former.model import Mask2FormerOutput


def clip_semantic_targets(labels: Tensor, clip_len: int, num_classes: int, ignore: int) -> list[dict[str, Tensor]]:
    """(B*T) x H x W class ids of B clips of T frames (clip-major) -> per clip {"labels": n long
    (sorted), "masks": n x T x H x W bool} on labels' device.

    One target per class present in ANY frame (the fork's VSPW mapper: the union of the clip's
    classes), its mask per frame (empty in frames without the class). Values outside [0, K)
    and `ignore` are no target. A clip's frames stacked into one (T*H) x W map are an image to
    `semantic_targets`: one host copy of a presence table for the batch.
    """
    h, w = labels.shape[-2:]
    stacked = torch.as_tensor(labels).reshape(-1, clip_len * h, w)
    return [{"labels": t["labels"], "masks": t["masks"].view(len(t["labels"]), clip_len, h, w)}
            for t in semantic_targets(stacked, num_classes, ignore)]


def clip_targets_from_semantic(labels: Tensor, num_classes: int, ignore: int) -> dict[str, Tensor]:
    """T x H x W class ids of one clip -> {"labels": n long (sorted), "masks": n x T x H x W bool}
    (`clip_semantic_targets` of a batch of one clip)."""
    return clip_semantic_targets(labels, labels.shape[0], num_classes, ignore)[0]


def clip_targets_from_tracks(frames: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """Per-frame instances of one clip -> per-track clip targets.

    frames: T dicts {"labels": n_t class ids, "masks": n_t x H x W bool, "ids": n_t track ids}.
    Returns {"labels": n, "masks": n x T x H x W bool, "ids": n}, tracks in increasing id,
    a frame where the track is absent all False (the official prepare_targets). Tracks with no
    pixel in any frame are dropped (as the image targets drop empty segments). ValueError for a
    track whose class changes between frames.
    """
    if not frames:
        raise ValueError("a clip needs at least one frame")
    h, w = frames[0]["masks"].shape[-2:]
    ids = torch.unique(torch.cat([f["ids"].long().flatten().cpu() for f in frames]))
    n, t = int(ids.numel()), len(frames)
    masks = torch.zeros(n, t, h, w, dtype=torch.bool)
    labels = torch.full((n,), -1, dtype=torch.long)
    for fi, f in enumerate(frames):
        for j, (tid, lab) in enumerate(zip(f["ids"].long().tolist(), f["labels"].long().tolist(), strict=True)):
            k = int(torch.searchsorted(ids, torch.tensor(tid)))
            if labels[k] >= 0 and labels[k] != lab:
                raise ValueError(f"track {tid} is class {int(labels[k])} in one frame and {lab} in frame {fi}")
            labels[k] = lab
            masks[k, fi] |= f["masks"][j].bool().cpu()
    has = masks.flatten(1).any(1)
    return {"labels": labels[has], "masks": masks[has], "ids": ids[has]}


def video_matching_cost(logits: Tensor, masks: Tensor, labels: Tensor, tgt_masks: Tensor, coords: Tensor,
                        w_class: float, w_mask: float, w_dice: float) -> Tensor:
    """Cost matrix Q x n for one clip.

    logits Q x (C+1), masks Q x T x h x w (logits), labels n (columns < C), tgt_masks
    n x T x H x W (0/1), coords P x 2 in [0, 1]: the same points are read in every frame, and
    both mask costs run over the T*P values of a mask.
    """
    cost_class = -logits.float().softmax(-1)[:, labels]
    pts = coords[None]
    pred = point_sample(masks.float(), pts.expand(masks.shape[0], -1, -1)).flatten(1)  # Q x (T*P)
    tgt = point_sample(tgt_masks.float(), pts.expand(tgt_masks.shape[0], -1, -1)).flatten(1)
    return w_mask * pairwise_sigmoid_ce(pred, tgt) + w_class * cost_class + w_dice * pairwise_dice(pred, tgt)


@torch.no_grad()
def video_hungarian_match(logits: Tensor, masks: Tensor, targets: list[dict[str, Tensor]], num_points: int,
                          w_class: float, w_mask: float, w_dice: float,
                          coords: Tensor | None = None) -> list[tuple[Tensor, Tensor]]:
    """Per clip (query indices, target indices), min(Q, n) pairs.

    logits B x Q x (C+1), masks B x Q x T x h x w; targets[b] = {"labels": n (columns),
    "masks": n x T x H x W}. coords: fixed P x 2 points (tests); default fresh uniform points
    per clip, shared by its T frames.
    """
    return assign_pairs(targets, num_points, coords, logits.device,
                        lambda b, pts: video_matching_cost(logits[b], masks[b], targets[b]["labels"],
                                                           targets[b]["masks"], pts, w_class, w_mask, w_dice))


class VideoMask2FormerCriterion(Mask2FormerCriterion):
    """`crit(out, targets, ml_targets) -> {"loss", "ce", "mask", "dice", "ml", "kept"}` for clips.

    out: a VideoMask2FormerOutput (pred_masks B x Q x T x h x w); targets: per CLIP
    {"labels": n long class ids, "masks": n x T x H x W bool} at the input size before padding
    (`clip_targets_from_semantic` / `clip_targets_from_tracks`); ml_targets: B x K clip-level
    targets, None = the union of each clip's target classes. The rest (padding, RankSeg
    renumbering and dropping, deep supervision, weights, the ml loss, `kept`) is the image
    criterion's.
    """

    def _match(self, logits: Tensor, masks: Tensor, targets: list[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """Clips matched on their T-frame masks at points shared by the T frames."""
        m = self.m
        return video_hungarian_match(logits, masks, targets, m.train_num_points, m.class_weight,
                                     m.mask_weight, m.dice_weight)

    @staticmethod
    def _frame_masks(src: Tensor, tgt: Tensor) -> tuple[Tensor, Tensor]:
        # N x T x h x w -> N*T frame masks, each with its own importance-sampled points (the
        # official flattening); the normaliser stays the number of tracks.
        return src.flatten(0, 1), tgt.flatten(0, 1)

    def __call__(self, out: Mask2FormerOutput, targets: list[dict[str, Tensor]],
                 ml_targets: Tensor | None = None) -> dict[str, Tensor]:
        if out.pred_masks.dim() != 5:
            raise ValueError(f"pred_masks {tuple(out.pred_masks.shape)}: a clip output is B x Q x T x h x w")
        t = out.pred_masks.shape[2]
        for i, tg in enumerate(targets):
            if tg["masks"].dim() != 4 or tg["masks"].shape[1] != t:
                raise ValueError(f"clip {i}: target masks {tuple(tg['masks'].shape)}, expected n x {t} x H x W")
        return super().__call__(out, targets, ml_targets)
