"""Evidence on CPU for the architectures beyond Segmenter / Mask2Former (docs/architectures.md,
docs/replication.md "RankSeg on other architectures"):

- bench/replicate_architectures.py: its chance level against the engine's confusion matrix,
  its verdicts against the rule computed by hand, and the whole script in --smoke mode (the
  block written into a copy of docs/replication.md, its numbers recomputed from the runs);
- each new architecture's tiny recipe, trained briefly from random weights on easy synthetic
  shards, beats chance on val by a clear margin (slow).
"""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_CONV, TINY_MASKFORMER, make_synthetic

from rankseg_core.engine.configure import build_train_config
from rankseg_core.engine.train import train
from rankseg_core.evaluation.metrics import ConfusionMatrix
from rankseg_core.shards.codec import IGNORE
from rankseg_core.shards.read import ShardDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import replicate_architectures as RA  # noqa: E402

K = 40  # the synthetic generator's smallest vocabulary: one scene, the easiest world
REPO_DOC = Path(__file__).resolve().parents[1] / "docs" / "replication.md"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("arch64") / "data", images=64, num_classes=K, size=64,
                          val_images=16, per_shard=64)


def chance(root: Path) -> tuple[float, float]:
    """(mIoU, aAcc) of the most frequent training class predicted on every val pixel, scored by
    the engine's confusion matrix; the class from the shard index's per-image pixel counts."""
    tr, val = ShardDataset(root, "train"), ShardDataset(root, "val")
    pixels = np.zeros(K)
    for i in range(len(tr)):
        pixels[tr.arrays.classes_of(i)] += tr.arrays.pixels_of(i)
    major = int(pixels.argmax())
    cm = ConfusionMatrix(K, IGNORE)
    for i in range(len(val)):
        label = val.load(i)["label"].astype(np.int64)
        cm.update(np.full(label.shape, major), label)
    return cm.miou(), cm.aacc()


def test_chance_is_the_majority_class_miou(data: Path) -> None:
    got = RA.chance_miou(data, K)
    miou, aacc = chance(data)
    assert got["miou"] == pytest.approx(miou, abs=1e-12)
    assert got["share"] == pytest.approx(aacc, abs=1e-12)  # the constant class's pixel share = its accuracy
    assert 0 < got["miou"] < got["share"] < 1


def test_claims_follow_the_rule() -> None:
    """Hand-built per-seed numbers: which claims appear and how each is decided."""
    seeds = {"deeplabv3/baseline": [0.04, 0.05, 0.06], "deeplabv3/rankseg": [0.08, 0.09, 0.10],
             "segmenter/rankseg": [0.05, 0.06, 0.07], "segmenter/encnet": [0.06, 0.05, 0.08],
             "segmenter/essnet": [0.01, 0.02, 0.03], "segmenter/baseline": [0.02, 0.02, 0.02]}
    titles = {"deeplabv3": "DL", "segmenter": "Seg"}  # no UperNet runs: its claim is left out
    got = {c.claim: c for c in RA.claims(seeds, 0.015, titles)}
    assert "Table 7: RankSeg > baseline on DL" in got and not any("UperNet" in c for c in got)
    dl = got["Table 7: RankSeg > baseline on DL"]
    assert dl.holds and dl.diffs == pytest.approx([0.04] * 3) and dl.spread == pytest.approx(0.01)
    enc = got["Suppl. Table 1: RankSeg > EncNet (Segmenter)"]  # -0.01, +0.01, -0.01: no sign
    assert not enc.holds and enc.outcome == "within"
    ess = got["Suppl. Table 1: RankSeg > ESSNet (Segmenter)"]  # +0.04 every seed, spread 0.01
    assert ess.holds
    # ESSNet vs baseline: -0.01, 0, +0.01, so "comparable" holds.
    assert got["Suppl. B: ESSNet performs comparably to the baseline"].holds
    # Against chance the set's own std: ESSNet (mean 0.02, std 0.01) is 0.005 above chance:
    # within; every other model is above it beyond its spread.
    beat = {c.a + "@" + c.claim.split(" ")[0]: c.holds for c in got.values() if c.claim.endswith("beats chance")}
    assert beat == {"Baseline@DL": True, "RankSeg@DL": True, "RankSeg@Seg": True, "EncNet@Seg": True,
                    "ESSNet@Seg": False, "Baseline@Seg": True}


def test_variants_differ_only_by_their_head(tmp_path: Path) -> None:
    """One recipe (the replication's) per architecture; its variants differ in the head alone."""
    p = RA.ArchProtocol()
    tasks, runs = RA.plan(p, tmp_path / "d", tmp_path / "w")
    assert len(tasks) == len(runs) == p.seeds * (2 + 2 + 4)
    by = {t.key[1:]: t.args[2] for t in tasks}
    for a in RA.architectures(p):
        base = RA.recipe(p.replication(a.iters), p.size, 0)
        for v, head in a.variants.items():
            ov = by[(a.key, v, 0)]
            assert ov[:len(base)] == base and f"schedule.iters={a.iters}" in ov
            assert ov[len(base):] == [f"model.model={a.model}", *a.knobs, *head]
            assert [x for x in by[(a.key, v, 2)] if x != "seed=2"] == [x for x in ov if x != "seed=0"]
    assert not any(x.startswith("init_from=") for ov in by.values() for x in ov)  # from random weights


def block_of(text: str) -> str:
    m = re.search(r"<!-- architectures:start -->\n(.*)\n<!-- architectures:end -->", text, re.S)
    assert m, "no architectures block"
    return m.group(1)


@pytest.mark.slow  # ~20 s: 24 runs of 2 iterations
def test_smoke_end_to_end(tmp_path: Path) -> None:
    doc = tmp_path / "replication.md"
    shutil.copyfile(REPO_DOC, doc)
    before = REPO_DOC.read_bytes()
    out = RA.main(["--smoke", "--work", str(tmp_path / "work"), "--docs", "--doc", str(doc)])
    assert REPO_DOC.read_bytes() == before  # --doc: the repository's page is not touched
    text = doc.read_text()
    body = block_of(text)
    assert body.strip() == out["report"].strip() and "SMOKE RUN" in body
    # Nothing else of the page changed (the block replaced in place, or appended once).
    outside = re.sub(r"<!-- architectures:start -->.*<!-- architectures:end -->\n?", "", text, flags=re.S)
    assert outside.rstrip() == re.sub(r"<!-- architectures:start -->.*<!-- architectures:end -->\n?", "",
                                      before.decode(), flags=re.S).rstrip()
    res, p, runs = out["results"], out["protocol"], out["runs"]
    titles = ["DeepLabv3-R18", "UperNet BEiT-T", "Segmenter ViT-T/16"]
    claims = [f"Table 7: RankSeg > baseline on {titles[0]}", f"Table 7: RankSeg > baseline on {titles[1]}",
              "Suppl. Table 1: RankSeg > EncNet (Segmenter)", "Suppl. Table 1: RankSeg > ESSNet (Segmenter)"]
    claims += [f"{t} {v} beats chance" for t, vs in zip(titles, (["Baseline", "RankSeg"], ["Baseline", "RankSeg"],
                                                              ["Baseline", "EncNet", "ESSNet", "RankSeg"]))
               for v in vs]
    for claim in claims:
        assert re.search(rf"^\| {re.escape(claim)} \|.*\| \*\*(holds|does not hold)\*\* \(", body, re.M), claim

    def stored(arch: str, v: str, s: int) -> dict:
        return json.loads((runs[(arch, v, s)] / "replicate.json").read_text())

    # The tables are the runs' own final evaluations.
    for (arch, v, s) in runs:
        assert res["runs"][arch][v]["per_seed"]["miou"][s] == stored(arch, v, s)["miou"]
    # Chance: the engine's confusion matrix on the same shards, as printed.
    miou, _ = chance(out["root"])
    assert res["chance"]["miou"] == pytest.approx(miou, abs=1e-12) and f"mIoU {100 * miou:.2f}" in body
    # A verdict recomputed with numpy from the stored runs: RankSeg > EncNet.
    a = np.array([stored("segmenter", "rankseg", s)["miou"] for s in range(p.seeds)])
    b = np.array([stored("segmenter", "encnet", s)["miou"] for s in range(p.seeds)])
    d, pooled = a - b, np.sqrt((a.std(ddof=1) ** 2 + b.std(ddof=1) ** 2) / 2)
    row = next(c for c in res["claims"] if c["claim"] == "Suppl. Table 1: RankSeg > EncNet (Segmenter)")
    assert row["holds"] == bool(np.all(d > 0) and d.mean() > pooled)
    assert row["diffs"] == pytest.approx(d.tolist()) and row["spread"] == pytest.approx(pooled)
    # Against chance: the set's own sample std.
    vals = np.array([stored("upernet", "rankseg", s)["miou"] for s in range(p.seeds)])
    row = next(c for c in res["claims"] if c["claim"] == "UperNet BEiT-T RankSeg beats chance")
    assert row["holds"] == bool(np.all(vals > miou) and (vals - miou).mean() > vals.std(ddof=1))
    # Cost: the parameters of the model each run saved.
    from rankseg_core.engine.runs import load_run

    for arch, v in (("deeplabv3", "rankseg"), ("segmenter", "essnet")):
        model, _ = load_run(runs[(arch, v, 0)])
        assert res["cost"][arch][v]["params"] == sum(t.numel() for t in model.parameters())
    assert res["cost"]["deeplabv3"]["rankseg"]["params"] > res["cost"]["deeplabv3"]["baseline"]["params"]


# ---------------------------------------------------------------------------------------
# Each tiny recipe beats chance (from random weights, 64 px, batch 4, AdamW 1e-3)

RUN = ["model.img_size=64", "model.kappa=5", "schedule.batch_size=4", "optim.name=adamw", "optim.lr=1e-3",
       "optim.weight_decay=0", "schedule.warmup_iters=5", "model.dropout=0", "model.drop_path=0", "device=cpu",
       "data.num_workers=0", "eval.num_workers=0", "eval.every=0", "log_every=10", "eval.short_side=64"]
# MaskFormer (conftest's TINY_MASKFORMER): from random weights the backbone and ml branch train at
# the full lr (the official x 0.1 protects pre-trained weights), no dropout.
RECIPES = {
    "deeplabv3-r18 rankseg": ["model.model=deeplabv3-r18", "model.head=rankseg", *TINY_CONV,
                              "model.convseg.aspp_dilations=1,2", "model.convseg.ml_pool=0", "schedule.iters=50"],
    "upernet-beitt rankseg": ["model.model=upernet-beitt", "model.head=rankseg", *TINY_CONV,
                              "model.convseg.pool_scales=1,2", "model.convseg.backbone_drop_path=0",
                              "model.convseg.layer_decay=1", "schedule.iters=60"],
    "segmenter-vitt encnet": ["model.model=segmenter-vitt", "model.head=encnet", "schedule.iters=60"],
    "segmenter-vitt essnet": ["model.model=segmenter-vitt", "model.head=essnet", "schedule.iters=60"],
    "maskformer-r50 rankseg": [*TINY_MASKFORMER, "model.mask2former.num_queries=16", "optim.backbone_lr_mult=1",
                               "optim.ml_lr_mult=1", "model.mask2former.maskformer.dropout=0", "model.img_size=32",
                               "eval.short_side=32", "schedule.batch_size=8", "optim.lr=2e-3", "schedule.iters=60"],
}


@pytest.fixture(scope="module")
def data32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MaskFormer's: 32 px, where its R50 trains 8 images a step in this file's budget."""
    return make_synthetic(tmp_path_factory.mktemp("arch32") / "data", images=64, num_classes=K, size=32,
                          val_images=16, per_shard=64)


@pytest.mark.slow  # 5-20 s each on one core
@pytest.mark.parametrize("name", list(RECIPES))
def test_tiny_recipe_beats_chance(name: str, data: Path, data32: Path, tmp_path: Path) -> None:
    root = data32 if name.startswith("maskformer") else data
    cfg = build_train_config(None, [*RUN, *RECIPES[name]], root)
    assert cfg.model.model == name.split()[0] and cfg.model.head == name.split()[1]
    res = train(cfg, tmp_path / "run", progress=False).final_eval
    assert res is not None
    miou, aacc = chance(root)
    # A clear margin: twice the majority predictor's mIoU, and 5 points more pixels right.
    assert res["miou"] > 2 * miou, (res["miou"], miou)
    assert res["aacc"] > aacc + 0.05, (res["aacc"], aacc)
