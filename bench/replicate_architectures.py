"""RankSeg on other architectures, and against EncNet / ESSNet, measured on CPU
(docs/replication.md, "RankSeg on other architectures").

    python bench/replicate_architectures.py --docs     # the whole protocol, writes its block of docs/replication.md
    python bench/replicate_architectures.py --smoke    # end to end in seconds (tiny everything)

On the replication's own synthetic shards (K = 200, 64 px; bench/replicate.py's `synthetic_root`),
from random weights, `--seeds` seeds each (mean ± sample std, and every seed):
- main paper Table 7: a tiny DeepLabv3 (`deeplabv3-r18`) and a tiny UperNet (`upernet-beitt`,
  BEiT with ViT-T widths and a narrow decoder), each with its own classifier (`--head
  segmenter`, the baseline) and with RankSeg (`--head rankseg`);
- supplement Table 1: Segmenter ViT-T/16 with the baseline, EncNet, ESSNet and RankSeg heads,
  the replication's Segmenter recipe (bench/replication_protocol.py `recipe`);
- every model against chance (the most frequent training class predicted everywhere), cost
  (params, FLOPs), and a verdict per claim by bench/replication_claims.py's rule.

Runs go through bench/replicate.py's `train_job` / `run_tasks`, so a finished run with the same
resolved config is reused and an interrupted one resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
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
from replication_protocol import METRICS, Protocol, recipe  # noqa: E402

BLOCK = "architectures"  # docs/replication.md: <!-- architectures:start --> ... <!-- architectures:end -->


# ---------------------------------------------------------------------------------------
# The protocol


@dataclass
class Arch:
    """One architecture: its variants share every setting but the head."""

    key: str  # run directory and claim names
    title: str  # what the report calls it
    model: str  # --model
    iters: int  # training iterations of each of its runs
    knobs: list[str]  # overrides that make the model tiny (shared by its variants)
    variants: dict[str, list[str]]  # variant -> the overrides that differ (the head)


@dataclass
class ArchProtocol:
    """Sizes and recipe of this section (docs/replication.md, "RankSeg on other architectures")."""

    num_classes: int = 200  # the replication's synthetic K, and its shards
    size: int = 64
    images: int = 2000
    val_images: int = 200
    kappa: int = 50  # the fork's DeepLabv3 / UperNet configs, and the replication's pre-trained regime
    batch: int = 8
    lr: float = 1e-3
    seeds: int = 3
    jobs: int = 1
    threads: int = 1
    # Iterations per architecture: chosen so that the whole section fits 40 minutes of one core
    # (docs/replication.md says what each costs); DeepLabv3's dilated ResNet costs ~3x a ViT-T step.
    segmenter_iters: int = 200
    deeplab_iters: int = 100
    upernet_iters: int = 200
    tiny: bool = False  # smoke: tiny decoder widths too

    def replication(self, iters: int) -> Protocol:
        """The replication's Protocol with these sizes (its `recipe` and `synthetic_root` take one)."""
        return Protocol(num_classes=self.num_classes, size=self.size, images=self.images, val_images=self.val_images,
                        pretrain_images=0, pretrain_iters=0, iters=iters, batch=self.batch, lr=self.lr,
                        warmup=max(0, min(30, iters // 10)), kappa=self.kappa, seeds=self.seeds, jobs=self.jobs,
                        threads=self.threads, kappa_sweep=[], kappa_eval=[], thresholds=[])

    @classmethod
    def smoke(cls) -> "ArchProtocol":
        return cls(num_classes=40, size=32, images=8, val_images=4, kappa=6, batch=2, seeds=2, segmenter_iters=2,
                   deeplab_iters=2, upernet_iters=2, tiny=True)


def architectures(p: ArchProtocol) -> list[Arch]:
    """The three architectures of this section and their variants."""
    heads = {"baseline": ["model.head=segmenter"], "rankseg": ["model.head=rankseg"]}
    # The fork's DeepLabv3 pools its stride-8 map to 16 x 16 tokens for the ml block (64 x 64 at
    # 512 px); at 64 px that map is 8 x 8, so pooling "to 16" would only repeat tokens: unpooled.
    deeplab = ["model.convseg.ml_pool=0"]
    # upernet-beitt's 256-wide decoder is 3.6x the cost of a 64-wide one at 64 px; from scratch
    # there is no pre-trained backbone for drop path or layer-wise lr decay to protect.
    upernet = ["model.convseg.channels=64", "model.convseg.ml_dim=64", "model.convseg.aux_channels=32",
               "model.convseg.backbone_drop_path=0", "model.convseg.layer_decay=1"]
    if p.tiny:
        deeplab += ["model.convseg.channels=16", "model.convseg.aux_channels=8", "model.convseg.ml_dim=16",
                    "model.convseg.aspp_dilations=1,2"]
        upernet = [*upernet[3:], "model.convseg.channels=16", "model.convseg.ml_dim=16",
                   "model.convseg.aux_channels=8", "model.convseg.pool_scales=1,2"]
    return [
        Arch("deeplabv3", "DeepLabv3-R18", "deeplabv3-r18", p.deeplab_iters, deeplab, dict(heads)),
        Arch("upernet", "UperNet BEiT-T", "upernet-beitt", p.upernet_iters, upernet, dict(heads)),
        Arch("segmenter", "Segmenter ViT-T/16", "segmenter-vitt", p.segmenter_iters, [],
             {"baseline": ["model.head=segmenter"], "encnet": ["model.head=encnet"],
              "essnet": ["model.head=essnet"], "rankseg": ["model.head=rankseg"]}),
    ]


VARIANT_TITLES = {"baseline": "Baseline", "rankseg": "RankSeg", "encnet": "EncNet", "essnet": "ESSNet"}


def overrides(p: ArchProtocol, a: Arch, variant: str, seed: int) -> list[str]:
    """The replication's one recipe at this architecture's iterations, its model and knobs, the head."""
    return recipe(p.replication(a.iters), p.size, seed) + [f"model.model={a.model}", *a.knobs, *a.variants[variant]]


def plan(p: ArchProtocol, root: Path, base: Path) -> tuple[list[Task], dict[tuple[str, str, int], Path]]:
    """Every training task (longest architecture first), and the run directory of each."""
    tasks, runs = [], {}
    for a in architectures(p):
        for v in a.variants:
            for s in range(p.seeds):
                runs[(a.key, v, s)] = run = base / a.key / v / f"seed{s}"
                tasks.append(Task(("train", a.key, v, s), train_job,
                                  (str(run), str(root), overrides(p, a, v, s), p.threads)))
    return tasks, runs


# ---------------------------------------------------------------------------------------
# Chance and claims


def chance_miou(root: Path, num_classes: int, train_split: str = "train", val_split: str = "val") -> dict:
    """mIoU of predicting the most frequent training class on every val pixel (mmseg's mean
    over classes with a non-empty union: the constant class has IoU = its share of the
    labelled pixels, every other class present in val 0)."""
    from rankseg_core.shards.codec import IGNORE
    from rankseg_core.shards.read import ShardDataset

    def counts(split: str) -> np.ndarray:
        ds = ShardDataset(root, split)
        out = np.zeros(num_classes, np.int64)
        for i in range(len(ds)):
            lab = ds.load(i)["label"].astype(np.int64)
            out += np.bincount(lab[lab != IGNORE], minlength=num_classes)[:num_classes]
        return out

    top = int(np.argmax(counts(train_split)))
    val = counts(val_split)
    present = int((val > 0).sum() + (val[top] == 0))  # the constant class has a union even if absent
    return {"class": top, "share": float(val[top] / val.sum()), "present": present,
            "miou": float(val[top] / val.sum() / present)}


def seed_values(res: dict) -> dict[str, list[float]]:
    """'arch/variant' -> per-seed mIoU (the numbers every verdict is computed from)."""
    return {f"{a}/{v}": r["per_seed"]["miou"] for a, vs in res["runs"].items() for v, r in vs.items()}


def claims(seeds: dict[str, list[float]], chance: float, titles: dict[str, str]) -> list[Comparison]:
    """The paper's claims this section checks, then each model against chance. A claim whose
    runs are missing is left out. titles: architecture key -> its name in the report."""
    out: list[Comparison] = []

    def add(claim: str, a: str, rel: str, b: str | float, a_label: str, b_label: str) -> None:
        if a in seeds and (not isinstance(b, str) or b in seeds):
            out.append(compare(claim, a_label, seeds[a], rel, b_label, seeds[b] if isinstance(b, str) else b))

    for arch in ("deeplabv3", "upernet"):
        if arch in titles:
            add(f"Table 7: RankSeg > baseline on {titles[arch]}", f"{arch}/rankseg", ">", f"{arch}/baseline",
                "RankSeg", "Baseline")
    add("Suppl. Table 1: RankSeg > EncNet (Segmenter)", "segmenter/rankseg", ">", "segmenter/encnet", "RankSeg", "EncNet")
    add("Suppl. Table 1: RankSeg > ESSNet (Segmenter)", "segmenter/rankseg", ">", "segmenter/essnet", "RankSeg", "ESSNet")
    add("Suppl. Table 1 / Table 1: RankSeg > Baseline (Segmenter)", "segmenter/rankseg", ">", "segmenter/baseline",
        "RankSeg", "Baseline")
    add("Suppl. B: ESSNet performs comparably to the baseline", "segmenter/essnet", "≈", "segmenter/baseline",
        "ESSNet", "Baseline")
    for name in seeds:
        arch, v = name.split("/")
        add(f"{titles.get(arch, arch)} {VARIANT_TITLES.get(v, v)} beats chance", name, ">", chance,
            VARIANT_TITLES.get(v, v), f"chance ({100 * chance:.2f})")
    return out


# ---------------------------------------------------------------------------------------
# Aggregation and cost


def collect(trained: dict[tuple, dict], p: ArchProtocol, archs: list[Arch]) -> dict:
    """Per architecture and variant: per-seed metrics and their mean ± std, training time."""
    runs: dict[str, dict[str, dict]] = {}
    for a in archs:
        for v in a.variants:
            recs = [trained[(a.key, v, s)] for s in range(p.seeds)]
            runs.setdefault(a.key, {})[v] = {
                "per_seed": {m: [r.get(m) for r in recs] for m in METRICS},
                **{m: rep.agg([r.get(m) for r in recs]) for m in METRICS},
                "train_seconds": rep.agg([r["train_seconds"] for r in recs]),
                "train_coverage": rep.agg([r.get("train_coverage") for r in recs]),
            }
    return runs


def cost(runs: dict[tuple[str, str, int], Path], archs: list[Arch]) -> dict[str, dict[str, dict]]:
    """Params and FLOPs of one forward at the training size, from each variant's seed-0 config
    (engine/model_stats.py: params in units of 10^6, the unit of Table 7 and supplement Table 1)."""
    from rankseg_core.engine.model_stats import model_stats
    from rankseg_core.engine.runs import load_config

    out: dict[str, dict[str, dict]] = {}
    for a in archs:
        for v in a.variants:
            cfg = load_config(runs[(a.key, v, 0)])
            s = model_stats(cfg.model)
            # What the family's recipe left as its own (recipe() does not set them), as the run recorded it.
            out.setdefault(a.key, {})[v] = {"params": int(s["params"]), "params_m": float(s["params_m"]),
                                           "gflops": float(s["gflops"]), "power": cfg.schedule.power,
                                           "eval_mode": cfg.eval.mode}
    return out


# ---------------------------------------------------------------------------------------
# The report


def _per_seed(vals: list[float | None]) -> str:
    return ", ".join("–" if x is None else f"{100 * x:.1f}" for x in vals)


def _arch_table(a: Arch, r: dict, c: dict, kappa: int) -> str:
    rows = []
    for v in a.variants:
        x = r[v]
        ranks = x["map"]["mean"] is not None
        rows.append([VARIANT_TITLES.get(v, v), rep.pm(x["miou"]), _per_seed(x["per_seed"]["miou"]), rep.pm(x["aacc"]),
                     rep.pm(x["map"]) if ranks else "–",
                     rep.pm(x["recall_at_kappa"]) if v == "rankseg" else "–",
                     f"{c[v]['params_m']:.2f}M", f"{c[v]['gflops']:.3f}", f"{x['train_seconds']['mean']:.0f}"])
    return rep.md_table(["head", "mIoU", "per seed", "aAcc", "mAP (ml)", f"recall@{kappa}", "params",
                         "GFLOPs", "train s"], rows)


def _reading(res: dict, p: ArchProtocol, archs: list[Arch]) -> list[str]:
    """What the numbers say, claim by claim, and what this setting can and cannot show."""
    beat = [c for c in res["claims"] if c["claim"].endswith("beats chance")]
    paper = [c for c in res["claims"] if not c["claim"].endswith("beats chance")]
    chance = res["chance"]["miou"]
    lowest = min(beat, key=lambda c: c["mean_diff"])
    lines = ["**Reading** (written by the script from the numbers above):", ""]
    lines.append(f"- *Against chance*: {sum(c['holds'] for c in beat)} of {len(beat)} models are above chance "
                 f"({100 * chance:.2f} mIoU) beyond the seed spread; the lowest mean is "
                 f"{100 * (lowest['mean_diff'] + chance):.1f} ({lowest['claim'].removesuffix(' beats chance')}).")
    for c in paper:
        lines.append(f"- *{c['claim']}*: **{'holds' if c['holds'] else 'does not hold'}**; mean difference "
                     f"{100 * c['mean_diff']:+.1f} points (per seed {', '.join(f'{100 * d:+.1f}' for d in c['diffs'])}"
                     f"), pooled std {100 * c['spread']:.1f}.")
    its = sorted({a.iters for a in archs})
    lines += [
        "",
        "What this setting can show: that each architecture and head trains through the one engine and learns "
        "this task from random weights (the chance rows), and the sign and size of each difference *at this "
        f"budget*, judged against the spread of {p.seeds} seeds. What it cannot show: the paper's setting. Every "
        "model here starts from random weights (the paper's from ImageNet backbones) and trains "
        f"{its[0]}–{its[-1]} iterations of batch {p.batch} on {p.size} px images (the paper: 20k–320k iterations at "
        "512–640 px), so all of them are far from converged: a difference here is a difference in how fast a head "
        "learns from scratch, which need not be where it ends. The paper's gains are 0.4–2.9 mIoU points at "
        "convergence (Table 7, supplement Table 1), so neither verdict transfers to that scale. The models are "
        "tiny stand-ins: ResNet-18 for ResNet-101, a 12-block, 192-wide BEiT with a 64-wide UperNet decoder for "
        "BEiT-L / Swin-B, ViT-T for ViT-B.",
    ]
    return lines


def report(res: dict, p: ArchProtocol, archs: list[Arch], command: str, smoke: bool, history: list[dict]) -> str:
    """The markdown block of docs/replication.md's "RankSeg on other architectures"."""
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
    rp = p.replication(0)
    its = ", ".join(f"{a.title} {a.iters}" for a in archs)
    out.append(f"Protocol: synthetic K = {p.num_classes}, {p.size} px, {p.images} train / {p.val_images} val images "
               "(bench/replicate.py's `synthetic_root`: the replication's shards at these sizes); "
               f"{p.seeds} seeds; every run from random weights; the replication's "
               f"recipe for every run: batch {p.batch}, AdamW lr {p.lr:g} on every parameter, weight decay 0, "
               f"warm-up min(30, iterations / 10), poly decay to {min(1e-5, p.lr):g} (its power the family's), ml loss weight "
               f"{rp.ml_weight:g}, training κ = {min(p.kappa, p.num_classes)} (ESSNet's k = κ); iterations: {its}. "
               "Metrics in %, mean ± sample std over seeds.")
    ch = res["chance"]
    out += ["", f"**Chance**: the most frequent training class (id {ch['class']}, {100 * ch['share']:.1f} % of the "
            f"labelled val pixels) predicted everywhere: mIoU {100 * ch['miou']:.2f} (over the {ch['present']} "
            "classes with a non-empty union).", ""]
    out += ["**Verdicts** (bench/replication_claims.py: A > B holds when A − B > 0 on every seed AND the mean "
            "difference exceeds the pooled sample std; ≈ holds when neither is higher by that rule; against chance "
            "the set's own sample std). Differences in mIoU points.", "",
            rep._claims_table(res["claims"]), ""]
    for a in archs:
        c0 = res["cost"][a.key][next(iter(a.variants))]
        out += [f"**{a.title}** (`{a.model}`{', ' + ' '.join(f'`{k}`' for k in a.knobs) if a.knobs else ''}; "
                f"{a.iters} iterations, poly power {c0['power']:g}, `{c0['eval_mode']}` evaluation). Params in units of 10^6 (Table 7's unit), GFLOPs of one forward at "
                f"{p.size} px (FlopCounterMode, all matmuls); train s = mean wall time of a run's training (one "
                "thread on a machine shared with other work: not a speed comparison).", "",
                _arch_table(a, res["runs"][a.key], res["cost"][a.key], min(p.kappa, p.num_classes)), ""]
    out += _reading(res, p, archs)
    return "\n".join(out)


# ---------------------------------------------------------------------------------------
# Main


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "replication",
                    help="runs (under architectures/) and the synthetic shards, shared with bench/replicate.py")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 iterations: checks the pipeline in seconds")
    ap.add_argument("--docs", action="store_true", help="write the results block into --doc")
    ap.add_argument("--doc", type=Path, default=DOC, help="the page whose architectures block --docs rewrites")
    for name in ("seeds", "jobs", "threads", "segmenter-iters", "deeplab-iters", "upernet-iters", "kappa"):
        ap.add_argument(f"--{name}", type=int)
    args = ap.parse_args(argv)

    return keeping_threads(_main, args, argv)


def _main(args: argparse.Namespace, argv: list[str] | None) -> dict:
    p = ArchProtocol.smoke() if args.smoke else ArchProtocol()
    for name in ("seeds", "jobs", "threads", "segmenter_iters", "deeplab_iters", "upernet_iters", "kappa"):
        if getattr(args, name) is not None:
            setattr(p, name, getattr(args, name))
    _threads(p.threads)
    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    t0, cpu0, load = time.perf_counter(), cpu_seconds(), LoadSampler()
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime()) + " UTC"

    root = synthetic_root(p.replication(0), work)
    base = work / "architectures"
    archs = architectures(p)
    tasks, runs = plan(p, root, base)
    print(f"[architectures] {len(tasks)} runs, {p.jobs} at a time", flush=True)
    done = run_tasks(tasks, p.jobs)
    trained = {key[1:]: r for key, r in done.items()}
    res: dict = {"runs": collect(trained, p, archs), "cost": cost(runs, archs),
                 "chance": chance_miou(root, p.num_classes), "seconds": time.perf_counter() - t0,
                 "reused_runs": sum(bool(r.get("reused")) for r in trained.values()),
                 "resumed_runs": sum(bool(r.get("resumed")) for r in trained.values()), "total_runs": len(trained)}
    titles = {a.key: a.title for a in archs}
    res["claims"] = [{**dataclasses.asdict(c), "verdict": c.verdict}
                     for c in claims(seed_values(res), res["chance"]["miou"], titles)]
    total = time.perf_counter() - t0
    command = ("python bench/replicate_architectures.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    history = log_invocation(base / "invocations.jsonl", {
        "started": started, "command": command, "wall_s": total, "cpu_s": cpu_seconds() - cpu0, "load": load.stop(),
        **{k: res[f"{k}_runs"] for k in ("total", "reused", "resumed")}})
    body = report(res, p, archs, command, args.smoke, history)
    publish(work / "results_architectures.json", {"protocol": dataclasses.asdict(p), "total_seconds": total, **res},
            body, args.docs, args.doc, BLOCK, base, total)
    return {"protocol": p, "results": res, "runs": runs, "root": root, "total_seconds": total, "report": body}


def cli(argv: list[str] | None = None) -> int:
    """Exit status 0; 2 with one `error:` line for a user mistake; 130 on Ctrl-C (as replicate.py)."""
    import replicate

    return replicate.cli(argv, main)


if __name__ == "__main__":
    sys.exit(cli())
