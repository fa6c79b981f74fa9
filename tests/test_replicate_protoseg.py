"""bench/replicate_protoseg.py (docs/replication.md, "Prototypes and the large-vocabulary study"):
ADE20K-x's top-x rule on synthetic shards against a recount from the decoded labels, the
protocol's runs, the verdicts against the rule computed by hand, and the `--shards` mode end to
end on tiny shards (the block written into a copy of docs/replication.md)."""

from __future__ import annotations

import json
import math
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_synthetic, tiny_run

from rankseg_core.shards.codec import IGNORE
from rankseg_core.shards.read import ShardDataset, ShardIndex

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import replicate_protoseg as RP  # noqa: E402

K = 40  # the synthetic generator's smallest vocabulary
REPO_DOC = Path(__file__).resolve().parents[1] / "docs" / "replication.md"


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("protoworld") / "world", images=24, num_classes=K, size=32,
                          val_images=8, per_shard=10)


def test_top_classes_are_ade20k_x_rule_recounted_from_the_labels(world: Path) -> None:
    x = 12
    out = RP.top_classes_root(world, x)
    assert out != world and RP.top_classes_root(world, K) == world  # x = K: the world itself
    # Recount: images containing each class, from the decoded train labels; rank by (-count, id).
    train = ShardDataset(world, "train")
    count = np.zeros(K, np.int64)
    for i in range(len(train)):
        lab = train.load(i)["label"]
        count[np.unique(lab[lab != IGNORE]).astype(np.int64)] += 1
    top = sorted(range(K), key=lambda c: (-count[c], c))[:x]
    new = {old: i for i, old in enumerate(top)}
    idx = ShardIndex(out)
    assert idx.num_classes == x and idx.name == "synthetic"  # the data's own defaults still apply
    assert idx.class_names == [ShardIndex(world).class_names[t] for t in top]
    freq = json.loads((out / "class_frequency.json").read_text())
    assert freq["class_images"] == count.tolist() and freq["top"] == top
    for split in ("train", "val"):
        src, dst = ShardDataset(world, split), ShardDataset(out, split)
        assert len(src) == len(dst)
        for i in range(len(src)):
            a, b = src.load(i), dst.load(i)
            assert a["key"] == b["key"] and src.raw(i)[0] == dst.raw(i)[0]  # the same image bytes
            want = np.vectorize(lambda v: new.get(int(v), IGNORE))(a["label"]).astype(np.uint16)
            np.testing.assert_array_equal(b["label"], want)
            np.testing.assert_array_equal(b["classes"], np.unique(want[want != IGNORE]))
    # Made once: a second call returns the same directory without rewriting it.
    stamp = (out / "dataset.json").stat().st_mtime_ns
    assert RP.top_classes_root(world, x) == out and (out / "dataset.json").stat().st_mtime_ns == stamp


def test_chance_from_the_index_is_the_decoded_labels_chance(world: Path) -> None:
    import replicate_architectures as RA  # decodes every label

    for root, k in ((world, K), (RP.top_classes_root(world, 12), 12)):
        assert RP.chance(root) == pytest.approx(RA.chance_miou(root, k), abs=1e-12)


def test_protocol_runs_differ_only_by_head_and_lambdas(tmp_path: Path) -> None:
    p = RP.ProtoProtocol()
    worlds = [RP.World(x, tmp_path / f"d{x}", [f"base={x}"]) for x in p.vocab]
    tasks, runs = RP.plan(p, worlds, tmp_path / "w")
    # 4 heads at both x, 4 extra lambda settings at the largest: 36 runs of 3 seeds.
    assert len(tasks) == len(runs) == 3 * (4 + 4 + 4)
    by = {t.key[1:]: t.args[2] for t in tasks}
    assert by[(200, "protoseg", 1)] == ["base=200", "seed=1", "model.head=protoseg"]
    assert by[(200, "protoseg_ppc0.05_ppd0.01", 0)] == [
        "base=200", "seed=0", "model.head=protoseg", "model.protoseg.ppc_weight=0.05", "model.protoseg.ppd_weight=0.01"]
    assert {v for (x, v, _) in by if x == 100} == set(RP.HEADS)
    assert {v for (x, v, _) in by if x == 200} - set(RP.HEADS) == {
        "protoseg_ppc0.001_ppd0.01", "protoseg_ppc0.05_ppd0.01", "protoseg_ppc0.01_ppd0.001", "protoseg_ppc0.01_ppd0.05"}
    assert tasks[0].key[1] == 200  # the costlier vocabulary first


def _res(vals: dict[tuple[int, str], list[float]]) -> dict:
    out: dict = {}
    for (x, v), m in vals.items():
        out.setdefault(x, {})[v] = {"per_seed": {"miou": m}}
    return out


def test_verdicts_follow_the_rule_on_hand_built_numbers() -> None:
    p = RP.ProtoProtocol()
    vals = {(100, "segmenter"): [0.10, 0.11, 0.12], (100, "protoseg"): [0.105, 0.115, 0.125],
            (100, "rankseg"): [0.09, 0.10, 0.11], (100, "rankproto"): [0.15, 0.16, 0.17],
            (200, "segmenter"): [0.05, 0.06, 0.07], (200, "protoseg"): [0.10, 0.11, 0.12],
            (200, "rankseg"): [0.05, 0.06, 0.07], (200, "rankproto"): [0.11, 0.10, 0.12],
            (200, "protoseg_ppc0.001_ppd0.01"): [0.10, 0.12, 0.11],
            (200, "protoseg_ppc0.05_ppd0.01"): [0.11, 0.11, 0.11],
            (200, "protoseg_ppc0.01_ppd0.001"): [0.05, 0.06, 0.04],
            (200, "protoseg_ppc0.01_ppd0.05"): [0.10, 0.11, 0.12]}
    comps, lam = RP.claims(_res(vals), p, {100: 0.02, 200: 0.01})
    got = {c.claim: c for c in comps}
    # +0.005 on every seed, pooled std 0.01: not beyond it (the mean must exceed the spread).
    c = got["ProtoSeg Table 4: prototypes > parametric (x = 100)"]
    assert not c.holds and c.diffs == pytest.approx([0.005] * 3) and c.spread == pytest.approx(0.01)
    assert got["ProtoSeg Table 4: prototypes > parametric (x = 200)"].holds  # +0.05 each seed
    assert got["RankSeg + prototypes > ProtoSeg (x = 100)"].holds
    assert not got["RankSeg > parametric (x = 200)"].holds  # equal
    # Growth of the gain: per seed (0.05, 0.05, 0.05) at 200 against (0.005, 0.005, 0.005) at 100.
    g = got["ProtoSeg's gain over parametric grows with x (100 -> 200)"]
    assert g.diffs == pytest.approx([0.045] * 3) and g.spread == pytest.approx(0.0) and g.holds
    # lambda1: means 0.11, 0.11, 0.11 -> range 0 <= noise: robust. lambda2: 0.05 vs 0.11 -> not robust.
    by = {r["axis"]: r for r in lam}
    assert by["ppc"]["holds"] and by["ppc"]["range"] == pytest.approx(0.0, abs=1e-12)
    var = [np.var(vals[(200, k)], ddof=1) for k in ("protoseg_ppc0.01_ppd0.001", "protoseg", "protoseg_ppc0.01_ppd0.05")]
    assert by["ppd"]["noise"] == pytest.approx(math.sqrt(sum(var) / 3))
    assert by["ppd"]["range"] == pytest.approx(0.06) and not by["ppd"]["holds"] and by["ppd"]["best"] in (0.01, 0.05)
    # Table S3's trend: the default is not below lambda2 = 0.001 ... it is above it, and "≥" holds.
    assert got["Table S3: λ2 (PPD) = 0.01 ≥ 0.001 (x = 200)"].holds
    assert got["Table S3: λ1 (PPC) = 0.01 ≥ 0.05 (x = 200)"].holds  # within the spread
    below = RP.claims(_res({**vals, (200, "protoseg_ppc0.01_ppd0.05"): [0.20, 0.21, 0.22]}), p, {})[0]
    assert not {c.claim: c for c in below}["Table S3: λ2 (PPD) = 0.01 ≥ 0.05 (x = 200)"].holds
    # Against chance: the set's own sample std (0.01); rankproto at 200 is 0.10 above it.
    assert got["x = 200: RankSeg + prototypes beats chance"].holds
    # A missing run leaves its claims out instead of failing.
    partial = {k: v for k, v in vals.items() if k != (100, "rankproto")}
    names = {c.claim for c in RP.claims(_res(partial), p, {})[0]}
    assert "RankSeg + prototypes > ProtoSeg (x = 100)" not in names and "RankSeg > parametric (x = 100)" in names


def test_shards_with_the_wrong_class_count_are_one_user_error(world: Path, capsys: pytest.CaptureFixture) -> None:
    assert RP.cli(["--shards", f"30={world}", "--work", "/nonexistent/never-written"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: --shards 30={world}: {world.resolve()} has {K} classes, not 30 (prepare it with "
                   "`rankseg prepare ade20k-full --top-classes 30`)"]
    assert RP.cli(["--shards", "nonsense"]) == 2
    assert RP.cli(["--set", "optim.lr=1"]) == 2  # --set belongs to --shards


def block_of(text: str) -> str:
    m = re.search(r"<!-- protoseg-shards:start -->\n(.*)\n<!-- protoseg-shards:end -->", text, re.S)
    assert m, "no protoseg-shards block"
    return m.group(1)


@pytest.mark.slow  # ~20 s: 8 runs of 1 iteration at 32 px, their cost and chance
def test_shards_mode_end_to_end(world: Path, tmp_path: Path) -> None:
    small = RP.top_classes_root(world, 20)
    doc = tmp_path / "replication.md"
    shutil.copyfile(REPO_DOC, doc)
    before = REPO_DOC.read_bytes()
    sets = [f"--set={s}" for s in [*tiny_run(kappa=4, model=None), "device=cpu", "eval.every=0", "seed=99"]]
    out = RP.main(["--shards", f"40={world}", "--shards", f"20={small}", "--iterations", "1", "--seeds", "2",
                   "--jobs", "1", "--work", str(tmp_path / "work"), "--docs", "--doc", str(doc), *sets])
    assert REPO_DOC.read_bytes() == before
    body = block_of(doc.read_text())
    assert body.strip() == out["report"].strip()
    res, runs = out["results"], out["runs"]
    assert set(res["runs"]) == {20, 40} and all(set(v) == set(RP.HEADS) for v in res["runs"].values())
    from rankseg_core.engine.runs import load_config

    for (x, v, s), run in runs.items():
        cfg = load_config(run)
        # The data's vocabulary, the head, the seed (after the user's --set: ours win), --iterations.
        assert (cfg.model.num_classes, cfg.model.head, cfg.seed, cfg.schedule.iters) == (x, v, s, 1)
        assert cfg.model.model == "segmenter-vitt" and cfg.model.kappa == 4
        stored = json.loads((run / "replicate.json").read_text())
        assert res["runs"][x][v]["per_seed"]["miou"][s] == stored["miou"]
    # ONE table: a row per (x, head), each mIoU cell the mean ± std of the stored runs.
    rows = [line for line in body.splitlines() if re.match(r"^\| (20|40) \| ", line)]
    assert len(rows) == 8
    seg40 = np.array(res["runs"][40]["segmenter"]["per_seed"]["miou"])
    assert f"| 40 | parametric (Segmenter) | {100 * seg40.mean():.1f} ± {100 * seg40.std(ddof=1):.1f} |" in body
    assert res["cost"][20]["protoseg"]["prototypes"] == 20 * 10 and res["cost"][20]["segmenter"]["prototypes"] == 0
    for claim in ("ProtoSeg Table 4: prototypes > parametric (x = 20)", "RankSeg + prototypes > RankSeg (x = 40)",
                  "ProtoSeg's gain over parametric grows with x (20 -> 40)"):
        assert re.search(rf"^\| {re.escape(claim)} \|.*\| \*\*(holds|does not hold)\*\* \(", body, re.M), claim
    assert not res["lambda"]  # no --lambda-x: no lambda check on real shards
