"""The synthetic weak-shot world (look-alike splits) and the pure logic of
bench/replicate_weak_shot.py: scores from per-class counts against the engine's weak-shot
metrics, chance against every constant prediction scored by the engine, the claims' wiring and
the variants' resolved configs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from rankseg_core.config.train import DataConfig
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.synthetic import (
    LOOK_ALIKE_FILE,
    look_alike_split,
    make_world,
    prepare_synthetic,
    shown_classes,
)
from rankseg_core.data.weak_shot import parse_split, resolve_config
from rankseg_core.errors import UserError
from rankseg_core.evaluation.metrics import ConfusionMatrix
from rankseg_core.evaluation.weak_shot import base_novel_scores
from rankseg_core.shards.codec import IGNORE

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import replicate_weak_shot as ws  # noqa: E402

# ---------------------------------------------------------------------------------------
# The look-alike splits


@pytest.mark.parametrize(("k", "seed", "top"), [(200, 0, 0.5), (100, 3, 0.45)])
def test_every_novel_class_shares_its_look_with_a_base_class(k: int, seed: int, top: float) -> None:
    """Written out from the world's arrays: the classes a scene draws, their looks, and for each
    novel class a base class of the same look that some scene draws."""
    world = make_world(k, seed)
    drawn = set(world.scenes_bg.tolist()) | set(world.scenes_objects.ravel().tolist())
    assert shown_classes(world).tolist() == sorted(drawn)
    small, big = (look_alike_split(world, r, seed) for r in (0.25, top))
    for split, ratio in ((small, 0.25), (big, top)):
        novel = set(split["novel"])
        assert len(novel) == int(np.floor(ratio * len(drawn) + 0.5))
        assert novel <= drawn and not novel & set(world.scenes_bg.tolist())  # backgrounds stay base
        for c in novel:
            look = world.appearance[c]
            alikes = [b for b in drawn if b not in novel and world.appearance[b] == look]
            assert alikes, f"novel class {c} has no base look-alike"
            assert world.appearance[world.names.index(split["notes"]["look_alike"][world.names[c]])] == look
    assert set(small["novel"]) < set(big["novel"])  # nested, as the supplement's splits 5-9
    assert look_alike_split(world, 0.25, seed) == small  # a function of (world, ratio, seed)
    assert look_alike_split(world, 0.25, seed + 1)["novel"] != small["novel"]


def test_the_split_is_a_split_file_of_the_world() -> None:
    world = make_world(200, 0)
    split = look_alike_split(world, 0.25, 0)
    names = list(world.names)
    data = json.dumps(split).encode()
    assert parse_split(data, "--weak-shot x", names, "synthetic") == split["novel"]
    with pytest.raises(UserError, match="another class table"):  # another seed's world names other classes
        parse_split(data, "--weak-shot x", list(make_world(200, 1).names), "synthetic")


def test_impossible_ratios_are_refused() -> None:
    world = make_world(100, 0)
    with pytest.raises(ValueError, match="--look-alike 0.9"):  # more novel classes than candidates
        look_alike_split(world, 0.9, 0)
    for bad in (0.0, 1.0, 0.001):
        with pytest.raises(ValueError, match="novel ratio"):
            look_alike_split(world, bad, 0)


def test_prepare_writes_the_split_and_leaves_the_shards_alone(tmp_path: Path) -> None:
    opts = ConvertOptions(samples_per_shard=4)
    plain, alike = tmp_path / "plain", tmp_path / "alike"
    prepare_synthetic(plain, num_classes=100, images=3, val_images=2, size=32, opts=opts)
    prepare_synthetic(alike, num_classes=100, images=3, val_images=2, size=32, look_alike=0.25, opts=opts)
    files = sorted(p.name for p in plain.iterdir() if p.name.endswith((".h5", ".h5.json")) or p.name == "dataset.json")
    assert LOOK_ALIKE_FILE in {p.name for p in alike.iterdir()} and LOOK_ALIKE_FILE not in files
    for name in files:  # shards and dataset.json byte for byte
        assert (plain / name).read_bytes() == (alike / name).read_bytes(), name
    written = json.loads((alike / LOOK_ALIKE_FILE).read_text())
    assert written == json.loads(json.dumps(look_alike_split(make_world(100, 0), 0.25, 0)))
    data = DataConfig(root=str(alike), name="synthetic", weak_shot=str(alike / LOOK_ALIKE_FILE),
                      class_names=list(make_world(100, 0).names))
    resolve_config(data, 100)  # what `rankseg train --weak-shot FILE` does with it
    assert data.novel_classes == written["novel"]
    with pytest.raises(UserError, match="drop --panoptic"):
        prepare_synthetic(tmp_path / "pan", num_classes=100, images=1, size=32, panoptic=True, look_alike=0.25)
    with pytest.raises(UserError, match="--look-alike 0.9"):
        prepare_synthetic(tmp_path / "big", num_classes=100, images=1, size=32, look_alike=0.9)
    assert not (tmp_path / "big").exists()  # refused before converting anything


# ---------------------------------------------------------------------------------------
# Scores and chance against the engine's metrics


def _confusion(labels: np.ndarray, preds: np.ndarray, k: int) -> ConfusionMatrix:
    cm = ConfusionMatrix(k, ignore_index=IGNORE)
    cm.update(preds, labels)
    return cm


def _counts(cm: ConfusionMatrix) -> dict:
    tp, gt, pred = cm.counts()
    return {"tp": tp.astype(int).tolist(), "gt": gt.astype(int).tolist(), "pred": pred.astype(int).tolist()}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_group_scores_are_the_engines_weak_shot_metrics(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k = 9
    labels = rng.integers(0, k - 2, (4, 12, 12)).astype(np.int64)  # classes 7, 8 never in the GT
    labels[rng.random(labels.shape) < 0.1] = IGNORE
    preds = np.where(rng.random(labels.shape) < 0.6, labels, rng.integers(0, k, labels.shape)) % k
    novel = [2, 5, 8]  # 8: novel but absent from the GT (left out of NovelIoU)
    cm = _confusion(labels, preds, k)
    ours = ws.group_scores(_counts(cm), novel)
    ref = base_novel_scores(cm, novel)
    for key in ("base_iou", "novel_iou", "novel_acc"):
        assert ours[key] == pytest.approx(ref[key], abs=1e-12), key
    assert ours["miou"] == pytest.approx(cm.miou(), abs=1e-12)
    assert ws.group_scores(_counts(cm), [7])["novel_iou"] is None  # no novel GT pixel: undefined


def test_chance_is_the_best_constant_prediction_scored_by_the_engine() -> None:
    rng = np.random.default_rng(4)
    k = 8
    labels = rng.choice(k, (3, 16, 16), p=[0.3, 0.2, 0.15, 0.1, 0.1, 0.1, 0.05, 0.0]).astype(np.int64)
    labels[:, 0] = IGNORE
    novel = [1, 3, 6, 7]  # 7 never occurs
    best = max(base_novel_scores(_confusion(labels, np.full_like(labels, c), k), novel)["novel_iou"]
               for c in range(k))
    gt = np.bincount(labels[labels != IGNORE], minlength=k)
    ch = ws.chance_novel_iou(gt, novel)
    assert ch["novel_iou"] == pytest.approx(best, abs=1e-12)
    assert ch["class"] == 1 and ch["present"] == 3
    assert ws.chance_novel_iou(gt, [7])["novel_iou"] == 0.0


def test_val_counts_are_the_labelled_pixels(synth: Path) -> None:
    from rankseg_core.shards.read import ShardDataset

    ds = ShardDataset(synth, "val")
    labels = np.concatenate([ds.load(i)["label"].ravel() for i in range(len(ds))]).astype(np.int64)
    k = len(ds.index.class_names)
    assert ws.val_counts(synth, k).tolist() == np.bincount(labels[labels != IGNORE], minlength=k).tolist()


# ---------------------------------------------------------------------------------------
# Claims and variants


def test_claims_name_each_comparison_and_judge_it() -> None:
    p = ws.WeakShotProtocol(seeds=3, points_alt=50)  # Table 1 on
    up = [0.10, 0.11, 0.12]
    seeds = {"seg_baseline_r25": [0.02, 0.03, 0.025], "seg_rankseg_r25": up, "mf_cross_r25": [0.05, 0.06, 0.07],
             "mf_self_r25": [0.05, 0.061, 0.069], "mf_none_r25": [0.01, 0.012, 0.011],
             "mf_cross_j50_r25": [0.052, 0.058, 0.071], "mf_cross_r50": [0.03, 0.04, 0.05]}
    found = ws.claims(seeds, {"mf_cross_r25": 0.001}, {"mf_cross_r25": "X"}, p)
    got = {c.comparison.claim: c.comparison for c in found}
    keys = {c.comparison.claim: (c.a, c.b) for c in found}
    assert keys["Suppl. Table 2: Self-Pair > Basic Model"] == ("mf_self_r25", "mf_none_r25")
    assert keys["X beats chance"] == ("mf_cross_r25", None)
    rs = got["Issue 21: RankSeg > per-pixel baseline (Segmenter, 25 % novel)"]
    assert rs.holds and rs.diffs == pytest.approx([0.08, 0.08, 0.095])
    assert not got["Suppl. Table 2: Cross-Pair > Self-Pair"].holds  # within the seed spread
    assert got["Suppl. Table 2: Self-Pair > Basic Model"].holds
    assert got["Suppl. Table 1: robust to J (J = 50 ≈ J = 100)"].holds
    drop = got["Suppl. Table 3: SimFormer drops from 25 % to 50 % novel"]
    assert drop.relation == "<" and drop.holds and drop.diffs == pytest.approx([-0.02] * 3)
    assert "Suppl. Table 3: the baseline drops from 25 % to 50 % novel" not in got  # its 50 % runs are missing
    assert "Suppl. Table 3: SimFormer > baseline at 50 % novel" not in got
    assert "Suppl. Table 1: robust to J (J = 50 ≈ J = 100)" not in {  # Table 1 off: no claim
        c.comparison.claim for c in ws.claims(seeds, {}, {}, ws.WeakShotProtocol(seeds=3, points_alt=None))}
    assert got["Suppl. Table 3: SimFormer > baseline at 25 % novel"].holds
    assert got["X beats chance"].b == "chance (0.10)" and got["X beats chance"].holds
    assert [c for c in got if c.endswith("beats chance")] == ["X beats chance"]  # only variants with a chance


def _resolved(synth_root: Path, split: Path, v: ws.Variant, p: ws.WeakShotProtocol):
    from rankseg_core.engine.configure import build_train_config

    return build_train_config(None, ws.overrides(p, v, 1), str(synth_root))


def test_variants_resolve_to_the_models_the_claims_name(tmp_path: Path) -> None:
    """Each variant's resolved config: the head, the pair mode and J, the split and batch; the
    Basic Model has no pixel-pixel term whichever way `pixel_pairs=none` resolves."""
    p = ws.WeakShotProtocol.smoke()
    root = tmp_path / "data"
    prepare_synthetic(root, num_classes=p.num_classes, images=1, val_images=1, size=p.size,
                      opts=ConvertOptions(samples_per_shard=4))
    splits = ws.write_splits(p, tmp_path / "splits")
    assert ws.split_novel(splits[p.ratio]) == look_alike_split(make_world(p.num_classes, 0), p.ratio, 0)["novel"]
    # As detected (the plain `pixel_pairs=none` where it resolves so), and the zero-weight fallback.
    for none_works in sorted({ws.none_resolves(p, root, splits[p.ratio]), False}):
        vs = {v.key: v for v in ws.variants(p, splits, none_works)}
        assert len(vs) == 9  # 5 SimFormer, 2 x 2 Segmenter
        cfgs = {key: _resolved(root, splits[v.ratio], v, p) for key, v in vs.items()}
        for key, cfg in cfgs.items():
            assert cfg.data.novel_classes == ws.split_novel(splits[vs[key].ratio]) and cfg.seed == 1
            sim = cfg.model.mask2former.simformer
            if key.startswith("mf_"):
                assert cfg.model.model == "maskformer-r50" and cfg.model.head == "segmenter"
                assert cfg.schedule.batch_size == p.maskformer_batch and cfg.schedule.iters == p.maskformer_iters
                pairs = "off" if sim.pixel_pairs == "off" or sim.pair_weight == sim.distill_weight == 0 else sim.pixel_pairs
                assert pairs == {"mf_cross": "cross", "mf_self": "self", "mf_none": "off"}[key.rsplit("_", 1)[0].split("_j")[0]]
                assert sim.points == (p.points_alt if "_j" in key else p.points)
            else:
                assert cfg.model.model == "segmenter-vitt" and cfg.schedule.iters == p.segmenter_iters
                assert cfg.model.head == ("rankseg" if "rankseg" in key else "segmenter")
        if not none_works:
            assert cfgs["mf_none_r25"].model.mask2former.simformer.pair_weight == 0


def test_a_comparison_of_two_models_below_chance_is_inconclusive() -> None:
    p = ws.WeakShotProtocol(seeds=3)
    seeds = {"mf_cross_r25": [0.0003, 0.0002, 0.0004], "mf_self_r25": [0.0001, 0.0001, 0.0002],  # both at ~0
             "mf_none_r25": [0.01, 0.02, 0.015]}  # learned something
    chance = {k: 0.001 for k in seeds}
    recs = {r["claim"]: r for r in ws.claim_records(ws.claims(seeds, chance, {}, p))}
    below = recs["Suppl. Table 2: Cross-Pair > Self-Pair"]
    assert below["holds"] and below["status"] == "inconclusive"  # the rule alone would say "holds"
    assert recs["Suppl. Table 2: Self-Pair > Basic Model"]["status"] == "does not hold"  # one side beats chance
    assert recs["mf_none_r25 beats chance"]["status"] == "holds"
    table = ws.claims_table(list(recs.values()))
    assert "**inconclusive** (neither model beats chance on NovelIoU)" in table
