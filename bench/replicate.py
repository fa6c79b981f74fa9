"""A measured mini-replication of RankSeg's claims on CPU (see docs/replication.md).

    python bench/replicate.py                      # full: synthetic K=200, 3 seeds (< 1 h, 2 cores)
    python bench/replicate.py --smoke              # end to end in seconds (tiny everything)
    python bench/replicate.py --data DIR [--data DIR2]   # also on shard directories
    python bench/replicate.py --docs               # write the results block of docs/replication.md

Per dataset, with the tiny model (Segmenter ViT-T/16, small images) and the same recipe for
every variant, `--seeds` seeds each (mean ± sample std, and min / max):
- Table 1: Baseline, +MT, +MT+LS (shared tau), +MT+LS+RA (= RankSeg): mIoU, multi-label mAP;
- Fig. 3: GT (eval) on the baseline and on RankSeg, GT (train + eval) oracle;
- Table 4: training kappa sweep (incl. kappa = K); evaluation kappa != training kappa;
  supplement Table 5: dynamic kappa (sigmoid thresholds);
- Fig. 7: learned 1/tau against rank (`rankseg_core.viz.tau`), mean over seeds with the range;
- cost: params and FLOPs of each variant (`rankseg_core.model_stats`);
- false positives of seed 0's baseline vs RankSeg (`rankseg_core.viz.false_positives`).

Work (runs, evaluations) goes to --work and is reused when re-run with the same settings:
a finished run (model.safetensors + same config) is not trained again, a stored evaluation is
not recomputed. Runs are trained `--jobs` at a time, each on `--threads` torch threads.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "replication.md"
DOC_IMG = REPO / "docs" / "img"


# ---------------------------------------------------------------------------------------
# Protocol


@dataclass
class Protocol:
    """Sizes and recipe shared by every variant of one replication."""

    num_classes: int = 200  # synthetic K
    size: int = 64  # synthetic image side = training crop
    images: int = 2000  # synthetic train images
    val_images: int = 200
    iters: int = 300
    batch: int = 8
    lr: float = 1e-3
    warmup: int = 30
    kappa: int = 20  # training kappa of RankSeg / +MT+LS
    kappa_sweep: list[int] = field(default_factory=lambda: [5])  # + kappa and K
    kappa_eval: list[int] = field(default_factory=lambda: [5, 10, 40, 100])
    thresholds: list[float] = field(default_factory=lambda: [0.1, 0.05, 0.02, 0.01])
    ml_weight: float = 10.0
    seeds: int = 3
    jobs: int = 2
    threads: int = 1
    fp_images: int = 0  # false-positive stats over this many val images (0 = all)

    @classmethod
    def smoke(cls) -> "Protocol":
        return cls(num_classes=40, size=32, images=8, val_images=4, iters=2, batch=2, warmup=0, kappa=6,
                   kappa_sweep=[], kappa_eval=[12], thresholds=[0.05], seeds=2, jobs=1, threads=2,
                   fp_images=4)


def recipe(p: Protocol, img_size: int, seed: int) -> list[str]:
    """Overrides shared by every variant (docs/replication.md explains each deviation from
    the paper's recipe: from-scratch ViT-T, AdamW, no dropout, short schedule)."""
    return [
        "model.model=segmenter-vitt", f"model.img_size={img_size}", f"model.kappa={p.kappa}",
        "model.dropout=0", "model.drop_path=0",
        "optim.name=adamw", f"optim.lr={p.lr}", "optim.weight_decay=0",
        f"schedule.iters={p.iters}", f"schedule.batch_size={p.batch}", f"schedule.warmup_iters={p.warmup}",
        f"schedule.min_lr={min(1e-5, p.lr)}", f"loss.ml_weight={p.ml_weight}",
        "data.num_workers=0", "eval.num_workers=0", "eval.every=0", "eval.batch_size=16",
        f"log_every={max(1, min(50, p.iters))}", f"ckpt_every={p.iters}", f"seed={seed}", "device=cpu", "amp=false",
    ]


def train_variants(p: Protocol, k: int) -> dict[str, list[str]]:
    """Variant name -> extra overrides. kappa values are clamped to K."""
    out = {
        "baseline": ["model.head=segmenter"],
        "mt": ["model.head=rankseg", "model.select=false"],
        "mt_ls": ["model.head=rankseg", "model.tau=shared"],
        "rankseg": ["model.head=rankseg"],
        "oracle": ["model.head=rankseg", "model.oracle=true"],
    }
    for kap in sorted({min(x, k) for x in p.kappa_sweep} | {k}):
        if kap != min(p.kappa, k):
            out[f"rankseg_k{kap}"] = ["model.head=rankseg", f"model.kappa={kap}"]
    return out


VARIANT_NAMES = {"baseline": "Baseline", "mt": "+MT", "mt_ls": "+MT+LS (shared τ)", "rankseg": "+MT+LS+RA (RankSeg)",
                 "oracle": "GT (train + eval)"}


def eval_specs(p: Protocol, k: int) -> list[tuple[str, str, dict]]:
    """(variant, eval name, EvalOptions kwargs) beyond each run's plain evaluation."""
    specs = [("baseline", "gt_eval", {"oracle": True}), ("rankseg", "gt_eval", {"oracle": True})]
    specs += [("rankseg", f"kappa{kap}", {"kappa": kap}) for kap in sorted({min(x, k) for x in p.kappa_eval})
              if kap != min(p.kappa, k)]
    specs += [("rankseg", f"thr{t:g}", {"dynamic_kappa": t}) for t in p.thresholds]
    return specs


# ---------------------------------------------------------------------------------------
# Jobs (run in worker processes)


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def train_job(run_dir: str, data: str, overrides: list[str], threads: int) -> dict:
    """Train one run unless an identical finished one exists; returns timing and final metrics."""
    _threads(threads)
    from rankseg_core import runs
    from rankseg_core.config import build_train_config, diff_configs
    from rankseg_core.train import train

    cfg = build_train_config(None, overrides, data)
    paths = runs.run_paths(run_dir)
    done = Path(run_dir) / "replicate.json"
    if paths.weights.is_file() and done.is_file() and paths.config.is_file():
        if not diff_configs(runs.load_config(run_dir), cfg):
            return {**json.loads(done.read_text()), "reused": True}
    shutil.rmtree(run_dir, ignore_errors=True)
    t = time.perf_counter()
    res = train(cfg, run_dir, progress=False)
    seconds = time.perf_counter() - t
    shutil.rmtree(paths.checkpoints, ignore_errors=True)  # model.safetensors holds the weights
    rec = {"run": run_dir, "train_seconds": seconds, "iters": res.iterations,
           **{k: _num(res.final_eval[k]) for k in ("miou", "aacc", "map", "recall_at_kappa")}}
    done.write_text(json.dumps(rec))
    return rec


def eval_job(run_dir: str, out_json: str, options: dict, threads: int) -> dict:
    """Evaluate a run on its val split with EvalOptions(**options); cached in out_json."""
    _threads(threads)
    out = Path(out_json)
    if out.is_file():
        return json.loads(out.read_text())
    from rankseg_core.evaluate import EvalOptions, evaluate_model
    from rankseg_core.runs import load_run

    t = time.perf_counter()
    model, cfg = load_run(run_dir, "cpu")
    res = evaluate_model(model, cfg, EvalOptions(split=cfg.data.val_split, progress=False, **options), _cpu())
    rec = {"run": run_dir, "options": options, "eval_seconds": time.perf_counter() - t,
           **{k: _num(res[k]) for k in ("miou", "aacc", "map", "recall_at_kappa")}}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rec))
    return rec


def _cpu():
    import torch

    return torch.device("cpu")


def _num(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x)


def run_pool(fn, jobs: list[tuple], workers: int) -> list[dict]:
    if workers <= 1:
        return [fn(*j) for j in jobs]
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        return list(pool.map(fn, *zip(*jobs)))


# ---------------------------------------------------------------------------------------
# Aggregation


def agg(values: list[float | None]) -> dict[str, float | int | None]:
    v = np.array([x for x in values if x is not None], np.float64)
    if v.size == 0:
        return {"mean": None, "std": None, "min": None, "max": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def pm(a: dict, scale: float = 100.0, digits: int = 1) -> str:
    """'mean ± std' (percent by default) or '–' when undefined."""
    if a["mean"] is None:
        return "–"
    return f"{a['mean'] * scale:.{digits}f} ± {a['std'] * scale:.{digits}f}"


def md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------
# One dataset


@dataclass
class Dataset:
    name: str
    root: Path
    num_classes: int
    img_size: int


def replicate_dataset(ds: Dataset, p: Protocol, work: Path, fig_dir: Path, fig_prefix: str) -> dict:
    """Train, evaluate, aggregate and draw for one dataset; returns its results dict."""
    k = ds.num_classes
    variants = train_variants(p, k)
    base = work / ds.name
    t0 = time.perf_counter()
    jobs = [(str(base / v / f"seed{s}"), str(ds.root), recipe(p, ds.img_size, s) + extra, p.threads)
            for s in range(p.seeds) for v, extra in variants.items()]
    print(f"[{ds.name}] training {len(jobs)} runs ({len(variants)} variants x {p.seeds} seeds), "
          f"{p.jobs} at a time", flush=True)
    trained = run_pool(train_job, jobs, p.jobs)
    t_train = time.perf_counter() - t0
    runs = {(v, s): base / v / f"seed{s}" for s in range(p.seeds) for v in variants}
    specs = eval_specs(p, k)
    ejobs = [(str(runs[(v, s)]), str(base / "evals" / f"{v}_seed{s}_{name}.json"), opts, p.threads)
             for s in range(p.seeds) for v, name, opts in specs]
    t1 = time.perf_counter()
    print(f"[{ds.name}] {len(ejobs)} extra evaluations", flush=True)
    evals = run_pool(eval_job, ejobs, p.jobs)
    t_eval = time.perf_counter() - t1

    by_run = {Path(r["run"]): r for r in trained}
    res: dict[str, Any] = {"dataset": ds.name, "num_classes": k, "img_size": ds.img_size,
                           "train_seconds": t_train, "eval_seconds": t_eval, "runs": {}, "evals": {},
                           "reused_runs": sum(bool(r.get("reused")) for r in trained), "total_runs": len(trained)}
    for v in variants:
        res["runs"][v] = {m: agg([by_run[runs[(v, s)]][m] for s in range(p.seeds)])
                          for m in ("miou", "aacc", "map", "recall_at_kappa")}
        res["runs"][v]["train_seconds"] = agg([by_run[runs[(v, s)]]["train_seconds"] for s in range(p.seeds)])
        res["runs"][v]["per_seed_miou"] = [by_run[runs[(v, s)]]["miou"] for s in range(p.seeds)]
    for (v, name, _), i in zip(specs, range(len(specs))):
        recs = [evals[s * len(specs) + i] for s in range(p.seeds)]
        res["evals"][f"{v}/{name}"] = {m: agg([r[m] for r in recs]) for m in ("miou", "map", "recall_at_kappa")}
    res["cost"] = cost_table(p, ds, variants)
    t2 = time.perf_counter()
    res["figures"] = draw(res, p, ds, runs, variants, fig_dir, fig_prefix)
    res["fp"] = false_positives(runs, p, ds, base / "fp", fig_dir, fig_prefix)
    res["figure_seconds"] = time.perf_counter() - t2
    return res


def cost_table(p: Protocol, ds: Dataset, variants: dict[str, list[str]]) -> dict[str, dict]:
    """Params and FLOPs of each variant at the replication's image size (one eval forward)."""
    from rankseg_core.config import TrainConfig, set_key
    from rankseg_core.model_stats import model_stats

    out = {}
    for v, extra in variants.items():
        cfg = TrainConfig()
        for text in recipe(p, ds.img_size, 0) + extra:
            key, value = text.split("=", 1)
            if key.startswith("model."):
                set_key(cfg, key, value)
        cfg.model.num_classes = ds.num_classes
        s = model_stats(cfg.model)
        out[v] = {"params_m": s["params_m"], "gflops": s["gflops"], "head_gflops": s["head_gflops"],
                  "kappa": s["kappa"]}
    return out


# ---------------------------------------------------------------------------------------
# Figures


def draw(res: dict, p: Protocol, ds: Dataset, runs: dict, variants: dict, fig_dir: Path, prefix: str) -> dict:
    from rankseg_core.plotting import plt, save_figure
    from rankseg_core.viz import load_viz_run, tau_curve
    from rankseg_core.viz.tau import TauCurve, plot_tau, tau_rows

    figs = {}
    k = ds.num_classes
    # Fig. 3 analogue: baseline, RankSeg, the two GT oracles.
    bars = [("Baseline", res["runs"]["baseline"]["miou"]), ("Baseline + GT (eval)", res["evals"]["baseline/gt_eval"]["miou"]),
            ("RankSeg", res["runs"]["rankseg"]["miou"]), ("RankSeg + GT (eval)", res["evals"]["rankseg/gt_eval"]["miou"]),
            ("GT (train + eval)", res["runs"]["oracle"]["miou"])]
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    _bars(ax, bars, "mIoU (%)")
    ax.set_title(f"{ds.name}, K={k}: oracle selections (mean ± std over {p.seeds} seeds)", fontsize=10)
    figs["oracles"] = str(save_figure(fig, fig_dir / f"{prefix}oracles.png", dpi=90).name)

    # Table 4 analogue: mIoU against training kappa, and against evaluation kappa.
    kap0 = min(p.kappa, k)
    train_k = sorted([(kap0, "rankseg")] + [(int(v.split("_k")[1]), v) for v in variants if v.startswith("rankseg_k")])
    eval_k = sorted([(kap0, res["runs"]["rankseg"]["miou"])] +
                    [(int(n.split("kappa")[1]), e["miou"]) for n, e in res["evals"].items() if n.startswith("rankseg/kappa")])
    fig, ax = plt.subplots(figsize=(6.5, 3.4))
    for pts, label, style in (([(kap, res["runs"][v]["miou"]) for kap, v in train_k], "trained and evaluated with κ", "o-"),
                              (eval_k, f"trained with κ={kap0}, evaluated with κ", "s--")):
        x = [a for a, _ in pts]
        y = [100 * b["mean"] for _, b in pts]
        e = [100 * b["std"] for _, b in pts]
        ax.errorbar(x, y, yerr=e, fmt=style, capsize=3, label=label)
    base = res["runs"]["baseline"]["miou"]
    ax.axhline(100 * base["mean"], color="0.5", ls=":", label="baseline (all K classes)")
    ax.set_xscale("log")
    ax.set(xlabel=f"κ (K = {k})", ylabel="mIoU (%)")
    ax.set_title(f"{ds.name}: number of selected classes", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    figs["kappa"] = str(save_figure(fig, fig_dir / f"{prefix}kappa.png", dpi=90).name)

    # Fig. 7: learned 1/tau by rank, mean over seeds with the seed range, per training kappa.
    curves, spread = [], {}
    for kap, v in train_k:
        cs = [tau_curve(load_viz_run(runs[(v, s)])) for s in range(p.seeds)]
        scale = np.stack([c.scale for c in cs])
        bias = np.stack([c.bias for c in cs])
        label = f"{ds.name} K={k} κ={kap} (mean of {p.seeds} seeds)"
        curves.append(TauCurve(label, f"{v}", ds.name, k, kap, "rank", scale.mean(0), bias.mean(0)))
        spread[label] = (scale.min(0), scale.max(0))
    png = plot_tau(curves, fig_dir / f"{prefix}tau.png", spread=spread)
    figs["tau"] = png.name
    res["tau"] = {c.run: {"kappa": c.kappa, "inv_tau": c.scale.tolist(), "bias": c.bias.tolist(), "trend": c.trend()}
                  for c in curves}
    res["tau_rows"] = tau_rows(curves)
    return figs


def _bars(ax, bars: list[tuple[str, dict]], ylabel: str) -> None:
    x = np.arange(len(bars))
    means = [100 * (b["mean"] or 0) for _, b in bars]
    stds = [100 * (b["std"] or 0) for _, b in bars]
    ax.bar(x, means, yerr=stds, capsize=3, color=["0.6", "0.75", "tab:blue", "tab:cyan", "tab:green"][:len(bars)])
    for xi, m in zip(x, means):
        ax.text(xi, m + 0.5, f"{m:.1f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x)
    ax.set_xticklabels([n for n, _ in bars], fontsize=8, rotation=12)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def false_positives(runs: dict, p: Protocol, ds: Dataset, out: Path, fig_dir: Path, prefix: str) -> dict:
    """Seed 0: RankSeg's false positives against the baseline's, over the val split."""
    from rankseg_core.viz import load_viz_run, run_false_positives

    rs, base = load_viz_run(runs[("rankseg", 0)]), load_viz_run(runs[("baseline", 0)])
    summary = run_false_positives(rs, ds.root, out, num=1, stats_num=p.fp_images, baseline=base)
    shutil.copyfile(out / "fp_summary.png", fig_dir / f"{prefix}fp_summary.png")
    summary["figure"] = f"{prefix}fp_summary.png"
    return summary


# ---------------------------------------------------------------------------------------
# Report


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children (the pool workers)."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


def report(results: list[dict], p: Protocol, total_seconds: float, command: str, smoke: bool, img_rel: str,
           loads: tuple[float, float] = (float("nan"), float("nan")), cpu: float = float("nan")) -> str:
    """The markdown results block of docs/replication.md."""
    from report import machine  # bench/report.py

    out = []
    tag = "**SMOKE RUN** (tiny sizes, 2 iterations: the numbers mean nothing)  \n" if smoke else ""
    load = ", ".join(f"{x:.1f}" for x in loads)
    out.append(f"{tag}Command: `{command}`  \nMeasured wall time: **{total_seconds / 60:.1f} min** on {machine()} "
               f"(threads per job {p.threads}, {p.jobs} job(s) at a time; 1-min load average at start / end: "
               f"{load}, other processes included); CPU time {cpu / 60:.1f} min, i.e. "
               f"{cpu / 60 / max(1, p.jobs * p.threads):.1f} min of wall time on {p.jobs * p.threads} dedicated core(s).  \n"
               f"Protocol: {p.seeds} seeds; {p.iters} iterations of batch {p.batch} (AdamW lr {p.lr:g}, "
               f"warm-up {p.warmup}, poly decay); training κ = {p.kappa}; ml loss weight {p.ml_weight:g}. "
               "Metrics in %, mean ± sample std over seeds.")
    for r in results:
        k, name = r["num_classes"], r["dataset"]
        runs, evals, cost = r["runs"], r["evals"], r["cost"]
        out.append(f"\n### {name} (K = {k}, {r['img_size']} px)\n")
        out.append(f"Training {r['train_seconds'] / 60:.1f} min ({r['total_runs'] - r['reused_runs']} runs trained, "
                   f"{r['reused_runs']} reused from an earlier invocation), extra evaluations {r['eval_seconds'] / 60:.1f} min, "
                   f"figures and false positives {r['figure_seconds'] / 60:.1f} min.\n")
        out.append("**Table 1** (ablation) and cost: params / GFLOPs of one forward at the training size "
                   "(FlopCounterMode, all matmuls).\n")
        rows = []
        for v in ("baseline", "mt", "mt_ls", "rankseg"):
            c = cost[v]
            rows.append([VARIANT_NAMES[v], pm(runs[v]["miou"]), pm(runs[v]["aacc"]), pm(runs[v]["map"]),
                         pm(runs[v]["recall_at_kappa"]), f"{c['params_m']:.2f}M", f"{c['gflops']:.3f}",
                         f"{c['head_gflops']:.3f}", f"{runs[v]['train_seconds']['mean']:.0f}"])
        out.append(md_table(["variant", "mIoU", "aAcc", "mAP (ml)", "recall@κ", "params", "GFLOPs", "head GFLOPs",
                             "train s"], rows))
        out.append("\nPer-seed mIoU: " + "; ".join(
            f"{VARIANT_NAMES.get(v, v)} " + ", ".join(f"{100 * x:.1f}" if x is not None else "–" for x in runs[v]["per_seed_miou"])
            for v in ("baseline", "mt", "mt_ls", "rankseg")) + ".\n")
        out.append("**Fig. 3** (oracle selections)\n")
        out.append(md_table(["selection", "mIoU"], [
            ["Baseline (all K)", pm(runs["baseline"]["miou"])],
            ["Baseline, GT classes only at eval", pm(evals["baseline/gt_eval"]["miou"])],
            ["RankSeg (top-κ)", pm(runs["rankseg"]["miou"])],
            ["RankSeg, GT (eval)", pm(evals["rankseg/gt_eval"]["miou"])],
            ["GT (train + eval)", pm(runs["oracle"]["miou"])]]))
        out.append(f"\n![oracles]({img_rel}/{r['figures']['oracles']})\n")
        out.append("**Table 4** (κ at training = κ at evaluation; κ = K sorts all classes)\n")
        kap0 = min(p.kappa, k)
        trows = [(kap0, "rankseg")] + [(int(v.split("_k")[1]), v) for v in runs if v.startswith("rankseg_k")]
        out.append(md_table(["κ", "mIoU", "aAcc", "mAP", "recall@κ", "GFLOPs"], [
            [f"{kap}{' = K' if kap == k else ''}", pm(runs[v]["miou"]), pm(runs[v]["aacc"]), pm(runs[v]["map"]),
             pm(runs[v]["recall_at_kappa"]), f"{cost[v]['gflops']:.3f}"] for kap, v in sorted(trows)]))
        out.append(f"\n**κ at evaluation ≠ κ at training** (trained with κ = {kap0})\n")
        erows = [[str(kap0) + " (training)", pm(runs["rankseg"]["miou"]), pm(runs["rankseg"]["recall_at_kappa"])]]
        erows += [[n.split("kappa")[1], pm(e["miou"]), pm(e["recall_at_kappa"])]
                  for n, e in sorted(evals.items(), key=lambda t: int(t[0].split("kappa")[1]) if "kappa" in t[0] else 0)
                  if n.startswith("rankseg/kappa")]
        out.append(md_table(["κ at eval", "mIoU", "recall@κ"], erows))
        out.append("\n**Supplement Table 5** (dynamic κ: classes with sigmoid score > threshold)\n")
        out.append(md_table(["threshold", "mIoU"], [[n.split("thr")[1], pm(e["miou"])] for n, e in evals.items()
                                                      if n.startswith("rankseg/thr")]))
        out.append(f"\n![kappa]({img_rel}/{r['figures']['kappa']})\n")
        out.append("**Fig. 7** (learned 1/τ by rank; band = range over seeds)\n")
        out.append(md_table(["training κ", "1/τ rank 1", "1/τ last rank", "Spearman ρ (1/τ vs rank)", "slope per rank"], [
            [str(t["kappa"]), f"{t['inv_tau'][0]:.3f}", f"{t['inv_tau'][-1]:.3f}", f"{t['trend']['spearman']:.2f}",
             f"{t['trend']['slope_per_rank']:.4f}"] for t in r["tau"].values()]))
        out.append(f"\n![tau]({img_rel}/{r['figures']['tau']})\n")
        fp = r["fp"]
        out.append(f"**False positives** (seed 0, {fp['images']} val images, per image): top-κ {fp['topk_fp_per_image']:.2f}; "
                   f"prediction: RankSeg {fp['pred_fp_per_image']:.2f}, baseline {fp['baseline_pred_fp_per_image']:.2f} "
                   f"({fp['removed_per_image']:.2f} of the baseline's removed, {fp['added_per_image']:.2f} added).\n")
        out.append(f"![false positives]({img_rel}/{fp['figure']})\n")
    return "\n".join(out)


def write_doc_block(body: str, doc: Path = DOC, name: str = "results") -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` of the doc."""
    text = doc.read_text() if doc.exists() else "# Mini-replication\n"
    block = f"<!-- {name}:start -->\n{body.strip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    doc.write_text(text)


# ---------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "replication", help="runs and evaluations")
    ap.add_argument("--data", type=Path, action="append", default=[], help="extra shard directory (repeatable)")
    ap.add_argument("--no-synthetic", action="store_true", help="only the --data directories")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 iterations: checks the pipeline in seconds")
    ap.add_argument("--docs", action="store_true", help="figures to docs/img, results block into docs/replication.md")
    ap.add_argument("--seeds", type=int)
    ap.add_argument("--iters", type=int)
    ap.add_argument("--jobs", type=int)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--num-classes", type=int)
    ap.add_argument("--size", type=int)
    ap.add_argument("--images", type=int)
    ap.add_argument("--kappa", type=int)
    ap.add_argument("--lr", type=float)
    args = ap.parse_args(argv)

    p = Protocol.smoke() if args.smoke else Protocol()
    for name in ("seeds", "iters", "jobs", "threads", "num_classes", "size", "images", "kappa", "lr"):
        if getattr(args, name) is not None:
            setattr(p, name, getattr(args, name))
    if not args.smoke and args.images is not None:
        p.val_images = max(1, p.images // 10)
    _threads(p.threads)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    fig_dir = DOC_IMG if args.docs else work / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    load0, cpu0 = os.getloadavg()[0], cpu_seconds()

    from rankseg_core.convert.common import ConvertOptions
    from rankseg_core.dataset import ShardIndex
    from rankseg_core.synthetic import prepare_synthetic

    datasets = []
    if not args.no_synthetic:
        root = work / f"synthetic_K{p.num_classes}_{p.size}px_{p.images}"
        if not (root / "dataset.json").is_file():
            prepare_synthetic(root, num_classes=p.num_classes, images=p.images, val_images=p.val_images,
                              size=p.size, seed=0, opts=ConvertOptions(samples_per_shard=1000))
        datasets.append(Dataset("synthetic", root, p.num_classes, p.size))
    for d in args.data:
        idx = ShardIndex(d)
        datasets.append(Dataset(re.sub(r"[^A-Za-z0-9_-]", "_", idx.name or d.name), d.resolve(), idx.num_classes,
                                p.size))
    if not datasets:
        ap.error("nothing to do: pass --data or drop --no-synthetic")

    results = []
    for ds in datasets:
        prefix = "smoke_" if args.smoke else ""
        prefix += f"replication_{ds.name}_"
        results.append(replicate_dataset(ds, p, work, fig_dir, prefix))
    total = time.perf_counter() - t0
    command = "python bench/replicate.py " + " ".join(argv if argv is not None else sys.argv[1:])
    body = report(results, p, total, command.strip(), args.smoke, "img" if args.docs else ".",
                  (load0, os.getloadavg()[0]), cpu_seconds() - cpu0)
    (work / "results.json").write_text(json.dumps({"protocol": p.__dict__, "total_seconds": total,
                                                   "results": results}, indent=1, default=str))
    (fig_dir / "replication_report.md").write_text(body + "\n") if not args.docs else None
    if args.docs:
        write_doc_block(body)
    print(body)
    print(f"\ntotal {total / 60:.1f} min; results in {work / 'results.json'}", flush=True)
    return {"protocol": p, "results": results, "total_seconds": total, "report": body}


if __name__ == "__main__":
    main()
