"""A world where RankSeg's mechanism is testable: the sweep over synthetic worlds (issue 23, item 3;
docs/replication.md, "The world sweep"; the worlds: docs/synthetic.md, "Harder worlds").

    python bench/replicate_world.py --docs      # the sweep, writes its block into docs/replication.md
    python bench/replicate_world.py --smoke     # end to end in seconds (tiny everything)
    # P0-P2 on each world's pre-trained replication (bench/replicate.py --world W first):
    python bench/replicate_world.py --pretrained --docs --world default --world shared-bg:1,all-classes

In the default synthetic world every scene has a background of its own, so the background names
the scene and the full-K decoder already knows it; there the paper's precondition fails (the
decoder's own ranking out-ranks the multi-label head). This sweep shares the S scenes' backgrounds
among B classes (by default B = S and B = 1, every object class shown in some scene; `--world`
adds levels) and measures, per
world, the baseline and RankSeg of the replication's from-scratch protocol (`Protocol.from_scratch`,
one recipe for both) over `--seeds` seeds, and on every run the precondition diagnostics of
bench/replication_diagnostics.py (`precondition`: ml-head vs decoder ranking, scene accuracy, the
scene oracle) plus the GT (eval) oracle of the baseline.

PREDICTIONS, stated before any sweep run (01:35 UTC, 2026-12-06; also in the docs block):

- P0: the scene-oracle gain (the baseline's mIoU when its selection is the image's GT classes plus
  every class of its scene, minus its own mIoU) grows as backgrounds are shared: at every B < S it
  is larger than at B = S, beyond the seed spread. Why: with its own background the scene is
  visible in every image; with shared backgrounds the decoder must infer it from the objects.
- P1: the multi-label head out-ranks the decoder: RankSeg's ml head has a higher mAP AND a higher
  scene accuracy than the ranking read off the baseline's segmentation (per-class max softmax
  over the image's pixels), beyond the seed spread. Expected to hold, if anywhere, where the
  background no longer gives the scene away; from scratch (ml mAP about 21 in the from-scratch
  replication) it may hold nowhere, and then the test is inconclusive.
- P2: RankSeg - Baseline grows where P1 holds: in every world where P1 holds it is larger than in
  every world where P1 fails, beyond the seed spread. Inconclusive when P1 holds in all worlds or
  in none (no contrast).

`--pretrained` trains nothing: it judges P0-P2 on the runs and evaluations that the pre-trained
replication (`python bench/replicate.py --world W`, which has them all: baseline, RankSeg, their
precondition files and the baseline's GT (eval)) left for each world, read from those files, and
writes its own block (`world-pretrained`) and results file. Its predictions were stated before
the first pre-trained world other than the default finished (PREDICTED_AT_PRETRAINED).

Verdicts use bench/replication_claims.py's rule ("beyond the seed spread"); `verdicts` recomputes
them from the per-seed numbers the results JSON stores, and tests/test_replicate_world.py
recomputes those numbers from the run files. Runs and evaluations are cached in --work exactly as
bench/replicate.py caches them (its `train_job` / `eval_job` / `run_tasks`), under the same paths
as `python bench/replicate.py --from-scratch --world W`, so either script reuses the other's runs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/
from replicate import (  # noqa: E402
    DOC,
    LoadSampler,
    Task,
    WorldSpec,
    _threads,
    cpu_seconds,
    eval_job,
    keeping_threads,
    log_invocation,
    parse_world,
    publish,
    run_tasks,
    synthetic_root,
    train_job,
)
from replication_claims import Comparison, compare  # noqa: E402
from replication_diagnostics import precondition_job  # noqa: E402
from replication_protocol import Protocol, recipe, train_variants  # noqa: E402

PREDICTED_AT = "01:35 UTC, 2026-12-06"
PREDICTIONS = (
    ("P0", "the scene-oracle gain on the baseline (scene oracle − own mIoU) grows as backgrounds are shared: at every "
           "B < S it exceeds the B = S world's, beyond the seed spread"),
    ("P1", "the ml head out-ranks the decoder: RankSeg's ml-head mAP AND scene accuracy exceed those of the ranking "
           "read off the baseline's segmentation (per-class max softmax), beyond the seed spread"),
    ("P2", "RankSeg − Baseline grows where P1 holds: larger in every world where P1 holds than in every world where it "
           "fails, beyond the seed spread (inconclusive when P1 holds everywhere or nowhere)"),
)
PREDICTED_AT_PRETRAINED = "04:26 UTC, 2026-12-06 (the B = 1 pre-trained replication started 04:17, no result yet)"
PREDICTIONS_PRETRAINED = (
    ("P0", "as from scratch: the baseline's scene-oracle gain is larger in the shared-background world than in the "
           "default one (B = S), beyond the seed spread"),
    ("P1", "as from scratch, per world (the ml head of RankSeg pre-trained and fine-tuned against the ranking read off "
           "the pre-trained baseline's segmentation). Expected: it fails in the default world (measured there: "
           "-14.8 mAP points) and, less clearly, in the B = 1 world too: pre-training teaches the backbone the "
           "classes, which helps the decoder's ranking as much as the head's"),
    ("P2", "as from scratch; inconclusive if P1 fails in both worlds"),
)
# B = S = 8 and B = 1 at K = 200. A full-size world costs ~20 min of wall time on the 2 shared
# cores (measured: 300 baseline iterations took ~8 min per run at a 1-min load of ~9), so the
# intermediate levels (--world shared-bg:4,all-classes, shared-bg:2,...) did not fit the budget.
WORLDS = ("all-classes", "shared-bg:1,all-classes")
SMOKE_WORLDS = ("all-classes", "shared-bg:1,all-classes")  # K = 40: S = 2
VARIANTS = ("baseline", "rankseg")
BLOCK = "world"
BLOCK_PRETRAINED = "world-pretrained"
SEED_KEYS = ("baseline", "rankseg", "baseline_gt_eval", "baseline_scene_oracle", "ml_map", "decoder_map",
             "ml_scene_acc", "decoder_scene_acc", "rankseg_decoder_map", "rankseg_scene_oracle")


# ---------------------------------------------------------------------------------------
# Jobs


def world_base(p: Protocol, work: Path, world: WorldSpec) -> Path:
    """Where a world's runs live: bench/replicate.py's directory for that world and regime."""
    tag = world.tag(p.num_classes)
    return work / ("pretrained" if p.pretrained else "scratch") / ("synthetic" + (f"_{tag}" if tag else ""))


def plan_world(p: Protocol, work: Path, spec: str, root: Path) -> tuple[list[Task], dict[tuple[str, int], Path]]:
    """Training and evaluation tasks of one world (keys start with the world's spec)."""
    world = parse_world(spec)
    base = world_base(p, work, world)
    variants = train_variants(p, p.num_classes)
    runs = {(v, s): base / v / f"seed{s}" for v in VARIANTS for s in range(p.seeds)}
    kap = min(p.kappa, p.num_classes)
    tasks = [Task((spec, "train", v, s), train_job,
                  (str(runs[(v, s)]), str(root), recipe(p, p.size, s) + variants[v], p.threads))
             for v in VARIANTS for s in range(p.seeds)]
    for s in range(p.seeds):
        for v in VARIANTS:
            tasks.append(Task((spec, "precondition", v, s), precondition_job,
                              (str(runs[(v, s)]), str(base / "evals" / f"{v}_seed{s}_precondition.json"),
                               str(root), kap, p.threads),
                              ((spec, "train", v, s),)))
        tasks.append(Task((spec, "eval", "baseline", s), eval_job,  # the name bench/replicate.py gives it
                          (str(runs[("baseline", s)]), str(base / "evals" / f"baseline_seed{s}_gt_eval.json"),
                           {"oracle": True}, p.threads), ((spec, "train", "baseline", s),)))
    return tasks, runs


def world_facts(root: Path) -> dict[str, Any]:
    """What a world is: its options and how many classes it shows (docs/synthetic.md)."""
    from rankseg_core.convert.synthetic import num_scenes, shown_classes, world_of
    from rankseg_core.shards.read import ShardIndex

    opts = ShardIndex(root).meta["options"]
    w = world_of(opts)
    s = num_scenes(int(opts["num_classes"]))
    return {"num_classes": int(opts["num_classes"]), "scenes": s, "backgrounds": int(opts.get("backgrounds", s)),
            "all_classes": bool(opts.get("all_classes", False)), "shown": int(len(shown_classes(w))),
            "objects_per_scene": int(w.scenes_objects.shape[1]), "data": str(root)}


def read_world(p: Protocol, work: Path, spec: str) -> dict[str, list[float | None]]:
    """The per-seed numbers of one world (SEED_KEYS) from the files its runs left (this sweep's,
    or with `--pretrained` the pre-trained replication's): each run's `replicate.json` (its
    final evaluation), the precondition files and the baseline's GT (eval) evaluation, under
    `world_base`; the same records the tasks return."""
    import json

    from rankseg_core.errors import UserError

    base = world_base(p, work, parse_world(spec))
    regime = "" if not p.pretrained else " (pre-trained)"

    def load(path: Path) -> dict:
        if not path.is_file():
            raise UserError(f"{path} is missing: run `python bench/replicate.py"
                            f"{'' if p.pretrained else ' --from-scratch'} --world {spec}` first{regime}")
        try:
            rec = json.loads(path.read_text())
        except ValueError as exc:  # a truncated or hand-edited record
            raise UserError(f"{path} is not a valid record ({exc}); delete it and re-run the replication") from None
        if not isinstance(rec, dict):
            raise UserError(f"{path} is not a valid record (not a JSON object); delete it and re-run the replication")
        return rec

    def get(name: str, key: str) -> list[float | None]:
        return [load(base / name.format(s=s)).get(key) for s in range(p.seeds)]

    return {
        "baseline": get("baseline/seed{s}/replicate.json", "miou"), "rankseg": get("rankseg/seed{s}/replicate.json", "miou"),
        "baseline_gt_eval": get("evals/baseline_seed{s}_gt_eval.json", "miou"),
        "baseline_scene_oracle": get("evals/baseline_seed{s}_precondition.json", "scene_oracle_miou"),
        "rankseg_scene_oracle": get("evals/rankseg_seed{s}_precondition.json", "scene_oracle_miou"),
        "ml_map": get("evals/rankseg_seed{s}_precondition.json", "ml_map"),
        "decoder_map": get("evals/baseline_seed{s}_precondition.json", "decoder_map"),
        "ml_scene_acc": get("evals/rankseg_seed{s}_precondition.json", "ml_scene_acc"),
        "decoder_scene_acc": get("evals/baseline_seed{s}_precondition.json", "decoder_scene_acc"),
        "rankseg_decoder_map": get("evals/rankseg_seed{s}_precondition.json", "decoder_map"),
    }


# ---------------------------------------------------------------------------------------
# Verdicts (pure: from the per-seed numbers alone)


def _diff(a: list, b: list) -> list[float]:
    return [float(x) - float(y) for x, y in zip(a, b, strict=True)]


def _row(c: Comparison, prediction: str, world: str) -> dict:
    return {"prediction": prediction, "world": world, "claim": c.claim, "a": c.a, "b": c.b, "relation": c.relation,
            "diffs": c.diffs, "mean_diff": c.mean_diff, "spread": c.spread, "outcome": c.outcome, "holds": c.holds,
            "verdict": c.verdict}


def verdicts(worlds: list[dict]) -> dict:
    """P0 / P1 / P2 (module docstring) from each world's `backgrounds` and per-seed `seeds`
    (SEED_KEYS; mIoU and mAP as fractions). The reference world is the one with the most
    backgrounds (B = S). Returns {"rows": [...], "P0": ..., "P1": {world: bool}, "P2": ...}.

    P1's decoder is the BASELINE's: what a full-K decoder trained without a selection already
    knows, which is what a selection must add to. RankSeg's own decoder, scored over all K
    classes, runs ranks past its trained kappa on the last rank's gamma / beta (off its
    training distribution), so its ranking would flatter the ml head; it is compared for
    reference only ("P1 (reference)", not part of the decision)."""
    rows: list[dict] = []
    ref = max(worlds, key=lambda w: w["backgrounds"])
    gain = {w["world"]: _diff(w["seeds"]["baseline_scene_oracle"], w["seeds"]["baseline"]) for w in worlds}
    lift = {w["world"]: _diff(w["seeds"]["rankseg"], w["seeds"]["baseline"]) for w in worlds}
    p0 = []
    for w in sorted(worlds, key=lambda w: -w["backgrounds"]):
        if w["backgrounds"] < ref["backgrounds"]:
            c = compare(f"P0: scene-oracle gain at B = {w['backgrounds']} > at B = {ref['backgrounds']}",
                        f"gain B={w['backgrounds']}", gain[w["world"]], ">", f"gain B={ref['backgrounds']}",
                        gain[ref["world"]])
            rows.append(_row(c, "P0", w["world"]))
            p0.append(c.holds)
    p1: dict[str, bool] = {}
    for w in worlds:
        s = w["seeds"]
        a = compare(f"P1: ml-head mAP > decoder mAP (B = {w['backgrounds']})", "ml head", s["ml_map"], ">",
                    "decoder", s["decoder_map"])
        b = compare(f"P1: ml-head scene accuracy > decoder's (B = {w['backgrounds']})", "ml head", s["ml_scene_acc"],
                    ">", "decoder", s["decoder_scene_acc"])
        rows += [_row(a, "P1", w["world"]), _row(b, "P1", w["world"])]
        p1[w["world"]] = a.holds and b.holds
        own = s.get("rankseg_decoder_map")
        if own and all(x is not None for x in own):  # for reference only: not part of P1 (docs)
            c = compare(f"ml-head mAP > RankSeg's own decoder mAP (B = {w['backgrounds']})", "ml head", s["ml_map"],
                        ">", "own decoder", own)
            rows.append(_row(c, "P1 (reference)", w["world"]))
        c = compare(f"RankSeg > Baseline (B = {w['backgrounds']})", "RankSeg", s["rankseg"], ">", "Baseline",
                    s["baseline"])
        rows.append(_row(c, "RankSeg > Baseline", w["world"]))
    yes = [w for w in worlds if p1[w["world"]]]
    no = [w for w in worlds if not p1[w["world"]]]
    if not yes or not no:
        p2 = f"inconclusive (P1 holds in {'no' if not yes else 'every'} world: no contrast to test P2 against)"
    else:
        ok = True
        for w in yes:
            for v in no:
                c = compare(f"P2: RankSeg − Baseline at B = {w['backgrounds']} (P1 holds) > at B = {v['backgrounds']} "
                            "(P1 fails)", f"lift B={w['backgrounds']}", lift[w["world"]], ">",
                            f"lift B={v['backgrounds']}", lift[v["world"]])
                rows.append(_row(c, "P2", w["world"]))
                ok &= c.holds
        p2 = "holds" if ok else "does not hold"
    return {"rows": rows, "P0": ("holds" if all(p0) else "does not hold") if p0 else "not tested (one sharing level)",
            "P1": p1, "P2": p2}


# ---------------------------------------------------------------------------------------
# Report


def _pc(v: list, scale: float = 100.0) -> str:
    """mean ± sample std and the per-seed values, in % (None when a number is missing)."""
    import numpy as np

    if not v or any(x is None for x in v):
        return "–"
    a = np.asarray(v, float) * scale
    sd = f" ± {a.std(ddof=1):.1f}" if len(a) > 1 else ""
    return f"{a.mean():.1f}{sd} ({', '.join(f'{x:.1f}' for x in a)})"


def _sgn(x: float, scale: float = 100.0) -> str:
    return f"{x * scale:+.1f}"


def report(worlds: list[dict], judged: dict, p: Protocol, command: str, smoke: bool, history: list[dict],
           seconds: float) -> str:
    """The markdown block (docs/replication.md, `world`)."""
    out = [f"Command: `{command}`" + (" (**smoke**: tiny sizes, numbers meaningless)" if smoke else "") + "  "]
    now = history[-1]
    if p.pretrained:  # trains nothing: the wall time is that of each world's replication
        out.append(f"This judgement ({now['started']}): {now['wall_s']:.1f} s, from the stored runs and evaluations.  ")
    else:
        out += _invocations(history, p)
    out.extend(_protocol(p))
    return _body(out, worlds, judged, p, smoke, history, seconds)


def _invocations(history: list[dict], p: Protocol) -> list[str]:
    """The sweep's wall-time lines: this invocation and all of them on the work directory."""
    out = []
    now, load = history[-1], history[-1]["load"]
    out.append(f"This invocation ({now['started']}): wall time **{now['wall_s'] / 60:.1f} min**, {now['reused']} of "
               f"{now['total']} runs reused, {now['resumed']} resumed from a checkpoint; CPU time of its processes {now['cpu_s'] / 60:.1f} min (= "
               f"{now['cpu_s'] / 60 / p.jobs:.1f} min on {p.jobs} dedicated core(s)); 1-min load average at start / end "
               f"{load['start']:.1f} / {load['end']:.1f}, mean {load['mean']:.1f}, max {load['max']:.1f} (other "
               "processes included).  ")
    if len(history) > 1:
        out.append(f"The {len(history)} invocations on this work directory took {sum(h['wall_s'] for h in history) / 60:.1f} "
                   f"min of wall time in all (runs reused when finished, resumed when interrupted).  ")
    return out


def _protocol(p: Protocol) -> list[str]:
    """The protocol line and the predictions stated before the results."""
    out = []
    if p.pretrained:
        regime = (f"pre-trained protocol (`Protocol()`: one multi-label classifier pre-trained per world on its "
                  f"{p.pretrain_images} `pretrain` images, {p.pretrain_iters} iterations, its backbone initialising "
                  f"every run at {p.backbone_lr_mult:g} × the lr)")
        source = "Read from the runs of `python bench/replicate.py --world W` (nothing trained here). "
        heading, at, predictions = "Predictions, stated before the results", PREDICTED_AT_PRETRAINED, PREDICTIONS_PRETRAINED
    else:
        regime, source = "from-scratch protocol (`Protocol.from_scratch`)", ""
        heading, at, predictions = "Predictions, stated before any sweep run", PREDICTED_AT, PREDICTIONS
    out.append(f"Protocol: the replication's {regime}, K = {p.num_classes}, {p.size} px, {p.images} train / "
               f"{p.val_images} val images per world; {p.iters} iterations of batch {p.batch} (AdamW lr {p.lr:g}, "
               f"warm-up {p.warmup}, poly decay), training κ = {p.kappa}, ml loss weight {p.ml_weight:g}; {p.seeds} "
               f"seeds; baseline and RankSeg per world. {source}mIoU / mAP / accuracy in %, mean ± sample std over "
               "seeds, then per seed.")
    out += ["", f"**{heading}** ({at}):", ""]
    out += [f"- **{k}**: {t}." for k, t in predictions]
    return out


def _body(out: list[str], worlds: list[dict], judged: dict, p: Protocol, smoke: bool, history: list[dict],
          seconds: float) -> str:
    """The tables, verdicts and outcome after the header lines `out`."""
    out += ["", "**The worlds** (docs/synthetic.md, \"Harder worlds\"; S scenes share B backgrounds; *shown* = classes "
                "some scene draws):", ""]
    out.append("| world | B of S | shown classes | objects per scene | data |")
    out.append("| --- | --- | --- | --- | --- |")
    for w in worlds:
        f = w["facts"]
        out.append(f"| `{w['world']}` | {f['backgrounds']} of {f['scenes']} | {f['shown']} of {f['num_classes']} | "
                   f"{f['objects_per_scene']} | `{Path(f['data']).name}` |")
    out += ["", "**Segmentation** (mIoU) and the two oracles on the baseline (GT (eval): its selection is the image's GT "
                "classes; scene oracle: GT classes plus every class of the image's scene):", ""]
    out.append("| world | Baseline | RankSeg | RankSeg − Baseline | Baseline + GT (eval) | Baseline + scene oracle | "
               "scene-oracle gain |")
    out.append("| --- | --- | --- | --- | --- | --- | --- |")
    for w in worlds:
        s = w["seeds"]
        lift = _diff(s["rankseg"], s["baseline"])
        gain = _diff(s["baseline_scene_oracle"], s["baseline"])
        out.append(f"| B = {w['backgrounds']} | {_pc(s['baseline'])} | {_pc(s['rankseg'])} | {_pc(lift)} | "
                   f"{_pc(s['baseline_gt_eval'])} | {_pc(s['baseline_scene_oracle'])} | {_pc(gain)} |")
    out += ["", "**The precondition** (bench/replication_diagnostics.py `precondition`, val split): the ranking of "
                f"RankSeg's ml head against the ranking read off the baseline's segmentation (per-class max softmax); "
                f"scene accuracy = the scene holding most of a ranking's top-{p.kappa} is one of the image's scenes; "
                "RankSeg's own decoder ranking for reference:", ""]
    out.append("| world | ml-head mAP | decoder mAP (baseline) | decoder mAP (RankSeg) | ml-head scene acc. | "
               "decoder scene acc. (baseline) |")
    out.append("| --- | --- | --- | --- | --- | --- |")
    for w in worlds:
        s = w["seeds"]
        out.append(f"| B = {w['backgrounds']} | {_pc(s['ml_map'])} | {_pc(s['decoder_map'])} | "
                   f"{_pc(s['rankseg_decoder_map'])} | {_pc(s['ml_scene_acc'])} | {_pc(s['decoder_scene_acc'])} |")
    out += ["", "**Verdicts** (bench/replication_claims.py: A > B holds when A − B > 0 on every seed AND the mean "
                "difference exceeds the pooled sample std; seeds paired by index, also across worlds). Differences in "
                "points:", ""]
    out.append("| prediction | comparison | A − B per seed | mean A − B | pooled std | verdict |")
    out.append("| --- | --- | --- | --- | --- | --- |")
    for r in judged["rows"]:
        out.append(f"| {r['prediction']} | {r['claim'].split(': ', 1)[-1]} | {', '.join(_sgn(d) for d in r['diffs'])} | "
                   f"{_sgn(r['mean_diff'])} | {r['spread'] * 100:.1f} | **{r['verdict']}** |")
    p1 = judged["P1"]
    held = [w["backgrounds"] for w in worlds if p1[w["world"]]]
    out += ["", "**Outcome** (mechanical, from the table above):", "",
            f"- P0: **{judged['P0']}**.",
            f"- P1: **holds in {'no world' if not held else 'B = ' + ', '.join(map(str, held))}** "
            f"(of B = {', '.join(str(w['backgrounds']) for w in worlds)}).",
            f"- P2: **{judged['P2']}**."]
    if not held:
        out.append("- So the test of RankSeg's mechanism is **inconclusive** in these worlds: nowhere did its ml head "
                   "rank better than the decoder, and a selection driven by the worse ranker cannot be expected to "
                   "help (whether RankSeg − Baseline is positive there says nothing about the mechanism).")
    if {w["world"] for w in worlds} == set(WORLDS) and not smoke and not p.pretrained:
        out.append("- Not run: the sharing levels between B = S and B = 1 (`--world shared-bg:4,all-classes`, "
                   "`shared-bg:2,all-classes`): a full-size world costs ~20 min of wall time on the 2 shared cores, "
                   "and the budget was 35 min.")
    total = sum(h["wall_s"] for h in history)
    if p.pretrained:
        out.append("\nWall time: that of each world's `bench/replicate.py --world W` invocation, in its own block; "
                   f"this judgement {seconds:.0f} s.")
    else:
        out.append(f"\nSweep wall time: **{total / 60:.1f} min** over {len(history)} invocation(s) on this work "
                   f"directory (this one {seconds / 60:.1f} min; finished runs are reused, interrupted ones resumed).")
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(__file__).resolve().parents[1] / "runs" / "replication")
    ap.add_argument("--world", action="append", default=None,
                    help=f"a world (repeatable; default {' '.join(WORLDS)}): see bench/replicate.py --world")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 iterations: checks the pipeline in seconds")
    ap.add_argument("--docs", action="store_true", help=f"write the `{BLOCK}` block into docs/replication.md")
    ap.add_argument("--pretrained", action="store_true",
                    help=f"judge the pre-trained replication's runs of each world (run `bench/replicate.py --world W` "
                         f"first; trains nothing; block `{BLOCK_PRETRAINED}`)")
    for name in ("seeds", "iters", "jobs", "threads", "images"):
        ap.add_argument(f"--{name}", type=int)
    args = ap.parse_args(argv)
    return keeping_threads(_main, args, argv)


def _main(args: argparse.Namespace, argv: list[str] | None) -> dict:
    from rankseg_core.errors import UserError

    p = Protocol.smoke(not args.pretrained) if args.smoke else Protocol() if args.pretrained else Protocol.from_scratch()
    for name in ("seeds", "iters", "jobs", "threads", "images"):
        if getattr(args, name) is not None:
            setattr(p, name, getattr(args, name))
    if args.images is not None and not args.smoke:
        p.val_images = max(1, p.images // 10)
    specs = list(args.world or (SMOKE_WORLDS if args.smoke else WORLDS))
    worlds = [parse_world(s) for s in specs]
    if len({w.tag(p.num_classes) for w in worlds}) < len(worlds):
        raise UserError(f"--world: {specs} name the same world twice")
    if p.seeds < 2:
        raise UserError(f"--seeds {p.seeds}: the verdicts need at least 2 seeds")
    _threads(p.threads)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0, cpu0, load = time.perf_counter(), cpu_seconds(), LoadSampler()
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime()) + " UTC"

    roots = {spec: synthetic_root(p, work, w) for spec, w in zip(specs, worlds)}
    trained: list[dict] = []
    if not args.pretrained:  # with --pretrained the pre-trained replication of each world left its files
        tasks: list[Task] = []
        for spec in specs:
            tasks += plan_world(p, work, spec, roots[spec])[0]
        # Training first (all worlds), then the evaluations: `run_tasks` takes tasks in list order.
        tasks.sort(key=lambda t: t.key[1] != "train")
        n_train = sum(t.key[1] == "train" for t in tasks)
        print(f"[world] {len(specs)} worlds: {n_train} runs and {len(tasks) - n_train} evaluations, {p.jobs} at a time",
              flush=True)
        trained = [r for k, r in run_tasks(tasks, p.jobs).items() if k[1] == "train"]
    seeds = {spec: read_world(p, work, spec) for spec in specs}
    runs = {f"{spec}|{v}|seed{s}": str(world_base(p, work, parse_world(spec)) / v / f"seed{s}")
            for spec in specs for v in VARIANTS for s in range(p.seeds)}
    seconds = time.perf_counter() - t0
    results = [{"world": spec, "backgrounds": world_facts(roots[spec])["backgrounds"], "facts": world_facts(roots[spec]),
                "seeds": seeds[spec]} for spec in specs]
    judged = verdicts(results)
    command = ("python bench/replicate_world.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    regime = "pretrained" if p.pretrained else "scratch"
    history = log_invocation(work / regime / f"invocations_world{'_smoke' if args.smoke else ''}.jsonl", {
        "started": started, "command": command, "wall_s": seconds, "cpu_s": cpu_seconds() - cpu0, "load": load.stop(),
        "total": len(trained), "reused": sum(bool(r.get("reused")) for r in trained),
        # A reused run's record is its stored one, which keeps the flag of the invocation that trained it.
        "resumed": sum(bool(r.get("resumed")) and not r.get("reused") for r in trained)})
    body = report(results, judged, p, command, args.smoke, history, seconds)
    record = {"protocol": p.__dict__,
              "predictions": dict(PREDICTIONS_PRETRAINED if p.pretrained else PREDICTIONS),
              "predicted_at": PREDICTED_AT_PRETRAINED if p.pretrained else PREDICTED_AT,
              "total_seconds": seconds, "worlds": results, "verdicts": judged, "runs": runs}
    name = "results_world" + ("_pretrained" if p.pretrained else "") + ("_smoke" if args.smoke else "")
    results_json = work / f"{name}.json"
    publish(results_json, record, body, args.docs and not args.smoke, DOC, BLOCK_PRETRAINED if p.pretrained else BLOCK,
            work, time.perf_counter() - t0)
    return {"protocol": p, "record": record, "report": body, "results": results_json}


if __name__ == "__main__":
    from replicate import cli

    sys.exit(cli(None, main))
