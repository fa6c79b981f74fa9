"""bench/replicate.py's numbers -> aggregates, verdicts, figures and the markdown block.

Everything here reads what the runs and evaluations returned (their replicate.json and the
stored evaluations); nothing is typed in by hand.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path
from typing import Any

import numpy as np
from replication_claims import claims, diagnoses, precondition_claim
from replication_protocol import METRICS, VARIANT_NAMES, Protocol, eval_specs, recipe

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


def _summary(recs: list[dict], keys: tuple[str, ...]) -> dict:
    """Per metric: the aggregate and the per-seed values."""
    out = {m: agg([r.get(m) for r in recs]) for m in keys}
    out["per_seed"] = {m: [r.get(m) for r in recs] for m in keys}
    return out


def collect(trained: dict[tuple, dict], evals: dict[tuple, dict], p: Protocol, k: int) -> dict:
    """Aggregates over seeds. trained: (variant, seed) -> train_job record ("pretrain", 0
    included); evals: (variant, seed, eval name) -> eval_job record."""
    res: dict[str, Any] = {"runs": {}, "evals": {}, "pretrain": trained.get(("pretrain", 0))}
    variants = sorted({v for v, _ in trained if v != "pretrain"})
    for v in variants:
        recs = [trained[(v, s)] for s in range(p.seeds)]
        res["runs"][v] = _summary(recs, METRICS + ("train_seconds", "train_coverage", "train_recall"))
        res["runs"][v]["init"] = recs[0].get("init")
        res["runs"][v]["init_same_all_seeds"] = all(
            {x: (r.get("init") or {}).get(x) for x in ("loaded", "missing", "unexpected", "mismatched", "sha256")} ==
            {x: (recs[0].get("init") or {}).get(x) for x in ("loaded", "missing", "unexpected", "mismatched", "sha256")}
            for r in recs)
    for v, name, _ in eval_specs(p, k):
        res["evals"][f"{v}/{name}"] = _summary([evals[(v, s, name)] for s in range(p.seeds)], METRICS)
    return res


def seed_values(res: dict) -> dict[str, list[float]]:
    """name -> per-seed mIoU of every run and evaluation (and the per-seed Spearman rho of
    RankSeg's 1/tau as 'rho/rankseg'): the numbers the verdicts are computed from."""
    out = {v: r["per_seed"]["miou"] for v, r in res["runs"].items()}
    out.update({n: e["per_seed"]["miou"] for n, e in res["evals"].items()})
    out = {n: vals for n, vals in out.items() if vals and all(x is not None for x in vals)}
    if "rankseg" in res.get("tau", {}):
        out["rho/rankseg"] = res["tau"]["rankseg"]["rho_per_seed"]
    return out


def classifier_maps(res: dict) -> dict[str, list[float]]:
    """Per-seed val mAP of the classifiers the independent scheme selects with: the fine-tuned
    `classifier` runs and the one pre-training run (Table 2's evidence)."""
    out = {}
    cls = res["runs"].get("classifier")
    if cls and all(x is not None for x in cls["per_seed"]["map"]):
        out["classifier"] = cls["per_seed"]["map"]
    pre = res.get("pretrain") or {}
    if pre.get("map") is not None:
        out["pretrain"] = [pre["map"]]
    return out


def judge(res: dict, p: Protocol, k: int) -> tuple[list[dict], list[dict]]:
    """The decision of every claim and the verdict of every diagnosis (replication_claims), as
    plain dicts."""
    seeds, kap = seed_values(res), min(p.kappa, k)
    found = claims(seeds, kap, k, classifier_maps(res))
    pre = res.get("precondition") or {}
    # P1: RankSeg's ml head against the ranking read off the BASELINE's segmentation (the full-K
    # decoder the selection would have to beat; RankSeg's own decoder scored with kappa = K runs
    # ranks past its trained kappa on the last gamma / beta, so it is only a reference row).
    rs, bl = pre.get("rankseg"), pre.get("baseline")
    p1 = None
    if rs and bl and all(x is not None for x in rs["per_seed"]["ml_map"] + bl["per_seed"]["decoder_map"]):
        scene = all(x is not None for x in rs["per_seed"]["ml_scene_acc"] + bl["per_seed"]["decoder_scene_acc"])
        p1 = precondition_claim(rs["per_seed"]["ml_map"], bl["per_seed"]["decoder_map"],
                                rs["per_seed"]["ml_scene_acc"] if scene else None,
                                bl["per_seed"]["decoder_scene_acc"] if scene else None)
        found.insert(0, p1)
    rows = []
    for c in found:
        # Where P1 is not established, a claim about the learned selection cannot test the
        # paper's mechanism, whichever way its numbers go.
        mech = "inconclusive (P1 not established)" if c.needs_ranking and p1 is not None and not p1.holds else ""
        rows.append({**dataclasses.asdict(c), "holds": c.holds, "mechanism": mech})
    return rows, [{**dataclasses.asdict(c), "verdict": c.verdict} for c in diagnoses(seeds, kap)]


PRECONDITION_KEYS = ("ml_map", "decoder_map", "ml_scene_acc", "decoder_scene_acc", "ml_recall", "decoder_recall",
                     "miou", "scene_oracle_miou", "scene_oracle_gain", "err_gt", "err_scene", "err_look",
                     "err_background", "err_other")


def precondition_summary(diags: dict[tuple, dict], p: Protocol) -> dict:
    """variant -> per key of bench/replication_diagnostics.py's `precondition`: the aggregate
    over seeds and the per-seed values. diags: (variant, seed) -> its record."""
    out: dict[str, dict] = {}
    for v in sorted({v for v, _ in diags}):
        recs = [diags[(v, s)] for s in range(p.seeds) if (v, s) in diags]
        out[v] = _summary(recs, PRECONDITION_KEYS)
    return out


def image_scenes(world, classes: np.ndarray) -> np.ndarray:
    """The scenes an image of the synthetic world can come from: every scene whose class set
    (its background and object classes) holds all of the image's GT classes. In the default
    world each background belongs to one scene, so this is the scene the image was drawn
    from; where scenes share backgrounds it may be several."""
    c = np.asarray(classes, np.int64)
    c = c[(c >= 0) & (c < world.num_classes)]
    return np.array([s for s, (b, objs) in enumerate(zip(world.scenes_bg, world.scenes_objects))
                     if np.isin(c, np.append(np.asarray(objs, np.int64), int(b))).all()], np.int64)


def related_classes(world, classes: np.ndarray) -> dict[str, np.ndarray]:
    """K-bool masks of an image's absent classes that relate to its GT classes in the synthetic
    world (docs/synthetic.md): "scene" = object classes of the image's scenes (`image_scenes`),
    "look" = object classes with the colour x texture of one of its objects."""
    k = world.num_classes
    gt = np.zeros(k, bool)
    gt[np.asarray(classes, np.int64)] = True
    scene = np.zeros(k, bool)
    for s in image_scenes(world, classes):
        scene[world.scenes_objects[s]] = True
    looks = world.appearance[gt & (world.appearance >= 0)]
    look = (world.appearance >= 0) & np.isin(world.appearance, looks)
    return {"scene": scene & ~gt, "look": look & ~gt}


def selection_makeup(classes: list[np.ndarray], probs: np.ndarray, related: list[dict[str, np.ndarray]],
                     kappa: int) -> dict:
    """What the top-kappa's false positives are. classes: per image GT ids; probs: N x K ml
    scores; related: per image, name -> K-bool mask of related absent classes. Per name,
    micro-averaged over the images: the share of the false positives that are related, the
    share a uniform draw of as many absent classes would have, the share of the related
    classes the top-kappa keeps (and the draw's), and related classes per image."""
    k = probs.shape[1]
    tot: dict[str, float] = {}
    for c, pr, rel in zip(classes, probs, related, strict=True):
        gt = np.zeros(k, bool)
        gt[np.asarray(c, np.int64)] = True
        top = np.zeros(k, bool)
        top[np.argsort(-pr, kind="stable")[:kappa]] = True
        n_fp, n_absent = float((top & ~gt).sum()), float((~gt).sum())
        tot["fp"] = tot.get("fp", 0.0) + n_fp
        for name, mask in rel.items():
            tot[f"{name}/kept"] = tot.get(f"{name}/kept", 0.0) + float((top & mask).sum())
            tot[f"{name}/random"] = tot.get(f"{name}/random", 0.0) + n_fp * float(mask.sum()) / n_absent
            tot[f"{name}/all"] = tot.get(f"{name}/all", 0.0) + float(mask.sum())

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    out: dict[str, float | None] = {"fp_per_image": tot.get("fp", 0.0) / len(classes)}
    for name in (related[0] if related else {}):
        kept, rand, allr = tot[f"{name}/kept"], tot[f"{name}/random"], tot[f"{name}/all"]
        out |= {f"{name}_fp_share": ratio(kept, tot["fp"]), f"{name}_fp_share_random": ratio(rand, tot["fp"]),
                f"{name}_kept": ratio(kept, allr), f"{name}_kept_random": ratio(rand, allr),
                f"{name}_per_image": allr / len(classes)}
    return out


def error_makeup(preds: list[np.ndarray], labels: list[np.ndarray], classes: list[np.ndarray],
                 related: list[dict[str, np.ndarray]]) -> dict[str, float]:
    """Where wrongly labelled pixels go: share of the labelled, wrongly predicted pixels whose
    predicted class is another GT class of the image ("gt"), one of each related set (first
    match in `related`'s order), or none of them ("other"). preds / labels: H x W train ids
    (labels >= K are ignore)."""
    counts: dict[str, float] = {}
    for pred, lab, c, rel in zip(preds, labels, classes, related, strict=True):
        k = next(iter(rel.values())).shape[0]
        wrong = (lab < k) & (pred != lab)
        got = pred[wrong]
        gt = np.zeros(k, bool)
        gt[np.asarray(c, np.int64)] = True
        left = np.ones(got.shape, bool)
        for name, mask in {"gt": gt, **rel}.items():
            hit = left & mask[got]
            counts[name] = counts.get(name, 0.0) + float(hit.sum())
            left &= ~hit
        counts["other"] = counts.get("other", 0.0) + float(left.sum())
    total = sum(counts.values())
    return {f"err_{name}": (v / total if total else None) for name, v in counts.items()}


def synthetic_world(data_root: Path) -> Any | None:
    """The synthetic generator's world of a shard directory, rebuilt from dataset.json's
    options (the seed, and every other option `make_world` takes by name: shared backgrounds,
    every class shown, ...), or None for data that are not the synthetic set."""
    import inspect

    from rankseg_core.convert.synthetic import make_world
    from rankseg_core.shards.read import ShardIndex

    idx = ShardIndex(data_root)
    opts = idx.meta.get("options") or {}
    if idx.name != "synthetic" or "seed" not in opts:
        return None
    names = set(inspect.signature(make_world).parameters) - {"num_classes", "seed"}
    return make_world(idx.num_classes, int(opts["seed"]), **{n: opts[n] for n in names if n in opts})


def false_positive_makeup(runs: dict, data: Path, p: Protocol, k: int) -> dict | None:
    """`selection_makeup` of every RankSeg seed on the val images (the synthetic world is
    rebuilt from dataset.json's options); None for data that are not the synthetic set."""
    from rankseg_core.viz.common import load_viz_run, open_split, predict_samples

    world = synthetic_world(data)
    if world is None:
        return None
    per_seed = []
    for s in range(p.seeds):
        run, base = load_viz_run(runs[("rankseg", s)]), load_viz_run(runs[("baseline", s)])
        ds = open_split(data, "val", [run, base])
        samples = predict_samples(run, ds, range(len(ds)))
        rel = [related_classes(world, x.classes) for x in samples]
        rec = selection_makeup([x.classes for x in samples], np.stack([x.probs for x in samples]), rel,
                               min(p.kappa, k))
        args = ([x.label for x in samples], [x.classes for x in samples], rel)
        rec |= {f"rankseg_{n}": v for n, v in error_makeup([x.pred for x in samples], *args).items()}
        b_preds = [x.pred for x in predict_samples(base, ds, range(len(ds)))]
        rec |= {f"baseline_{n}": v for n, v in error_makeup(b_preds, *args).items()}
        per_seed.append(rec)
    return {key: agg([r[key] for r in per_seed]) for key in per_seed[0]} | {"per_seed": per_seed}


def cost_table(p: Protocol, k: int, img_size: int, variants: dict[str, list[str]], runs: dict) -> dict[str, dict]:
    """Params and FLOPs of one forward at the replication's image size: every segmenter
    variant, the classifier, and the independent segmenter with its frozen classifier."""
    from rankseg_core.config.train import TrainConfig, set_key
    from rankseg_core.engine.model_stats import model_stats
    from rankseg_core.engine.runs import load_config

    out = {}
    for v, extra in {**variants, "classifier": ["model.model=classifier-vitt"]}.items():
        cfg = TrainConfig()
        for text in recipe(p, img_size, 0) + extra:
            key, value = text.split("=", 1)
            if key.startswith("model."):
                set_key(cfg, key, value)
        cfg.model.num_classes = k
        out[v] = _stats(model_stats(cfg.model))
    out["indep"] = _stats(model_stats(load_config(runs[("indep", 0)]).model))  # the selector counted
    return out


def _stats(s: dict) -> dict:
    return {"params_m": s["params_m"], "gflops": s["gflops"], "head_gflops": s["head_gflops"], "kappa": s["kappa"]}


# ---------------------------------------------------------------------------------------
# Figures


FIGSIZE = (8.0, 4.8)  # inches: read at full width in docs/replication.md
FIG_DPI = 130


def _bars(ax, bars: list[tuple[str, dict]], ylabel: str, colours: list[str]) -> None:
    """Mean bars with the sample std, and each seed as a dot."""
    x = np.arange(len(bars))
    means = [100 * (b["mean"] or 0) for _, b in bars]
    stds = [100 * (b["std"] or 0) for _, b in bars]
    ax.bar(x, means, yerr=stds, capsize=3, color=colours[:len(bars)])
    tops = [100 * (b["max"] or 0) for _, b in bars] + [m + s for m, s in zip(means, stds)]
    ax.set_ylim(0, 1.25 * max(tops + [1e-3]))
    for xi, (_, b), m, s_ in zip(x, bars, means, stds):
        seeds = [100 * v for v in b.get("seeds", []) if v is not None]
        ax.plot([xi] * len(seeds), seeds, "k.", ms=4)
        # Above the error bar's cap, centred: beside the bar it met the seed dots.
        ax.text(xi, m + s_ + 0.02 * ax.get_ylim()[1], f"{m:.1f}", ha="center", va="bottom", fontsize=9)
    ax.set_xticks(x)
    ax.set_xticklabels([n for n, _ in bars], fontsize=9)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)


def _miou(block: dict) -> dict:
    return {**block["miou"], "seeds": block["per_seed"]["miou"]}


def draw_bar_figures(res: dict, seeds: int, kappa: int, name: str) -> dict[str, Any]:
    """The replication's bar and line figures (matplotlib Figures): Table 1 with the
    independent scheme, the oracle selections, mIoU against kappa."""
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    from rankseg_core.utils.plotting import plt

    figs: dict[str, Any] = {}
    k = res["num_classes"]
    r, e = res["runs"], res["evals"]
    title = f"(mean ± std and each seed, {seeds} seeds)"
    # Table 1 and the independent scheme.
    bars = [("Baseline", _miou(r["baseline"])), ("+MT", _miou(r["mt"])), ("+MT+LS", _miou(r["mt_ls"])),
            ("+MT+LS+RA", _miou(r["rankseg"])), ("independent", _miou(r["indep"]))]
    fig, ax = plt.subplots(figsize=FIGSIZE)
    _bars(ax, bars, "mIoU (%)", ["0.6", "0.75", "tab:cyan", "tab:blue", "tab:orange"])
    ax.set_title(f"{name}, K={k}: Table 1 and the independent scheme\n{title}", fontsize=11)
    fig.tight_layout()
    figs["table1"] = fig
    # Fig. 3 analogue: baseline, RankSeg, the two GT oracles.
    bars = [("Baseline", _miou(r["baseline"])), ("Baseline\n+ GT (eval)", _miou(e["baseline/gt_eval"])),
            ("RankSeg", _miou(r["rankseg"])), ("RankSeg\n+ GT (eval)", _miou(e["rankseg/gt_eval"])),
            ("GT (train\n+ eval)", _miou(r["oracle"]))]
    fig, ax = plt.subplots(figsize=FIGSIZE)
    _bars(ax, bars, "mIoU (%)", ["0.6", "0.75", "tab:blue", "tab:cyan", "tab:green"])
    ax.set_title(f"{name}, K={k}: oracle selections\n{title}", fontsize=11)
    fig.tight_layout()
    figs["oracles"] = fig

    # Table 4 analogue: mIoU against training kappa, and against evaluation kappa.
    kap0 = min(kappa, k)
    train_k = training_kappas(r, kap0)
    eval_k = sorted([(kap0, r["rankseg"]["miou"])] +
                    [(int(n.split("kappa")[1]), x["miou"]) for n, x in e.items() if n.startswith("rankseg/kappa")])
    fig, ax = plt.subplots(figsize=FIGSIZE)
    for pts, label, style in (([(kap, r[v]["miou"]) for kap, v in train_k], "trained and evaluated with κ", "o-"),
                              (eval_k, f"trained with κ={kap0}, evaluated with κ", "s--")):
        ax.errorbar([a for a, _ in pts], [100 * b["mean"] for _, b in pts], yerr=[100 * b["std"] for _, b in pts],
                    fmt=style, capsize=3, label=label)
    ax.axhline(100 * r["baseline"]["miou"]["mean"], color="0.5", ls=":", label="baseline (all K classes)")
    ax.set_xscale("log")
    # Plain numbers at 1, 2, 5 x 10^n: a log axis spanning one or two decades otherwise reads
    # only "10^1, 10^2".
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set(xlabel=f"κ, classes kept per image (K = {k})", ylabel="mIoU (%)")
    ax.set_title(f"{name}: number of selected classes", fontsize=11)
    ax.grid(alpha=0.3)
    # Below the axes: inside, it hid error bars wherever the curves ran.
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    fig.tight_layout()
    figs["kappa"] = fig
    return figs


def training_kappas(runs: dict, kap0: int) -> list[tuple[int, str]]:
    """(kappa, variant) of the RankSeg runs trained with different kappas, by kappa."""
    return sorted([(kap0, "rankseg")] + [(int(v.split("_k")[1]), v) for v in runs if v.startswith("rankseg_k")])


def draw(res: dict, p: Protocol, name: str, runs: dict, fig_dir: Path, prefix: str) -> dict:
    from rankseg_core.utils.plotting import save_figure
    from rankseg_core.viz.common import load_viz_run
    from rankseg_core.viz.tau import TauCurve, plot_tau, tau_curve

    k = res["num_classes"]
    r = res["runs"]
    figs = {key: save_figure(fig, fig_dir / f"{prefix}{key}.png", dpi=FIG_DPI).name
            for key, fig in draw_bar_figures(res, p.seeds, p.kappa, name).items()}
    train_k = training_kappas(r, min(p.kappa, k))

    # Fig. 7: learned 1/tau by rank, mean over seeds with the seed range, per training kappa.
    curves, spread, res["tau"] = [], {}, {}
    for kap, v in train_k:
        cs = [tau_curve(load_viz_run(runs[(v, s)])) for s in range(p.seeds)]
        scale, bias = np.stack([c.scale for c in cs]), np.stack([c.bias for c in cs])
        label = f"{name} K={k} κ={kap} (mean of {p.seeds} seeds)"
        curve = TauCurve(label, v, name, k, kap, "rank", scale.mean(0), bias.mean(0))
        curves.append(curve)
        spread[label] = (scale.min(0), scale.max(0))
        res["tau"][v] = {"kappa": kap, "inv_tau": curve.scale.tolist(), "bias": curve.bias.tolist(),
                         "trend": curve.trend(), "rho_per_seed": [c.trend()["spearman"] for c in cs],
                         "bias_rho_per_seed": [_spearman(c.bias) for c in cs],
                         "max_abs_change": float(np.abs(scale - 1).max())}
    figs["tau"] = plot_tau(curves, fig_dir / f"{prefix}tau.png", spread=spread).name
    return figs


def _spearman(y: np.ndarray) -> float | None:
    """Spearman rho of `y` against rank (None when y is constant)."""
    from scipy.stats import spearmanr

    if len(y) < 2 or np.ptp(y) == 0:
        return None
    return float(spearmanr(np.arange(len(y)), y).statistic)


def false_positives(runs: dict, data: Path, out: Path, fp_images: int, fig_dir: Path, prefix: str) -> dict:
    """Seed 0: RankSeg's false positives against the baseline's over the val split, its
    per-image chart of the first val image, and both models' predictions on four images."""
    from rankseg_core.viz.common import load_viz_run
    from rankseg_core.viz.false_positives import run_false_positives
    from rankseg_core.viz.predictions import run_predictions

    rs, base = load_viz_run(runs[("rankseg", 0)]), load_viz_run(runs[("baseline", 0)])
    summary = run_false_positives(rs, data, out, num=1, stats_num=fp_images, baseline=base)
    pred = run_predictions([base, rs], data, out / "pred", num=4)
    figures = {"summary": (out / "fp_summary.png", "fp_summary.png"),
               "image": (next(out.glob("fp_val_*.png")), "fp_image.png"),
               "predictions": (out / "pred" / pred["figures"][0], "predictions.png")}
    for key, (src, dst) in figures.items():
        shutil.copyfile(src, fig_dir / f"{prefix}{dst}")
        summary[f"figure_{key}"] = f"{prefix}{dst}"
    summary["image_key"] = figures["image"][0].stem.removeprefix("fp_")
    return summary


# ---------------------------------------------------------------------------------------
# Markdown


def _rhos(vals: list[float | None]) -> str:
    return ", ".join("–" if x is None or x != x else f"{x:.2f}" for x in vals)


def _per_seed(vals: list[float | None], scale: float = 100.0, digits: int = 1) -> str:
    return ", ".join("–" if x is None else f"{x * scale:.{digits}f}" for x in vals)


def _diagnosis(r: dict, kap: int) -> list[str]:
    """Which classes in the selection cost mIoU: the GT (eval) selection filled up to kappa."""
    runs, evals = r["runs"], r["evals"]
    if "rankseg/gt_ranked" not in evals:
        return []
    out = [f"**Which classes in the selection cost mIoU** (`rankseg eval --oracle --oracle-fill`): each image's "
           f"GT classes filled up to κ = {kap} with the model's own highest-ranked other classes (*ranked*: "
           "recall 100 %, the same competitors as its top-κ) or with uniformly drawn ones (*random*, seeded by "
           "the image).\n"]
    rows = [("RankSeg, own top-κ", runs["rankseg"]), ("RankSeg, GT + ranked fill", evals["rankseg/gt_ranked"]),
            ("RankSeg, GT + random fill", evals["rankseg/gt_random"]), ("RankSeg, GT only", evals["rankseg/gt_eval"]),
            ("Baseline, all K", runs["baseline"]), ("Baseline, GT + random fill", evals["baseline/gt_random"]),
            ("Baseline, GT only", evals["baseline/gt_eval"])]
    out.append(md_table(["selection at evaluation", "mIoU", "per seed"],
                        [[label, pm(b["miou"]), _per_seed(b["per_seed"]["miou"])] for label, b in rows]))
    out.append("\nThe same rule as the verdicts, applied to the hypotheses these numbers test:\n")
    out.append(_claims_table(r["diagnoses"], "hypothesis"))
    mk = r.get("fp_makeup")
    if mk:
        out.append(f"\nWhat RankSeg's top-κ false positives are ({mk['fp_per_image']['mean']:.1f} per image; synthetic "
                   "world, docs/synthetic.md): *scene-mates* = object classes of the image's scene that it does not "
                   "show; *look-alikes* = classes with the colour × texture of one of its objects, from other "
                   "scenes. 'Random' = the same numbers for as many absent classes drawn uniformly.\n")
        out.append(md_table(["absent classes", "per image", "share of the top-κ false positives", "random",
                             "share of them in the top-κ", "random"], [
            [label, f"{mk[f'{n}_per_image']['mean']:.1f}", pm(mk[f"{n}_fp_share"]), pm(mk[f"{n}_fp_share_random"]),
             pm(mk[f"{n}_kept"]), pm(mk[f"{n}_kept_random"])]
            for n, label in (("scene", "scene-mates"), ("look", "look-alikes"))]))
        out.append("\nWhere the wrongly labelled pixels go (share of the labelled pixels predicted wrong, by the kind "
                   "of class they are given; a class counts in the first row it belongs to):\n")
        out.append(md_table(["predicted class", "Baseline", "RankSeg"], [
            [label, pm(mk[f"baseline_err_{n}"]), pm(mk[f"rankseg_err_{n}"])]
            for n, label in (("gt", "another class of the image"), ("scene", "a scene-mate"),
                             ("look", "a look-alike"), ("other", "any other class"))]))
        out.append("")
    return out


def _claims_table(rows: list[dict], first: str = "claim (paper)") -> str:
    def num(c: dict, x: float, sign: str = "+") -> str:  # mIoU in points; rho as it is
        return f"{x:{sign}.2f}" if c["b"] == "0" else f"{100 * x:{sign}.1f}"

    return md_table([first, "A vs B", "A − B per seed", "mean A − B", "pooled std", "verdict"], [
        [c["claim"], f"{c['a']} {c['relation']} {c['b']}", ", ".join(num(c, d) for d in c["diffs"]),
         num(c, c["mean_diff"]), num(c, c["spread"], ""),
         f"**{'holds' if c['holds'] else 'does not hold'}** ({c['verdict'].split('(', 1)[1]}"] for c in rows])


CLAIMS_NOTE = (
    "**Claims** (bench/replication_claims.py). Each comparison A vs B is *beyond the seed spread* when A − B "
    "has the same sign on every seed AND |mean A − B| exceeds the pooled sample std of the two sets. *MDE* "
    "(minimum detectable effect) = the smallest mean difference that rule would call beyond the spread in the "
    "claim's direction if the per-seed differences kept their observed scatter: max(pooled std, mean − min of "
    "the differences) for >, the mirror for <, the larger of both for ≈; it does not shrink with more seeds. "
    "*Paper*: the effect the paper reports (COCO-Stuff unless said; for ≈ the margin). A claim **holds** when "
    "every comparison is beyond the spread in the paper's direction (≈: within the spread with an MDE at most "
    "the margin); **does not hold** when one is beyond the spread the other way, or within it although its MDE "
    "is at most the paper's effect; otherwise **inconclusive**, with the seeds a one-sided paired t-test (5 %, "
    "power 80 %) would need to detect the paper's effect at the observed scatter. Differences in mIoU points "
    "(ρ for Fig. 7, accuracy / mAP points for P1).\n")


def _num(c: dict, x: float, sign: str = "+") -> str:
    """mIoU (and other fractions) in points; rho as it is."""
    return f"{x:{sign}.2f}" if c["b"] == "0" else f"{100 * x:{sign}.1f}"


def claim_table(rows: list[dict]) -> str:
    """The claims (replication_claims.Claim as dicts): one row per claim, one line per comparison."""
    out = []
    for c in rows:
        parts = c["parts"]
        multi = len(parts) > 1
        ev = "<br>".join((f"{p['a']} vs {p['b']}: " if multi or c["relation"] == "≈" else "") +
                         ", ".join(_num(p, d) for d in p["diffs"]) for p in parts)
        means = "<br>".join(_num(p, p["mean_diff"]) for p in parts)
        stds = "<br>".join(_num(p, p["spread"], "") for p in parts)
        mdes = "<br>".join(_num(p, p["mde"], "") for p in parts)
        paper = (f"{100 * c['paper_effect']:+.2f} ({c['paper_source']})" if c["paper_effect"] is not None
                 else f"– ({c['paper_source']})")
        decision = f"**{c['decision']}** ({c['reason']})"
        n_seeds = len(parts[0]["diffs"])
        if c["decision"] == "inconclusive" and c.get("seeds_needed"):
            decision += (f"; more seeds: a paired t-test needs {c['seeds_needed']} for the paper's effect"
                         if c["seeds_needed"] > n_seeds else
                         f"; the paired differences are tight enough for a t-test ({c['seeds_needed']} seeds): the "
                         "spread between seeds leaves the rule undecided")
        if c.get("mechanism"):
            decision += f"; mechanism: {c['mechanism']}"
        if c.get("evidence"):
            decision += f"; {c['evidence']}"
        out.append([c["claim"], ev, means, stds, mdes, paper, decision])
    return md_table(["claim (paper)", "A − B per seed", "mean", "pooled std", "MDE", "paper", "decision"], out)


def claims_summary(rows: list[dict]) -> str:
    """One line: how many claims hold, do not hold, are inconclusive."""
    n = {d: sum(c["decision"] == d for c in rows) for d in ("holds", "does not hold", "inconclusive")}
    return (f"\n{len(rows)} claims: {n['holds']} hold, {n['does not hold']} do not hold, {n['inconclusive']} are "
            "inconclusive at these seeds.\n")


def precondition_report(pre: dict, kap: int) -> list[str]:
    """The precondition table (bench/replication_diagnostics.py) of the baseline and RankSeg runs."""
    if not pre:
        return []
    vs = [v for v in ("baseline", "rankseg") if v in pre]
    names = {"baseline": "Baseline", "rankseg": "RankSeg"}
    out = [f"**The paper's precondition** (bench/replication_diagnostics.py, val split, mean ± std over seeds). "
           "*ml head*: the multi-label branch's scores; *decoder*: per class the maximum over the image's pixels of "
           "the decoder's softmax over all K classes (RankSeg evaluated with κ = K for it: a reference only; P1 "
           "sets RankSeg's ml head against the baseline's decoder, the full-K decoder a selection has to beat). *Scene accuracy*: the "
           f"scene whose class set holds most of the ranking's top-{kap} is one the image can come from. *Scene "
           "oracle*: each image's selection replaced by its GT classes plus every class of its scene.\n"]
    rows = [("ml head mAP", "ml_map"), ("decoder ranking mAP", "decoder_map"),
            ("ml head scene accuracy", "ml_scene_acc"), ("decoder scene accuracy", "decoder_scene_acc"),
            (f"ml head recall@{kap}", "ml_recall"), (f"decoder recall@{kap}", "decoder_recall"),
            ("mIoU (own selection)", "miou"), ("mIoU with the scene oracle", "scene_oracle_miou"),
            ("scene-oracle gain", "scene_oracle_gain")]
    out.append(md_table(["", *[names[v] for v in vs]], [[label, *[pm(pre[v][key]) for v in vs]] for label, key in rows]))
    if any(pre[v]["err_gt"]["mean"] is not None for v in vs):
        out.append("\nWhere the wrongly labelled pixels go (share of the wrong pixels, by the kind of class they are "
                   "given; first row that fits):\n")
        out.append(md_table(["predicted class", *[names[v] for v in vs]], [
            [label, *[pm(pre[v][f"err_{n}"]) for v in vs]]
            for n, label in (("gt", "another class of the image"), ("scene", "a scene-mate"),
                             ("look", "a look-alike of another scene"), ("background", "another scene's background"),
                             ("other", "any other class"))]))
    out.append("")
    return out


def variant_name(v: str) -> str:
    if v.startswith("ml_w"):
        return f"RankSeg, ml loss weight {v[4:]} (Table 5)"
    return f"RankSeg κ={v.split('_k')[1]}" if v.startswith("rankseg_k") else VARIANT_NAMES.get(v, v)


def _init_line(r: dict, v: str) -> list[str]:
    i = r[v].get("init")
    if not i:
        return [variant_name(v), "–", "–", "–", "–", "–"]
    return [variant_name(v), f"{i['loaded']} of {i['loaded'] + i['missing'] + i['mismatched']}",
            str(i["missing"]), str(i["unexpected"]), str(i["mismatched"]),
            ("yes" if i["backbone_only"] else "NO") + ("" if r[v]["init_same_all_seeds"] else " (differs by seed!)")]


def report(results: list[dict], p: Protocol, command: str, smoke: bool, img_rel: str, history: list[dict]) -> str:
    """The markdown results block of docs/replication.md. history: the timing records of
    every invocation on this work directory, this one last."""
    from report import machine  # bench/report.py

    out = []
    tag = "**SMOKE RUN** (tiny sizes, 2 iterations: the numbers mean nothing)  \n" if smoke else ""
    cores = max(1, p.jobs * p.threads)
    now = history[-1]
    out.append(f"{tag}Command: `{command}` on {machine()} (threads per job {p.threads}, {p.jobs} job(s) at a time).  ")
    out.append(f"This invocation ({now['started']}): {_timing(now, cores)}  ")
    earlier = [h for h in history[:-1] if h["total"] > h["reused"]]
    if now["reused"]:
        out.append(f"It reused {now['reused']} of {now['total']} runs; the invocations on this work directory that "
                   "trained runs:  ")
        out += [f"- {h['started']} `{h['command']}`: {h['total'] - h['reused']} runs trained ({h['resumed']} resumed); "
                f"{_timing(h, cores)}  " for h in earlier] or ["- none recorded its timing (interrupted before the end)  "]
    pre = (f"pre-training: `classifier-vitt` on {p.pretrain_images} `pretrain` images, {p.pretrain_iters} iterations "
           f"of batch {p.pretrain_batch} (AdamW lr {p.pretrain_lr:g}, warm-up {p.pretrain_warmup}, poly decay, DDP over "
           f"{p.jobs} processes); every run below starts from its backbone, trained at {p.backbone_lr_mult:g} × the lr. "
           if p.pretrained else "every run from random weights (no pre-training). ")
    out.append(f"Protocol: {p.seeds} seeds; {pre}Each run: {p.iters} iterations of batch {p.batch} (AdamW lr {p.lr:g}, "
               f"warm-up {p.warmup}, poly decay); training κ = {p.kappa}; ml loss weight {p.ml_weight:g}. "
               "Metrics in %, mean ± sample std over seeds.")
    for r in results:
        out.append(dataset_report(r, p, img_rel))
    return "\n".join(out)


def _timing(h: dict, cores: int) -> str:
    load = h["load"]
    return (f"wall time **{h['wall_s'] / 60:.1f} min**; CPU time of the replication's processes {h['cpu_s'] / 60:.1f} "
            f"min (= {h['cpu_s'] / 60 / cores:.1f} min on {cores} dedicated core(s)); 1-min load average at start / "
            f"end {load['start']:.1f} / {load['end']:.1f}, mean {load['mean']:.1f}, max {load['max']:.1f} over "
            f"{load['n']} samples (other processes included).")


def dataset_report(r: dict, p: Protocol, img_rel: str) -> str:
    k, name = r["num_classes"], r["dataset"]
    runs, evals, cost = r["runs"], r["evals"], r["cost"]
    kap0 = min(p.kappa, k)
    out = [f"\n### {name} (K = {k}, {r['img_size']} px)\n",
           f"{r['total_runs']} runs ({r['total_runs'] - r['reused_runs']} trained, {r['reused_runs']} reused from an "
           f"earlier invocation, {r['resumed_runs']} resumed) and their evaluations {r['seconds'] / 60:.1f} min; "
           f"figures and false positives {r['figure_seconds'] / 60:.1f} min.\n"]
    pre = r.get("pretrain")
    if pre:
        out.append(f"**Pre-training** (one run, shared by every variant and seed): val mAP {100 * pre['map']:.1f}, "
                   f"recall@{kap0} {100 * pre['recall_at_kappa']:.1f}, {pre['train_seconds'] / 60:.1f} min. "
                   "What `--init-from` loaded into each variant (the report `train` prints; identical for every seed "
                   "unless marked):\n")
        out.append(md_table(["variant", "loaded", "missing (kept as initialised)", "unexpected", "shape mismatch",
                             "exactly the backbone"], [_init_line(runs, v) for v in runs]))
        out.append("")
    out.append(CLAIMS_NOTE)
    out.append(claim_table(r["claims"]))
    out.append(claims_summary(r["claims"]))
    out += precondition_report(r.get("precondition") or {}, kap0)
    out.append(f"\n**Table 1** (ablation), selection diagnostics and cost: params / GFLOPs of one forward at "
               f"{r['img_size']} px (FlopCounterMode, all matmuls). Train coverage = share of labelled pixels whose "
               "class is in the selection, mean of the last quarter of training.\n")
    rows = []
    for v in ("baseline", "mt", "mt_ls", "rankseg"):
        c = runs[v]
        rows.append([VARIANT_NAMES[v], pm(c["miou"]), pm(c["aacc"]), pm(c["map"]), pm(c["recall_at_kappa"]),
                     pm(c["train_coverage"]), f"{cost[v]['params_m']:.2f}M", f"{cost[v]['gflops']:.3f}",
                     f"{c['train_seconds']['mean']:.0f}"])
    out.append(md_table(["variant", "mIoU", "aAcc", "mAP (ml)", f"recall@{kap0}", "train coverage", "params", "GFLOPs",
                         "train s"], rows))
    out.append("\nPer-seed mIoU: " + "; ".join(f"{VARIANT_NAMES[v]} {_per_seed(runs[v]['per_seed']['miou'])}"
                                               for v in ("baseline", "mt", "mt_ls", "rankseg")) + ".\n")
    out.append(f"![table 1]({img_rel}/{r['figures']['table1']})\n")
    out.append("**Fig. 3** (oracle selections)\n")
    out.append(md_table(["selection", "mIoU", "per seed"], [
        [label, pm(block["miou"]), _per_seed(block["per_seed"]["miou"])] for label, block in (
            ("Baseline (all K)", runs["baseline"]), ("Baseline, GT classes only at eval", evals["baseline/gt_eval"]),
            ("RankSeg (top-κ)", runs["rankseg"]), ("RankSeg, GT (eval)", evals["rankseg/gt_eval"]),
            ("GT (train + eval)", runs["oracle"]))]))
    out.append(f"\n![oracles]({img_rel}/{r['figures']['oracles']})\n")
    out += _diagnosis(r, kap0)
    out.append(f"**Tables 2–3** (independent scheme: a `classifier-vitt` fine-tuned per seed with the same recipe, "
               f"then a segmenter with `--selector` that classifier; joint = RankSeg; κ = {kap0} for both). Ranking "
               "mAP / recall: the classifier's (independent) or the ml branch's (joint) on the val images. Cost: "
               "the independent segmenter's forward includes its frozen classifier.\n")
    cls, ind, rs = runs["classifier"], runs["indep"], runs["rankseg"]
    out.append(md_table(["scheme", "ranking mAP", f"recall@{kap0}", "mIoU", "per seed", "params", "GFLOPs"], [
        ["Baseline (no selection)", "–", "–", pm(runs["baseline"]["miou"]), _per_seed(runs["baseline"]["per_seed"]["miou"]),
         f"{cost['baseline']['params_m']:.2f}M", f"{cost['baseline']['gflops']:.3f}"],
        ["Independent (classifier → segmenter)", pm(ind["map"]), pm(ind["recall_at_kappa"]), pm(ind["miou"]),
         _per_seed(ind["per_seed"]["miou"]), f"{cost['indep']['params_m']:.2f}M", f"{cost['indep']['gflops']:.3f}"],
        ["Joint (RankSeg)", pm(rs["map"]), pm(rs["recall_at_kappa"]), pm(rs["miou"]), _per_seed(rs["per_seed"]["miou"]),
         f"{cost['rankseg']['params_m']:.2f}M", f"{cost['rankseg']['gflops']:.3f}"]] + ([
        ["Independent, the pre-training classifier selects (Table 2)", pm(runs["indep_pre"]["map"]),
         pm(runs["indep_pre"]["recall_at_kappa"]), pm(runs["indep_pre"]["miou"]),
         _per_seed(runs["indep_pre"]["per_seed"]["miou"]), "–", "–"]] if "indep_pre" in runs else [])))
    out.append(f"\nThe classifier alone: mAP {pm(cls['map'])}, recall@{kap0} {pm(cls['recall_at_kappa'])} "
               f"({cost['classifier']['params_m']:.2f}M params, {cost['classifier']['gflops']:.3f} GFLOPs).\n")
    out.append("**Table 4** (κ at training = κ at evaluation; κ = K sorts all classes)\n")
    trows = [(kap0, "rankseg")] + [(int(v.split("_k")[1]), v) for v in runs if v.startswith("rankseg_k")]
    out.append(md_table(["κ", "mIoU", "per seed", "aAcc", "mAP", "recall@κ", "train coverage", "GFLOPs"], [
        [f"{kap}{' = K' if kap == k else ''}", pm(runs[v]["miou"]), _per_seed(runs[v]["per_seed"]["miou"]),
         pm(runs[v]["aacc"]), pm(runs[v]["map"]), pm(runs[v]["recall_at_kappa"]), pm(runs[v]["train_coverage"]),
         f"{cost[v]['gflops']:.3f}"] for kap, v in sorted(trows)]))
    out.append(f"\n**κ at evaluation ≠ κ at training** (trained with κ = {kap0})\n")
    erows = [[f"{kap0} (training)", pm(runs["rankseg"]["miou"]), _per_seed(runs["rankseg"]["per_seed"]["miou"]),
              pm(runs["rankseg"]["recall_at_kappa"])]]
    erows += [[n.split("kappa")[1], pm(x["miou"]), _per_seed(x["per_seed"]["miou"]), pm(x["recall_at_kappa"])]
              for n, x in sorted(evals.items(), key=lambda t: int(t[0].split("kappa")[1]) if "kappa" in t[0] else 0)
              if n.startswith("rankseg/kappa")]
    out.append(md_table(["κ at eval", "mIoU", "per seed", "recall@κ"], erows))
    out.append("\n**Supplement Table 5** (dynamic κ: classes with sigmoid score > threshold)\n")
    out.append(md_table(["threshold", "mIoU", "per seed"], [
        [n.split("thr")[1], pm(x["miou"]), _per_seed(x["per_seed"]["miou"])] for n, x in evals.items()
        if n.startswith("rankseg/thr")]))
    out.append(f"\n![kappa]({img_rel}/{r['figures']['kappa']})\n")
    t56 = [v for v in runs if v.startswith("ml_")]
    if t56:
        out.append(f"**Tables 5–6** (RankSeg, κ = {kap0}, with another ml loss weight or ml head; RankSeg itself is "
                   "weight 10 with the 1× TranEnc head)\n")
        out.append(md_table(["variant", "mIoU", "per seed", "mAP (ml)", f"recall@{kap0}", "params", "GFLOPs"], [
            ["RankSeg (weight 10, 1× TranEnc)" if v == "rankseg" else variant_name(v), pm(runs[v]["miou"]),
             _per_seed(runs[v]["per_seed"]["miou"]), pm(runs[v]["map"]),
             pm(runs[v]["recall_at_kappa"]), f"{cost[v]['params_m']:.2f}M" if v in cost else "–",
             f"{cost[v]['gflops']:.3f}" if v in cost else "–"] for v in ["rankseg", *sorted(t56)]]))
        out.append("")
    out.append("**Fig. 7** (learned 1/τ by rank, mean over seeds; band = range over seeds). Spearman ρ against "
               "rank (< 0: decreasing); max |1/τ − 1| = how far any seed's 1/τ moved from its initial 1; β = the "
               "per-rank bias of the same LayerNorm.\n")
    out.append(md_table(["training κ", "1/τ rank 1", "1/τ last rank", "ρ of 1/τ per seed", "ρ of the mean curve",
                         "slope per rank", "max abs(1/τ − 1)", "β rank 1", "β last rank", "ρ of β per seed"], [
        [str(t["kappa"]), f"{t['inv_tau'][0]:.3f}", f"{t['inv_tau'][-1]:.3f}", _rhos(t["rho_per_seed"]),
         f"{t['trend']['spearman']:.2f}", f"{t['trend']['slope_per_rank']:.5f}", f"{t['max_abs_change']:.3f}",
         f"{t['bias'][0]:.3f}", f"{t['bias'][-1]:.3f}", _rhos(t["bias_rho_per_seed"])]
        for t in r["tau"].values()]))
    out.append(f"\n![tau]({img_rel}/{r['figures']['tau']})\n")
    fp = r["fp"]
    out.append(f"**False positives** (seed 0, {fp['images']} val images, per image): top-κ {fp['topk_fp_per_image']:.2f}; "
               f"prediction: RankSeg {fp['pred_fp_per_image']:.2f}, baseline {fp['baseline_pred_fp_per_image']:.2f} "
               f"({fp['removed_per_image']:.2f} of the baseline's removed, {fp['added_per_image']:.2f} added).\n")
    out.append(f"![false positives]({img_rel}/{fp['figure_summary']})\n")
    out.append(f"Seed 0 on `{fp['image_key']}`: RankSeg's existence probabilities (black = GT classes, red = false "
               "positives), and both models' errors on four val images (white = correct, other colours = the wrongly "
               "predicted class, black = ignore):\n")
    out.append(f"![per-image false positives]({img_rel}/{fp['figure_image']})\n")
    out.append(f"![predictions]({img_rel}/{fp['figure_predictions']})\n")
    return "\n".join(out)
