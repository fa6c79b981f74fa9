"""The replication's protocol (docs/replication.md): sizes, the one recipe every run shares,
the variants and the extra evaluations. bench/replicate.py runs it, bench/replication_report.py
reports it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

METRICS = ("miou", "aacc", "map", "recall_at_kappa")


@dataclass
class Protocol:
    """Sizes and recipe shared by every variant of one replication (docs/replication.md,
    "How the protocol was chosen")."""

    num_classes: int = 200  # synthetic K
    size: int = 64  # synthetic image side = training crop
    images: int = 2000  # synthetic train images
    val_images: int = 200
    pretrain_images: int = 20000  # the disjoint pre-training split; 0 = from scratch
    pretrain_iters: int = 3000
    pretrain_batch: int = 16
    pretrain_lr: float = 1e-3
    pretrain_warmup: int = 50
    iters: int = 500  # fine-tuning (or from-scratch) iterations of every run
    batch: int = 8
    lr: float = 1e-3
    backbone_lr_mult: float = 0.1  # fine-tuning a pre-trained backbone (from scratch: 1)
    warmup: int = 30
    kappa: int = 50  # training kappa of RankSeg / +MT+LS / the independent scheme
    kappa_sweep: list[int] = field(default_factory=lambda: [20])  # + kappa and K
    kappa_eval: list[int] = field(default_factory=lambda: [10, 25, 100, 200])
    thresholds: list[float] = field(default_factory=lambda: [0.1, 0.05, 0.02, 0.01])
    ml_weight: float = 10.0
    # Tables 5 and 6: RankSeg with other ml loss weights / ml heads (each a variant, every seed).
    ml_weights: list[float] = field(default_factory=lambda: [1.0, 20.0])
    ml_heads: list[str] = field(default_factory=lambda: ["trandec", "gap"])
    seeds: int = 3
    jobs: int = 2
    threads: int = 1
    fp_images: int = 0  # false-positive stats over this many val images (0 = all)

    @property
    def pretrained(self) -> bool:
        return self.pretrain_images > 0 and self.pretrain_iters > 0

    @classmethod
    def from_scratch(cls) -> "Protocol":
        """The earlier protocol (docs/replication.md, second section): random initial weights."""
        return cls(pretrain_images=0, pretrain_iters=0, iters=300, kappa=20, kappa_sweep=[5],
                   kappa_eval=[5, 10, 40, 100], ml_weights=[], ml_heads=[])

    @classmethod
    def smoke(cls, from_scratch: bool = False) -> "Protocol":
        return cls(num_classes=40, size=32, images=8, val_images=4, pretrain_images=0 if from_scratch else 16,
                   pretrain_iters=0 if from_scratch else 2, pretrain_batch=2, pretrain_warmup=0, iters=2, batch=2, warmup=0, kappa=6,
                   kappa_sweep=[], kappa_eval=[3, 12], thresholds=[0.05], seeds=2, jobs=1, threads=2, fp_images=4,
                   ml_weights=[], ml_heads=["gap"])


def recipe(p: Protocol, img_size: int, seed: int, init: str | Path | None = None) -> list[str]:
    """Overrides shared by every run (docs/replication.md explains each deviation from the
    paper's recipe: ViT-T, AdamW, no dropout, short schedule). `init`: the pre-trained
    backbone every run starts from; it then trains at `backbone_lr_mult` x the lr (one
    custom key for every model family; with weight decay 0 no decay multiplier matters)."""
    tune = [f"init_from={init}", f"optim.custom_keys={{backbone.: {{lr_mult: {p.backbone_lr_mult}}}}}"] if init else []
    return [
        "model.model=segmenter-vitt", f"model.img_size={img_size}", f"model.kappa={p.kappa}",
        "model.dropout=0", "model.drop_path=0",
        "optim.name=adamw", f"optim.lr={p.lr}", "optim.weight_decay=0",
        f"schedule.iters={p.iters}", f"schedule.batch_size={p.batch}", f"schedule.warmup_iters={p.warmup}",
        f"schedule.min_lr={min(1e-5, p.lr)}", f"loss.ml_weight={p.ml_weight}",
        "data.num_workers=0", "eval.num_workers=0", "eval.every=0", "eval.batch_size=16",
        f"log_every={max(1, min(50, p.iters))}", f"ckpt_every={_ckpt_every(p.iters)}", f"seed={seed}",
        "device=cpu", "amp=false",
    ] + tune


def pretrain_recipe(p: Protocol, img_size: int) -> list[str]:
    """The one pre-training run: the classifier on the `pretrain` split (seed 0), evaluated on val."""
    base = recipe(p, img_size, 0)
    return base + ["model.model=classifier-vitt", "data.train_split=pretrain", f"schedule.iters={p.pretrain_iters}",
                   f"schedule.batch_size={p.pretrain_batch}", f"optim.lr={p.pretrain_lr}",
                   f"schedule.warmup_iters={p.pretrain_warmup}", f"schedule.min_lr={min(1e-5, p.pretrain_lr)}",
                   f"ckpt_every={_ckpt_every(p.pretrain_iters)}", f"log_every={max(1, min(50, p.pretrain_iters))}"]


def _ckpt_every(iters: int) -> int:
    """last.pt about four times per run, so an interrupted run resumes (not for tiny runs)."""
    return max(iters // 4, 50) if iters >= 200 else iters


def train_variants(p: Protocol, k: int) -> dict[str, list[str]]:
    """Segmenter variant name -> extra overrides. kappa values are clamped to K."""
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
    for w in p.ml_weights:  # Table 5
        if w != p.ml_weight:
            out[f"ml_w{w:g}"] = ["model.head=rankseg", f"loss.ml_weight={w:g}"]
    for head in p.ml_heads:  # Table 6 (the default head, tranenc, is RankSeg itself)
        if head != "tranenc":
            out[f"ml_{head}"] = ["model.head=rankseg", f"model.ml_head={head}"]
    return out


# The independent scheme: a classifier per seed, then a segmenter it selects for.
CLASSIFIER = ["model.model=classifier-vitt"]
VARIANT_NAMES = {"baseline": "Baseline", "mt": "+MT", "mt_ls": "+MT+LS (shared τ)", "rankseg": "+MT+LS+RA (RankSeg)",
                 "oracle": "GT (train + eval)", "classifier": "classifier (independent scheme)",
                 "indep": "segmenter --selector classifier (independent)",
                 "indep_pre": "segmenter --selector the pre-training classifier (Table 2)",
                 "ml_gap": "RankSeg, GAP+Linear ml head (Table 6)", "ml_trandec": "RankSeg, 2× TranDec ml head (Table 6)"}


def eval_specs(p: Protocol, k: int) -> list[tuple[str, str, dict]]:
    """(variant, eval name, EvalOptions kwargs) beyond each run's plain evaluation."""
    specs = [("baseline", "gt_eval", {"oracle": True}), ("rankseg", "gt_eval", {"oracle": True})]
    specs += [("rankseg", f"kappa{kap}", {"kappa": kap}) for kap in sorted({min(x, k) for x in p.kappa_eval})
              if kap != min(p.kappa, k)]
    specs += [("rankseg", f"thr{t:g}", {"dynamic_kappa": t}) for t in p.thresholds]
    # Why the selection helps or not: the GT classes filled up to kappa with the ranking's own
    # best other classes (recall 100 %, the same competitors) or with random ones.
    kap = min(p.kappa, k)
    specs += [("rankseg", "gt_ranked", {"oracle": True, "oracle_fill": "ranked", "kappa": kap}),
              ("rankseg", "gt_random", {"oracle": True, "oracle_fill": "random", "kappa": kap}),
              ("baseline", "gt_random", {"oracle": True, "oracle_fill": "random", "kappa": kap})]
    return specs


def cached(run_dir: str | Path, out_json: str | Path, **same: object) -> tuple[str, dict | None]:
    """(the run's stamp, the record cached in out_json if it was computed from these weights
    and with these `same` fields, else None): the caching rule of every per-run job of the
    replications (evaluations, confusion counts, diagnostics)."""
    stamp = json.loads((Path(run_dir) / "replicate.json").read_text())["stamp"]
    out = Path(out_json)
    if out.is_file():
        rec = json.loads(out.read_text())
        if rec.get("stamp") == stamp and all(rec.get(k) == v for k, v in same.items()):
            return stamp, rec
    return stamp, None
