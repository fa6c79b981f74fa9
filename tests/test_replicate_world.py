"""bench/replicate_world.py, the world sweep (docs/replication.md, "The world sweep"): the P0 / P1 /
P2 verdicts on hand-built numbers, `--world` parsing and paths, and the sweep end to end in
--smoke with every number and verdict recomputed from the stored run files."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import replicate as R  # noqa: E402
import replicate_world as RW  # noqa: E402
from replication_protocol import Protocol  # noqa: E402

from rankseg_core.errors import UserError  # noqa: E402


def _world(name: str, b: int, base: float, oracle_gain: list[float], lift: list[float], ml: list[float],
           dec: list[float], ml_acc: list[float], dec_acc: list[float]) -> dict:
    baseline = [base, base + 0.002, base - 0.002]
    return {"world": name, "backgrounds": b, "seeds": {
        "baseline": baseline, "rankseg": [x + d for x, d in zip(baseline, lift)],
        "baseline_scene_oracle": [x + g for x, g in zip(baseline, oracle_gain)],
        "ml_map": ml, "decoder_map": dec, "ml_scene_acc": ml_acc, "decoder_scene_acc": dec_acc}}


def _by(rows: list[dict], prediction: str) -> list[dict]:
    return [r for r in rows if r["prediction"] == prediction]


def test_verdicts_on_hand_built_numbers() -> None:
    lo, hi = [0.30, 0.31, 0.32], [0.40, 0.41, 0.42]
    worlds = [
        # B = S: the ml head ranks worse (P1 fails), RankSeg loses a little.
        _world("s", 8, 0.10, [0.010, 0.020, 0.015], [-0.010, -0.020, -0.015], lo, hi, lo, hi),
        # B = 4: better mAP but the same scene accuracy: P1 fails (it needs both).
        _world("m", 4, 0.10, [0.050, 0.060, 0.055], [0.000, 0.010, -0.010], hi, lo, lo, lo),
        # B = 1: P1 holds, RankSeg gains.
        _world("one", 1, 0.10, [0.100, 0.120, 0.110], [0.030, 0.040, 0.035], hi, lo, hi, lo),
    ]
    v = RW.verdicts(worlds)
    # P0 by hand: gain(B=4) - gain(B=8) = +0.04 on every seed, pooled std 0.005 -> above; likewise B=1.
    p0 = _by(v["rows"], "P0")
    assert [r["world"] for r in p0] == ["m", "one"] and all(r["holds"] for r in p0) and v["P0"] == "holds"
    assert p0[0]["diffs"] == pytest.approx([0.04, 0.04, 0.04]) and p0[0]["spread"] == pytest.approx(0.005)
    assert v["P1"] == {"s": False, "m": False, "one": True}
    # P2: B = 1 (P1 holds) against each world where it fails.
    p2 = _by(v["rows"], "P2")
    assert [(r["world"], r["b"]) for r in p2] == [("one", "lift B=8"), ("one", "lift B=4")]
    assert p2[0]["diffs"] == pytest.approx([0.04, 0.06, 0.05]) and v["P2"] == "holds"
    # One level within the spread: P0 fails. No contrast: P2 is inconclusive.
    worlds[1]["seeds"]["baseline_scene_oracle"] = [x + g for x, g in zip(worlds[1]["seeds"]["baseline"],
                                                                          [0.0, 0.03, 0.0])]
    assert RW.verdicts(worlds)["P0"] == "does not hold"
    for w in worlds:
        w["seeds"]["ml_map"], w["seeds"]["decoder_map"] = lo, hi
    assert RW.verdicts(worlds)["P2"].startswith("inconclusive (P1 holds in no world")
    for w in worlds:
        w["seeds"].update(ml_map=hi, decoder_map=lo, ml_scene_acc=hi, decoder_scene_acc=lo)
    assert RW.verdicts(worlds)["P2"].startswith("inconclusive (P1 holds in every world")


def test_world_switch_parsing_and_paths(tmp_path: Path) -> None:
    assert R.parse_world(None) == R.parse_world("default") == R.WorldSpec()
    assert R.parse_world("shared-bg:2,all-classes") == R.WorldSpec(2, True)
    assert R.parse_world("all-classes") == R.WorldSpec(None, True)
    for bad in ("shared-bg", "shared-bg:x", "all-classes,shared-bg:2", "bg:2", "shared-bg:2,"):
        with pytest.raises(UserError, match="--world"):
            R.parse_world(bad)
    # Today's world keeps its name (B = S included), so cached shards and runs are reused.
    assert R.WorldSpec().tag(200) == R.WorldSpec(8, False).tag(200) == ""
    assert R.WorldSpec(8, True).tag(200) == "all" and R.WorldSpec(1, True).tag(200) == "bg1_all"
    p = Protocol.smoke(True)
    p.images, p.val_images = 4, 2
    plain = R.synthetic_root(p, tmp_path)
    world = R.synthetic_root(p, tmp_path, R.WorldSpec(1, False))
    assert plain.name == "synthetic_K40_32px_4" and world.name == "synthetic_K40_32px_4_bg1"
    assert "backgrounds" not in json.loads((plain / "dataset.json").read_text())["options"]
    assert json.loads((world / "dataset.json").read_text())["options"]["backgrounds"] == 1
    assert RW.world_base(p, tmp_path, R.WorldSpec()) == tmp_path / "scratch" / "synthetic"
    with pytest.raises(UserError, match="--backgrounds 3: must be 1..2"):
        R.synthetic_root(p, tmp_path, R.WorldSpec(3, False))


def _outcome(a: list[float], b: list[float]) -> tuple[list[float], float, float, str]:
    """The verdict rule, re-implemented with numpy from docs/replication.md's words."""
    d = np.asarray(a, float) - np.asarray(b, float)
    spread = math.sqrt((np.std(a, ddof=1) ** 2 + np.std(b, ddof=1) ** 2) / 2)
    if (d > 0).all() and d.mean() > spread:
        return d.tolist(), float(d.mean()), spread, "above"
    if (d < 0).all() and -d.mean() > spread:
        return d.tolist(), float(d.mean()), spread, "below"
    return d.tolist(), float(d.mean()), spread, "within"


def _seeds_from_run_files(base: Path, seeds: range) -> dict[str, list]:
    """One world's per-seed numbers read back from its run and evaluation files."""
    def run(v: str, s: int) -> dict:
        return json.loads((base / v / f"seed{s}" / "replicate.json").read_text())

    def ev(name: str) -> dict:
        return json.loads((base / "evals" / name).read_text())

    pre = {(v, s): ev(f"{v}_seed{s}_precondition.json") for v in ("baseline", "rankseg") for s in seeds}
    for v, s in pre:  # each cached diagnosis belongs to the weights of its run
        assert pre[(v, s)]["stamp"] == run(v, s)["stamp"] and pre[(v, s)]["run"].endswith(f"{v}/seed{s}")
    # The baseline has no ml head; the GT (eval) oracle was really an oracle evaluation.
    assert all(pre[("baseline", s)]["ml_map"] is None for s in seeds)
    assert all(ev(f"baseline_seed{s}_gt_eval.json")["options"] == {"oracle": True} for s in seeds)
    return {
        "baseline": [run("baseline", s)["miou"] for s in seeds], "rankseg": [run("rankseg", s)["miou"] for s in seeds],
        "baseline_gt_eval": [ev(f"baseline_seed{s}_gt_eval.json")["miou"] for s in seeds],
        "baseline_scene_oracle": [pre[("baseline", s)]["scene_oracle_miou"] for s in seeds],
        "rankseg_scene_oracle": [pre[("rankseg", s)]["scene_oracle_miou"] for s in seeds],
        "ml_map": [pre[("rankseg", s)]["ml_map"] for s in seeds],
        "decoder_map": [pre[("baseline", s)]["decoder_map"] for s in seeds],
        "ml_scene_acc": [pre[("rankseg", s)]["ml_scene_acc"] for s in seeds],
        "decoder_scene_acc": [pre[("baseline", s)]["decoder_scene_acc"] for s in seeds],
        "rankseg_decoder_map": [pre[("rankseg", s)]["decoder_map"] for s in seeds],
    }


def _check_record(rec: dict, work: Path) -> None:
    """Every number of a results record from the run files, and every verdict row from those
    numbers with the rule re-implemented here (P0 gains, P1 rankings, P2 lifts, RankSeg vs Baseline)."""
    seeds = range(rec["protocol"]["seeds"])
    regime = "pretrained" if rec["protocol"]["pretrain_iters"] else "scratch"
    numbers = {}
    for w in rec["worlds"]:
        tag = R.parse_world(w["world"]).tag(rec["protocol"]["num_classes"])
        numbers[w["world"]] = _seeds_from_run_files(work / regime / ("synthetic" + (f"_{tag}" if tag else "")), seeds)
        assert w["seeds"] == numbers[w["world"]]
    bg = {w["world"]: w["backgrounds"] for w in rec["worlds"]}

    def minus(x: list, y: list) -> list:
        return [a - b for a, b in zip(x, y)]

    for r in rec["verdicts"]["rows"]:
        n = numbers[r["world"]]
        if r["prediction"] == "P0":
            ref = numbers[max(bg, key=bg.get)]
            a, b = minus(n["baseline_scene_oracle"], n["baseline"]), minus(ref["baseline_scene_oracle"], ref["baseline"])
        elif r["prediction"] == "P2":
            (other,) = [w for w in bg if f"B={bg[w]}" == r["b"].split()[-1]]
            a, b = minus(n["rankseg"], n["baseline"]), minus(numbers[other]["rankseg"], numbers[other]["baseline"])
        else:
            key = {"ml-head mAP > decoder": ("ml_map", "decoder_map"),
                   "ml-head scene": ("ml_scene_acc", "decoder_scene_acc"), "RankSeg > Baseline": ("rankseg", "baseline"),
                   "own decoder": ("ml_map", "rankseg_decoder_map")}
            ((ka, kb),) = [ab for k, ab in key.items() if k in r["claim"]]
            a, b = n[ka], n[kb]
        d, mean, spread, outcome = _outcome(a, b)
        assert r["diffs"] == pytest.approx(d) and r["mean_diff"] == pytest.approx(mean)
        assert r["spread"] == pytest.approx(spread) and r["outcome"] == outcome and r["holds"] == (outcome == "above")
    for w in bg:  # P1 per world: both of its rows hold
        rows = [r for r in rec["verdicts"]["rows"] if r["prediction"] == "P1" and r["world"] == w]
        assert len(rows) == 2 and rec["verdicts"]["P1"][w] == all(r["holds"] for r in rows)


@pytest.mark.slow
def test_smoke_end_to_end_recomputed_from_run_files(tmp_path: Path) -> None:
    world = "shared-bg:1,all-classes"
    out = RW.main(["--smoke", "--work", str(tmp_path), "--world", world, "--threads", "1"])
    rec = json.loads(Path(out["results"]).read_text())
    (w,) = rec["worlds"]
    assert w["facts"]["backgrounds"] == 1 and w["facts"]["shown"] == 40
    _check_record(rec, tmp_path)
    rows = rec["verdicts"]["rows"]
    assert len(rows) == 4 and not _by(rows, "P0") and not _by(rows, "P2")
    assert rec["verdicts"]["P2"].startswith("inconclusive")
    assert "Predictions, stated before any sweep run" in out["report"]
    # A second invocation reuses every run and evaluation.
    again = RW.main(["--smoke", "--work", str(tmp_path), "--world", world, "--threads", "1"])
    assert again["record"]["worlds"][0]["seeds"] == w["seeds"]
    assert "4 of 4 runs reused" in again["report"]


def _write_replication(base: Path, v: dict[str, list[float]]) -> None:
    """The files a replication of one world leaves for its baseline and RankSeg runs (the ones
    `--pretrained` reads), with the given per-seed values."""
    def put(path: Path, rec: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec))

    for s in range(len(v["baseline"])):
        for run in ("baseline", "rankseg"):
            put(base / run / f"seed{s}" / "replicate.json", {"miou": v[run][s], "stamp": f"{run}{s}"})
            ml = {"ml_map": v["ml_map"][s], "ml_scene_acc": v["ml_scene_acc"][s]} if run == "rankseg" else \
                {"ml_map": None, "ml_scene_acc": None}
            put(base / "evals" / f"{run}_seed{s}_precondition.json", {
                "run": str(base / run / f"seed{s}"), "stamp": f"{run}{s}", **ml,
                "decoder_map": v[f"{run}_decoder_map"][s], "decoder_scene_acc": v[f"{run}_decoder_scene_acc"][s],
                "scene_oracle_miou": v[f"{run}_scene_oracle"][s]})
        put(base / "evals" / f"baseline_seed{s}_gt_eval.json", {"options": {"oracle": True}, "miou": v["gt_eval"][s]})


def test_pretrained_judges_each_worlds_replication_from_its_files(tmp_path: Path) -> None:
    """`--pretrained` trains nothing: it reads each world's replication files (hand-built here:
    P1 fails in the default world and holds at B = 1, where RankSeg gains) and judges P0-P2
    from them; a world not replicated yet is one line naming the command to run."""
    from rankseg_core.errors import UserError

    default = {"baseline": [0.10, 0.12], "rankseg": [0.09, 0.10], "gt_eval": [0.20, 0.22],
               "baseline_scene_oracle": [0.11, 0.13], "rankseg_scene_oracle": [0.10, 0.11],
               "ml_map": [0.30, 0.31], "baseline_decoder_map": [0.50, 0.52], "rankseg_decoder_map": [0.45, 0.47],
               "ml_scene_acc": [0.70, 0.72], "baseline_decoder_scene_acc": [0.90, 0.91],
               "rankseg_decoder_scene_acc": [0.80, 0.81]}
    shared = {"baseline": [0.05, 0.06], "rankseg": [0.08, 0.095], "gt_eval": [0.15, 0.16],
              "baseline_scene_oracle": [0.10, 0.115], "rankseg_scene_oracle": [0.11, 0.12],
              "ml_map": [0.60, 0.62], "baseline_decoder_map": [0.40, 0.41], "rankseg_decoder_map": [0.35, 0.36],
              "ml_scene_acc": [0.90, 0.92], "baseline_decoder_scene_acc": [0.60, 0.61],
              "rankseg_decoder_scene_acc": [0.55, 0.56]}
    _write_replication(tmp_path / "pretrained" / "synthetic", default)
    _write_replication(tmp_path / "pretrained" / "synthetic_bg1_all", shared)
    worlds = ["default", "shared-bg:1,all-classes"]
    out = RW.main(["--smoke", "--pretrained", "--work", str(tmp_path), *sum((["--world", w] for w in worlds), [])])
    rec = json.loads(Path(out["results"]).read_text())
    assert Path(out["results"]).name == "results_world_pretrained_smoke.json"
    assert [w["world"] for w in rec["worlds"]] == worlds and rec["protocol"]["pretrain_iters"] > 0
    assert [w["backgrounds"] for w in rec["worlds"]] == [2, 1]  # K = 40: S = 2 scenes
    _check_record(rec, tmp_path)  # every number re-read from the files, every row re-judged
    v = rec["verdicts"]
    # By hand: gains 0.01 / 0.01 vs 0.05 / 0.055; P1 only at B = 1; lifts -0.01 / -0.02 vs +0.03 / +0.035.
    assert v["P0"] == "holds" and v["P1"] == {"default": False, "shared-bg:1,all-classes": True}
    assert v["P2"] == "holds"
    (p2,) = [r for r in v["rows"] if r["prediction"] == "P2"]
    assert p2["diffs"] == pytest.approx([0.04, 0.055])
    assert "pre-trained protocol" in out["report"] and "Predictions, stated before the results" in out["report"]
    assert not list((tmp_path / "pretrained" / "synthetic").glob("*/seed*/model.safetensors"))  # nothing trained
    with pytest.raises(UserError, match=r"run `python bench/replicate.py --world shared-bg:1` first"):
        RW.main(["--smoke", "--pretrained", "--work", str(tmp_path), "--world", "default", "--world", "shared-bg:1"])
    bad = tmp_path / "pretrained" / "synthetic_bg1_all" / "evals" / "rankseg_seed1_precondition.json"
    bad.write_text('{"ml_map": 0.6')  # truncated
    with pytest.raises(UserError, match=r"rankseg_seed1_precondition.json is not a valid record .*delete it"):
        RW.main(["--smoke", "--pretrained", "--work", str(tmp_path), *sum((["--world", w] for w in worlds), [])])


WORK = Path(__file__).resolve().parents[1] / "runs" / "replication"


@pytest.mark.parametrize("name,block", [("results_world", "world"), ("results_world_pretrained", "world-pretrained")])
def test_published_sweep_recomputed_from_its_run_files(name: str, block: str) -> None:
    """The numbers and verdicts of docs/replication.md's `world` (from scratch) and
    `world-pretrained` blocks, from runs/replication."""
    if not (WORK / f"{name}.json").is_file():
        pytest.skip("the sweep's run files are not on this machine")
    rec = json.loads((WORK / f"{name}.json").read_text())
    _check_record(rec, WORK)
    doc = (Path(__file__).resolve().parents[1] / "docs" / "replication.md").read_text()
    block = doc.split(f"<!-- {block}:start -->")[1].split(f"<!-- {block}:end -->")[0]
    assert f"- P0: **{rec['verdicts']['P0']}**." in block and f"- P2: **{rec['verdicts']['P2']}**." in block
