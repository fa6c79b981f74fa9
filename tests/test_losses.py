"""Losses against independent references (timm's ASL, hand-computed CE) and remap semantics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from rankseg_core.config.model import ModelConfig
from rankseg_core.families.segmenter import SEGMENTER
from rankseg_core.losses.rankseg import (
    PAD_LOGIT,
    RankSegCriterion,
    asymmetric_loss,
    bce_loss,
    clip_targets,
    ml_loss_fn,
    ml_targets,
    present_classes,
    rank_targets,
    seg_loss,
    selection_stats,
)
from rankseg_core.model.heads import SegOutput
from rankseg_core.model.selection import Selection

IGN = 255


def test_ml_targets_from_labels() -> None:
    labels = torch.tensor([[[0, 0, 3], [IGN, 3, 1]], [[IGN, IGN, IGN], [IGN, 2, 2]]])
    y = ml_targets(labels, num_classes=5, ignore_index=IGN)
    assert y.tolist() == [[1, 1, 0, 1, 0], [0, 0, 1, 0, 0]]
    assert [c.tolist() for c in present_classes(labels, 5, IGN)] == [[0, 1, 3], [2]]
    assert clip_targets(y, 2).tolist() == [[1, 1, 1, 1, 0]]


def test_ml_targets_large_ignore_value_and_many_classes() -> None:
    labels = torch.tensor([[[65535, 300], [299, 0]]])
    y = ml_targets(labels, num_classes=1284, ignore_index=65535)
    assert y.sum() == 3 and y[0, 300] == 1 and y[0, 299] == 1


@pytest.mark.parametrize("seed", [0, 1])
def test_asl_matches_timm_divided_by_bk(seed: int) -> None:
    from timm.loss import AsymmetricLossMultiLabel

    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, 9, generator=g) * 4
    targets = (torch.rand(4, 9, generator=g) > 0.6).float()
    ref_loss = AsymmetricLossMultiLabel(gamma_neg=2, gamma_pos=0, clip=0.05, eps=1e-5, reduction="sum")
    ours = asymmetric_loss(logits, targets)
    torch.testing.assert_close(ours, ref_loss(logits, targets) / targets.numel())

    # gradients agree too (timm keeps the focusing weights in the graph by default)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    asymmetric_loss(a, targets).backward()
    (ref_loss(b, targets) / targets.numel()).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_asl_hand_value() -> None:
    # one positive with p = 0.5 and one negative with p = 0.5: p_m = 0.45
    loss = asymmetric_loss(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))
    expected = -(math.log(0.5) + 0.45**2 * math.log(0.55)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_bce_is_mean_bce_with_logits() -> None:
    x, y = torch.randn(3, 5), (torch.rand(3, 5) > 0.5).float()
    torch.testing.assert_close(bce_loss(x, y), F.binary_cross_entropy_with_logits(x, y))


def test_rank_targets_remap_and_ignore() -> None:
    labels = torch.tensor([[[4, 7, 2], [IGN, 4, 9]], [[1, 1, 3], [3, 0, 300]]])
    topk = torch.tensor([[7, 4, 1], [3, 0, 8]])
    out = rank_targets(labels, topk, num_classes=10, ignore_index=IGN)
    assert out.tolist() == [[[1, 0, IGN], [IGN, 1, IGN]], [[IGN, IGN, 0], [0, 1, IGN]]]
    # padding channels are not targets
    valid = torch.tensor([[True, True, False], [True, False, False]])
    out = rank_targets(labels, topk, num_classes=10, ignore_index=IGN, valid=valid)
    assert out.tolist() == [[[1, 0, IGN], [IGN, 1, IGN]], [[IGN, IGN, 0], [0, IGN, IGN]]]


def _hand_ce(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, int]:
    total, n = 0.0, 0
    b, c, h, w = logits.shape
    for i in range(b):
        for y in range(h):
            for x in range(w):
                t = int(targets[i, y, x])
                if t == IGN:
                    continue
                z = logits[i, :, y, x].tolist()
                total += -z[t] + math.log(sum(math.exp(v) for v in z))
                n += 1
    return total, n


def test_seg_loss_normalisations_by_hand() -> None:
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 2, 3)
    targets = torch.tensor([[[0, 1, IGN], [2, IGN, 1]], [[IGN, IGN, IGN], [0, 0, 2]]])
    total, n = _hand_ce(logits, targets)
    assert seg_loss(logits, targets, IGN, "official").item() == pytest.approx(total / targets.numel(), rel=1e-5)
    assert seg_loss(logits, targets, IGN, "valid").item() == pytest.approx(total / n, rel=1e-5)


def test_seg_loss_padding_channels_get_no_probability() -> None:
    logits = torch.tensor([[[[0.0]], [[5.0]], [[3.0]]]])  # 1 x 3 x 1 x 1, channel 1 is padding
    targets = torch.tensor([[[0]]])
    valid = torch.tensor([[True, False, True]])
    expected = -(0.0 - math.log(math.exp(0.0) + math.exp(3.0)))
    assert seg_loss(logits, targets, IGN, "valid", valid).item() == pytest.approx(expected, rel=1e-6)
    assert PAD_LOGIT < -1e3


def test_seg_loss_all_ignored_is_zero_not_nan() -> None:
    logits = torch.randn(1, 3, 2, 2, requires_grad=True)
    targets = torch.full((1, 2, 2), IGN)
    for norm in ("official", "valid"):
        loss = seg_loss(logits, targets, IGN, norm)
        assert loss.item() == 0.0
        loss.backward()


def test_selection_stats_by_hand() -> None:
    # image 0: classes 1 (3 px), 2 (1 px); selection {1, 5} -> coverage 3/4, recall 1/2, precision 1/2
    labels = torch.tensor([[[1, 1, 1, 2]]])
    s = selection_stats(labels, torch.tensor([[1, 5]]), num_classes=6, ignore_index=IGN)
    assert s["coverage"].item() == pytest.approx(0.75)
    assert s["recall"].item() == pytest.approx(0.5)
    assert s["precision"].item() == pytest.approx(0.5)
    # padding does not count as selected
    s = selection_stats(labels, torch.tensor([[1, 2]]), 6, IGN, valid=torch.tensor([[True, False]]))
    assert s["precision"].item() == pytest.approx(1.0) and s["coverage"].item() == pytest.approx(0.75)


def test_criterion_on_fake_output_matches_parts() -> None:
    torch.manual_seed(0)
    labels = torch.randint(0, 6, (2, 8, 8))
    labels[0, :2] = IGN
    out = SegOutput(mask_logits=torch.randn(2, 3, 4, 4, requires_grad=True),
                    topk_index=torch.tensor([[0, 1, 2], [5, 4, 3]]), ml_logits=torch.randn(2, 6, requires_grad=True))
    crit = RankSegCriterion(num_classes=6, ignore_index=IGN, ml_weight=10.0)
    res = crit(out, labels)
    up = F.interpolate(out.mask_logits, size=(8, 8), mode="bilinear", align_corners=False)
    seg = seg_loss(up, rank_targets(labels, out.topk_index, 6, IGN), IGN)
    ml = asymmetric_loss(out.ml_logits, ml_targets(labels, 6, IGN))
    torch.testing.assert_close(res["loss"], seg + 10.0 * ml)
    assert set(res) == {"loss", "seg", "ml", "coverage", "recall", "precision"}
    res["loss"].backward()
    assert out.ml_logits.grad is not None


@pytest.mark.parametrize("kw", [dict(), dict(head="segmenter"), dict(select=False), dict(oracle=True, kappa=8),
                                dict(clip_len=2), dict(ml_head="gap")])
def test_criterion_end_to_end_gradients(kw: dict) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(**{"img_size": 32, "num_classes": 8, "kappa": 3, **kw})
    model = SEGMENTER.build(cfg).train()
    labels = torch.randint(0, 8, (2, 32, 32))
    labels[:, :4] = IGN
    out = model(torch.randn(2, 3, 32, 32), Selection(gt_classes=present_classes(labels, 8, IGN)))
    res = RankSegCriterion(num_classes=8, ignore_index=IGN, clip_len=cfg.clip_len)(out, labels)
    assert all(torch.isfinite(v) for v in res.values())
    res["loss"].backward()
    assert model.head.mask_norm.weight.grad is not None
    if kw.get("oracle"):
        assert res["coverage"].item() == pytest.approx(1.0)


def test_criterion_bad_option_is_user_error() -> None:
    from rankseg_core.errors import UserError

    with pytest.raises(UserError):
        RankSegCriterion(num_classes=3, ml_loss="focal")
    with pytest.raises(UserError):
        RankSegCriterion(num_classes=3, seg_loss_norm="batch")


def official_asl(x: torch.Tensor, y: torch.Tensor, gamma_neg: float, gamma_pos: float, clip: float,
                 eps: float = 1e-5) -> torch.Tensor:
    """The RankSeg fork's AsymmetricLoss (mmseg/models/losses/bce_loss.py), re-typed."""
    targets, anti_targets = y, 1 - y
    xs_pos = torch.sigmoid(x)
    xs_neg = 1.0 - xs_pos
    if clip is not None and clip > 0:
        xs_neg = (xs_neg + clip).clamp(max=1)
    loss = targets * torch.log(xs_pos.clamp(min=eps))
    loss = loss + anti_targets * torch.log(xs_neg.clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        pt = xs_pos * targets + xs_neg * anti_targets
        loss = loss * torch.pow(1 - pt, gamma_pos * targets + gamma_neg * anti_targets)
    return -loss.sum() / x.size(0) / y.size(1)


@pytest.mark.parametrize("gamma_neg, gamma_pos, clip", [(2, 0, 0.05), (0, 0, 0.05), (4, 1, 0.05), (1, 2, 0.0),
                                                        (0, 0, 0.0)])
def test_asl_matches_the_official_loss_for_any_gamma(gamma_neg: float, gamma_pos: float, clip: float) -> None:
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 11, generator=g) * 3
    targets = (torch.rand(3, 11, generator=g) > 0.5).float()
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    ours = asymmetric_loss(a, targets, gamma_neg, gamma_pos, clip)
    ref = official_asl(b, targets, gamma_neg, gamma_pos, clip)
    torch.testing.assert_close(ours, ref)
    ours.backward()
    ref.backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_criterion_uses_the_configured_asl_gammas() -> None:
    """TranDec / GAP configs: ASL with gamma- = gamma+ = 0 (still clipped), not BCE."""
    torch.manual_seed(0)
    labels = torch.randint(0, 6, (2, 8, 8))  # classes 6..11 absent: negatives
    out = SegOutput(mask_logits=torch.randn(2, 3, 4, 4), topk_index=torch.tensor([[0, 1, 2], [5, 4, 3]]),
                    ml_logits=torch.randn(2, 12) * 3)
    y = ml_targets(labels, 12, IGN)
    res = RankSegCriterion(num_classes=12, ignore_index=IGN, asl_gamma_neg=0.0, asl_gamma_pos=0.0)(out, labels)
    torch.testing.assert_close(res["ml"], official_asl(out.ml_logits, y, 0, 0, 0.05))
    assert not torch.allclose(res["ml"], official_asl(out.ml_logits, y, 2, 0, 0.05))
    res = RankSegCriterion(num_classes=12, ignore_index=IGN, asl_gamma_neg=3.0, asl_gamma_pos=1.0, asl_clip=0.1)(out, labels)
    torch.testing.assert_close(res["ml"], official_asl(out.ml_logits, y, 3, 1, 0.1))
    from rankseg_core.errors import UserError

    with pytest.raises(UserError, match="asl_gamma_neg"):
        RankSegCriterion(num_classes=3, asl_gamma_neg=None)


def test_ml_loss_fn_from_a_loss_config() -> None:
    from rankseg_core.config.train import LossConfig
    from rankseg_core.errors import UserError

    x, y = torch.randn(2, 9) * 2, (torch.rand(2, 9) > 0.5).float()
    fn = ml_loss_fn(LossConfig(ml_loss="asl", asl_gamma_neg=0.0, asl_gamma_pos=1.0, asl_clip=0.1))
    torch.testing.assert_close(fn(x, y), official_asl(x, y, 0, 1, 0.1))
    assert ml_loss_fn(LossConfig(ml_loss="bce")) is bce_loss
    with pytest.raises(UserError, match="asl_gamma_neg=None"):
        ml_loss_fn(LossConfig(ml_loss="asl"))  # unresolved
    with pytest.raises(UserError, match="use one of asl, bce"):
        ml_loss_fn(LossConfig(ml_loss="focal"))
