"""bench/replicate.py: the protocol's pieces and the verdict rule (fast), and the whole pipeline
in --smoke mode (slow)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import replicate as R  # noqa: E402
import replication_claims as C  # noqa: E402
import replication_report as RR  # noqa: E402


def test_variants_and_evals() -> None:
    p = R.Protocol(kappa=20, kappa_sweep=[5, 50, 500], kappa_eval=[10, 20, 40])
    v = R.train_variants(p, 200)
    assert {"baseline", "mt", "mt_ls", "rankseg", "oracle"} <= set(v)
    # The sweep is clamped to K, always includes kappa = K, and never repeats the default kappa.
    assert sorted(k for k in v if k.startswith("rankseg_k")) == ["rankseg_k200", "rankseg_k5", "rankseg_k50"]
    assert v["mt"] == ["model.head=rankseg", "model.select=false"] and "model.tau=shared" in v["mt_ls"]
    specs = R.eval_specs(p, 200)
    names = [(a, b) for a, b, _ in specs]
    assert ("baseline", "gt_eval") in names and ("rankseg", "gt_eval") in names
    assert ("rankseg", "kappa20") not in names and ("rankseg", "kappa40") in names  # 20 is the training kappa
    assert [o for a, b, o in specs if b == "thr0.05"] == [{"dynamic_kappa": 0.05}]
    fills = {(a, b): o for a, b, o in specs if b.startswith("gt_r")}
    assert fills == {("rankseg", "gt_ranked"): {"oracle": True, "oracle_fill": "ranked", "kappa": 20},
                     ("rankseg", "gt_random"): {"oracle": True, "oracle_fill": "random", "kappa": 20},
                     ("baseline", "gt_random"): {"oracle": True, "oracle_fill": "random", "kappa": 20}}
    rec = R.recipe(p, 64, 2)
    assert "seed=2" in rec and "model.img_size=64" in rec and "model.kappa=20" in rec
    assert not any(x.startswith("init_from=") for x in rec)
    tuned = R.recipe(p, 64, 2, "/w/backbone.safetensors")
    # One recipe: a fine-tuned run differs from the from-scratch one only by its initial weights
    # and the lower learning rate of the pre-trained backbone.
    assert tuned[:len(rec)] == rec and tuned[len(rec):] == [
        "init_from=/w/backbone.safetensors", f"optim.custom_keys={{backbone.: {{lr_mult: {p.backbone_lr_mult}}}}}"]
    pre = R.pretrain_recipe(p, 64)
    assert "model.model=classifier-vitt" in pre and "data.train_split=pretrain" in pre
    assert f"schedule.iters={p.pretrain_iters}" in pre and not any(x.startswith("init_from=") for x in pre)
    assert R.Protocol().pretrained and not R.Protocol.from_scratch().pretrained
    assert not R.Protocol.smoke(from_scratch=True).pretrained and R.Protocol.smoke().pretrained


def test_plan_dependencies(tmp_path: Path) -> None:
    """The pre-training run comes first and every fine-tune starts from its backbone; each
    independent segmenter waits for its own seed's classifier; evaluations wait for their run."""
    p = R.Protocol(seeds=2, kappa_sweep=[], kappa_eval=[10])
    tasks, runs = R.plan(R.Dataset("synthetic", tmp_path / "d", 200, 64), p, tmp_path / "w")
    keys = [t.key for t in tasks]
    assert keys[0] == ("train", "pretrain", 0)
    backbone = tasks[0].args[4]
    for t in tasks:
        assert all(keys.index(d) < keys.index(t.key) for d in t.deps)  # listed after what it needs
        if t.key[0] == "train" and t.key[1] != "pretrain":
            assert f"init_from={backbone}" in t.args[2] and ("train", "pretrain", 0) in t.deps or t.key[1] == "indep"
    indep = [t for t in tasks if t.key[1] == "indep"]
    assert len(indep) == 2 and all(t.deps == (("train", "classifier", t.key[2]),) for t in indep)
    assert all(f"model.selector.run={runs[('classifier', t.key[2])]}" in t.args[2] for t in indep)
    scratch, _ = R.plan(R.Dataset("synthetic", tmp_path / "d", 200, 64), R.Protocol.from_scratch(), tmp_path / "w")
    assert all(t.key[1] != "pretrain" and not any(a.startswith("init_from=") for a in t.args[2])
               for t in scratch if t.key[0] == "train")


def test_run_tasks_in_process_order() -> None:
    seen = []
    tasks = [R.Task(("a",), lambda: seen.append("a") or {"x": 1}, ()),
             R.Task(("b",), lambda: seen.append("b") or {"x": 2}, (), (("a",),))]
    assert R.run_tasks(tasks, 1) == {("a",): {"x": 1}, ("b",): {"x": 2}} and seen == ["a", "b"]
    with pytest.raises(RuntimeError, match="before its dependencies"):
        R.run_tasks(tasks[::-1], 1)


def test_false_positive_makeup_hand_built() -> None:
    from types import SimpleNamespace

    # Classes: 0, 6 backgrounds of scenes 0, 1; objects 1-5 with looks a, a, b, b, c.
    # Scene 0 = background 0 + objects 1, 3, 5; scene 1 = background 6 + objects 2, 4.
    world = SimpleNamespace(num_classes=7, appearance=np.array([-1, 0, 0, 1, 1, 2, -1]),
                            scenes_bg=np.array([0, 6]), scenes_objects=np.array([[1, 3, 5], [2, 4, 4]]))
    rel = RR.related_classes(world, np.array([0, 1]))
    assert np.nonzero(rel["scene"])[0].tolist() == [3, 5]  # the scene's objects it does not show
    assert np.nonzero(rel["look"])[0].tolist() == [2]  # look a of object 1, from scene 1
    probs = np.array([[0.9, 0.8, 0.7, 0.6, 0.1, 0.2, 0.05]])  # top-4: 0, 1, 2, 3 -> false positives 2, 3
    mk = RR.selection_makeup([np.array([0, 1])], probs, [rel], 4)
    # 5 absent classes, 2 of them drawn: a uniform draw holds 2 * 2/5 scene-mates and 2 * 1/5 look-alikes.
    assert mk == pytest.approx({"fp_per_image": 2.0,
                                "scene_fp_share": 0.5, "scene_fp_share_random": 0.4, "scene_kept": 0.5,
                                "scene_kept_random": 0.4, "scene_per_image": 2.0,
                                "look_fp_share": 0.5, "look_fp_share_random": 0.2, "look_kept": 1.0,
                                "look_kept_random": 0.4, "look_per_image": 1.0})
    assert RR.selection_makeup([np.array([0, 1])], probs, [rel], 2)["scene_fp_share"] is None  # top-2 = GT
    # Labels: 0 = background, 1 = object, 65535 = ignore; five wrong pixels go to 1 (GT), 3 (scene-mate),
    # 2 (look-alike), 4, 4 (neither) and one ignore pixel is never counted.
    label = np.array([[0, 0, 0, 1, 1, 0, 65535]])
    pred = np.array([[0, 1, 3, 2, 4, 4, 5]])
    err = RR.error_makeup([pred], [label], [np.array([0, 1])], [rel])
    assert err == pytest.approx({"err_gt": 0.2, "err_scene": 0.2, "err_look": 0.2, "err_other": 0.4})


def test_diagnoses_follow_the_rule() -> None:
    seeds = {"rankseg": [0.20, 0.16, 0.17], "rankseg/gt_ranked": [0.20, 0.165, 0.17],
             "rankseg/gt_random": [0.28, 0.27, 0.26], "rankseg/gt_eval": [0.37, 0.32, 0.33],
             "baseline": [0.19, 0.19, 0.19], "baseline/gt_random": [0.30, 0.29, 0.31]}
    got = {d.b: (d.relation, d.holds) for d in C.diagnoses(seeds, 50)}
    assert got == {"own top-50": (">", False), "GT + ranked fill": (">", True), "GT + random fill": (">", True),
                   "Baseline": (">", True)}
    assert C.diagnoses({"rankseg": [0.1]}, 50) == []


def test_aggregation_and_tables(tmp_path: Path) -> None:
    a = RR.agg([0.5, 0.7, None, 0.6])
    assert a["n"] == 3 and a["mean"] == pytest.approx(0.6) and a["std"] == pytest.approx(0.1)
    assert a["min"] == 0.5 and a["max"] == 0.7
    assert RR.pm(a) == "60.0 ± 10.0"
    assert RR.agg([None])["mean"] is None and RR.pm(RR.agg([])) == "–"
    assert RR.agg([0.3])["std"] == 0.0
    assert RR.md_table(["a", "b"], [[1, "x"]]) == "| a | b |\n| --- | --- |\n| 1 | x |"
    doc = tmp_path / "r.md"
    doc.write_text("# T\n\nreading\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\n"
                   "<!-- from-scratch:start -->\nkept\n<!-- from-scratch:end -->\ntail\n")
    R.write_doc_block("new numbers", doc)
    text = doc.read_text()
    assert "new numbers" in text and "old" not in text and text.endswith("tail\n") and "reading" in text
    assert "kept" in text  # the other regime's block is left alone
    R.write_doc_block("scratch numbers", doc, "from-scratch")
    assert "kept" not in doc.read_text() and "new numbers" in doc.read_text()


def test_verdict_rule_on_hand_built_cases() -> None:
    """Beyond the seed spread = every seed on the same side AND |mean difference| > pooled std."""
    clear = C.compare("c", "A", [0.30, 0.32, 0.34], ">", "B", [0.20, 0.22, 0.24])  # +0.10 each, std 0.02
    assert clear.outcome == "above" and clear.holds and clear.diffs == pytest.approx([0.1] * 3)
    assert clear.spread == pytest.approx(0.02) and clear.verdict.startswith("holds")
    # One seed reversed: not beyond the spread, whatever the mean.
    mixed = C.compare("c", "A", [0.50, 0.50, 0.19], ">", "B", [0.20, 0.20, 0.20])
    assert mixed.outcome == "within" and not mixed.holds
    # Every seed higher, but by less than the (large) spread.
    noisy = C.compare("c", "A", [0.11, 0.31, 0.51], ">", "B", [0.10, 0.30, 0.50])
    assert noisy.outcome == "within" and not noisy.holds
    assert noisy.spread == pytest.approx(0.2) and noisy.mean_diff == pytest.approx(0.01)
    lower = C.compare("c", "A", [0.1, 0.11, 0.12], ">", "B", [0.3, 0.31, 0.32])
    assert lower.outcome == "below" and not lower.holds and "lower beyond" in lower.verdict
    assert C.compare("c", "A", [0.1, 0.11, 0.12], "≥", "B", [0.1, 0.13, 0.10]).holds  # equal within the spread
    assert not C.compare("c", "A", [0.1, 0.11, 0.12], "≥", "B", [0.3, 0.31, 0.32]).holds
    assert C.compare("c", "A", [0.1, 0.11, 0.12], "≈", "B", [0.1, 0.13, 0.10]).holds
    assert not C.compare("c", "A", [0.30, 0.32, 0.34], "≈", "B", [0.20, 0.22, 0.24]).holds
    # One set against a fixed value uses that set's own std.
    rho = C.compare("c", "rho", [-0.9, -0.8, -0.7], "<", "0", 0.0)
    assert rho.holds and rho.spread == pytest.approx(0.1)
    assert not C.compare("c", "rho", [-0.9, 0.1, -0.7], "<", "0", 0.0).holds
    with pytest.raises(ValueError):
        C.compare("c", "A", [0.1, 0.2], ">", "B", [0.1])


def test_claims_cover_the_paper_and_skip_missing_numbers() -> None:
    seeds = {n: [0.1, 0.11, 0.12] for n in ("baseline", "mt", "mt_ls", "rankseg", "oracle", "indep", "indep_pre",
                                            "baseline/gt_eval", "rankseg/gt_eval", "rankseg_k200", "rankseg_k5",
                                            "rankseg/kappa10", "rankseg/kappa40", "rankseg/kappa5",
                                            "rankseg/kappa100", "rankseg/thr0.1", "rankseg/thr0.05", "ml_w1", "ml_w20",
                                            "ml_gap", "ml_trandec")}
    seeds["rho/rankseg"] = [-0.5, -0.6, -0.7]
    rows = C.claims(seeds, 20, 200, {"classifier": [0.4, 0.41, 0.42], "pretrain": [0.5]})
    text = [r.claim for r in rows]
    assert "Table 1: +MT > Baseline" in text and "Table 3: joint scheme > independent scheme" in text
    # The paper's direction: sorting alone is claimed ">" (a gain), not "≥".
    k = next(r for r in rows if "κ = K" in r.claim)
    assert k.relation == ">" and [p.relation for p in k.parts] == [">"]
    assert any(t.startswith("Fig. 7") for t in text)
    # Fig. 3 against the baseline only, plus GT (train + eval) > GT (eval); no restatement against ablations.
    assert [t for t in text if t.startswith("Fig. 3")] == ["Fig. 3: GT (train + eval) > Baseline",
                                                          "Fig. 3: GT (eval) > Baseline",
                                                          "Fig. 3: GT (train + eval) > GT (eval)"]
    # Repeated comparisons are one claim each: the thresholds, the evaluation kappas (only inside the
    # paper's tried range kappa / 2 .. 2 kappa), the weights and the heads are its evidence.
    robust = [r for r in rows if r.claim.startswith("§4.2")]
    assert len(robust) == 1 and [p.a for p in robust[0].parts] == ["eval κ=10", "eval κ=40"]
    dyn = [r for r in rows if r.claim.startswith("Suppl. Table 5")]
    assert len(dyn) == 2 and all(len(r.parts) == 2 for r in dyn)
    assert [p.b for p in next(r for r in rows if r.claim.startswith("Table 5")).parts] == ["weight 1", "weight 20"]
    assert len(next(r for r in rows if r.claim.startswith("Table 6")).parts) == 2
    t2 = next(r for r in rows if r.claim.startswith("Table 2"))
    assert t2.parts[0].a == "selector mAP higher" and "50.0" in t2.evidence and "41.0" in t2.evidence
    assert len(C.claims({"baseline": [0.1, 0.2], "mt": [0.2, 0.3]}, 20, 200)) == 1


def _predict_with(run, item: dict, selection) -> np.ndarray:
    """One stored sample through the family's own `predict` (the engine's path), with `selection`."""
    import torch

    from rankseg_core.data.augment import build_test_transform
    from rankseg_core.families import family_of
    from rankseg_core.families.base import InferenceProtocol

    fam = family_of(run.cfg.model.model)
    dc = fam.data_config(run.model)
    x = torch.from_numpy(build_test_transform(run.cfg, dc["mean"], dc["std"])(item["image"]))[None]
    proto = InferenceProtocol(run.cfg.eval.mode, tuple(run.cfg.eval.scales), run.cfg.eval.flip)
    res = fam.predict(run.model, run.cfg, x, [tuple(item["label"].shape)], proto, selection)
    return res.semantic[0].cpu().numpy().astype(np.int64)


@pytest.mark.slow
def test_smoke_end_to_end(tmp_path: Path) -> None:
    import torch
    from safetensors import safe_open

    from rankseg_core.engine.evaluate import EvalOptions, evaluate_model
    from rankseg_core.engine.runs import load_run
    from rankseg_core.model.selection import SelectionOptions

    out = R.main(["--smoke", "--work", str(tmp_path / "work")])
    res = out["results"][0]
    p = out["protocol"]
    assert res["dataset"] == "synthetic" and res["num_classes"] == 40
    body = out["report"]
    assert "SMOKE RUN" in body
    for title in ("Pre-training", "**Claims**", "Tables 5–6", "Table 2)", "Table 1", "Fig. 3", "Tables 2–3", "Table 4", "Supplement Table 5",
                  "Fig. 7", "False positives", "Which classes in the selection cost mIoU", "scene-mates"):
        assert title in body
    figs = tmp_path / "work" / "figures"
    names = list(res["figures"].values()) + [res["fp"][f"figure_{k}"] for k in ("summary", "image", "predictions")]
    for name in names:
        with Image.open(figs / name) as im:
            assert im.size[0] > 300 and im.size[1] > 200
    assert (figs / "replication_report.md").read_text().strip() == body.strip()
    base = tmp_path / "work" / "pretrained" / "synthetic"

    def stored(v: str, s: int) -> dict:
        return json.loads((base / v / f"seed{s}" / "replicate.json").read_text())

    # Table numbers are the runs' own evaluations: re-evaluate seed 1 of RankSeg with GT (eval).
    run = base / "rankseg" / "seed1"
    model, cfg = load_run(run)
    again = evaluate_model(model, cfg, EvalOptions(progress=False, selection=SelectionOptions(oracle=True)), torch.device("cpu"))
    ev = json.loads((base / "evals" / "rankseg_seed1_gt_eval.json").read_text())
    assert ev["miou"] == pytest.approx(again["miou"], abs=1e-9)
    assert res["evals"]["rankseg/gt_eval"]["per_seed"]["miou"][1] == ev["miou"]
    filled = evaluate_model(model, cfg, EvalOptions(progress=False, selection=SelectionOptions(kappa=p.kappa, oracle=True, oracle_fill="random")),
                            torch.device("cpu"))
    assert res["evals"]["rankseg/gt_random"]["per_seed"]["miou"][1] == pytest.approx(filled["miou"], abs=1e-9)
    assert {d["b"] for d in res["diagnoses"]} >= {"GT + ranked fill", f"own top-{p.kappa}"}
    # The false-positive makeup rebuilds the generator's world: every val image's classes are
    # one scene's background and objects in it.
    from rankseg_core.convert.synthetic import make_world
    from rankseg_core.shards.read import ShardDataset

    world = make_world(40, 0)
    ds = ShardDataset(cfg.data.root, "val")
    for i in range(len(ds)):
        c = set(ds.load(i)["classes"].tolist())
        assert any(c <= {int(b), *world.scenes_objects[s].tolist()} and int(b) in c
                   for s, b in enumerate(world.scenes_bg))
    assert res["fp_makeup"]["scene_per_image"]["mean"] > 0
    seeds = [stored("baseline", s)["miou"] for s in range(p.seeds)]
    assert res["runs"]["baseline"]["miou"]["mean"] == pytest.approx(np.mean(seeds))
    # Fig. 7 numbers: the mean over seeds of each run's LayerNorm weight.
    weights = [load_run(base / "rankseg" / f"seed{s}")[0].rank_scale().detach().numpy() for s in range(p.seeds)]
    np.testing.assert_allclose(res["tau"]["rankseg"]["inv_tau"], np.mean(weights, 0), atol=1e-6)
    assert res["cost"]["baseline"]["params_m"] < res["cost"]["rankseg"]["params_m"]  # the ml branch adds params

    # Only the backbone transferred: the init file holds exactly the model's backbone.* tensors.
    with safe_open(str(base / "pretrain_backbone.safetensors"), "pt") as f:
        init_keys = set(f.keys())
    for v in ("rankseg", "baseline", "classifier", "indep"):
        rec = stored(v, 0)["init"]
        own = {k for k in load_run(base / v / "seed0")[0].state_dict() if k.startswith("backbone.")}
        assert init_keys == own and rec["loaded"] == len(own) and rec["unexpected"] == 0 and rec["backbone_only"]
    from safetensors.torch import load_file

    from rankseg_core.utils.integrity import content_digest

    digest = content_digest(load_file(str(base / "pretrain_backbone.safetensors")))
    assert {stored(v, s)["init"]["sha256"] for v in ("mt", "indep") for s in range(p.seeds)} == {digest}
    assert res["pretrain"]["map"] is not None

    # The verdict table follows mechanically from the numbers: recompute "+MT > Baseline" here.
    a = np.array([stored("mt", s)["miou"] for s in range(p.seeds)])
    b = np.array([stored("baseline", s)["miou"] for s in range(p.seeds)])
    d = a - b
    pooled = np.sqrt((a.std(ddof=1) ** 2 + b.std(ddof=1) ** 2) / 2)
    expect = bool(np.all(d > 0) and d.mean() > pooled)
    row = next(c for c in res["claims"] if c["claim"] == "Table 1: +MT > Baseline")
    part = row["parts"][0]
    assert (part["outcome"] == "above") == expect and part["diffs"] == pytest.approx(d.tolist())
    assert part["spread"] == pytest.approx(pooled) and row["holds"] == expect
    # Its MDE: the smallest mean difference the rule would call "above" at this scatter.
    assert row["mde"] == pytest.approx(max(pooled, d.mean() - d.min()))
    assert f"**{row['decision']}**" in body and "MDE" in body

    # The precondition diagnostics (bench/replication_diagnostics.py) agree with the engine's own
    # evaluation: the run's mIoU and its ml head's mAP are the numbers `train` recorded.
    for v in ("baseline", "rankseg"):
        for s in range(p.seeds):
            diag = json.loads((base / "evals" / f"{v}_seed{s}_precondition.json").read_text())
            assert diag["miou"] == pytest.approx(stored(v, s)["miou"], abs=1e-12)
            if v == "rankseg":
                assert diag["ml_map"] == pytest.approx(stored(v, s)["map"], abs=1e-12)
            assert diag["decoder_map"] is not None and diag["scene_oracle_miou"] is not None
            assert res["precondition"][v]["per_seed"]["miou"][s] == diag["miou"]
    assert "The paper's precondition" in body and "scene-oracle gain" in body
    # The scene oracle, recomputed through the family's own prediction with the selection
    # GT classes + the image's scene(s), scored by a confusion matrix here.
    import replication_diagnostics as RD

    from rankseg_core.evaluation.metrics import ConfusionMatrix
    from rankseg_core.model.selection import Selection
    from rankseg_core.viz.common import load_viz_run

    vr = load_viz_run(base / "baseline" / "seed0")
    cm = ConfusionMatrix(40, ignore_index=65535)
    sets = RD.scene_class_sets(world)
    for i in range(len(ds)):
        item = ds.load(i)
        allowed = set(item["classes"].tolist())
        for sc in RR.image_scenes(world, item["classes"]):
            allowed |= set(sets[sc].tolist())
        pred = _predict_with(vr, item, Selection(override=[torch.tensor(sorted(allowed))]))
        assert set(np.unique(pred).tolist()) <= allowed
        cm.update(pred, item["label"].astype(np.int64))
    diag0 = json.loads((base / "evals" / "baseline_seed0_precondition.json").read_text())
    assert diag0["scene_oracle_miou"] == pytest.approx(cm.miou(), abs=1e-12)
    # P1 is judged from those per-seed numbers by the same rule.
    p1 = res["claims"][0]
    assert p1["claim"].startswith("P1") and p1["parts"][0]["diffs"] == pytest.approx(
        np.subtract(res["precondition"]["rankseg"]["per_seed"]["ml_map"],
                    res["precondition"]["baseline"]["per_seed"]["decoder_map"]).tolist())

    # A second call reuses the finished runs and stored evaluations.
    stamp = (run / "model.safetensors").stat().st_mtime_ns
    ev_stamp = (base / "evals" / "rankseg_seed1_gt_eval.json").stat().st_mtime_ns
    again = R.main(["--smoke", "--work", str(tmp_path / "work")])
    assert (run / "model.safetensors").stat().st_mtime_ns == stamp
    assert (base / "evals" / "rankseg_seed1_gt_eval.json").stat().st_mtime_ns == ev_stamp
    assert again["results"][0]["reused_runs"] == again["results"][0]["total_runs"]


PRETRAINED = Path(__file__).resolve().parents[1] / "runs" / "replication"


def _final_miou(run: Path) -> float:
    """The run's own final evaluation, as `train` wrote it to metrics.jsonl."""
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return float([r for r in recs if r.get("type") == "eval" and r.get("final")][-1]["miou"])


def _beyond(a: np.ndarray, b: np.ndarray) -> str:
    """The verdict rule written out again: same sign on every seed and |mean| > the pooled sample std."""
    d = a - b
    pooled = np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2)
    if (d > 0).all() and d.mean() > pooled:
        return "above"
    if (d < 0).all() and -d.mean() > pooled:
        return "below"
    return "within"


def _seed_values(work: Path, seeds: int, kappa: int) -> dict[str, list[float]]:
    """name -> per-seed value, read from the run files only: a run's final mIoU from its own
    metrics.jsonl, an evaluation's from its JSON, RankSeg's Spearman rho of 1/tau against rank
    from the rank LayerNorm weight in its safetensors (scipy), the precondition's numbers from
    the diagnostics files, and the classifiers' mAP from their metrics.jsonl."""
    from safetensors.numpy import load_file
    from scipy.stats import spearmanr

    out: dict[str, list[float]] = {}
    for run in sorted(work.glob("*/seed0")):
        v = run.parent.name
        if v != "classifier" and all((work / v / f"seed{s}" / "metrics.jsonl").is_file() for s in range(seeds)):
            out[v] = [_final_miou(work / v / f"seed{s}") for s in range(seeds)]
    for f in sorted((work / "evals").glob("*_seed0_*.json")):
        v, name = f.name.removesuffix(".json").split("_seed0_")
        recs = [json.loads((work / "evals" / f"{v}_seed{s}_{name}.json").read_text()) for s in range(seeds)]
        if name == "precondition":
            for key in ("ml_map", "decoder_map", "ml_scene_acc", "decoder_scene_acc"):
                out[f"{v}/{key}"] = [r[key] for r in recs]
        else:
            out[f"{v}/{name}"] = [r["miou"] for r in recs]
    weights = [load_file(str(work / "rankseg" / f"seed{s}" / "model.safetensors"))["head.mask_norm.weight"]
               for s in range(seeds)]
    assert all(len(w) == kappa for w in weights)
    out["rho"] = [float(spearmanr(np.arange(kappa), w).statistic) for w in weights]
    if (work / "classifier" / "seed0").is_dir():
        final = [[json.loads(x) for x in (work / "classifier" / f"seed{s}" / "metrics.jsonl").read_text().split("\n")
                  if x.strip()] for s in range(seeds)]
        out["classifier/map"] = [[r for r in recs if r.get("type") == "eval" and r.get("final")][-1]["map"]
                                 for recs in final]
    if (work / "pretrain" / "metrics.jsonl").is_file():  # the pre-trained regime's one pre-training run
        pre = [json.loads(x) for x in (work / "pretrain" / "metrics.jsonl").read_text().splitlines() if x.strip()]
        out["pretrain/map"] = [[r for r in pre if r.get("type") == "eval" and r.get("final")][-1]["map"]]
    return out


def _label_source(label: str, kappa: int, vals: dict[str, list[float]]) -> list[float] | float:
    """The per-seed values a verdict row's label names (the report's wording, mapped here by hand)."""
    import re

    fixed = {"Baseline": "baseline", "+MT": "mt", "+MT+LS": "mt_ls", "+MT+LS+RA": "rankseg", "RankSeg": "rankseg",
             "joint (RankSeg)": "rankseg", "weight 10": "rankseg", "1× TranEnc": "rankseg",
             f"eval κ={kappa}": "rankseg", f"fixed κ={kappa}": "rankseg", f"own top-{kappa}": "rankseg",
             "GT (train + eval)": "oracle", "Baseline + GT (eval)": "baseline/gt_eval", "independent": "indep",
             "GAP+Linear": "ml_gap", "2× TranDec": "ml_trandec", "ρ": "rho",
             "ml head mAP": "rankseg/ml_map", "decoder ranking mAP": "baseline/decoder_map",
             "ml head scene accuracy": "rankseg/ml_scene_acc", "decoder scene accuracy": "baseline/decoder_scene_acc",
             "GT + ranked fill": "rankseg/gt_ranked", "GT + random fill": "rankseg/gt_random",
             "GT only": "rankseg/gt_eval", "Baseline + GT + random fill": "baseline/gt_random"}
    if label == "0":
        return 0.0
    if label.startswith("selector mAP"):  # Table 2: which selector is the more accurate, from their mAPs
        better_pre = np.mean(vals["pretrain/map"]) > np.mean(vals["classifier/map"])
        return vals["indep_pre" if (label == "selector mAP higher") == better_pre else "indep"]
    for pattern, fmt in ((r"RankSeg κ=(\d+)", "rankseg_k{}"), (r"eval κ=(\d+)", "rankseg/kappa{}"),
                         (r"dynamic κ \(t = ([\d.]+)\)", "rankseg/thr{}"), (r"weight ([\d.]+)", "ml_w{}")):
        m = re.fullmatch(pattern, label)
        if m and label not in fixed:
            return vals[fmt.format(m.group(1))]
    return vals[fixed[label]]


def _decide(relation: str, parts: list[tuple[str, float]], effect: float | None) -> str:
    """The claim rule written out again from docs/replication.md: parts are (outcome, MDE)."""
    want = {">": "above", "<": "below", "≈": "within"}[relation]
    if relation == "≈":
        if any(o != "within" for o, _ in parts):
            return "does not hold"
        return "holds" if effect is not None and max(m for _, m in parts) <= effect else "inconclusive"
    if all(o == want for o, _ in parts):
        return "holds"
    if any(o not in (want, "within") for o, _ in parts):
        return "does not hold"
    worst = max(m for o, m in parts if o == "within")
    return "does not hold" if effect is not None and worst <= effect else "inconclusive"


# (results file runs/replication/results_{name}.json, its block in docs/replication.md)
BLOCKS = [("pretrained", "results"), ("scratch", "from-scratch"), ("pretrained_bg1_all", "results-bg1_all")]


@pytest.mark.parametrize("name,block", BLOCKS)
def test_published_block_recomputed_from_its_run_files(name: str, block: str) -> None:
    """Every verdict of docs/replication.md's `results` (pre-trained), `from-scratch` and
    `results-bg1_all` (pre-trained, B = 1 world) blocks, and every diagnosis, from
    runs/replication's run files: the per-seed values read here (`_seed_values`), each
    comparison judged by the rule re-implemented here (`_beyond`, the MDE), each claim decided
    by `_decide`, and the block's row saying the same."""
    path = PRETRAINED / f"results_{name}.json"
    regime = name.split("_")[0]  # the runs' directory: pretrained/ or scratch/
    if not path.is_file():
        pytest.skip(f"the {name} replication's run files are not on this machine")
    rec = json.loads(path.read_text())
    res, seeds = rec["results"][0], int(rec["protocol"]["seeds"])
    kappa = min(int(rec["protocol"]["kappa"]), int(res["num_classes"]))
    vals = _seed_values(PRETRAINED / regime / res["dataset"], seeds, kappa)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "replication.md").read_text()
    rows = doc.split(f"<!-- {block}:start -->")[1].split(f"<!-- {block}:end -->")[0].splitlines()
    p1_holds = True
    checked = 0
    for claim in res["claims"] + [{**d, "parts": [d], "relation": d["relation"]} for d in res["diagnoses"]]:
        judged = []
        for part in claim["parts"]:
            a = np.array(_label_source(part["a"], kappa, vals), dtype=np.float64)
            b_src = _label_source(part["b"], kappa, vals)
            b = np.array(b_src, dtype=np.float64)
            d = a - b
            assert part["diffs"] == pytest.approx(list(d), abs=1e-9), (claim["claim"], part["a"])
            if b.ndim == 0:
                spread = a.std(ddof=1)
                out = "above" if (d > 0).all() and d.mean() > spread else \
                    "below" if (d < 0).all() and -d.mean() > spread else "within"
            else:
                spread, out = np.sqrt((a.var(ddof=1) + b.var(ddof=1)) / 2), _beyond(a, b)
            assert part["outcome"] == out, (claim["claim"], part["a"])
            up, down = max(spread, d.mean() - d.min()), max(spread, d.max() - d.mean())
            mde = {"<": down, "≈": max(up, down)}.get(part["relation"], up)
            assert part["mde"] == pytest.approx(mde, abs=1e-9)
            judged.append((out, mde))
            checked += 1
        if "decision" not in claim:  # a diagnosis: one comparison, its own verdict
            holds = {">": judged[0][0] == "above", "<": judged[0][0] == "below"}[claim["relation"]]
            assert claim["holds"] == holds
            continue
        decision = _decide(claim["relation"], judged, claim["paper_effect"])
        assert claim["decision"] == decision, claim["claim"]
        if claim["claim"].startswith("P1"):
            p1_holds = decision == "holds"
        row = [line for line in rows if line.startswith(f"| {claim['claim']} |")]
        per_seed = ", ".join(f"{x:+.2f}" if claim["claim"].startswith("Fig. 7") else f"{100 * x:+.1f}"
                             for x in claim["parts"][0]["diffs"])
        assert len(row) == 1 and per_seed in row[0] and f"**{decision}**" in row[0], claim["claim"]
        assert ("mechanism: inconclusive (P1 not established)" in row[0]) == (claim["needs_ranking"] and not p1_holds)
    assert checked >= 20
    # The precondition's mIoU is the run's own (the engine's final evaluation).
    pre = [json.loads((PRETRAINED / regime / res["dataset"] / "evals" / f"baseline_seed{s}_precondition.json")
                      .read_text())["miou"] for s in range(seeds)]
    assert pre == pytest.approx(vals["baseline"], abs=1e-6)
