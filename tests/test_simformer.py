"""SimFormer on the MaskFormer / Mask2Former family (issue 21 part C): each loss against a hand
computation or a loop re-implementation of the official semantics, the hiding of novel pixels
end to end, a tiny training step, the config switches, and a weak-shot run through the CLI."""

from __future__ import annotations

import collections
import copy
import dataclasses
import itertools
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_MASK2FORMER_RUN, tiny_m2f_cfg, train_resume_eval_predict

from rankseg_core.config.mask2former import Mask2FormerConfig, MaskFormerConfig, SimFormerConfig
from rankseg_core.config.model import ModelConfig
from rankseg_core.data.augment import TrainTransform
from rankseg_core.data.weak_shot import hide_novel, novel_table
from rankseg_core.engine.configure import build_train_config
from rankseg_core.errors import UserError
from rankseg_core.families.mask2former import MASK2FORMER
from rankseg_core.losses.mask2former import Mask2FormerCriterion
from rankseg_core.losses.maskformer import MaskFormerCriterion
from rankseg_core.losses.points import point_sample, uncertain_points
from rankseg_core.losses.simformer import (
    SimFormerCriterion,
    base_pair_loss,
    complementary_dense,
    complementary_points,
    distill_map,
    loader_padding,
    novel_scores_at,
    pair_partners,
    pixel_pair_losses,
    sample_region_points,
    weak_shot_match,
    weak_shot_targets,
)
from rankseg_core.model.mask2former.model import Mask2FormerOutput
from rankseg_core.model.mask2former.simformer import PairBalance, PairSimilarityNet, SimFormerModel, SimFormerOutput
from rankseg_core.shards.codec import IGNORE

IGN = -2.9444  # the official fixed ignore logit
CROSS = SimFormerConfig(pixel_pairs="cross", distill_weight=0.5, distill_func="cce", points=20)  # J small: CPU


def maskformer_cfg(head: str = "segmenter", num_classes: int = 10, kappa: int = 4,
                   sim: SimFormerConfig = CROSS) -> ModelConfig:
    m2f = Mask2FormerConfig(hidden_dim=32, conv_dim=32, mask_dim=32, nheads=4, num_queries=6, dim_feedforward=64,
                            enc_layers=1, ml_hidden_dim=32, ml_query_layer=2, freeze_bn=False,
                            maskformer=MaskFormerConfig(dec_layers=2), simformer=sim)
    return ModelConfig(model="maskformer-r50", num_classes=num_classes, kappa=kappa, head=head, img_size=64,
                       mask2former=m2f)


def mask2former_cfg(head: str = "segmenter", sim: SimFormerConfig = CROSS) -> ModelConfig:
    return tiny_m2f_cfg(head=head, kappa=6, m2f={"simformer": sim, "freeze_bn": False, "dec_layers": 2})


# ---------------------------------------------------------------------------------------
# Hand computations (plain Python floats)


def sig(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def focal(m: float, t: float) -> float:
    """RetinaNet's focal loss of one logit (alpha 0.25, gamma 2)."""
    p = sig(m)
    ce = -(t * math.log(p) + (1 - t) * math.log(1 - p))
    p_t = p * t + (1 - p) * (1 - t)
    return (0.25 * t + 0.75 * (1 - t)) * ce * (1 - p_t) ** 2


def dice(ps: list[float], ts: list[float]) -> float:
    return 1 - (2 * sum(p * t for p, t in zip(ps, ts)) + 1) / (sum(ps) + sum(ts) + 1)


# ---------------------------------------------------------------------------------------
# Targets, padding, matching


def test_weak_shot_targets_base_with_masks_then_novel_without() -> None:
    lab = torch.tensor([[0, 0, 2], [IGNORE, 2, 2]])
    novel = torch.zeros(5, dtype=torch.bool)
    novel[[1, 4]] = True
    y = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0])  # novel 4 present (hidden), novel 1 absent
    lab2 = torch.tensor([[3, 3, IGNORE], [IGNORE, IGNORE, IGNORE]])  # image 2: base 3 alone, novel 1 in its labels
    y2 = torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0])
    ws = weak_shot_targets(torch.stack([lab, lab2]), torch.stack([y, y2]), novel)
    t, t2 = ws.targets
    assert t["labels"].tolist() == [0, 2, 4]
    assert t["masks"][0].tolist() == [[True, True, False], [False, False, False]]
    assert t["masks"][1].tolist() == [[False, False, True], [False, True, True]]
    assert not t["masks"][2].any()
    assert t["has"].tolist() == [True, True, False] and t["has"].device.type == "cpu"
    assert t2["labels"].tolist() == [3, 1] and t2["has"].tolist() == [True, False]
    assert t2["masks"][0].tolist() == [[True, True, False], [False, False, False]] and not t2["masks"][1].any()
    assert ws.base == [{0, 2}, {3}] and ws.novel == [{4}, {1}]
    # The guard: a novel class with pixels in the label means the loader did not hide it.
    with pytest.raises(ValueError, match="novel class 4"):
        weak_shot_targets(torch.tensor([[[0, 4]]]), y[None], novel)


def test_loader_padding_is_the_transforms_padding() -> None:
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    label = rng.integers(0, 5, (20, 30)).astype(np.uint16)  # no ignore: padding is the only ignore
    tf = TrainTransform(crop=48, mean=np.array([123.675, 116.28, 103.53]), std=np.array([58.4, 57.1, 57.4]),
                        scale=(40, 20), ratio_range=(1.0, 1.0), photometric=False)
    img, lab = tf([image], [label], np.random.default_rng(1))
    pad = loader_padding(torch.from_numpy(img))
    assert pad.shape == (1, 48, 48) and bool(pad.any()) and bool((~pad).any())
    assert torch.equal(pad, torch.from_numpy(lab == IGNORE))


def _focal_mean(q: torch.Tensor, t: torch.Tensor) -> float:
    return sum(focal(float(a), float(b)) for a, b in zip(q.flatten(), t.flatten())) / q.numel()


@pytest.mark.parametrize("family", ["maskformer", "mask2former"])
def test_novel_targets_are_matched_by_class_cost_only(family: str) -> None:
    """The assignment is the minimum-cost one of a cost written out here (brute force over all
    injective maps): base targets the family's class + mask + dice cost, novel targets the
    class cost alone."""
    torch.manual_seed(3)
    q, k = 5, 4
    logits = torch.randn(1, q, k + 1) * 2
    if family == "maskformer":
        crit: Mask2FormerCriterion = MaskFormerCriterion(maskformer_cfg(num_classes=k))
        masks = torch.randn(1, q, 2, 2) * 2
        tgt = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    else:  # Mask2Former reads random points: uniform maps make the point costs exact
        crit = Mask2FormerCriterion(mask2former_cfg())
        masks = (torch.randn(1, q, 1, 1) * 2).expand(1, q, 2, 2).contiguous()
        tgt = torch.ones(2, 2)
    targets = [{"labels": torch.tensor([2, 1, 3]), "masks": torch.stack([tgt > 0, torch.zeros(2, 2) > 0,
                                                                          torch.zeros(2, 2) > 0]),
                "has": torch.tensor([True, False, False])}]
    (rows, cols), = weak_shot_match(crit, logits, masks, targets)
    m = crit.m
    prob = logits[0].softmax(-1)

    def cost(i: int, j: int) -> float:
        c = -m.class_weight * float(prob[i, targets[0]["labels"][j]])
        if j == 0:
            ps = [sig(float(v)) for v in masks[0, i].flatten()]
            ts = [float(v) for v in tgt.flatten()]
            if family == "maskformer":
                mask_cost = _focal_mean(masks[0, i], tgt)
            else:
                mask_cost = sum(-(t * math.log(p) + (1 - t) * math.log(1 - p)) for p, t in zip(ps, ts)) / len(ps)
                ps, ts = ps[:1] * m.train_num_points, ts[:1] * m.train_num_points  # every point reads the same
            c += m.mask_weight * mask_cost + m.dice_weight * dice(ps, ts)
        return c

    best = min(itertools.permutations(range(q), 3), key=lambda p: sum(cost(p[j], j) for j in range(3)))
    got = {int(c): int(r) for r, c in zip(rows, cols)}
    assert [got[j] for j in range(3)] == list(best)
    # The novel columns do not read the masks: another mask for every query changes nothing there.
    (rows2, cols2), = weak_shot_match(crit, logits, torch.zeros_like(masks), [
        {key: v[1:] for key, v in targets[0].items()}])
    novel_best = min(itertools.permutations(range(q), 2),
                     key=lambda p: -float(prob[p[0], 1]) - float(prob[p[1], 3]))
    assert {int(c): int(r) for r, c in zip(rows2, cols2)} == {0: novel_best[0], 1: novel_best[1]}


# ---------------------------------------------------------------------------------------
# The complementary loss


def test_complementary_dense_by_hand() -> None:
    torch.manual_seed(0)
    props = torch.randn(2, 3, 3) * 3  # image 0: two matched novel queries
    target = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]], dtype=torch.bool)
    notbase = torch.stack([target, torch.ones(3, 3, dtype=torch.bool)])
    got = complementary_dense([props, torch.zeros(0, 3, 3)], notbase, mask_weight=20.0, dice_weight=1.0)
    m = [max(float(props[0].flatten()[i]), float(props[1].flatten()[i]), IGN) for i in range(9)]
    t = [float(v) for v in target.flatten()]
    want = 20 * sum(focal(a, b) for a, b in zip(m, t)) / 9 + dice([sig(a) for a in m], t)
    assert float(got) == pytest.approx(want, rel=1e-5)  # image 1 (no novel query) is not scored
    # The ignore logit floors the max: all-very-negative proposals score exactly the floor.
    low = complementary_dense([torch.full((1, 3, 3), -20.0)], target[None], 20.0, 1.0)
    floor = [IGN] * 9
    assert float(low) == pytest.approx(20 * sum(focal(a, b) for a, b in zip(floor, t)) / 9
                                       + dice([sig(a) for a in floor], t), rel=1e-5)
    assert float(complementary_dense([torch.zeros(0, 3, 3)], target[None], 20.0, 1.0)) == 0.0


def test_complementary_points_by_hand() -> None:
    """Mask2Former's variant: the points are re-drawn here as the loss draws them (uncertainty of
    the low-resolution max map); max, BCE and dice at those points by hand."""
    torch.manual_seed(0)
    props = torch.randn(2, 4, 4) * 3
    notbase = torch.zeros(2, 8, 8)
    notbase[0, :5, :3] = 1
    torch.manual_seed(5)
    got = complementary_points([props, torch.zeros(0, 4, 4)], notbase, num_points=50, oversample=3.0,
                               importance=0.75, mask_weight=5.0, dice_weight=5.0)
    torch.manual_seed(5)
    coords = uncertain_points(props.amax(0).clamp_min(IGN)[None, None], 50, 3.0, 0.75)
    vals = point_sample(props[:, None], coords.expand(2, -1, -1))[:, 0]
    tgt = [float(v) for v in point_sample(notbase[0][None, None], coords)[0, 0]]
    m = [max(float(vals[0, i]), float(vals[1, i]), IGN) for i in range(50)]
    bce = sum(-(t * math.log(sig(a)) + (1 - t) * math.log(1 - sig(a))) for a, t in zip(m, tgt)) / 50
    assert float(got) == pytest.approx(5 * bce + 5 * dice([sig(a) for a in m], tgt), rel=1e-5)


# ---------------------------------------------------------------------------------------
# Pixel-pixel pieces


def test_sample_region_points_official_rule() -> None:
    torch.manual_seed(0)
    region = torch.zeros(2, 30, dtype=torch.bool)
    region[0, 3:20] = True  # 17 >= 10: all from the region
    region[1, [2, 5, 7]] = True  # 3 < 10: all three, then others
    pts = sample_region_points(region, 10)
    assert pts.shape == (2, 10)
    assert all(len(set(p.tolist())) == 10 for p in pts)
    assert bool(region[0, pts[0]].all())
    assert {2, 5, 7} <= set(pts[1].tolist()) and int(region[1, pts[1]].sum()) == 3
    assert sample_region_points(region, 99).shape == (2, 30)  # capped at the map size


def test_pair_partners_prefer_one_shared_novel_class() -> None:
    base = [{0}, {1}, {0}, {2}]
    novel = [{5, 6}, {7}, {5, 6}, {5}]
    # 0 shares one novel class (5) with 3, two with 2: it takes 3; then 1 and 2 pair.
    assert pair_partners(base, novel, "cross") == [3, 2, 1, 0]
    assert pair_partners(base, [set()] * 4, "cross") == [2, 3, 0, 1]  # no novel: a shared base class
    assert pair_partners(base, novel, "self") == [0, 1, 2, 3]
    with pytest.raises(UserError, match="pixel_pairs=cross"):
        pair_partners(base[:3], novel[:3], "cross")


def test_pair_net_has_the_official_layer_shapes() -> None:
    """CroPixelResSimConvNet(2 x 256, 256, 3 layers, BN): 1x1 convs 512->256 (+ the 512->256
    shortcut), 256->256, then per further block two 256->256; BN weight + bias after each conv
    of a block; a 256->2 output: 595,202 parameters."""
    d = 256
    conv = lambda i, o: i * o + o  # noqa: E731  (1x1 conv with bias)
    bn = 2 * d
    want = conv(2 * d, d) * 2 + conv(d, d) + 2 * bn + 2 * (2 * conv(d, d) + 2 * bn) + conv(d, 2)
    net = PairSimilarityNet(d, 3)
    assert sum(p.numel() for p in net.parameters()) == want == 595_202
    assert net(torch.randn(3, 4, 2 * d)).shape == (3, 4)


def test_pair_balance_is_the_official_queue() -> None:
    torch.manual_seed(0)
    bal, neg_q, pos_q = PairBalance(), collections.deque([1], maxlen=25), collections.deque([1], maxlen=25)
    for step in range(31):
        same = torch.rand(2, 12, 12) < (0.1 + 0.02 * step)
        bal.update(same)
        sub = same[:, ::5, ::5]
        neg_q.append(int((~sub).sum()))
        pos_q.append(int(sub.sum()))
        n, p = sum(neg_q), sum(pos_q)
        assert [float(w) for w in bal.weights()] == pytest.approx((p / (n + p), n / (n + p)))


def test_base_pair_loss_by_hand() -> None:
    prob = torch.tensor([[[0.9, 0.2], [0.6, 0.3]]])
    same = torch.tensor([[[True, False], [False, True]]])
    valid = torch.tensor([[[True, True], [False, True]]])
    w_neg, w_pos = 0.3, 0.7
    terms = [(0.9, 1, w_pos), (0.2, 0, w_neg), (0.3, 1, w_pos)]  # the three valid pairs
    want = sum(w * -(y * math.log(p) + (1 - y) * math.log(1 - p)) for p, y, w in terms) / 3
    assert float(base_pair_loss(prob, same, valid, (w_neg, w_pos))) == pytest.approx(want, rel=1e-6)


def test_distill_map_by_hand() -> None:
    t, s = torch.tensor([0.9, 0.2, 0.999], dtype=torch.float64), torch.tensor([0.4, 0.7, 0.001], dtype=torch.float64)
    ce = [-(a * math.log(b) + (1 - a) * math.log(1 - b)) for a, b in ((0.9, 0.4), (0.2, 0.7), (0.99, 0.01))]
    assert distill_map(t, s, "ce").tolist() == pytest.approx(ce, rel=1e-5)
    cce = [-0.4 * math.log(1.4), -0.3 * math.log(2 - 0.7), -0.499 * math.log(1.001)]
    assert distill_map(t, s, "cce").tolist() == pytest.approx(cce, rel=1e-5)


def _hand_output(bsz: int = 4, q: int = 3, k: int = 5, dim: int = 3, side: int = 4, topk: bool = False,
                 seed: int = 0) -> SimFormerOutput:
    g = torch.Generator().manual_seed(seed)
    c = 3 if topk else k
    return SimFormerOutput(
        pred_logits=torch.randn(bsz, q, c + 1, generator=g), pred_masks=torch.randn(bsz, q, side, side, generator=g),
        aux=[], ml_logits=None, valid=None, image_size=(4 * side, 4 * side), num_classes=k,
        topk_index=torch.stack([torch.randperm(k, generator=g)[:c] for _ in range(bsz)]) if topk else None,
        pixel_features=torch.randn(bsz, dim, side, side, generator=g),
        pair_net=PairSimilarityNet(dim, 1).eval(), pair_balance=PairBalance())


@pytest.mark.parametrize("topk", [False, True])
def test_novel_scores_at_loops(topk: bool) -> None:
    out = _hand_output(topk=topk)
    pts = torch.tensor([[0, 5, 15]] * 4)
    novel = torch.tensor([1, 4])
    got = novel_scores_at(out, pts, novel)
    for b in range(4):
        probs = out.pred_logits[b].softmax(-1)[:, :-1]
        for i, p in enumerate(pts[b].tolist()):
            for n, c in enumerate(novel.tolist()):
                cols = [c] if out.topk_index is None else [j for j, v in enumerate(out.topk_index[b].tolist())
                                                            if v == c]
                want = sum(float(probs[qq, j]) * sig(float(out.pred_masks[b, qq].flatten()[p]))
                           for qq in range(3) for j in cols)
                assert float(got[b, i, n]) == pytest.approx(want, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("student", ["cross", "within"])
def test_pixel_pair_losses_against_a_loop_reimplementation(student: str) -> None:
    """The official semantics written out pair by pair (the pair net in eval mode, so that one
    pair at a time gives what the batch gives); the random draws re-made in the same order."""
    out, k, j = _hand_output(), 5, 10
    lab = torch.full((4, 4, 4), IGNORE)
    lab[:, :2] = 0
    lab[[0, 2], 2:, :2] = 1
    lab[1, 2:, 2:] = 2
    pad = torch.zeros(4, 4, 4, dtype=torch.bool)
    pad[3, 3] = True
    base = [{0, 1}, {0, 2}, {0, 1}, {0}]
    novel = [{3}, {4}, {3, 4}, {4}]
    sim = SimFormerConfig(pixel_pairs="cross", distill_weight=1.0, distill_func="cce", points=j, student_pairs=student)
    random.seed(7)
    torch.manual_seed(7)
    pair, distill = pixel_pair_losses(out, lab, pad, base, novel, torch.tensor([3, 4]), sim)

    random.seed(7)
    torch.manual_seed(7)
    partner = [2, 3, 0, 1]  # 0 and 2 share one novel class (3); 1 and 3 share one (4)
    assert pair_partners(base, novel, "cross") == partner
    flat = lab.flatten(1)
    isb = flat < k
    choice = {}
    for key in ((0, 2), (1, 3)):
        common = sorted(base[key[0]] & base[key[1]])
        choice[key] = common[random.randrange(len(common))]
    pos = torch.stack([flat[b] == choice[tuple(sorted((b, partner[b])))] for b in range(4)])
    pts = torch.cat([sample_region_points(pos, 8), sample_region_points(~pad.flatten(1) & ~pos, 2)], 1)
    feats = out.pixel_features.flatten(2)
    net = out.pair_net
    neg_q, pos_q = collections.deque([1], maxlen=25), collections.deque([1], maxlen=25)
    same = torch.tensor([[[bool(flat[b, pts[b, a]] == flat[partner[b], pts[partner[b], c]]) for c in range(j)]
                          for a in range(j)] for b in range(4)])
    neg_q.append(int((~same[:, ::5, ::5]).sum()))
    pos_q.append(int(same[:, ::5, ::5].sum()))
    n_all = sum(neg_q) + sum(pos_q)
    w_neg, w_pos = sum(pos_q) / n_all, sum(neg_q) / n_all
    num = den = 0.0
    for b in range(4):
        pb = partner[b]
        for a in range(j):
            for c in range(j):
                pa, pc = int(pts[b, a]), int(pts[pb, c])
                valid = bool(isb[b, pa]) or bool(isb[pb, pc])
                if not valid:
                    continue
                with torch.no_grad():
                    p = float(net(torch.cat([feats[b, :, pa], feats[pb, :, pc]])[None]))
                y = float(same[b, a, c])
                num += (w_pos if y else w_neg) * -(y * math.log(p) + (1 - y) * math.log(1 - p))
                den += 1
    assert float(pair.detach()) == pytest.approx(num / den, rel=1e-5)

    dpts = sample_region_points(~isb, j)
    probs = out.pred_logits.softmax(-1)[..., :-1][:, :, [3, 4]]
    terms = []
    for b in range(4):  # every image shares a novel class with its partner here
        pb = partner[b] if student == "cross" else b

        def score(img: int, p: int) -> torch.Tensor:
            return (probs[img] * out.pred_masks[img].flatten(1)[:, p].sigmoid()[:, None]).sum(0)

        for a in range(j):
            for c in range(j):
                pa, pc = int(dpts[b, a]), int(dpts[partner[b], c])
                with torch.no_grad():
                    t = float(net(torch.cat([feats[b, :, pa], feats[partner[b], :, pc]])[None]))
                s = max(0.0, float(F.cosine_similarity(score(b, pa), score(pb, int(dpts[pb, c])), dim=0)))
                terms.append(-max(t - 0.5, 0) * math.log(1 + s) - max(0.5 - t, 0) * math.log(2 - s))
    assert float(distill) == pytest.approx(sum(terms) / len(terms), rel=1e-4, abs=1e-7)


# ---------------------------------------------------------------------------------------
# The criterion


def _raw_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Two 64 x 64 images: base classes 1 / 3, novel 5 / 6 in the bottom right, bottom padding in
    image 1 (image 0, label ignore)."""
    torch.manual_seed(1)
    lab = torch.full((2, 64, 64), 1)
    lab[:, :32] = 3
    lab[:, 40:, 40:] = 5
    lab[:, 52:, 52:] = 6
    lab[1, 56:] = IGNORE
    img = torch.randn(2, 3, 64, 64)
    img[1, :, 56:] = 0
    return img, lab


def _batch(img: torch.Tensor, lab: torch.Tensor, k: int = 10) -> dict:
    hidden, present = hide_novel(lab.numpy(), novel_table([5, 6], k))
    return {"image": img, "label": torch.from_numpy(hidden), "image_labels": torch.from_numpy(present)}


@pytest.mark.parametrize("kind", ["maskformer", "mask2former"])
def test_hidden_pixels_never_reach_a_loss(kind: str) -> None:
    """Which hidden pixel is novel class 5 and which is 6 is swapped (both stay present): every
    loss, pixel pairs included, is bit-identical. A label whose novel pixels are not hidden is
    refused (the same swap would otherwise change the mask targets)."""
    cfg = maskformer_cfg() if kind == "maskformer" else mask2former_cfg()
    torch.manual_seed(0)
    model = MASK2FORMER.build(cfg).train()
    assert isinstance(model, SimFormerModel)
    base = MaskFormerCriterion(cfg) if kind == "maskformer" else Mask2FormerCriterion(cfg)
    crit = SimFormerCriterion(base, [5, 6], 0.15, cfg.mask2former.simformer)
    img, lab = _raw_batch()
    swapped = lab.clone()
    swapped[lab == 5], swapped[lab == 6] = 6, 5
    results = []
    for raw in (lab, swapped):
        torch.manual_seed(11)
        random.seed(11)  # the pairs' common class is a host draw
        twin = copy.deepcopy(model)  # the same state (the pair counts change with every step)
        results.append(crit(twin(img), _batch(img, raw)))
    assert results[0].keys() == results[1].keys()
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])
    assert float(results[0]["comp"]) > 0 and float(results[0]["pair"]) > 0 and float(results[0]["distill"]) != 0
    with pytest.raises(ValueError, match="must hide"):
        crit(model(img), {"image": img, "label": lab, "image_labels": _batch(img, lab)["image_labels"]})


def test_mask_terms_read_base_targets_only() -> None:
    """A hand-built output whose queries 0, 1 are clearly base classes 1, 3 and queries 4, 5 the
    novel classes 6, 5: the mask / dice terms are MaskFormer's on the base targets alone
    (normaliser 2 base masks), and queries 4, 5 are trained towards 6, 5 by the class loss."""
    cfg = maskformer_cfg(sim=SimFormerConfig(pixel_pairs="off"))
    torch.manual_seed(0)
    logits = torch.full((1, 6, 11), -4.0)
    logits[0, :, 10] = 4.0
    logits[0, 0, 1] = logits[0, 1, 3] = logits[0, 4, 6] = logits[0, 5, 5] = 8.0
    masks = torch.randn(1, 6, 16, 16)
    out = Mask2FormerOutput(pred_logits=logits, pred_masks=masks, aux=[], ml_logits=None, topk_index=None, valid=None,
                            image_size=(64, 64), num_classes=10)
    img, lab = _raw_batch()
    batch = {k: v[:1] for k, v in _batch(img, lab).items()}
    res = SimFormerCriterion(MaskFormerCriterion(cfg), [5, 6], 0.15, cfg.mask2former.simformer)(out, batch)
    base_targets = [{"labels": torch.tensor([1, 3]), "masks": torch.stack([batch["label"][0] == 1,
                                                                          batch["label"][0] == 3])}]
    ref = MaskFormerCriterion(cfg)(out, base_targets)
    assert torch.equal(res["mask"], ref["mask"]) and torch.equal(res["dice"], ref["dice"])
    cols = torch.full((1, 6), 10)
    cols[0, 0], cols[0, 1], cols[0, 4], cols[0, 5] = 1, 3, 6, 5
    w = torch.ones(11)
    w[-1] = 0.1
    assert float(res["ce"]) == pytest.approx(float(F.cross_entropy(logits.transpose(1, 2), cols, w)), rel=1e-6)
    assert float(res["comp"]) > 0  # queries 4 and 5 must cover the not-base region


def test_rankseg_learns_every_class_from_image_labels() -> None:
    cfg = mask2former_cfg(head="rankseg", sim=SimFormerConfig(pixel_pairs="off"))
    torch.manual_seed(0)
    model = MASK2FORMER.build(cfg).train()
    crit = Mask2FormerCriterion(cfg)
    img, lab = _raw_batch()
    batch = _batch(img, lab)
    out = model(img)
    res = SimFormerCriterion(crit, [5, 6], 0.15, cfg.mask2former.simformer)(out, batch)
    y = torch.zeros(2, 10)
    y[:, [1, 3, 5, 6]] = 1  # novel 5 and 6 included: they are present in the crops
    assert torch.equal(batch["image_labels"], y)
    assert torch.equal(res["ml"], crit.ml_loss(out.ml_logits, y).detach())
    kept = sum(int(c in out.topk_index[b].tolist()) for b in range(2) for c in (1, 3, 5, 6)) / 8
    assert float(res["kept"]) == pytest.approx(kept)


@pytest.mark.parametrize("kind", ["maskformer", "mask2former"])
def test_tiny_weak_shot_training_steps(kind: str) -> None:
    cfg = maskformer_cfg(head="rankseg", kappa=6) if kind == "maskformer" else mask2former_cfg(head="rankseg")
    torch.manual_seed(0)
    model = MASK2FORMER.build(cfg).train()
    base = MaskFormerCriterion(cfg) if kind == "maskformer" else Mask2FormerCriterion(cfg)
    crit = SimFormerCriterion(base, [5, 6], 0.15, cfg.mask2former.simformer)
    img, lab = _raw_batch()
    batch = _batch(img, lab)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        res = crit(model(img), batch)
        opt.zero_grad()
        res["loss"].backward()
        opt.step()
        losses.append(float(res["loss"].detach()))
    assert all(math.isfinite(v) for v in losses) and int(model.pair_balance.written) == 4
    # The pair loss trains the pair net only (features detached); the teacher gives no gradient.
    out = model(img)
    sim = cfg.mask2former.simformer
    small = F.pad(batch["label"], (0, 0, 0, 0))[:, ::4, ::4]
    pad = loader_padding(img)[:, ::4, ::4]
    pair, distill = pixel_pair_losses(out, small, pad, [{1, 3}, {1, 3}], [{5, 6}, {5, 6}], torch.tensor([5, 6]), sim)
    model.zero_grad()
    pair.backward(retain_graph=True)
    assert all(p.grad is None for p in model.backbone.parameters())
    assert any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in model.pair_net.parameters())
    model.zero_grad()
    distill.backward()
    assert all(p.grad is None for p in model.pair_net.parameters())
    assert model.class_embed.weight.grad is not None


# ---------------------------------------------------------------------------------------
# Configuration


def _split(tmp_path: Path) -> Path:
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"novel": list(range(0, 60, 5))}))
    return path


def test_resolve_fills_official_values_and_refuses_bad_ones(synth: Path, tmp_path: Path) -> None:
    split = _split(tmp_path)
    cfg = build_train_config(None, [*TINY_MASK2FORMER_RUN, f"data.weak_shot={split}"], synth)
    s = cfg.model.mask2former.simformer
    assert (s.pixel_pairs, s.distill_weight, s.distill_func) == ("cross", 0.5, "cce")  # synthetic: ADE20K's
    assert cfg.loss.weak_shot_comp_weight == 0.2
    assert isinstance(MASK2FORMER.build(cfg.model), SimFormerModel)
    plain = build_train_config(None, TINY_MASK2FORMER_RUN, synth)
    assert plain.model.mask2former.simformer.pixel_pairs is None
    assert not isinstance(MASK2FORMER.build(plain.model), SimFormerModel)
    bad = {
        "weak-shot runs only": [*TINY_MASK2FORMER_RUN, "model.mask2former.simformer.pixel_pairs=cross"],
        "pairs the images": [*TINY_MASK2FORMER_RUN, f"data.weak_shot={split}", "schedule.batch_size=3"],
        "is unknown": [*TINY_MASK2FORMER_RUN, f"data.weak_shot={split}", "model.mask2former.simformer.distill_func=kl"],
        "task=semantic": [*TINY_MASK2FORMER_RUN, f"data.weak_shot={split}", "model.mask2former.task=panoptic"],
        "cannot hold": [*TINY_MASK2FORMER_RUN, "model.model=mask2former-semaskt", f"data.weak_shot={split}",
                        "model.mask2former.simformer.pixel_pairs=self"],
    }
    for fragment, sets in bad.items():
        with pytest.raises(UserError, match=fragment) as err:
            build_train_config(None, sets, synth)
        assert "\n" not in str(err.value)
    # A model without a pair net trains the proposal-pixel transfer alone by default.
    semask = build_train_config(None, [*TINY_MASK2FORMER_RUN, "model.model=mask2former-semaskt",
                                       f"data.weak_shot={split}"], synth)
    assert semask.model.mask2former.simformer.pixel_pairs == "off"


@pytest.mark.slow  # ~20 s on one core: 3 + 2 steps, a resume, an evaluation and a prediction
def test_weak_shot_run_trains_resumes_evaluates_predicts(synth: Path, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """SimFormer (MaskFormer, cross pairs, RankSeg) through the CLI: the resumed run's losses
    equal the uninterrupted run's bit for bit (the pair net's balance counts are restored), and
    the evaluation reports BaseIoU / NovelIoU."""
    tiny = [s for s in TINY_MASK2FORMER_RUN if not s.startswith(("model.mask2former.dec_layers",
                                                                   "model.mask2former.enc_dim",
                                                                   "model.mask2former.train_num"))]
    sets = [*tiny, "model.model=maskformer-r50", "model.mask2former.maskformer.dec_layers=2",
            "model.mask2former.simformer.points=20", f"data.weak_shot={_split(tmp_path)}"]
    rows, rep, _ = train_resume_eval_predict(synth, tmp_path, monkeypatch, sets)
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(r["pair"] > 0 and math.isfinite(r["comp"]) for r in rows)  # the similarity terms are logged
    assert "novel_iou" in rep and "base_iou" in rep
    cfg = dataclasses.asdict(build_train_config(None, sets, synth).model.mask2former.simformer)
    assert cfg["pixel_pairs"] == "cross"
