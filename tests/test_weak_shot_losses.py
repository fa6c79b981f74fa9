"""Weak-shot losses (losses/weak_shot.py) against independent float64 re-implementations of
the official formulas (SimFormer's `loss_masks_asm` complementary loss, MaskFormer's focal /
dice, BCE of pooled scores), hand-computed cases, and the guarantee that a novel pixel's class
never reaches a loss."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rankseg_core.config.model import ModelConfig
from rankseg_core.config.train import TrainConfig
from rankseg_core.data.weak_shot import hide_novel, novel_table
from rankseg_core.errors import UserError
from rankseg_core.families.segmenter import SEGMENTER
from rankseg_core.losses.rankseg import RankSegCriterion, asymmetric_loss, ml_targets
from rankseg_core.losses.weak_shot import (
    IGNORE_LOGIT,
    WeakShotCriterion,
    complementary_loss,
    mil_loss,
    one_vs_rest_logits,
)
from rankseg_core.model.heads import SegOutput
from rankseg_core.shards.codec import IGNORE

K = 8
NOVEL = [2, 5, 6]


# ---------------------------------------------------------------------------------------
# Independent references (float64, per image / per pixel loops over plain numbers)


def _softmax64(logits: torch.Tensor) -> np.ndarray:
    z = logits.detach().double().numpy()
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _bce(p: float, y: float) -> float:
    return -(y * math.log(p) + (1 - y) * math.log(1 - p))


def ref_mil(logits: torch.Tensor, channels: np.ndarray, targets: np.ndarray, region: np.ndarray, pool: str,
            topk: float = 0.1) -> float:
    """BCE of the pooled probability: max pixel probability, or sigmoid of the mean top-k log-odds."""
    p = _softmax64(logits)
    terms = []
    for b in range(p.shape[0]):
        pix = np.flatnonzero(region[b].ravel())
        if pix.size == 0:
            continue
        for c in range(p.shape[1]):
            if not channels[b, c]:
                continue
            probs = p[b, c].ravel()[pix]
            if pool == "max":
                s = float(probs.max())
            else:
                odds = sorted((math.log(q / (1 - q)) for q in probs), reverse=True)
                k = math.ceil(topk * pix.size)
                s = 1 / (1 + math.exp(-sum(odds[:k]) / k))
            terms.append(_bce(s, float(targets[b, c])))
    return sum(terms) / len(terms)


def ref_comp(logits: torch.Tensor, channels: np.ndarray, region: np.ndarray) -> float:
    """SimFormer's `loss_masks_asm` comp term, per image in probability space: q = max(novel
    proposals' probabilities, sigmoid(IgnoreInit)); 20 * focal(alpha .25, gamma 2, pixel mean)
    + 1 * dice(+1 smoothing); mean over images with a present novel proposal."""
    p = _softmax64(logits)
    floor = 1 / (1 + math.exp(2.9444))  # sigmoid(cfg.LOSS.IgnoreInit) = 0.05
    per_image = []
    for b in range(p.shape[0]):
        chans = np.flatnonzero(channels[b])
        if chans.size == 0:
            continue
        q = np.maximum(p[b, chans].max(0), floor).ravel()
        t = region[b].ravel().astype(np.float64)
        focal = 0.0
        for qi, ti in zip(q, t):
            ce = -(ti * math.log(qi) + (1 - ti) * math.log(1 - qi))
            p_t = qi * ti + (1 - qi) * (1 - ti)
            alpha_t = 0.25 * ti + 0.75 * (1 - ti)
            focal += alpha_t * (1 - p_t) ** 2 * ce
        focal /= q.size
        dice = 1 - (2 * (q * t).sum() + 1) / (q.sum() + t.sum() + 1)
        per_image.append(20 * focal + dice)
    return sum(per_image) / len(per_image)


def _case(seed: int, b: int = 3, c: int = 6, h: int = 5, w: int = 4) -> tuple[torch.Tensor, np.ndarray, np.ndarray,
                                                                              np.ndarray]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g) * 3
    channels = (torch.rand(b, c, generator=g) > 0.5).numpy()
    targets = (torch.rand(b, c, generator=g) > 0.5).numpy()
    region = (torch.rand(b, h, w, generator=g) > 0.4).numpy()
    channels[0, :2] = True  # never an empty case
    region[0, 0, 0] = True
    return logits, channels, targets, region


# ---------------------------------------------------------------------------------------
# The terms


def test_one_vs_rest_logits_are_the_log_odds_of_the_softmax() -> None:
    z = torch.tensor([[100.0, 0.0, 0.0], [0.0, 0.0, 0.0], [3.0, 3.0, -50.0], [-1e4, 2.0, 1.0]])[:, :, None, None]
    z = z.requires_grad_()
    ovr = one_vs_rest_logits(z)
    # Hand values: a dominant channel's odds are e^100 / 2, the others' e^-100 / (1 + e^-100).
    assert ovr[0, 0].item() == pytest.approx(100 - math.log(2), abs=1e-4)
    assert ovr[0, 1].item() == pytest.approx(-100.0, abs=1e-4)
    assert ovr[1].flatten().tolist() == pytest.approx([-math.log(2)] * 3, abs=1e-6)
    assert ovr[2, 0].item() == pytest.approx(0.0, abs=1e-6)  # a tie at the top: probability 1/2
    p = _softmax64(z)
    got = torch.sigmoid(ovr.double()).detach().numpy()
    np.testing.assert_allclose(got, p, rtol=1e-5, atol=1e-30)
    idx = torch.tensor([[2, 0], [1, 1], [0, 2], [2, 1]])  # a per-image subset: the same values
    torch.testing.assert_close(one_vs_rest_logits(z, idx), ovr.gather(1, idx[:, :, None, None]), rtol=0, atol=0)
    ovr.sum().backward()  # p ~ 1 in row 0: log(1 - p) would be -inf, the gradient must stay finite
    assert torch.isfinite(z.grad).all()
    with pytest.raises(ValueError):
        one_vs_rest_logits(torch.zeros(1, 1, 2, 2))


def test_hand_case_two_pixels() -> None:
    """Equal logits (p = 1/2), novel channel 1 present, not-base region = the first pixel."""
    ovr = one_vs_rest_logits(torch.zeros(1, 2, 1, 2))
    channels = torch.tensor([[False, True]])
    region = torch.tensor([[[True, False]]])
    # MIL: S = max over the region's one pixel = 1/2 -> BCE = log 2.
    assert mil_loss(ovr, channels, torch.tensor([[0.0, 1.0]]), region).item() == pytest.approx(math.log(2))
    # comp: q = max(1/2, 0.05) on both pixels. Focal: t=1 pixel .25*(1/2)^2*log 2, t=0 pixel
    # .75*(1/2)^2*log 2 -> mean log(2)/8; dice 1 - (2*.5 + 1) / (1 + 1 + 1) = 1/3.
    want = 20 * math.log(2) / 8 + 1 / 3
    assert complementary_loss(ovr, channels, region).item() == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("pool", ["max", "topk"])
def test_mil_matches_reference(seed: int, pool: str) -> None:
    logits, channels, targets, region = _case(seed)
    region[2] = False  # an image without a pixel to pool over is not scored
    ours = mil_loss(one_vs_rest_logits(logits), torch.from_numpy(channels), torch.from_numpy(targets).float(),
                    torch.from_numpy(region), pool, topk=0.3)
    assert ours.item() == pytest.approx(ref_mil(logits, channels, targets, region, pool, topk=0.3), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_complementary_matches_official_formula(seed: int) -> None:
    logits, channels, _, region = _case(seed)
    channels[1] = False  # an image without a present novel channel adds nothing
    ours = complementary_loss(one_vs_rest_logits(logits), torch.from_numpy(channels), torch.from_numpy(region))
    assert ours.item() == pytest.approx(ref_comp(logits, channels, region), rel=1e-5)


def test_empty_cases_are_zero_and_keep_the_graph() -> None:
    z = torch.randn(2, 3, 4, 4, requires_grad=True)
    ovr = one_vs_rest_logits(z)
    none = torch.zeros(2, 3, dtype=torch.bool)
    assert mil_loss(ovr, none, none.float(), torch.ones(2, 4, 4, dtype=torch.bool)).item() == 0.0
    assert mil_loss(ovr, ~none, none.float(), torch.zeros(2, 4, 4, dtype=torch.bool)).item() == 0.0
    loss = complementary_loss(ovr, none, torch.ones(2, 4, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()  # a batch without novel classes still backpropagates (zeros)
    assert z.grad is not None and not z.grad.any()


def test_ignore_logit_floors_the_not_base_prediction() -> None:
    """The fixed ignore proposal: where every present novel channel is below 5 %, the comp loss
    passes no gradient to the logits; above it, it pushes on base pixels."""
    z = torch.zeros(1, 2, 1, 2)
    z[0, 0] = torch.tensor([[6.0, 0.5]])  # channel 1 (novel): p = 0.0025 on pixel 0, 0.38 on pixel 1
    z.requires_grad_()
    channels = torch.tensor([[False, True]])
    region = torch.zeros(1, 1, 2, dtype=torch.bool)  # both pixels base
    p1 = torch.softmax(z.detach(), 1)[0, 1, 0]
    assert p1[0] < math.exp(IGNORE_LOGIT) / (1 + math.exp(IGNORE_LOGIT)) < p1[1]
    complementary_loss(one_vs_rest_logits(z), channels, region).backward()
    assert (z.grad[0, :, 0, 0] == 0).all()
    assert (z.grad[0, :, 0, 1] != 0).all()


# ---------------------------------------------------------------------------------------
# The criterion: class-ordered (Segmenter) and rank-ordered (RankSeg) channels


def _maps(seed: int, b: int = 2, size: int = 8) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(full label map, hidden map, image labels) via the loader's `hide_novel`; image 1 has no
    novel class at all; ignore pixels are sprinkled in."""
    g = torch.Generator().manual_seed(seed)
    full = torch.randint(0, K, (b, size, size), generator=g)
    full[1][torch.isin(full[1], torch.tensor(NOVEL))] = 0
    full[:, 0, :3] = IGNORE
    hidden, present = hide_novel(full.numpy(), novel_table(NOVEL, K))
    return full, torch.from_numpy(hidden).long(), torch.from_numpy(present)


def _novel_np(classes: torch.Tensor) -> np.ndarray:
    return np.isin(classes.numpy(), NOVEL)


def _criterion(ml_weight: float = 10.0) -> WeakShotCriterion:
    base = RankSegCriterion(K, IGNORE, "asl", ml_weight, "official")
    return WeakShotCriterion(base, NOVEL, mil_weight=1.5, comp_weight=0.2)


def test_segmenter_channels_total_and_terms() -> None:
    full, hidden, present = _maps(0)
    g = torch.Generator().manual_seed(3)
    out = SegOutput(mask_logits=torch.randn(2, K, 4, 4, generator=g) * 2)  # class order, no ml branch
    crit = _criterion()
    res = crit(out, hidden, present)
    logits = F.interpolate(out.mask_logits, size=(8, 8), mode="bilinear", align_corners=False)
    region = (hidden == IGNORE).numpy()
    chans = np.broadcast_to(_novel_np(torch.arange(K)), (2, K))
    want_mil = ref_mil(logits, chans, present.numpy(), region, "max")
    want_comp = ref_comp(logits, chans & (present.numpy() > 0), region)
    # The class-ordered CE on base pixels, by hand: -log softmax at base pixels / all pixels.
    logp = torch.log_softmax(logits.double(), 1)
    base_pix = hidden != IGNORE
    want_seg = -logp.gather(1, hidden.clamp_max(K - 1)[:, None])[:, 0][base_pix].sum().item() / hidden.numel()
    assert res["mil"].item() == pytest.approx(want_mil, rel=1e-5)
    assert res["comp"].item() == pytest.approx(want_comp, rel=1e-5)
    assert res["seg"].item() == pytest.approx(want_seg, rel=1e-5)
    assert res["loss"].item() == pytest.approx(want_seg + 1.5 * want_mil + 0.2 * want_comp, rel=1e-5)
    # A batch that marks its padding (the official pad_region) takes it out of the not-base region.
    pad = torch.zeros(2, 8, 8, dtype=torch.bool)
    pad[:, :, 6:] = True
    padded = crit(out, hidden, present, pad)
    kept = region & ~pad.numpy()
    assert padded["mil"].item() == pytest.approx(ref_mil(logits, chans, present.numpy(), kept, "max"), rel=1e-5)
    assert padded["comp"].item() == pytest.approx(ref_comp(logits, chans & (present.numpy() > 0), kept), rel=1e-5)
    assert padded["comp"].item() != pytest.approx(want_comp, rel=1e-3)


def test_rankseg_channels_follow_the_selection() -> None:
    """Rank channels: only selected novel classes are scored, each against its own class's
    image label; a padding channel is never novel; the ml targets are the image labels, novel
    classes included, not the hidden map's classes."""
    full, hidden, present = _maps(1)
    # image 0: ranks hold novel 5, base 1, novel 2, novel 6, padding; image 1: base and novel
    topk = torch.tensor([[5, 1, 2, 6, 0], [3, 6, 0, 2, 7]])
    valid = torch.tensor([[True, True, True, True, False], [True] * 5])
    present[0, 6] = 0.0  # novel 6 selected but absent from image 0
    g = torch.Generator().manual_seed(4)
    ml = torch.randn(2, K, generator=g)
    out = SegOutput(mask_logits=torch.randn(2, 5, 4, 4, generator=g) * 2, topk_index=topk, ml_logits=ml, valid=valid)
    res = _criterion()(out, hidden, present)
    logits = F.interpolate(out.mask_logits, size=(8, 8), mode="bilinear", align_corners=False)
    logits = logits.masked_fill(~valid[:, :, None, None], -1e4)
    region = (hidden == IGNORE).numpy()
    chans = _novel_np(topk) & valid.numpy()
    assert chans.tolist() == [[True, False, True, True, False], [False, True, False, True, False]]
    tgt = np.take_along_axis(present.numpy(), topk.numpy(), 1)
    assert res["mil"].item() == pytest.approx(ref_mil(logits, chans, tgt, region, "max"), rel=1e-5)
    assert res["comp"].item() == pytest.approx(ref_comp(logits, chans & (tgt > 0), region), rel=1e-5)
    # ml targets: the image labels (novel 2 and 5 of image 0 are absent from the hidden map)
    assert present[0, 2] == 1 and present[0, 5] == 1 and ml_targets(hidden, K, IGNORE)[0, [2, 5]].sum() == 0
    assert res["ml"].item() == pytest.approx(asymmetric_loss(ml, present).item(), rel=1e-6)
    assert res["ml"].item() != pytest.approx(asymmetric_loss(ml, ml_targets(hidden, K, IGNORE)).item(), rel=1e-3)


def test_novel_pixels_never_reach_a_loss() -> None:
    """Relabel hidden pixels of the full map (novel 2 -> novel 5, both still present): every
    loss term is bit-identical. The same change fed unhidden changes the loss, so this test
    would catch a leak; changing an image label changes the novel terms only."""
    family_crit = SEGMENTER.criterion(_weak_cfg("rankseg"))
    full, hidden, present = _maps(2)
    other = full.clone()
    moved = (full[0] == 2).nonzero()[:3]
    other[0, moved[:, 0], moved[:, 1]] = 5
    assert (other[0] == 2).any() and (other[0] == 5).any() and not torch.equal(full, other)
    hidden2, present2 = (torch.from_numpy(a) for a in hide_novel(other.numpy(), novel_table(NOVEL, K)))
    g = torch.Generator().manual_seed(5)
    out = SegOutput(mask_logits=torch.randn(2, 5, 4, 4, generator=g),
                    topk_index=torch.tensor([[5, 1, 2, 6, 0], [3, 6, 0, 2, 7]]), ml_logits=torch.randn(2, K, generator=g))
    a = family_crit(out, {"label": hidden, "image_labels": present})
    b = family_crit(out, {"label": hidden2.long(), "image_labels": present2})
    assert a.keys() == b.keys() and {"seg", "ml", "mil", "comp"} <= a.keys()
    for key in a:
        assert torch.equal(a[key], b[key]) or (a[key].isnan() and b[key].isnan()), key
    # The check can fail: the unhidden maps (a leak) give different losses.
    crit = _criterion()
    assert crit(out, full, present)["seg"] != crit(out, other, present)["seg"]
    # Image labels drive the novel terms only.
    fewer = present.clone()
    fewer[0, 5] = 0.0
    c = family_crit(out, {"label": hidden, "image_labels": fewer})
    assert c["mil"] != a["mil"] and c["comp"] != a["comp"] and torch.equal(c["seg"], a["seg"])


def test_missing_image_labels_and_bad_options() -> None:
    family_crit = SEGMENTER.criterion(_weak_cfg("segmenter"))
    out = SegOutput(mask_logits=torch.randn(1, K, 2, 2))
    with pytest.raises(ValueError, match="image_labels"):
        family_crit(out, {"label": torch.zeros(1, 4, 4, dtype=torch.long)})
    base = RankSegCriterion(K, IGNORE, "asl", 1.0)
    for kw in ({"novel_classes": [K]}, {"novel_classes": []}, {"mil_pool": "mean"}, {"mil_topk": 0.0}):
        with pytest.raises(UserError):
            WeakShotCriterion(base, **{"novel_classes": NOVEL, **kw})
    for head, extra in (("essnet", {}), ("rankseg", {"oracle": True})):
        with pytest.raises(UserError, match="weak-shot|oracle"):
            SEGMENTER.criterion(_weak_cfg(head, **extra))


# ---------------------------------------------------------------------------------------
# Config and a training step of each head


def _weak_cfg(head: str, **model_kw: object) -> TrainConfig:
    cfg = TrainConfig()
    cfg.model = ModelConfig(img_size=32, num_classes=K, kappa=5, head=head, **model_kw)  # type: ignore[arg-type]
    cfg.loss.ml_loss, cfg.loss.asl_gamma_neg, cfg.loss.weak_shot_comp_weight = "asl", 2.0, 0.2
    cfg.data.novel_classes = list(NOVEL)
    return cfg


@pytest.mark.parametrize(("dataset", "weight"), [("coco-stuff-10k", 0.15), ("ADE20K", 0.2), ("synthetic", 0.2)])
def test_comp_weight_resolves_per_dataset_in_weak_shot_runs_only(dataset: str, weight: float) -> None:
    from rankseg_core.engine.configure import resolve

    cfg = TrainConfig()
    cfg.model = ModelConfig(img_size=32, num_classes=K, kappa=5)
    cfg.data.name = dataset
    assert resolve(cfg).loss.weak_shot_comp_weight is None  # not weak-shot: nothing recorded
    cfg.data.novel_classes = list(NOVEL)
    assert resolve(cfg).loss.weak_shot_comp_weight == weight
    cfg.loss.weak_shot_comp_weight = 0.5  # an explicit value wins
    assert resolve(cfg).loss.weak_shot_comp_weight == 0.5


@pytest.mark.parametrize(("head", "select"), [("segmenter", True), ("rankseg", True), ("rankseg", False)])
def test_training_steps_of_each_head_lower_the_weak_shot_loss(head: str, select: bool) -> None:
    """A few SGD steps on one hand-built batch through the family's model and criterion (the
    baseline, RankSeg, and RankSeg +MT without selection): every term is finite, the novel
    terms are live and the total goes down."""
    torch.manual_seed(0)
    cfg = _weak_cfg(head, select=select)
    model = SEGMENTER.build(cfg.model).train()
    crit = SEGMENTER.criterion(cfg)
    g = torch.Generator().manual_seed(6)
    images = torch.randn(2, 3, 32, 32, generator=g)
    full = torch.zeros(2, 32, 32, dtype=torch.long)
    full[0, :16], full[0, 16:] = 1, 2  # base 1, novel 2
    full[1, :, :16], full[1, :, 16:] = 3, 5  # base 3, novel 5
    hidden, present = (torch.from_numpy(a) for a in hide_novel(full.numpy(), novel_table(NOVEL, K)))
    batch = {"image": images, "label": hidden.long(), "image_labels": present}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        res = crit(model(images), batch)
        assert all(torch.isfinite(v).all() for k, v in res.items() if k not in ("coverage", "recall", "precision"))
        assert res["mil"] > 0 and res["comp"] > 0
        opt.zero_grad()
        res["loss"].backward()
        opt.step()
        losses.append(res["loss"].item())
    assert losses[-1] < losses[0]



@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import make_synthetic

    return make_synthetic(tmp_path_factory.mktemp("weak") / "data", images=6, num_classes=40, size=32, val_images=2)


@pytest.mark.parametrize("head", ["segmenter", "rankseg"])
def test_cli_weak_shot_run_trains_each_head(synthetic: Path, tmp_path: Path, head: str) -> None:
    """`rankseg train --weak-shot FILE` through the loader's hidden maps and image labels into
    this criterion: finite losses, and the official complementary weight recorded."""
    from conftest import tiny_run
    from typer.testing import CliRunner

    from rankseg_cli.common import new_app
    from rankseg_cli.train_cmds import train as train_cmd
    from rankseg_core.engine import runs

    split = tmp_path / "split.json"
    split.write_text(json.dumps({"novel": NOVEL}))
    app = new_app("test")
    app.command("train")(train_cmd)  # the app's only command: invoked without its name
    run = tmp_path / "run"
    res = CliRunner().invoke(app, ["--data", str(synthetic), "--out", str(run), "--weak-shot", str(split),
                                   "--head", head, "--iters", "2", *sum((["--set", s] for s in tiny_run(5)), [])])
    assert res.exit_code == 0, res.output
    cfg = runs.load_config(run)
    assert cfg.data.novel_classes == NOVEL and cfg.loss.weak_shot_comp_weight == 0.2
    rows = [r for r in runs.read_metrics(run) if r["type"] == "train"]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
