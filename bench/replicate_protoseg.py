"""Prototypes (ProtoSeg) against the parametric head and RankSeg, over vocabulary sizes, measured
on CPU (docs/replication.md, "Prototypes and the large-vocabulary study").

    python bench/replicate_protoseg.py --docs        # the synthetic protocol, writes its block of docs/replication.md
    python bench/replicate_protoseg.py --smoke       # end to end in seconds (tiny everything)
    python bench/replicate_protoseg.py --shards 300=ADE300 --shards 847=ADE847 --model segmenter-vitb \\
        --seeds 1 --jobs 1 --threads 8 --set device=cuda --set model.backbone_weights=vitb.safetensors   # ADE20K-x

Four Segmenter heads, `--seeds` seeds each (mean ± sample std, and every seed): the parametric
baseline (`segmenter`), ProtoSeg's prototypes (`protoseg`), RankSeg (`rankseg`) and RankSeg with
prototypes (`rankproto`), on each vocabulary size x:
- synthetic (default): bench/replicate.py's world (K = 200, 64 px); x < K keeps the x classes present
  in the most training images and makes the others ignore, the rule of ADE20K-x
  (rankseg_core/convert/ade20k_full.py `top_classes_by_frequency`), written once as shards of their
  own next to the world's; x = K is the world itself. From random weights, the replication's recipe;
- `--shards X=DIR` (repeatable): shard directories, e.g. `rankseg prepare ade20k-full --top-classes X`,
  with the family's own recipe for that data (`--model`, `--iterations`, `--set` on top).
Plus the lambda check of ProtoSeg's supplement Table S3: protoseg at lambda1 (`ppc_weight`) in
{0.001, 0.01, 0.05} with lambda2 = 0.01 and lambda2 (`ppd_weight`) in {0.001, 0.05} with lambda1 = 0.01,
on one x (`--lambda-x`; the synthetic default: the largest). Every verdict is decided by
bench/replication_claims.py's rule or by the stated lambda rule (`lambda_robustness`).

Runs go through bench/replicate.py's `train_job` / `run_tasks`: a finished run with the same
resolved config is reused, an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
import time
from dataclasses import dataclass, field
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
from replication_protocol import METRICS, Protocol, recipe  # noqa: E402

BLOCK = "protoseg"  # docs/replication.md: <!-- protoseg:start --> ... <!-- protoseg:end -->
HEADS = ("segmenter", "protoseg", "rankseg", "rankproto")
HEAD_TITLES = {"segmenter": "parametric (Segmenter)", "protoseg": "ProtoSeg (prototypes)", "rankseg": "RankSeg",
               "rankproto": "RankSeg + prototypes"}
DEFAULT_LAMBDA = (0.01, 0.01)  # (lambda1 = PPC, lambda2 = PPD): the paper's choice, the head's default
# Supplement Table S3 (ADE20K val, mIoU %) at the settings this check trains.
PAPER_S3 = {"ppc": {0.001: 46.1, 0.01: 46.4, 0.05: 46.3}, "ppd": {0.001: 46.2, 0.01: 46.4, 0.05: 46.1}}


# ---------------------------------------------------------------------------------------
# The protocol


@dataclass
class ProtoProtocol:
    """Sizes and recipe of this section (docs/replication.md, "Prototypes and the large-vocabulary study")."""

    num_classes: int = 200  # the replication's synthetic world, and its shards
    size: int = 64
    images: int = 2000
    val_images: int = 200
    vocab: list[int] = field(default_factory=lambda: [100, 200])  # x: the top-x classes by training frequency
    lambda_x: int | None = 200  # the x of the lambda check (None: no lambda check)
    ppc: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.05])  # lambda1 at lambda2 = 0.01
    ppd: list[float] = field(default_factory=lambda: [0.001, 0.01, 0.05])  # lambda2 at lambda1 = 0.01
    kappa: int = 50  # training kappa of rankseg / rankproto (the replication's, clamped to x)
    iters: int = 120
    batch: int = 8
    lr: float = 1e-3
    seeds: int = 3
    jobs: int = 2
    threads: int = 1
    tiny: bool = False  # smoke: 2 iterations

    def replication(self) -> Protocol:
        """The replication's Protocol with these sizes (its `recipe` and `synthetic_root` take one)."""
        return Protocol(num_classes=self.num_classes, size=self.size, images=self.images, val_images=self.val_images,
                        pretrain_images=0, pretrain_iters=0, iters=self.iters, batch=self.batch, lr=self.lr,
                        warmup=max(0, min(30, self.iters // 10)), kappa=self.kappa, seeds=self.seeds, jobs=self.jobs,
                        threads=self.threads, kappa_sweep=[], kappa_eval=[], thresholds=[])

    @classmethod
    def smoke(cls) -> "ProtoProtocol":
        return cls(num_classes=40, size=32, images=8, val_images=4, vocab=[20, 40], lambda_x=40, ppc=[0.001, 0.01],
                   ppd=[0.01, 0.05], kappa=6, iters=2, batch=2, seeds=2, jobs=1, threads=1, tiny=True)


def lambda_settings(p: ProtoProtocol) -> list[tuple[float, float]]:
    """(lambda1, lambda2) of the lambda check: one axis at a time through the default (listed once)."""
    out = [(a, DEFAULT_LAMBDA[1]) for a in p.ppc] + [(DEFAULT_LAMBDA[0], b) for b in p.ppd]
    return sorted(set(out) | {DEFAULT_LAMBDA})


def variant_key(head: str, lam: tuple[float, float] = DEFAULT_LAMBDA) -> str:
    """Run-directory name: the head, and for protoseg off its default lambdas both of them."""
    return head if head != "protoseg" or lam == DEFAULT_LAMBDA else f"protoseg_ppc{lam[0]:g}_ppd{lam[1]:g}"


def variants(p: ProtoProtocol, x: int) -> dict[str, list[str]]:
    """Variant -> the overrides that differ on vocabulary x (the head; the lambdas)."""
    out = {h: [f"model.head={h}"] for h in HEADS}
    if x == p.lambda_x:
        for lam in lambda_settings(p):
            if lam != DEFAULT_LAMBDA:
                out[variant_key("protoseg", lam)] = ["model.head=protoseg", f"model.protoseg.ppc_weight={lam[0]:g}",
                                                     f"model.protoseg.ppd_weight={lam[1]:g}"]
    return out


# ---------------------------------------------------------------------------------------
# ADE20K-x's rule on the synthetic world


def presence_counts(root: Path, split: str = "train") -> np.ndarray:
    """K int64: the number of `split` images each class is present in (the shard index's class
    lists: the labels as stored), the count ADE20K-x ranks by."""
    from rankseg_core.shards.read import ShardIndex

    idx = ShardIndex(root)
    a = idx.arrays(split)
    return np.bincount(a.classes.astype(np.int64), minlength=idx.num_classes)[:idx.num_classes].astype(np.int64)


def top_lut(top: np.ndarray) -> np.ndarray:
    """65,536-entry uint16 label map: old train id top[i] -> i, every other value (other classes
    and ignore) -> ignore."""
    from rankseg_core.shards.codec import IGNORE

    lut = np.full(1 << 16, IGNORE, np.uint16)
    lut[np.asarray(top, np.int64)] = np.arange(len(top), dtype=np.uint16)
    return lut


class _Relabel:
    """Conversion maker: sample `key` of the source shards with its label through `lut`; the
    image bytes are stored as they were (the same pixels)."""

    def __init__(self, source: Path, splits: dict[str, list[str]], lut: np.ndarray, num_classes: int) -> None:
        self.source, self.lut, self.num_classes = source, lut, num_classes
        self.where = {k: (s, i) for s, keys in splits.items() for i, k in enumerate(keys)}
        self._data: dict[str, object] = {}

    def __call__(self, key: str):
        from rankseg_core.shards.codec import decode_label
        from rankseg_core.shards.read import ShardDataset
        from rankseg_core.shards.write import encode_sample

        split, i = self.where[key]
        if split not in self._data:
            self._data[split] = ShardDataset(self.source, split)
        ds = self._data[split]
        image, label = ds.raw(i)  # type: ignore[attr-defined]
        return encode_sample(key, image, self.lut[decode_label(label)], self.num_classes)


def top_classes_root(source: Path, x: int) -> Path:
    """Shards of `source` restricted to its x most frequent training classes (ADE20K-x's rule:
    presence in the most training images, ties by lower id, remapped to 0..x-1 by decreasing
    frequency, the rest ignore), made once next to it; x = K returns `source` itself."""
    from rankseg_core.convert.ade20k_full import top_classes_by_frequency
    from rankseg_core.convert.common import ConvertOptions, run_conversion
    from rankseg_core.errors import UserError
    from rankseg_core.shards.read import ShardIndex
    from rankseg_core.shards.write import DatasetHeader
    from rankseg_core.utils.fsio import atomic_write_json

    idx = ShardIndex(source)
    k = idx.num_classes
    if not 1 <= x <= k:
        raise UserError(f"--vocab {x}: must be in 1..{k} (the world's classes)")
    if x == k:
        return source
    out = source.parent / f"{source.name}_top{x}"
    if (out / "dataset.json").is_file():
        return out
    counts = presence_counts(source)
    top = top_classes_by_frequency(counts, x)
    splits = {s: list(idx.arrays(s).keys) for s in ("train", "val")}
    names = idx.class_names
    # Named "synthetic" so that the data's own defaults (no photometric distortion) apply as to the world.
    header = DatasetHeader("synthetic", [names[t] for t in top],
                           {"source": source.name, "top_classes": x, "ranking": "training-image presence, ties by id"},
                           f"{source.name}; top {x} classes by training-image frequency")
    run_conversion(out, header, splits, _Relabel(source, splits, top_lut(top), x),
                   ConvertOptions(samples_per_shard=1000))
    atomic_write_json(out / "class_frequency.json", {"split": "train", "source": source.name,
                                                     "class_images": counts.tolist(), "top": top.tolist()})
    return out


def chance(root: Path) -> dict:
    """mIoU of the most frequent training class (by pixels) predicted on every val pixel, from the
    shard index's per-image pixel counts (no label is decoded: ADE20K-x has 25k of them). As
    bench/replicate_architectures.py `chance_miou`: the constant class has IoU = its share of the
    labelled val pixels, every other class with val pixels 0, averaged over classes with a union."""
    from rankseg_core.shards.read import ShardIndex

    idx = ShardIndex(root)

    def pixels(split: str) -> np.ndarray:
        a = idx.arrays(split)
        return np.bincount(a.classes.astype(np.int64), weights=a.pixels.astype(np.float64),
                           minlength=idx.num_classes)[:idx.num_classes]

    top = int(np.argmax(pixels("train")))
    val = pixels("val")
    present = int((val > 0).sum() + (val[top] == 0))
    return {"class": top, "share": float(val[top] / val.sum()), "present": present,
            "miou": float(val[top] / val.sum() / present)}


# ---------------------------------------------------------------------------------------
# Runs


@dataclass
class World:
    """One vocabulary size: its shards and the overrides every run on it shares."""

    x: int
    root: Path
    base: list[str]  # the recipe (without the head, without the seed)


def seed_overrides(w: World, seed: int) -> list[str]:
    return [*w.base, f"seed={seed}"]


def synthetic_worlds(p: ProtoProtocol, work: Path) -> list[World]:
    """The synthetic world and its top-x restrictions, each with the replication's recipe
    (from random weights; training kappa clamped to x)."""
    world = synthetic_root(p.replication(), work)
    out = []
    for x in p.vocab:
        root = top_classes_root(world, x)
        base = [o for o in recipe(p.replication(), p.size, 0) if not o.startswith(("seed=", "model.kappa="))]
        out.append(World(x, root, [*base, f"model.kappa={min(p.kappa, x)}"]))
    return out


def shard_worlds(specs: list[str], model: str, iterations: int | None, sets: list[str]) -> list[World]:
    """`--shards X=DIR` -> worlds with the family's own recipe for that data, `--model`,
    `--iterations` and `--set` on top. DIR must hold exactly X classes."""
    from rankseg_core.errors import UserError
    from rankseg_core.shards.read import ShardIndex

    out = []
    for spec in specs:
        m = re.fullmatch(r"(\d+)=(.+)", spec)
        if not m:
            raise UserError(f"--shards {spec!r}: write X=DIR (e.g. 300=shards/ade20k-300)")
        x, root = int(m.group(1)), Path(m.group(2)).resolve()
        k = ShardIndex(root).num_classes
        if k != x:
            raise UserError(f"--shards {spec}: {root} has {k} classes, not {x} (prepare it with "
                            f"`rankseg prepare ade20k-full --top-classes {x}`)")
        its = [f"schedule.iters={iterations}"] if iterations else []
        out.append(World(x, root, [f"model.model={model}", *its, *sets]))
    if len({w.x for w in out}) != len(out):
        raise UserError("--shards: each X once")
    return sorted(out, key=lambda w: w.x)


def plan(p: ProtoProtocol, worlds: list[World], base: Path) -> tuple[list[Task], dict[tuple[int, str, int], Path]]:
    """Every training task (largest vocabulary first: its runs cost the most), and each run directory."""
    tasks, runs = [], {}
    for w in sorted(worlds, key=lambda w: -w.x):
        for v, ov in variants(p, w.x).items():
            for s in range(p.seeds):
                runs[(w.x, v, s)] = run = base / f"x{w.x}" / v / f"seed{s}"
                tasks.append(Task(("train", w.x, v, s), train_job,
                                  (str(run), str(w.root), [*seed_overrides(w, s), *ov], p.threads)))
    return tasks, runs


def collect(trained: dict[tuple, dict], p: ProtoProtocol, worlds: list[World]) -> dict[int, dict[str, dict]]:
    """x -> variant -> per-seed metrics and their mean ± std, training time."""
    out: dict[int, dict[str, dict]] = {}
    for w in worlds:
        for v in variants(p, w.x):
            recs = [trained[(w.x, v, s)] for s in range(p.seeds)]
            out.setdefault(w.x, {})[v] = {
                "per_seed": {m: [r.get(m) for r in recs] for m in METRICS},
                **{m: rep.agg([r.get(m) for r in recs]) for m in METRICS},
                "train_seconds": rep.agg([r["train_seconds"] for r in recs]),
            }
    return out


def cost(runs: dict[tuple[int, str, int], Path], worlds: list[World]) -> dict[int, dict[str, dict]]:
    """Params (units of 10^6), the prototype buffer's size and GFLOPs of one forward at the
    training size, from each head's seed-0 config (engine/model_stats.py)."""
    from rankseg_core.engine.model_stats import model_stats
    from rankseg_core.engine.runs import load_config

    out: dict[int, dict[str, dict]] = {}
    for w in worlds:
        for h in HEADS:
            cfg = load_config(runs[(w.x, h, 0)])
            s = model_stats(cfg.model)
            buffer = cfg.model.num_classes * cfg.model.protoseg.prototypes if h in ("protoseg", "rankproto") else 0
            out.setdefault(w.x, {})[h] = {"params": int(s["params"]), "params_m": float(s["params_m"]),
                                          "gflops": float(s["gflops"]), "prototypes": buffer,
                                          "kappa": cfg.model.effective_kappa, "iters": cfg.schedule.iters,
                                          "img_size": cfg.model.img_size}
    return out


# ---------------------------------------------------------------------------------------
# Verdicts


def _pooled_std(sets: list[list[float]]) -> float:
    """sqrt(mean of the sample variances): the seed noise of one setting."""
    var = [float(np.var(v, ddof=1)) for v in sets if len(v) > 1]
    return math.sqrt(sum(var) / len(var)) if var else 0.0


def lambda_robustness(means_by_setting: dict[float, list[float]]) -> dict:
    """Robust to a coefficient: the range (max - min) of the per-setting mean mIoU is no larger
    than the pooled seed std of the settings (sqrt of their mean sample variance): moving the
    coefficient changes the result less than re-running with another seed does."""
    means = {k: float(np.mean(v)) for k, v in means_by_setting.items()}
    spread = max(means.values()) - min(means.values())
    noise = _pooled_std(list(means_by_setting.values()))
    return {"means": means, "range": spread, "noise": noise, "holds": spread <= noise,
            "best": max(means, key=lambda k: means[k])}


def claims(res: dict[int, dict[str, dict]], p: ProtoProtocol, chance: dict[int, float]) -> tuple[list[Comparison], list[dict]]:
    """(comparisons by replication_claims' rule, lambda-robustness verdicts). A claim whose runs
    are missing is left out."""
    out: list[Comparison] = []
    seeds = {(x, v): r["per_seed"]["miou"] for x, vs in res.items() for v, r in vs.items()}

    def add(claim: str, a: tuple, rel: str, b: tuple | float, a_label: str, b_label: str) -> None:
        if a in seeds and (not isinstance(b, tuple) or b in seeds):
            out.append(compare(claim, a_label, seeds[a], rel, b_label, seeds[b] if isinstance(b, tuple) else b))

    xs = sorted(res)
    for x in xs:
        add(f"ProtoSeg Table 4: prototypes > parametric (x = {x})", (x, "protoseg"), ">", (x, "segmenter"),
            "ProtoSeg", "parametric")
        add(f"RankSeg > parametric (x = {x})", (x, "rankseg"), ">", (x, "segmenter"), "RankSeg", "parametric")
        add(f"RankSeg + prototypes > ProtoSeg (x = {x})", (x, "rankproto"), ">", (x, "protoseg"),
            "RankSeg + prototypes", "ProtoSeg")
        add(f"RankSeg + prototypes > RankSeg (x = {x})", (x, "rankproto"), ">", (x, "rankseg"),
            "RankSeg + prototypes", "RankSeg")
    if len(xs) > 1 and all((x, h) in seeds for x in (xs[0], xs[-1]) for h in ("protoseg", "segmenter")):
        # The gap of each seed at the largest x against the gap of the same seed index at the smallest.
        lo, hi = xs[0], xs[-1]
        for h, title in (("protoseg", "ProtoSeg"), ("rankseg", "RankSeg")):
            if (lo, h) in seeds and (hi, h) in seeds:
                gap = {x: [a - b for a, b in zip(seeds[(x, h)], seeds[(x, "segmenter")])] for x in (lo, hi)}
                out.append(compare(f"{title}'s gain over parametric grows with x ({lo} -> {hi})",
                                   f"gain at x = {hi}", gap[hi], ">", f"gain at x = {lo}", gap[lo]))
    lam = []
    lx = p.lambda_x
    if lx is not None and lx in res:
        runs = res[lx]
        for axis, name in (("ppc", "λ1 (PPC)"), ("ppd", "λ2 (PPD)")):
            default = DEFAULT_LAMBDA[0] if axis == "ppc" else DEFAULT_LAMBDA[1]
            settings = {}
            for val in sorted(set(p.ppc if axis == "ppc" else p.ppd) | {default}):
                lam_pair = (val, DEFAULT_LAMBDA[1]) if axis == "ppc" else (DEFAULT_LAMBDA[0], val)
                key = variant_key("protoseg", lam_pair)
                if key in runs:
                    settings[val] = runs[key]["per_seed"]["miou"]
            if len(settings) < 2:
                continue
            rob = lambda_robustness(settings)
            lam.append({"claim": f"Table S3: robust to {name} (x = {lx})", "axis": axis, **rob,
                        "per_seed": settings})
            for val in sorted(settings):
                if val != default:
                    out.append(compare(f"Table S3: {name} = {default:g} ≥ {val:g} (x = {lx})", f"{name} {default:g}",
                                       settings[default], "≥", f"{name} {val:g}", settings[val]))
    for x in xs:
        for v in HEADS:
            if (x, v) in seeds and x in chance:
                add(f"x = {x}: {HEAD_TITLES[v]} beats chance", (x, v), ">", chance[x], HEAD_TITLES[v],
                    f"chance ({100 * chance[x]:.2f})")
    return out, lam


# ---------------------------------------------------------------------------------------
# The report


def _per_seed(vals: list[float | None]) -> str:
    return ", ".join("–" if v is None else f"{100 * v:.1f}" for v in vals)


def main_table(res: dict[int, dict[str, dict]], c: dict[int, dict[str, dict]]) -> str:
    """ONE table: every vocabulary size and head."""
    rows = []
    for x in sorted(res):
        for h in HEADS:
            if h not in res[x]:
                continue
            r, k = res[x][h], c[x][h]
            ranks = h in ("rankseg", "rankproto")
            rows.append([str(x), HEAD_TITLES[h], rep.pm(r["miou"]), _per_seed(r["per_seed"]["miou"]), rep.pm(r["aacc"]),
                         rep.pm(r["map"]) if ranks else "–", rep.pm(r["recall_at_kappa"]) if ranks else "–",
                         str(k["kappa"]) if ranks else "–", f"{k['params_m']:.2f}M",
                         f"{k['prototypes']:,}" if k["prototypes"] else "–", f"{k['gflops']:.3f}",
                         f"{r['train_seconds']['mean']:.0f}"])
    return rep.md_table(["x", "head", "mIoU", "per seed", "aAcc", "mAP (ml)", "recall@κ", "κ", "params",
                         "prototypes", "GFLOPs", "train s"], rows)


def lambda_table(res: dict[int, dict[str, dict]], p: ProtoProtocol) -> str:
    x = p.lambda_x
    rows = []
    for lam in lambda_settings(p):
        key = variant_key("protoseg", lam)
        if x not in res or key not in res[x]:
            continue
        r = res[x][key]
        paper = PAPER_S3["ppc"].get(lam[0]) if lam[1] == DEFAULT_LAMBDA[1] and lam[0] != DEFAULT_LAMBDA[0] else (
            PAPER_S3["ppd"].get(lam[1]) if lam[0] == DEFAULT_LAMBDA[0] else None)
        rows.append([f"{lam[0]:g}", f"{lam[1]:g}", rep.pm(r["miou"]), _per_seed(r["per_seed"]["miou"]), rep.pm(r["aacc"]),
                     "–" if paper is None else f"{paper:.1f}"])
    return rep.md_table(["λ1 (PPC)", "λ2 (PPD)", "mIoU", "per seed", "aAcc", "paper (Table S3, ADE20K)"], rows)


def _lambda_rows(lam: list[dict]) -> str:
    return rep.md_table(["claim", "mean mIoU per setting", "range", "pooled seed std", "best", "verdict"], [
        [r["claim"], ", ".join(f"{k:g}: {100 * v:.2f}" for k, v in sorted(r["means"].items())),
         f"{100 * r['range']:.2f}", f"{100 * r['noise']:.2f}", f"{r['best']:g}",
         f"**{'holds' if r['holds'] else 'does not hold'}** (range {'≤' if r['holds'] else '>'} seed std)"]
        for r in lam])


def _reading(res: dict, p: ProtoProtocol, synthetic: bool) -> list[str]:
    """One line per verdict, written from the numbers."""
    cl = [c for c in res["claims"] if not c["claim"].endswith("beats chance")]
    beat = [c for c in res["claims"] if c["claim"].endswith("beats chance")]
    lines = ["**Reading** (written by the script from the numbers above):", ""]
    if beat:
        lines.append(f"- *Against chance*: {sum(c['holds'] for c in beat)} of {len(beat)} models are above chance "
                     "beyond their seed spread.")
    for r in res["lambda"]:
        lines.append(f"- *{r['claim']}*: **{'holds' if r['holds'] else 'does not hold'}**; the mean mIoU moves "
                     f"{100 * r['range']:.2f} points across the settings against a seed std of {100 * r['noise']:.2f} "
                     f"(the paper: 0.3 points on ADE20K); best mean at {r['best']:g} (the paper: 0.01).")
    for c in cl:
        lines.append(f"- *{c['claim']}*: **{'holds' if c['holds'] else 'does not hold'}**; mean difference "
                     f"{100 * c['mean_diff']:+.2f} points (per seed {', '.join(f'{100 * d:+.2f}' for d in c['diffs'])}),"
                     f" pooled std {100 * c['spread']:.2f}.")
    if synthetic:
        lines += ["", f"What this setting can show: the sign and size of each difference *at this budget* ({p.iters} "
                  f"iterations of batch {p.batch} at {p.size} px from random weights), judged against {p.seeds} seeds. "
                  "What it cannot show: the paper's setting (ImageNet backbones, 80k-160k iterations at 512 px, "
                  "ADE20K-x with up to 847 classes): every model here is far from converged, so a difference is one of "
                  "how fast a head learns from scratch. The vocabulary sizes are the synthetic world's (its top-x "
                  "classes by the ADE20K-x rule), not ADE20K-Full's; run `--shards` on real shards for those."]
    return lines


def report(res: dict, p: ProtoProtocol, worlds: list[World], command: str, smoke: bool, synthetic: bool,
           history: list[dict]) -> str:
    """The markdown block of docs/replication.md's prototypes section."""
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
    c0 = next(iter(res["cost"].values()))["segmenter"]
    if synthetic:
        rp = p.replication()
        out.append(f"Protocol: the replication's synthetic world (K = {p.num_classes}, {p.size} px, {p.images} train / "
                   f"{p.val_images} val images); x ∈ {{{', '.join(map(str, p.vocab))}}}: its x classes present in the "
                   "most training images, the others ignore (ADE20K-x's rule; x = K is the world itself); "
                   f"{p.seeds} seeds; every run from random weights with the replication's recipe: Segmenter ViT-T/16, "
                   f"batch {p.batch}, {p.iters} iterations, AdamW lr {p.lr:g} on every parameter, weight decay 0, "
                   f"warm-up {rp.warmup}, poly decay to {min(1e-5, p.lr):g}, ml loss weight {rp.ml_weight:g}, training "
                   f"κ = min({p.kappa}, x); prototypes: M = 10, Sinkhorn ε 0.05 × 3 iterations, momentum 0.999, "
                   f"λ1 = λ2 = 0.01 unless stated. Metrics in %, mean ± sample std over seeds.")
    else:
        out.append("Protocol: `--shards` " + ", ".join(f"x = {w.x}: `{w.root}`" for w in worlds) +
                   f"; {p.seeds} seed(s); the family's recipe for the data with `{' '.join(worlds[0].base)}` on top "
                   f"({c0['iters']} iterations at {c0['img_size']} px). Metrics in %, mean ± sample std over seeds.")
    out += ["", "**Chance** (the most frequent training class predicted everywhere): " +
            "; ".join(f"x = {x}: mIoU {100 * ch['miou']:.2f}" for x, ch in sorted(res["chance"].items())) + ".", ""]
    out += ["**All heads** (params in units of 10^6, the unit of the paper's Segmenter tables; prototypes = the "
            "K × M buffer's vectors, not parameters; GFLOPs of one forward at the training size; train s = mean wall "
            "time of a run, one thread on a shared machine: not a speed comparison).", "",
            main_table(res["runs"], res["cost"]), ""]
    if res["lambda"]:
        out += [f"**λ check** (ProtoSeg supplement Table S3; protoseg, x = {p.lambda_x}; the row 0.01 / 0.01 is the "
                "protoseg row above).", "", lambda_table(res["runs"], p), "",
                "Robustness rule: a coefficient is robust when the range of the per-setting mean mIoU is no larger "
                "than the pooled seed std (sqrt of the settings' mean sample variance).", "",
                _lambda_rows(res["lambda"]), ""]
    out += ["**Verdicts** (bench/replication_claims.py: A > B holds when A − B > 0 on every seed AND the mean "
            "difference exceeds the pooled sample std; ≥ holds unless A is below B by that rule; against chance the "
            "set's own sample std; a gain's growth compares the per-seed gains at the largest and the smallest x). "
            "Differences in mIoU points.", "", rep._claims_table(res["claims"], "claim"), ""]
    out += _reading(res, p, synthetic)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "replication",
                    help="runs (under protoseg/) and the synthetic shards, shared with bench/replicate.py")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 iterations: checks the pipeline in seconds")
    ap.add_argument("--docs", action="store_true", help="write the results block into --doc")
    ap.add_argument("--doc", type=Path, default=DOC, help="the page whose protoseg block --docs rewrites")
    ap.add_argument("--shards", action="append", default=[], metavar="X=DIR",
                    help="the ADE20K-x study on shard directories (repeatable) instead of the synthetic world")
    ap.add_argument("--model", default="segmenter-vitt", help="with --shards: the Segmenter model (paper: segmenter-vitb)")
    ap.add_argument("--iterations", type=int, help="training iterations (default: synthetic 120, --shards the recipe's)")
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                    help="with --shards: config overrides for every run (e.g. model.backbone_weights=FILE, device=cuda)")
    ap.add_argument("--vocab", type=int, action="append", help="synthetic: a vocabulary size x (repeatable)")
    ap.add_argument("--lambda-x", type=int, help="the x of the λ check (0: none; --shards default: none)")
    for name in ("seeds", "jobs", "threads", "kappa"):
        ap.add_argument(f"--{name}", type=int)
    args = ap.parse_args(argv)

    return keeping_threads(_main, args, argv)


def _main(args: argparse.Namespace, argv: list[str] | None) -> dict:
    from rankseg_core.errors import UserError

    p = ProtoProtocol.smoke() if args.smoke else ProtoProtocol()
    for name in ("seeds", "jobs", "threads", "kappa"):
        if getattr(args, name) is not None:
            setattr(p, name, getattr(args, name))
    synthetic = not args.shards
    if not synthetic and args.vocab:
        raise UserError("--vocab is for the synthetic world; with --shards the X of each X=DIR is its vocabulary")
    if synthetic and (args.sets or args.model != "segmenter-vitt"):
        raise UserError("--set and --model go with --shards; the synthetic protocol is the replication's recipe")
    if args.iterations is not None:
        if args.iterations < 1:
            raise UserError(f"--iterations must be >= 1, not {args.iterations}")
        p.iters = args.iterations
    if args.vocab:
        p.vocab = sorted(set(args.vocab))
    if synthetic:
        p.lambda_x = max(p.vocab) if args.lambda_x is None else (args.lambda_x or None)
    else:
        p.lambda_x = args.lambda_x or None
    _threads(p.threads)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0, cpu0, load = time.perf_counter(), cpu_seconds(), LoadSampler()
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime()) + " UTC"

    if synthetic:
        worlds = synthetic_worlds(p, work)
        base = work / "protoseg"
    else:
        worlds = shard_worlds(args.shards, args.model, args.iterations, args.sets)
        p.vocab = [w.x for w in worlds]
        base = work / "protoseg_shards"
    if p.lambda_x is not None and p.lambda_x not in [w.x for w in worlds]:
        raise UserError(f"--lambda-x {p.lambda_x}: not one of the vocabulary sizes {[w.x for w in worlds]}")
    tasks, runs = plan(p, worlds, base)
    print(f"[protoseg] {len(tasks)} runs, {p.jobs} at a time", flush=True)
    done = run_tasks(tasks, p.jobs)
    trained = {key[1:]: r for key, r in done.items()}
    res: dict = {"runs": collect(trained, p, worlds), "cost": cost(runs, worlds),
                 "chance": {w.x: chance(w.root) for w in worlds},
                 "roots": {w.x: str(w.root) for w in worlds},
                 "reused_runs": sum(bool(r.get("reused")) for r in trained.values()),
                 "resumed_runs": sum(bool(r.get("resumed")) for r in trained.values()), "total_runs": len(trained)}
    comparisons, lam = claims(res["runs"], p, {x: c["miou"] for x, c in res["chance"].items()})
    res["claims"] = [{**dataclasses.asdict(c), "verdict": c.verdict} for c in comparisons]
    res["lambda"] = lam
    total = time.perf_counter() - t0
    command = ("python bench/replicate_protoseg.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    history = log_invocation(base / "invocations.jsonl", {
        "started": started, "command": command, "wall_s": total, "cpu_s": cpu_seconds() - cpu0, "load": load.stop(),
        **{k: res[f"{k}_runs"] for k in ("total", "reused", "resumed")}})
    body = report(res, p, worlds, command, args.smoke, synthetic, history)
    name = "results_protoseg.json" if synthetic else "results_protoseg_shards.json"
    publish(work / name, {"protocol": dataclasses.asdict(p), "total_seconds": total, **res}, body, args.docs, args.doc,
            BLOCK if synthetic else f"{BLOCK}-shards", base, total)
    return {"protocol": p, "results": res, "runs": runs, "worlds": worlds, "total_seconds": total, "report": body}


def cli(argv: list[str] | None = None) -> int:
    """Exit status 0; 2 with one `error:` line for a user mistake; 130 on Ctrl-C (as replicate.py)."""
    import replicate

    return replicate.cli(argv, main)


if __name__ == "__main__":
    sys.exit(cli())
