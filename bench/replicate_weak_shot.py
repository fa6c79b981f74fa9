"""Weak-shot segmentation measured on CPU: SimFormer's claims (its supplement's Tables 1-3) and
RankSeg in the weak-shot setting (docs/replication.md, "Weak-shot segmentation").

    python bench/replicate_weak_shot.py --docs     # the whole protocol, writes its block of docs/replication.md
    python bench/replicate_weak_shot.py --smoke    # end to end in seconds (tiny everything)

On the replication's synthetic shards (K = 200, 64 px; bench/replicate.py's `synthetic_root`)
with look-alike weak-shot splits (rankseg_core/convert/synthetic.py `look_alike_split`: every
novel class shares its look with a base class of other scenes; 25 % and 50 % of the shown
classes novel, the larger split containing the smaller), from random weights, `--seeds` seeds:
- RankSeg weak-shot against the per-pixel weak-shot baseline (Segmenter ViT-T/16, MIL +
  complementary loss; issue 21 item 4);
- SimFormer on a tiny MaskFormer-R50: cross-image pixel pairs > self pairs > none
  (supplement Table 2), robustness to J, the points per image (Table 1), and the drop as the
  novel ratio grows while staying above the baseline (Table 3);
- every model against chance on NovelIoU (the best constant prediction), and a verdict per
  claim by bench/replication_claims.py's rule, on NovelIoU.

Runs go through bench/replicate.py's `train_job` / `run_tasks`, so a finished run with the same
resolved config is reused and an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the replication's modules
import replication_report as rep  # noqa: E402
from replicate import (  # noqa: E402
    DOC,
    REPO,
    LoadSampler,
    Task,
    _threads,
    cpu_seconds,
    keeping_threads,
    log_invocation,
    publish,
    run_tasks,
    synthetic_root,
    train_job,
)
from replication_claims import Comparison, compare  # noqa: E402
from replication_protocol import Protocol, cached, recipe  # noqa: E402

BLOCK = "weak-shot"  # docs/replication.md: <!-- weak-shot:start --> ... <!-- weak-shot:end -->
WS_METRICS = ("miou", "base_iou", "novel_iou", "novel_acc")


# ---------------------------------------------------------------------------------------
# The protocol


@dataclass
class WeakShotProtocol:
    """Sizes and recipe of this section (docs/replication.md, "Weak-shot segmentation")."""

    num_classes: int = 200  # the replication's synthetic K, and its shards
    size: int = 64
    images: int = 2000
    val_images: int = 200
    world_seed: int = 0  # synthetic_root's seed: the world the splits are drawn from
    ratio: float = 0.25  # novel ratio of the main split (the supplement's splits 1-4: 25 %)
    big_ratio: float = 0.5  # Table 3's other ratio (split 9: 50 %)
    kappa: int = 50  # the replication's training kappa
    batch: int = 8
    lr: float = 1e-3
    seeds: int = 3
    jobs: int = 2
    threads: int = 1
    # Sizes measured to fit 30 minutes of two cores (docs/replication.md says what each costs):
    segmenter_iters: int = 150
    maskformer_iters: int = 200
    maskformer_batch: int = 8  # even: cross-image pairs pair a micro-batch's images two by two
    maskformer_lr: float = 2e-3  # at the recipe's 1e-3 no MaskFormer learned novel classes in 200 iterations
    points: int = 100  # J of the SimFormer runs: the official default
    points_alt: int | None = 50  # Table 1's other J (None: Table 1 not run)
    simformer_big: bool = True  # SimFormer at the larger ratio too (Table 3's SimFormer rows)
    queries: int = 20  # MaskFormer queries (official 100; <= 10 classes per synthetic image)
    tiny: bool = False  # smoke: tiny MaskFormer widths too

    def replication(self, iters: int) -> Protocol:
        """The replication's Protocol with these sizes (its `recipe` and `synthetic_root` take one)."""
        return Protocol(num_classes=self.num_classes, size=self.size, images=self.images, val_images=self.val_images,
                        pretrain_images=0, pretrain_iters=0, iters=iters, batch=self.batch, lr=self.lr,
                        warmup=max(0, min(30, iters // 10)), kappa=self.kappa, seeds=self.seeds, jobs=self.jobs,
                        threads=self.threads, kappa_sweep=[], kappa_eval=[], thresholds=[])

    @classmethod
    def smoke(cls) -> "WeakShotProtocol":
        # K = 100: the smallest default-sized world whose looks leave room for a 50 % split; 64 px:
        # a MaskFormer-R50 at 32 px has a 1 x 1 res5 map, which its GroupNorm refuses.
        return cls(num_classes=100, size=64, images=8, val_images=4, kappa=6, batch=2, seeds=2, jobs=1,
                   segmenter_iters=2, maskformer_iters=2, points=10, points_alt=5, simformer_big=True, queries=6,
                   tiny=True)


def pct(ratio: float) -> str:
    return f"{100 * ratio:g}"


@dataclass
class Variant:
    """One weak-shot model: its family, split and the overrides that make it."""

    key: str  # run directory and claim names
    title: str  # what the report calls it
    family: str  # "segmenter" | "maskformer"
    ratio: float
    overrides: list[str]


def maskformer_knobs(p: WeakShotProtocol) -> list[str]:
    """A MaskFormer-R50 small enough for minutes on one core: 32-wide decoder, 2 decoder layers,
    `queries` queries; from random weights, so the backbone trains at the full lr and BatchNorm
    is not frozen (both official settings protect a pre-trained ResNet); no decoder dropout
    (as the recipe's Segmenter)."""
    width = 16 if p.tiny else 32
    m = "model.mask2former."
    return ["model.model=maskformer-r50", f"{m}hidden_dim={width}", f"{m}conv_dim={width}", f"{m}mask_dim={width}",
            f"{m}nheads=4", f"{m}num_queries={p.queries}", f"{m}dim_feedforward={2 * width}",
            f"{m}maskformer.dec_layers=2", f"{m}ml_query_layer=2", f"{m}maskformer.dropout=0", f"{m}freeze_bn=false",
            "optim.backbone_lr_mult=1"]


def none_resolves(p: WeakShotProtocol, root: Path, split: Path) -> bool:
    """Whether `--set model.mask2former.simformer.pixel_pairs=off` gives a weak-shot MaskFormer
    without pixel pairs. The value was spelled "none" when the results block was written, and the
    config reader turned that text into null (= cross): those Basic Model runs used the
    zero-weight fallback (docs/replication.md, "Weak-shot segmentation")."""
    from rankseg_core.engine.configure import build_train_config

    sets = [*maskformer_knobs(p), "model.mask2former.simformer.pixel_pairs=off", f"data.weak_shot={split}"]
    return build_train_config(None, sets, str(root)).model.mask2former.simformer.pixel_pairs == "off"


BASIC_BY_WEIGHTS = ["model.mask2former.simformer.pixel_pairs=cross", "model.mask2former.simformer.pair_weight=0",
                    "model.mask2former.simformer.distill_weight=0"]


def variants(p: WeakShotProtocol, splits: dict[float, Path], none_works: bool = True) -> list[Variant]:
    """Every model of this section (MaskFormer first: the longest runs start first).

    none_works: False makes the Basic Model a cross-pair model whose pair and distillation terms
    weigh 0 (the same gradients as no pixel pairs; the pair net still runs), see `none_resolves`."""
    r, big = pct(p.ratio), pct(p.big_ratio)

    def mf(pairs: str, points: int) -> list[str]:
        pair = (BASIC_BY_WEIGHTS if pairs == "off" and not none_works
                else [f"model.mask2former.simformer.pixel_pairs={pairs}"])
        return [*maskformer_knobs(p), "model.head=segmenter", *pair, f"model.mask2former.simformer.points={points}"]

    out = [
        Variant(f"mf_cross_r{r}", f"SimFormer Cross-Pair (J = {p.points})", "maskformer", p.ratio, mf("cross", p.points)),
        Variant(f"mf_self_r{r}", f"SimFormer Self-Pair (J = {p.points})", "maskformer", p.ratio, mf("self", p.points)),
        Variant(f"mf_none_r{r}", "SimFormer Basic Model (no pixel pairs)", "maskformer", p.ratio, mf("off", p.points)),
    ]
    if p.points_alt is not None:
        out.append(Variant(f"mf_cross_j{p.points_alt}_r{r}", f"SimFormer Cross-Pair (J = {p.points_alt})",
                           "maskformer", p.ratio, mf("cross", p.points_alt)))
    if p.simformer_big:
        out.append(Variant(f"mf_cross_r{big}", f"SimFormer Cross-Pair (J = {p.points})", "maskformer", p.big_ratio,
                           mf("cross", p.points)))
    for ratio in (p.ratio, p.big_ratio):
        out += [Variant(f"seg_baseline_r{pct(ratio)}", "Segmenter baseline (MIL + comp)", "segmenter", ratio,
                        ["model.head=segmenter"]),
                Variant(f"seg_rankseg_r{pct(ratio)}", "Segmenter RankSeg (weak-shot)", "segmenter", ratio,
                        ["model.head=rankseg"])]
    for v in out:
        v.overrides = [*v.overrides, f"data.weak_shot={splits[v.ratio]}"]
    return out


def overrides(p: WeakShotProtocol, v: Variant, seed: int) -> list[str]:
    """The replication's one recipe at this family's iterations, then the variant's own."""
    if v.family == "maskformer":
        return recipe(p.replication(p.maskformer_iters), p.size, seed) + [
            f"schedule.batch_size={p.maskformer_batch}", f"optim.lr={p.maskformer_lr}", *v.overrides]
    return recipe(p.replication(p.segmenter_iters), p.size, seed) + v.overrides


def write_splits(p: WeakShotProtocol, out: Path) -> dict[float, Path]:
    """ratio -> the look-alike split file of the replication's world (nested: the larger split
    holds the smaller's novel classes). Rewritten with the same bytes on every invocation, so a
    run's recorded SHA-256 stays valid."""
    from rankseg_core.convert.synthetic import look_alike_split, make_world
    from rankseg_core.utils.fsio import atomic_write_json

    world = make_world(p.num_classes, p.world_seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for ratio in (p.ratio, p.big_ratio):
        paths[ratio] = out / f"look_alike_{pct(ratio)}.json"
        atomic_write_json(paths[ratio], look_alike_split(world, ratio, p.world_seed))
    return paths


def split_novel(path: Path) -> list[int]:
    return sorted(json.loads(path.read_text())["novel"])


# ---------------------------------------------------------------------------------------
# Jobs (run in worker processes)


def confusion_counts(run_dir: str, out_json: str, threads: int) -> dict:
    """(tp, gt, pred) pixel counts per class of the run on its val split (the engine's
    evaluation), cached in out_json for the same weights: any class subset's IoU follows."""
    _threads(threads)
    out = Path(out_json)
    stamp, hit = cached(run_dir, out)
    if hit is not None:
        return hit
    import torch

    from rankseg_core.engine.evaluate import EvalOptions, evaluate_model
    from rankseg_core.engine.runs import load_run
    from rankseg_core.utils.fsio import atomic_write_json

    model, cfg = load_run(run_dir, "cpu")
    res = evaluate_model(model, cfg, EvalOptions(split=cfg.data.val_split, progress=False), torch.device("cpu"))
    tp, gt, pred = res.confusion.counts()
    rec = {"run": run_dir, "stamp": stamp, "tp": tp.astype(np.int64).tolist(), "gt": gt.astype(np.int64).tolist(),
           "pred": pred.astype(np.int64).tolist()}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, rec)
    return rec


def weak_shot_job(run_dir: str, data: str, overrides: list[str], threads: int, counts_json: str) -> dict:
    """Train (or reuse / resume) one run, then its per-class counts and the final evaluation's
    BaseIoU / NovelIoU as the engine logged them."""
    from rankseg_core.engine.runs import read_metrics

    rec = train_job(run_dir, data, overrides, threads)
    final = [r for r in read_metrics(run_dir) if r.get("type") == "eval" and r.get("final")][-1]
    return {**rec, "logged": {k: final.get(k) for k in ("miou", "base_iou", "novel_iou")},
            "counts": confusion_counts(run_dir, counts_json, threads)}


# ---------------------------------------------------------------------------------------
# Scores, chance and claims


def group_scores(counts: dict, novel: list[int] | np.ndarray) -> dict[str, float | None]:
    """mIoU and the official weak-shot means (evaluation/weak_shot.py) from per-class counts:
    a class's IoU / accuracy is defined only where it has GT pixels; mIoU as mmseg (the
    classes with GT or prediction, a predicted-only class 0)."""
    tp, gt, pred = (np.asarray(counts[k], np.float64) for k in ("tp", "gt", "pred"))
    union = gt + pred - tp
    is_novel = np.zeros(len(gt), bool)
    is_novel[np.asarray(novel, np.int64)] = True

    def mean(values: np.ndarray, keep: np.ndarray) -> float | None:
        return float(values[keep].mean()) if keep.any() else None

    with np.errstate(invalid="ignore", divide="ignore"):
        iou, acc = tp / np.maximum(union, 1), tp / np.maximum(gt, 1)
    has = gt > 0
    return {"miou": mean(iou, union > 0), "base_iou": mean(iou, has & ~is_novel),
            "novel_iou": mean(iou, has & is_novel), "novel_acc": mean(acc, has & is_novel)}


def val_counts(root: Path, num_classes: int, split: str = "val") -> np.ndarray:
    """Labelled pixels per class of a shard split (ignore excluded)."""
    from rankseg_core.shards.codec import IGNORE
    from rankseg_core.shards.read import ShardDataset

    ds = ShardDataset(root, split)
    out = np.zeros(num_classes, np.int64)
    for i in range(len(ds)):
        lab = ds.load(i)["label"].astype(np.int64)
        out += np.bincount(lab[lab != IGNORE], minlength=num_classes)[:num_classes]
    return out


def chance_novel_iou(gt: np.ndarray, novel: list[int] | np.ndarray) -> dict:
    """NovelIoU of the best constant prediction (one class on every pixel), in hindsight.

    The constant class c has IoU = gt_c / (all labelled pixels) (its union is every labelled
    pixel), every other class IoU 0 where it has GT pixels; NovelIoU averages the novel classes
    with GT pixels, so the best c is the most frequent novel class and a base c scores 0. No
    constant predictor, and no predictor of base classes only, does better."""
    gt = np.asarray(gt, np.int64)
    novel = np.asarray(novel, np.int64)
    present = novel[gt[novel] > 0]
    if present.size == 0:
        return {"class": None, "share": 0.0, "present": 0, "novel_iou": 0.0}
    top = int(present[np.argmax(gt[present])])
    share = float(gt[top] / gt.sum())
    return {"class": top, "share": share, "present": int(present.size), "novel_iou": share / present.size}


def seed_values(runs: dict, metric: str = "novel_iou") -> dict[str, list[float]]:
    """variant key -> per-seed values of `metric` (a variant with an undefined seed is left out)."""
    out = {}
    for key, r in runs.items():
        vals = r["per_seed"].get(metric)
        if vals and all(x is not None for x in vals):
            out[key] = vals
    return out


@dataclass
class Claim:
    """A verdict and the variants it compares (b None: against a fixed value)."""

    comparison: Comparison
    a: str
    b: str | None


def claims(seeds: dict[str, list[float]], chance: dict[str, float], titles: dict[str, str],
           p: WeakShotProtocol) -> list[Claim]:
    """The claims this section checks (on NovelIoU), then each model against chance. A claim
    whose runs are missing is left out. chance: variant key -> the chance NovelIoU of its split."""
    r, big, j, alt = pct(p.ratio), pct(p.big_ratio), p.points, p.points_alt
    out: list[Claim] = []

    def add(claim: str, a: str, rel: str, b: str | float, a_label: str, b_label: str) -> None:
        if a in seeds and (not isinstance(b, str) or b in seeds):
            out.append(Claim(compare(claim, a_label, seeds[a], rel, b_label, seeds[b] if isinstance(b, str) else b),
                             a, b if isinstance(b, str) else None))

    add(f"Issue 21: RankSeg > per-pixel baseline (Segmenter, {r} % novel)", f"seg_rankseg_r{r}", ">",
        f"seg_baseline_r{r}", "RankSeg", "Baseline")
    add(f"Suppl. Table 3 (RankSeg as the method): RankSeg > per-pixel baseline at {big} % novel",
        f"seg_rankseg_r{big}", ">", f"seg_baseline_r{big}", "RankSeg", "Baseline")
    add("Suppl. Table 2: Cross-Pair > Self-Pair", f"mf_cross_r{r}", ">", f"mf_self_r{r}", "Cross-Pair", "Self-Pair")
    add("Suppl. Table 2: Self-Pair > Basic Model", f"mf_self_r{r}", ">", f"mf_none_r{r}", "Self-Pair", "Basic Model")
    add("Suppl. Table 2: Cross-Pair > Basic Model", f"mf_cross_r{r}", ">", f"mf_none_r{r}", "Cross-Pair",
        "Basic Model")
    add(f"Suppl. Table 1: robust to J (J = {alt} ≈ J = {j})", f"mf_cross_j{alt}_r{r}", "≈", f"mf_cross_r{r}",
        f"J = {alt}", f"J = {j}")
    add(f"Suppl. Table 3: SimFormer drops from {r} % to {big} % novel", f"mf_cross_r{big}", "<", f"mf_cross_r{r}",
        f"{big} %", f"{r} %")
    add(f"Suppl. Table 3: the baseline drops from {r} % to {big} % novel", f"seg_baseline_r{big}", "<",
        f"seg_baseline_r{r}", f"{big} %", f"{r} %")
    add(f"Suppl. Table 3 (RankSeg as the method): RankSeg drops from {r} % to {big} % novel", f"seg_rankseg_r{big}",
        "<", f"seg_rankseg_r{r}", f"{big} %", f"{r} %")
    for ratio in (r, big):
        add(f"Suppl. Table 3: SimFormer > baseline at {ratio} % novel", f"mf_cross_r{ratio}", ">",
            f"seg_baseline_r{ratio}", "SimFormer", "Baseline")
    for key in seeds:
        if key in chance:
            add(f"{titles.get(key, key)} beats chance", key, ">", chance[key], "NovelIoU",
                f"chance ({100 * chance[key]:.2f})")
    return out


def claim_records(found: list[Claim]) -> list[dict]:
    """The claims as the report shows them, with the mechanical verdict, and `outcome`
    "inconclusive" for a comparison of two models of which neither beats chance: such models
    learned nothing measurable about novel classes, so whichever is ahead is ahead by noise
    around chance, whatever the seed-spread rule says."""
    beats = {c.a: c.comparison.holds for c in found if c.b is None}
    out = []
    for c in found:
        rec = {**dataclasses.asdict(c.comparison), "verdict": c.comparison.verdict, "a_key": c.a, "b_key": c.b,
               "status": "holds" if c.comparison.holds else "does not hold"}
        if c.b is not None and not beats.get(c.a, True) and not beats.get(c.b, True):
            rec["status"] = "inconclusive"
            rec["verdict"] = "inconclusive (neither model beats chance on NovelIoU)"
        out.append(rec)
    return out


def claims_table(rows: list[dict]) -> str:
    """replication_report's verdict table, with the inconclusive status."""
    return rep.md_table(["claim", "A vs B", "A − B per seed", "mean A − B", "pooled std", "verdict"], [
        [c["claim"], f"{c['a']} {c['relation']} {c['b']}", ", ".join(f"{100 * d:+.1f}" for d in c["diffs"]),
         f"{100 * c['mean_diff']:+.1f}", f"{100 * c['spread']:.1f}",
         f"**{c['status']}** ({c['verdict'].split('(', 1)[1]}"] for c in rows])


# ---------------------------------------------------------------------------------------
# Aggregation and cost


def collect(trained: dict[tuple, dict], p: WeakShotProtocol, vs: list[Variant], novel: dict[float, list[int]]) -> dict:
    """Per variant: per-seed weak-shot scores (from the per-class counts, over its own split and,
    for the larger split, also over the smaller split's novel classes), their mean ± std."""
    runs: dict[str, dict] = {}
    for v in vs:
        recs = [trained[(v.key, s)] for s in range(p.seeds)]
        own = [group_scores(r["counts"], novel[v.ratio]) for r in recs]
        row = {"per_seed": {m: [x[m] for x in own] for m in WS_METRICS},
               **{m: rep.agg([x[m] for x in own]) for m in WS_METRICS},
               "logged_novel_iou": [r["logged"]["novel_iou"] for r in recs],
               "train_seconds": rep.agg([r["train_seconds"] for r in recs])}
        if v.ratio != p.ratio:  # like for like: the smaller split's novel classes only
            small = [group_scores(r["counts"], novel[p.ratio])["novel_iou"] for r in recs]
            row["per_seed"]["novel_iou_small"] = small
            row["novel_iou_small"] = rep.agg(small)
        runs[v.key] = row
    return runs


def cost(runs: dict[tuple[str, int], Path], vs: list[Variant]) -> dict[str, dict]:
    """Params and FLOPs of one forward at the training size, from each variant's seed-0 config
    (engine/model_stats.py; params in units of 10^6). SimFormer's pair net trains only: the
    inference FLOPs do not use it, its parameters are counted."""
    from rankseg_core.engine.model_stats import model_stats
    from rankseg_core.engine.runs import load_config

    out: dict[str, dict] = {}
    for v in vs:
        cfg = load_config(runs[(v.key, 0)])
        s = model_stats(cfg.model)
        out[v.key] = {"params_m": float(s["params_m"]), "gflops": float(s["gflops"])}
    return out


def plan(p: WeakShotProtocol, root: Path, base: Path, vs: list[Variant]) -> tuple[list[Task], dict]:
    """Every training task (MaskFormer first), and the run directory of each (variant, seed)."""
    tasks, runs = [], {}
    for v in vs:
        for s in range(p.seeds):
            runs[(v.key, s)] = run = base / v.key / f"seed{s}"
            tasks.append(Task(("train", v.key, s), weak_shot_job,
                              (str(run), str(root), overrides(p, v, s), p.threads,
                               str(base / "counts" / f"{v.key}_seed{s}.json"))))
    return tasks, runs


# ---------------------------------------------------------------------------------------
# The report


def _per_seed(vals: list[float | None]) -> str:
    return ", ".join("–" if x is None else f"{100 * x:.1f}" for x in vals)


def _table(rows_of: list[Variant], res: dict, small_ratio: float | None = None) -> str:
    """One row per variant; small_ratio: also NovelIoU over that (smaller) split's novel classes."""
    rows = []
    for v in rows_of:
        x, c = res["runs"][v.key], res["cost"][v.key]
        row = [v.title, f"{pct(v.ratio)} %", rep.pm(x["novel_iou"]), _per_seed(x["per_seed"]["novel_iou"]),
               rep.pm(x["base_iou"]), rep.pm(x["miou"]), rep.pm(x["novel_acc"])]
        if small_ratio is not None:
            row.append(rep.pm(x["novel_iou_small"]) if "novel_iou_small" in x else "–")
        rows.append(row + [f"{c['params_m']:.2f}M", f"{c['gflops']:.3f}", f"{x['train_seconds']['mean']:.0f}"])
    head = ["model", "novel", "NovelIoU", "per seed", "BaseIoU", "mIoU", "NovelACC"]
    if small_ratio is not None:
        head.append(f"NovelIoU ({pct(small_ratio)} % classes)")
    return rep.md_table(head + ["params", "GFLOPs", "train s"], rows)


def _reading(res: dict, p: WeakShotProtocol) -> list[str]:
    """Every verdict in one line each, and what this setting can and cannot show."""
    beat = [c for c in res["claims"] if c["claim"].endswith("beats chance")]
    paper = [c for c in res["claims"] if not c["claim"].endswith("beats chance")]
    lines = ["**Reading** (written by the script from the numbers above):", ""]
    if beat:
        lowest = min(beat, key=lambda c: c["mean_diff"])
        lines.append(f"- *Against chance*: {sum(c['holds'] for c in beat)} of {len(beat)} models are above chance "
                     "on NovelIoU beyond the seed spread; the smallest margin is "
                     f"{100 * lowest['mean_diff']:+.1f} points ({lowest['claim'].removesuffix(' beats chance')}).")
    for c in paper:
        lines.append(f"- *{c['claim']}*: **{c['status']}**; mean difference "
                     f"{100 * c['mean_diff']:+.1f} points (per seed {', '.join(f'{100 * d:+.1f}' for d in c['diffs'])}"
                     f"), pooled std {100 * c['spread']:.1f}.")
    lines += [
        "",
        f"What this setting can show: that both families train weak-shot through the one engine and segment novel "
        "classes they never saw a mask of (the chance rows), and the sign and size of each difference *at this "
        f"budget*, judged against the spread of {p.seeds} seeds. What it cannot show: the paper's setting. Every model "
        f"starts from random weights (the paper's from ImageNet backbones) and trains {p.segmenter_iters} (Segmenter) / "
        f"{p.maskformer_iters} (MaskFormer) iterations of batch {p.batch} on {p.size} px images (the paper: 60k "
        "iterations of batch 8 at 640 px on COCO-Stuff-10K), so every model is far from converged, and the novel "
        "classes here differ from base ones only by scene (a look-alike shares colour and texture exactly): a "
        "difference here is a difference in how fast a method learns this world from scratch.",
    ]
    return lines


def report(res: dict, p: WeakShotProtocol, vs: list[Variant], command: str, smoke: bool, history: list[dict]) -> str:
    """The markdown block of docs/replication.md's "Weak-shot segmentation"."""
    from report import machine  # bench/report.py

    now = history[-1]
    tag = "**SMOKE RUN** (tiny sizes, 2 iterations: the numbers mean nothing)  \n" if smoke else ""
    out = [f"{tag}Command: `{command}` on {machine()} (threads per job {p.threads}, {p.jobs} job(s) at a time).  ",
           f"This invocation ({now['started']}): {rep._timing(now, max(1, p.jobs * p.threads))}  "]
    earlier = [h for h in history[:-1] if h["total"] > h["reused"]]
    if now["reused"]:
        out.append(f"It reused {now['reused']} of {now['total']} runs; the invocations on this work directory that "
                   "trained runs:  ")
        out += [f"- {h['started']} `{h['command']}`: {h['total'] - h['reused']} runs trained ({h['resumed']} "
                f"resumed); {rep._timing(h, max(1, p.jobs * p.threads))}  " for h in earlier] or [
                    "- none recorded its timing (interrupted before the end)  "]
    sp = res["splits"]
    out.append(f"Protocol: synthetic K = {p.num_classes}, {p.size} px, {p.images} train / {p.val_images} val images "
               "(bench/replicate.py's `synthetic_root`); look-alike splits of its world "
               f"(`look_alike_split`, seed {p.world_seed}): {sp[str(p.ratio)]['novel']} novel classes at "
               f"{pct(p.ratio)} % and {sp[str(p.big_ratio)]['novel']} at {pct(p.big_ratio)} % of the "
               f"{sp['shown']} classes the world shows (the larger split holds the smaller). {p.seeds} seeds; every "
               f"run from random weights; the replication's recipe for every run: batch {p.batch}, AdamW lr {p.lr:g} "
               f"on every parameter, weight decay 0, warm-up min(30, iterations / 10), poly decay, ml loss weight "
               f"10, training κ = {min(p.kappa, p.num_classes)}; Segmenter ViT-T/16 {p.segmenter_iters} iterations; "
               f"MaskFormer-R50 {p.maskformer_iters} iterations of batch {p.maskformer_batch} at lr {p.maskformer_lr:g} "
               f"(`{' '.join(maskformer_knobs(p))}`, plain MaskFormer "
               "classification as SimFormer, the family's gradient clipping). Weak-shot losses at the defaults "
               "(docs/weak-shot.md): complementary weight 0.2, MIL weight 1 (Segmenter), distillation weight 0.5 "
               "(SimFormer). Metrics in %, mean ± sample std over seeds; every score from the run's own confusion "
               "matrix on val (NovelIoU / BaseIoU average the classes of the group with GT pixels).")
    ch = res["chance"]
    out += ["", "**Chance** (the best constant prediction in hindsight: the most frequent novel val class on every "
            "pixel; a base class, or any predictor of base classes only, scores 0): " + "; ".join(
                f"{pct(float(r))} % novel: class {c['class']} ({100 * c['share']:.1f} % of the labelled val pixels), "
                f"NovelIoU {100 * c['novel_iou']:.2f} over {c['present']} novel classes with val pixels"
                for r, c in ch.items()) + ".", ""]
    out += ["**Verdicts** (bench/replication_claims.py: A > B holds when A − B > 0 on every seed AND the mean "
            "difference exceeds the pooled sample std; A < B likewise; ≈ holds when neither is higher by that rule; "
            "against chance the set's own sample std). Differences in NovelIoU points.", "",
            claims_table(res["claims"]), ""]
    small = [v for v in vs if v.ratio == p.big_ratio]
    out += ["Params in units of 10^6, GFLOPs of one forward at "
            f"{p.size} px (FlopCounterMode, all matmuls; SimFormer's pair net trains only, its parameters are "
            "counted); train s = mean wall time of a run's training and evaluation (one thread on a machine shared "
            f"with other work: not a speed comparison). *NovelIoU ({pct(p.ratio)} % classes)*: the "
            f"{pct(p.big_ratio)} % runs scored over the {pct(p.ratio)} % split's novel classes only (like for like "
            "with the rows above them).", "",
            _table([v for v in vs if v.ratio == p.ratio], res), "", _table(small, res, p.ratio), ""]
    out += _reading(res, p)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "replication",
                    help="runs (under weak_shot/) and the synthetic shards, shared with bench/replicate.py")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 iterations: checks the pipeline in seconds")
    ap.add_argument("--docs", action="store_true", help="write the results block into --doc")
    ap.add_argument("--doc", type=Path, default=DOC, help="the page whose weak-shot block --docs rewrites")
    for name in ("seeds", "jobs", "threads", "segmenter-iters", "maskformer-iters", "points", "points-alt"):
        ap.add_argument(f"--{name}", type=int)
    args = ap.parse_args(argv)

    return keeping_threads(_main, args, argv)


def _main(args: argparse.Namespace, argv: list[str] | None) -> dict:
    p = WeakShotProtocol.smoke() if args.smoke else WeakShotProtocol()
    for name in ("seeds", "jobs", "threads", "segmenter_iters", "maskformer_iters", "points", "points_alt"):
        if getattr(args, name) is not None:
            setattr(p, name, getattr(args, name))
    _threads(p.threads)
    work = args.work.resolve()
    base = work / "weak_shot"
    base.mkdir(parents=True, exist_ok=True)
    t0, cpu0, load = time.perf_counter(), cpu_seconds(), LoadSampler()
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime()) + " UTC"

    from rankseg_core.convert.synthetic import make_world, shown_classes

    root = synthetic_root(p.replication(0), work)
    splits = write_splits(p, base / "splits")
    novel = {r: split_novel(path) for r, path in splits.items()}
    vs = variants(p, splits, none_resolves(p, root, splits[p.ratio]))
    tasks, runs = plan(p, root, base, vs)
    print(f"[weak-shot] {len(tasks)} runs, {p.jobs} at a time", flush=True)
    done = run_tasks(tasks, p.jobs)
    trained = {key[1:]: r for key, r in done.items()}
    gt = val_counts(root, p.num_classes)
    chance = {str(r): chance_novel_iou(gt, n) for r, n in novel.items()}
    res: dict = {"runs": collect(trained, p, vs, novel), "cost": cost(runs, vs), "chance": chance,
                 "splits": {"shown": int(len(shown_classes(make_world(p.num_classes, p.world_seed)))),
                            **{str(r): {"file": str(path), "novel": len(novel[r])} for r, path in splits.items()}},
                 "reused_runs": sum(bool(r.get("reused")) for r in trained.values()),
                 "resumed_runs": sum(bool(r.get("resumed")) for r in trained.values()), "total_runs": len(trained)}
    titles = {v.key: f"{v.title}, {pct(v.ratio)} % novel" for v in vs}
    res["claims"] = claim_records(claims(seed_values(res["runs"]),
                                         {v.key: chance[str(v.ratio)]["novel_iou"] for v in vs}, titles, p))
    total = time.perf_counter() - t0
    command = ("python bench/replicate_weak_shot.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    history = log_invocation(base / "invocations.jsonl", {
        "started": started, "command": command, "wall_s": total, "cpu_s": cpu_seconds() - cpu0, "load": load.stop(),
        **{k: res[f"{k}_runs"] for k in ("total", "reused", "resumed")}})
    body = report(res, p, vs, command, args.smoke, history)
    publish(work / "results_weak_shot.json", {"protocol": dataclasses.asdict(p), "total_seconds": total, **res},
            body, args.docs, args.doc, BLOCK, base, total)
    return {"protocol": p, "results": res, "runs": runs, "root": root, "splits": splits, "total_seconds": total,
            "report": body}


def cli(argv: list[str] | None = None) -> int:
    """Exit status 0; 2 with one `error:` line for a user mistake; 130 on Ctrl-C (as replicate.py)."""
    import replicate

    return replicate.cli(argv, main)


if __name__ == "__main__":
    sys.exit(cli())
