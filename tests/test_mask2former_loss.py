"""Matcher vs brute force, point losses vs dense losses, criterion on hand-built outputs,
RankSeg renumbering / pruning, targets from semantic and panoptic labels."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_m2f_cfg as tiny_cfg

from rankseg_core.losses import mask2former as crit_mod
from rankseg_core.losses.mask2former import Mask2FormerCriterion, column_targets, mask_losses
from rankseg_core.losses.matcher import hungarian_match, matching_cost
from rankseg_core.losses.points import point_sample, uncertain_points
from rankseg_core.losses.targets import ml_targets_from, targets_from_panoptic, targets_from_semantic
from rankseg_core.model.mask2former.model import Mask2FormerOutput


def pixel_centres(h: int, w: int) -> torch.Tensor:
    """Every pixel centre of an h x w map, row-major: (h*w) x 2 (x, y) in [0, 1]; sampling
    there with align_corners=False reads the map exactly."""
    y = (torch.arange(h, dtype=torch.float32) + 0.5) / h
    x = (torch.arange(w, dtype=torch.float32) + 0.5) / w
    yy, xx = torch.meshgrid(y, x, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], -1)


def dense_bce(logit: torch.Tensor, target: torch.Tensor) -> float:
    """Mean binary CE over all pixels, from the formula."""
    p = torch.sigmoid(logit.double())
    t = target.double()
    return float(-(t * p.clamp_min(1e-300).log() + (1 - t) * (1 - p).clamp_min(1e-300).log()).mean())


def dense_dice(logit: torch.Tensor, target: torch.Tensor) -> float:
    p, t = torch.sigmoid(logit.double()).flatten(), target.double().flatten()
    return float(1 - (2 * (p * t).sum() + 1) / (p.sum() + t.sum() + 1))


def test_point_sample_at_pixel_centres_reads_pixels() -> None:
    maps = torch.randn(2, 3, 4, 5)
    pts = pixel_centres(4, 5)[None].expand(2, -1, -1)
    torch.testing.assert_close(point_sample(maps, pts), maps.flatten(2))


@pytest.mark.parametrize("seed", range(4))
def test_matcher_equals_brute_force(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q, n, c, h, w = 5, 3, 4, 6, 7
    logits = torch.randn(1, q, c + 1, generator=g) * 2
    masks = torch.randn(1, q, h, w, generator=g) * 3
    labels = torch.randint(0, c, (n,), generator=g)
    tgt = torch.rand(n, h, w, generator=g) > 0.5
    w_class, w_mask, w_dice = 2.0, 5.0, 5.0
    # Independent dense cost: -prob of the class + mean pixel BCE + dice over all pixels.
    prob = logits[0].double().softmax(-1)
    cost = torch.zeros(q, n, dtype=torch.float64)
    for i in range(q):
        for j in range(n):
            cost[i, j] = (-w_class * prob[i, labels[j]] + w_mask * dense_bce(masks[0, i], tgt[j])
                          + w_dice * dense_dice(masks[0, i], tgt[j]))
    coords = pixel_centres(h, w)  # sampling every pixel centre = the dense cost
    got_cost = matching_cost(logits[0], masks[0], labels, tgt, coords, w_class, w_mask, w_dice)
    torch.testing.assert_close(got_cost.double(), cost, atol=1e-5, rtol=1e-5)
    (rows, cols), = hungarian_match(logits, masks, [{"labels": labels, "masks": tgt}], 0, w_class, w_mask, w_dice,
                                    coords=coords)
    assert len(set(rows.tolist())) == n and sorted(cols.tolist()) == list(range(n))
    best = min(sum(float(cost[perm[j], j]) for j in range(n)) for perm in itertools.permutations(range(q), n))
    assert sum(float(cost[r, c_]) for r, c_ in zip(rows.tolist(), cols.tolist())) == pytest.approx(best, abs=1e-6)


def test_matcher_empty_targets_and_nan() -> None:
    out = hungarian_match(torch.randn(1, 3, 4), torch.randn(1, 3, 4, 4),
                          [{"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 4, 4, dtype=torch.bool)}],
                          8, 2, 5, 5)
    assert out[0][0].numel() == 0
    bad = torch.full((1, 3, 4), float("nan"))
    target = {"labels": torch.tensor([1]), "masks": torch.ones(1, 4, 4, dtype=torch.bool)}
    rows, _ = hungarian_match(bad, torch.randn(1, 3, 4, 4), [target], 8, 2, 5, 5)[0]
    assert rows.numel() == 1  # no scipy error; the step's loss is non-finite and gets skipped


def test_point_mask_losses_equal_dense_with_every_pixel_sampled() -> None:
    torch.manual_seed(0)
    src = torch.randn(3, 5, 6) * 2
    tgt = torch.rand(3, 5, 6) > 0.4
    coords = pixel_centres(5, 6)[None].expand(3, -1, -1)
    ce, dice = mask_losses(src, tgt, coords, num_masks=2.0)
    assert float(ce) == pytest.approx(sum(dense_bce(src[i], tgt[i]) for i in range(3)) / 2, rel=1e-5)
    assert float(dice) == pytest.approx(sum(dense_dice(src[i], tgt[i]) for i in range(3)) / 2, rel=1e-5)


def test_uncertain_points_pick_the_most_uncertain_candidates() -> None:
    # logit = 8 * (x - 0.3): uncertainty -|logit| is highest near x = 0.3
    w = 64
    ramp = (8 * ((torch.arange(w) + 0.5) / w - 0.3)).expand(1, 1, 16, w).contiguous()
    g = torch.Generator().manual_seed(3)
    pts = uncertain_points(ramp, num_points=40, oversample_ratio=3.0, importance_ratio=0.75, generator=g)
    assert pts.shape == (1, 40, 2)
    g2 = torch.Generator().manual_seed(3)
    cand = torch.rand(1, 120, 2, generator=g2)
    unc = -point_sample(ramp, cand)[0, 0].abs()
    expected = cand[0, unc.argsort(descending=True)[:30]]
    torch.testing.assert_close(pts[0, :30], expected)
    fresh = torch.rand(1, 10, 2, generator=g2)  # then 10 uniform points from the same stream
    torch.testing.assert_close(pts[0, 30:], fresh[0])
    assert (pts[0, :30, 0] - 0.3).abs().max() < (cand[0, :, 0] - 0.3).abs().max()


def test_column_targets_renumber_and_drop() -> None:
    masks = torch.zeros(3, 2, 2, dtype=torch.bool)
    masks[0, 0, 0] = masks[1, 0, 1] = masks[2, 1, 1] = True
    tgt = [{"labels": torch.tensor([2, 7, 9]), "masks": masks}]
    out = column_targets(tgt, torch.tensor([[5, 2, 9]]), None, 10)[0]
    assert out["labels"].tolist() == [1, 2]  # class 2 -> column 1, class 9 -> column 2, class 7 dropped
    assert torch.equal(out["masks"], masks[[0, 2]])
    padded = column_targets(tgt, torch.tensor([[9, 2, 0]]), torch.tensor([[True, True, False]]), 10)[0]
    assert padded["labels"].tolist() == [1, 0]
    plain = column_targets([{"labels": torch.tensor([3, 12]), "masks": masks[:2]}], None, None, 10)[0]
    assert plain["labels"].tolist() == [3]


def _hand_output(k: int, logits: torch.Tensor, masks: torch.Tensor, topk=None, ml=None) -> Mask2FormerOutput:
    return Mask2FormerOutput(pred_logits=logits, pred_masks=masks, aux=[(logits, masks)], ml_logits=ml,
                             topk_index=topk, valid=None, image_size=(masks.shape[-2] * 4, masks.shape[-1] * 4),
                             num_classes=k)


def test_criterion_on_hand_built_case(monkeypatch) -> None:
    """Every pixel sampled: the criterion equals an independent dense computation."""
    monkeypatch.setattr(crit_mod, "uncertain_points",
                        lambda src, n, o, r: pixel_centres(*src.shape[-2:])[None].expand(src.shape[0], -1, -1))
    k = 3
    cfg = tiny_cfg(num_classes=k, head="segmenter")
    crit = Mask2FormerCriterion(cfg)
    # 3 queries at 1/4 resolution 2 x 2 (image 8 x 8). Query 0 draws the left column, query 1
    # the right one, query 2 nothing; classes: q0 -> 1, q1 -> 2, q2 -> no-object.
    masks = torch.tensor([[[6.0, -6.0], [6.0, -6.0]], [[-6.0, 6.0], [-6.0, 6.0]], [[-6.0, -6.0], [-6.0, -6.0]]])[None]
    logits = torch.tensor([[0.0, 4.0, 0.0, 0.0], [0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, 5.0]])[None]
    gt = torch.zeros(2, 8, 8, dtype=torch.bool)
    gt[0, :, :4] = True  # class 1 = left half
    gt[1, :, 4:] = True  # class 2 = right half
    out = _hand_output(k, logits, masks)
    res = crit(out, [{"labels": torch.tensor([1, 2]), "masks": gt}])
    # CE: targets (1, 2, no-object=3), weights (1, 1, 0.1): weighted mean.
    logp = logits[0].double().log_softmax(-1)
    w = torch.tensor([1.0, 1.0, 0.1], dtype=torch.float64)
    ce = float(-(w * torch.stack([logp[0, 1], logp[1, 2], logp[2, 3]])).sum() / w.sum())
    # Masks are compared at the 2 x 2 prediction grid's sampling of the (padded) 8 x 8 GT: the
    # sampled GT at the 2 x 2 pixel centres of the 8 x 8 map is that map's bilinear value there.
    pts = pixel_centres(2, 2)
    gt_pts = point_sample(gt[:, None].float(), pts[None].expand(2, -1, -1))[:, 0]
    bce = sum(float(F.binary_cross_entropy_with_logits(masks[0, i].flatten(), gt_pts[i])) for i in range(2)) / 2
    dice = sum(float(1 - (2 * (masks[0, i].flatten().sigmoid() * gt_pts[i]).sum() + 1)
                     / (masks[0, i].sigmoid().sum() + gt_pts[i].sum() + 1)) for i in range(2)) / 2
    assert float(res["ce"]) == pytest.approx(ce, rel=1e-5)
    assert float(res["mask"]) == pytest.approx(bce, rel=1e-5)
    assert float(res["dice"]) == pytest.approx(dice, rel=1e-5)
    # Two prediction steps (aux + last), official weights 2 / 5 / 5.
    assert float(res["loss"]) == pytest.approx(2 * (2 * ce + 5 * bce + 5 * dice), rel=1e-5)
    assert float(res["ml"]) == 0.0 and float(res["kept"]) == 1.0


def test_criterion_rankseg_drops_unselected_before_matching_and_adds_asl(monkeypatch) -> None:
    monkeypatch.setattr(crit_mod, "uncertain_points",
                        lambda src, n, o, r: pixel_centres(*src.shape[-2:])[None].expand(src.shape[0], -1, -1))
    torch.manual_seed(0)
    k = 6
    cfg = tiny_cfg(num_classes=k)
    crit = Mask2FormerCriterion(cfg)
    logits, masks = torch.randn(1, 4, 3), torch.randn(1, 4, 2, 2)  # columns: classes 4, 1 + no-object
    ml = torch.randn(1, k)
    out = _hand_output(k, logits, masks, topk=torch.tensor([[4, 1]]), ml=ml)
    gt = torch.zeros(3, 8, 8, dtype=torch.bool)
    gt[0, :4], gt[1, 4:, :4], gt[2, 4:, 4:] = True, True, True
    torch.manual_seed(1)  # the matcher's random points: same stream for both calls
    full = crit(out, [{"labels": torch.tensor([1, 3, 4]), "masks": gt}])
    torch.manual_seed(1)
    pruned = crit(_hand_output(k, logits, masks), [{"labels": torch.tensor([1, 0]), "masks": gt[[0, 2]]}])
    assert float(full["kept"]) == pytest.approx(2 / 3)
    for key in ("ce", "mask", "dice"):  # = class-3 segment never existed, labels renumbered (1 -> 1, 4 -> 0)
        assert float(full[key]) == pytest.approx(float(pruned[key]), rel=1e-6)
    # ASL(gamma- = 2, gamma+ = 0, clip 0.05) vs the image's GT classes {1, 3, 4} (not only the selected)
    y = torch.zeros(1, k)
    y[0, [1, 3, 4]] = 1
    p = ml.double().sigmoid()
    pm = (p - 0.05).clamp_min(0)
    asl = -(y * p.clamp_min(1e-5).log() + (1 - y) * pm.pow(2) * (1 - pm).clamp_min(1e-5).log()).mean()
    assert float(full["ml"]) == pytest.approx(float(asl), rel=1e-5)
    assert float(full["loss"]) == pytest.approx(float(pruned["loss"]) + 10 * float(asl), rel=1e-5)


def test_criterion_handles_images_without_segments_and_checks_sizes() -> None:
    cfg = tiny_cfg(num_classes=4, head="segmenter")
    crit = Mask2FormerCriterion(cfg)
    logits = torch.randn(2, 3, 5, requires_grad=True)
    masks = torch.randn(2, 3, 2, 2, requires_grad=True)
    out = _hand_output(4, logits, masks)
    empty = {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 8, 8, dtype=torch.bool)}
    res = crit(out, [empty, empty])
    res["loss"].backward()
    assert torch.isfinite(res["loss"]) and float(res["mask"]) == 0.0
    with pytest.raises(ValueError, match="target masks"):
        crit(out, [empty, {"labels": torch.tensor([1]), "masks": torch.ones(1, 6, 8, dtype=torch.bool)}])
    with pytest.raises(ValueError, match="target dicts"):
        crit(out, [empty])


def test_criterion_pads_targets_to_the_padded_input() -> None:
    cfg = tiny_cfg(num_classes=4, head="segmenter")
    out = Mask2FormerOutput(pred_logits=torch.randn(1, 3, 5), pred_masks=torch.randn(1, 3, 4, 4), aux=[],
                            ml_logits=None, topk_index=None, valid=None, image_size=(10, 13), num_classes=4)
    res = Mask2FormerCriterion(cfg)(out, [{"labels": torch.tensor([2]), "masks": torch.ones(1, 10, 13, dtype=torch.bool)}])
    assert torch.isfinite(res["loss"])


def test_targets_from_semantic() -> None:
    lab = torch.tensor([[3, 3, 255], [0, 3, 12]])
    t = targets_from_semantic(lab, num_classes=10, ignore=255)
    assert t["labels"].tolist() == [0, 3]
    assert t["masks"].tolist() == [[[False, False, False], [True, False, False]],
                                   [[True, True, False], [False, True, False]]]
    empty = targets_from_semantic(torch.full((2, 2), 255), 10, 255)
    assert empty["labels"].numel() == 0 and empty["masks"].shape == (0, 2, 2)


def test_targets_from_panoptic_skips_crowd_and_empty() -> None:
    seg = np.array([[1, 1, 2], [3, 3, 0]], dtype=np.uint16)
    info = [{"id": 11, "category": 4, "iscrowd": 0, "area": 2}, {"id": 12, "category": 4, "iscrowd": 1, "area": 1},
            {"id": 13, "category": 1, "iscrowd": 0, "area": 2}, {"id": 14, "category": 2, "iscrowd": 0, "area": 0}]
    t = targets_from_panoptic(seg, info, num_classes=5)
    assert t["labels"].tolist() == [4, 1]  # crowd (record 2) and the pixel-less record 4 left out
    assert t["masks"].tolist() == [[[True, True, False], [False, False, False]],
                                   [[False, False, False], [True, True, False]]]
    with pytest.raises(ValueError, match="category 7"):
        targets_from_panoptic(seg, [{"id": 1, "category": 7, "iscrowd": 0, "area": 2}], num_classes=5)
    assert targets_from_panoptic(torch.zeros(2, 2, dtype=torch.long), [], 5)["labels"].numel() == 0


def test_ml_targets_and_gt_classes() -> None:
    tg = [{"labels": torch.tensor([4, 1, 4])}, {"labels": torch.zeros(0, dtype=torch.long)}]
    y = ml_targets_from(tg, 6)
    assert y.tolist() == [[0, 1, 0, 0, 1, 0], [0] * 6]
    assert math.isclose(float(y.sum()), 2.0)
