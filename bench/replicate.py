"""A measured mini-replication of RankSeg's claims on CPU (see docs/replication.md).

    python bench/replicate.py --docs               # the whole protocol, writes docs/replication.md
    python bench/replicate.py --smoke              # end to end in seconds (tiny everything)
    python bench/replicate.py --from-scratch       # the earlier protocol: no pre-training
    python bench/replicate.py --data DIR           # also on a shard directory (with a `pretrain` split)

Per dataset, with the tiny model (Segmenter ViT-T/16, small images) and one recipe for every
variant, `--seeds` seeds each (mean ± sample std, and every seed):
- pre-training (default regime): ONE multi-label classifier (`classifier-vitt`) trained on the
  synthetic `pretrain` split (same classes and looks, images disjoint from train / val); its
  backbone initialises every run below (`--init-from`), as ImageNet weights do in the paper;
- Table 1: Baseline, +MT, +MT+LS (shared tau), +MT+LS+RA (= RankSeg): mIoU, multi-label mAP;
- Fig. 3: GT (eval) on the baseline and on RankSeg, GT (train + eval) oracle;
- Tables 2-3: the independent scheme (a classifier fine-tuned per seed, then a segmenter that
  it selects for, `--selector`) against the joint one;
- Table 4: training kappa sweep (incl. kappa = K); evaluation kappa != training kappa;
  supplement Table 5: dynamic kappa (sigmoid thresholds);
- Fig. 7: learned 1/tau against rank, mean over seeds with the range, Spearman rho per seed;
- cost (params, FLOPs) and false positives of seed 0's baseline vs RankSeg;
- a verdict per claim, decided mechanically (bench/replication_claims.py).

Work (runs, evaluations) goes to --work and is reused when re-run with the same settings: a
finished run (same resolved config, same initial weights) is not trained again, an interrupted
one resumes from its last checkpoint, a stored evaluation of the same weights is not recomputed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rankseg_core.utils.fsio import atomic_write_bytes, atomic_write_json

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: the modules below, report.py
from replication_diagnostics import precondition_job  # noqa: E402
from replication_protocol import (  # noqa: E402
    CLASSIFIER,
    METRICS,
    Protocol,
    cached,
    eval_specs,
    pretrain_recipe,
    recipe,
    train_variants,
)

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "replication.md"
DOC_IMG = REPO / "docs" / "img"


# ---------------------------------------------------------------------------------------
# Jobs (run in worker processes)


def _threads(n: int) -> None:
    import torch

    torch.set_num_threads(n)
    os.environ["OMP_NUM_THREADS"] = str(n)


def _num(x: Any) -> float | None:
    return None if x is None or (isinstance(x, float) and np.isnan(x)) else float(x)


def weights_digest(path: str | Path) -> str:
    """The content SHA-256 a rankseg .safetensors file carries in its header (the run's identity)."""
    from rankseg_core.utils import integrity

    return integrity.safetensors_metadata(Path(path).read_bytes())[integrity.KEY]


def resolved_config(run_dir: str, data: str, overrides: list[str]):
    """The config `train` will record for these overrides: selector and init source resolved
    as `train` resolves them, so that a finished run's config.yaml compares equal."""
    from rankseg_core.engine.configure import build_train_config
    from rankseg_core.engine.selector import resolve_selector
    from rankseg_core.engine.warm_start import check_init_from

    cfg = build_train_config(None, overrides, data)
    resolve_selector(cfg, run_dir)
    check_init_from(cfg, False)
    return cfg


def init_report(cfg) -> dict | None:
    """What `--init-from` loads into this run's model (the report `train` prints, recomputed
    on a fresh model of the same config), and whether exactly the backbone transferred."""
    if not cfg.init_from:
        return None
    from rankseg_core.engine.warm_start import warm_start
    from rankseg_core.families import family_of

    model = family_of(cfg.model.model).build(cfg.model)
    rep = warm_start(model, cfg.init_from)
    backbone = {k for k in model.state_dict() if k.startswith("backbone.")}
    return {"source": str(rep.source), "sha256": weights_digest(rep.source), "loaded": len(rep.loaded),
            "missing": len(rep.missing), "unexpected": len(rep.unexpected), "mismatched": len(rep.mismatched),
            "resampled": len(rep.resampled), "backbone_tensors": len(backbone),
            "backbone_only": set(rep.loaded) == backbone, "lines": rep.lines()}


def _train_stats(run_dir: str) -> dict:
    """Selection diagnostics of the last quarter of training (coverage = share of labelled
    pixels whose class is selected; recall / precision of the selection vs the crop's classes)."""
    from rankseg_core.engine.runs import read_metrics

    recs = [r for r in read_metrics(run_dir) if r.get("type") == "train"]
    tail = recs[len(recs) - max(1, len(recs) // 4):] if recs else []
    out = {}
    for key in ("coverage", "recall", "precision"):
        vals = [r[key] for r in tail if r.get(key) is not None]
        out[f"train_{key}"] = float(np.mean(vals)) if vals else None
    return out


def train_job(run_dir: str, data: str, overrides: list[str], threads: int, export: str | None = None,
              procs: int = 1) -> dict:
    """Train one run unless an identical finished one exists (resume an interrupted one);
    returns timing, final metrics, selection diagnostics and the init report. `export`: also
    write the run's backbone alone to that .safetensors file (the pre-training run). `procs`
    > 1: train with DDP over that many processes of `threads` threads (torchrun; the global
    batch and so the run are the same, docs/training.md)."""
    _threads(threads)
    from rankseg_core.config.train import diff_configs
    from rankseg_core.engine import runs

    cfg = resolved_config(run_dir, data, overrides)
    init = init_report(cfg)
    if init is not None and not init["backbone_only"]:
        raise RuntimeError(f"{run_dir}: --init-from {cfg.init_from} loaded {init['loaded']} tensors, not exactly the "
                           f"{init['backbone_tensors']} of the backbone: " + " / ".join(init["lines"]))
    paths = runs.run_paths(run_dir)
    done = Path(run_dir) / "replicate.json"
    same = paths.config.is_file() and not diff_configs(runs.load_config(run_dir), cfg)
    if same and paths.weights.is_file() and done.is_file():
        rec = json.loads(done.read_text())
        if (rec.get("init") or {}).get("sha256") == (init or {}).get("sha256"):
            if export:
                _export_backbone(run_dir, export)
            return {**rec, "reused": True}
    resume = same and paths.last.is_file() and not paths.weights.is_file()
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    t = time.perf_counter()
    if procs > 1:
        _torchrun(run_dir, data, overrides, procs, resume)
    else:
        from rankseg_core.engine.train import train

        train(cfg, run_dir, resume=resume, progress=False)
    seconds = time.perf_counter() - t
    shutil.rmtree(paths.checkpoints, ignore_errors=True)  # model.safetensors holds the weights
    final = [r for r in runs.read_metrics(run_dir) if r.get("type") == "eval" and r.get("final")][-1]
    rec = {"run": run_dir, "train_seconds": seconds, "resumed": resume, "procs": procs, "iters": final["iter"],
           "stamp": weights_digest(paths.weights), "init": init, **_train_stats(run_dir),
           **{k: _num(final.get(k)) for k in METRICS}}
    atomic_write_json(done, rec)  # the completion marker: never half-written, never NaN
    if export:
        _export_backbone(run_dir, export)
    return rec


def _torchrun(run_dir: str, data: str, overrides: list[str], procs: int, resume: bool) -> None:
    """`torchrun --standalone --nproc_per_node procs -m rankseg_cli train ...` (threads per
    process as this worker's OMP_NUM_THREADS); its output goes to RUN.log next to the run."""
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}",
           "-m", "rankseg_cli", "train", "--data", data, "--out", run_dir]
    cmd += [a for o in overrides for a in ("--set", o)] + (["--resume"] if resume else [])
    log = Path(f"{run_dir}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO,
                              env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}).returncode
    if code:
        raise RuntimeError(f"training {run_dir} with {procs} processes failed (exit {code}); see {log}")


def _export_backbone(run_dir: str, out: str) -> None:
    """The run's `backbone.*` tensors alone, as a checksummed .safetensors file (the
    "ImageNet weights" of this replication: nothing of the classifier's head goes along)."""
    from torch import nn

    from rankseg_core.engine.runs import load_run, save_weights

    model, _ = load_run(run_dir)
    holder = nn.Module()
    holder.backbone = model.backbone  # state-dict names stay backbone.*
    save_weights(out, holder)


def eval_job(run_dir: str, out_json: str, options: dict, threads: int) -> dict:
    """Evaluate a run on its val split with SelectionOptions(**options); cached in out_json for
    the same weights (the run's stamp)."""
    _threads(threads)
    out = Path(out_json)
    stamp, hit = cached(run_dir, out)
    if hit is not None:
        return hit
    import torch

    from rankseg_core.engine.evaluate import EvalOptions, evaluate_model
    from rankseg_core.engine.runs import load_run
    from rankseg_core.model.selection import SelectionOptions

    t = time.perf_counter()
    model, cfg = load_run(run_dir, "cpu")
    res = evaluate_model(model, cfg, EvalOptions(split=cfg.data.val_split, progress=False,
                                                   selection=SelectionOptions(**options)),
                         torch.device("cpu"))
    rec = {"run": run_dir, "options": options, "stamp": stamp, "eval_seconds": time.perf_counter() - t,
           **{k: _num(res[k]) for k in METRICS}}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out, rec)
    return rec


# ---------------------------------------------------------------------------------------
# Scheduling


@dataclass
class Task:
    key: tuple
    fn: Callable[..., dict]
    args: tuple
    deps: tuple = ()


def run_tasks(tasks: list[Task], workers: int) -> dict[tuple, dict]:
    """Run `tasks` (listed in priority order, dependencies first) on `workers` processes: a
    task starts once its dependencies finished; the first failure stops everything."""
    done: dict[tuple, dict] = {}
    if workers <= 1:
        for t in tasks:
            if not all(d in done for d in t.deps):
                raise RuntimeError(f"task {t.key} is listed before its dependencies {t.deps}")
            done[t.key] = t.fn(*t.args)
        return done
    pending, running = list(tasks), {}
    pool = ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=_leave_sigint_to_parent)
    try:
        while pending or running:
            for t in [t for t in pending if all(d in done for d in t.deps)][:workers - len(running)]:
                pending.remove(t)
                running[pool.submit(t.fn, *t.args)] = t
            if not running:
                raise RuntimeError(f"unmet dependencies: {[t.key for t in pending]}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                done[running.pop(f).key] = f.result()
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            # Running jobs would otherwise train on to their end, and the interpreter waits for
            # them at exit. Their files are written atomically; a re-run resumes them.
            for proc in list((getattr(pool, "_processes", None) or {}).values()):
                proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return done


def _on_sigint_in_worker(signum: int, frame: Any) -> None:
    """Ctrl-C reaches every process of the terminal's group: a worker leaves it to the parent,
    which stops the workers (`run_tasks`), instead of printing a traceback of its own."""


def _leave_sigint_to_parent() -> None:
    # A Python handler rather than SIG_IGN: an ignored SIGINT is inherited through exec, and
    # the torchrun a job starts must still stop on Ctrl-C.
    signal.signal(signal.SIGINT, _on_sigint_in_worker)


# ---------------------------------------------------------------------------------------
# One dataset


@dataclass
class Dataset:
    name: str
    root: Path
    num_classes: int
    img_size: int


# Fine-tuning jobs first by their cost (longest first: fewer idle cores at the end).
ORDER = ("classifier", "mt", "baseline", "mt_ls", "rankseg", "oracle")


def plan(ds: Dataset, p: Protocol, base: Path) -> tuple[list[Task], dict[tuple[str, int], Path]]:
    """Every training and evaluation task of one dataset, and the run directory of each
    (variant, seed)."""
    k = ds.num_classes
    tasks, deps, init = [], (), None
    if p.pretrained:
        pre = base / "pretrain"
        init = base / "pretrain_backbone.safetensors"
        tasks.append(Task(("train", "pretrain", 0), train_job,  # alone: DDP over every core
                          (str(pre), str(ds.root), pretrain_recipe(p, ds.img_size), p.threads, str(init), p.jobs)))
        deps = (("train", "pretrain", 0),)
    variants = {**train_variants(p, k), "classifier": CLASSIFIER}
    names = sorted(variants, key=lambda v: (ORDER.index(v) if v in ORDER else 2.5, v))
    runs = {(v, s): base / v / f"seed{s}" for s in range(p.seeds) for v in [*names, "indep"]}
    for v in names:
        for s in range(p.seeds):
            tasks.append(Task(("train", v, s), train_job,
                              (str(runs[(v, s)]), str(ds.root), recipe(p, ds.img_size, s, init) + variants[v],
                               p.threads), deps))
    for s in range(p.seeds):
        sel = ["model.head=rankseg", f"model.selector.run={runs[('classifier', s)]}"]
        tasks.append(Task(("train", "indep", s), train_job,
                          (str(runs[("indep", s)]), str(ds.root), recipe(p, ds.img_size, s, init) + sel, p.threads),
                          (("train", "classifier", s),)))
        if p.pretrained:  # Table 2: the same scheme with the (more accurate) pre-training classifier
            runs[("indep_pre", s)] = base / "indep_pre" / f"seed{s}"
            sel = ["model.head=rankseg", f"model.selector.run={base / 'pretrain'}"]
            tasks.append(Task(("train", "indep_pre", s), train_job,
                              (str(runs[("indep_pre", s)]), str(ds.root), recipe(p, ds.img_size, s, init) + sel,
                               p.threads), deps))
    for v, name, opts in eval_specs(p, k):
        for s in range(p.seeds):
            tasks.append(Task(("eval", v, s, name), eval_job,
                              (str(runs[(v, s)]), str(base / "evals" / f"{v}_seed{s}_{name}.json"), opts, p.threads),
                              (("train", v, s),)))
    for v in ("baseline", "rankseg"):  # the paper's precondition (bench/replication_diagnostics.py)
        for s in range(p.seeds):
            tasks.append(Task(("diag", v, s), precondition_job,
                              (str(runs[(v, s)]), str(base / "evals" / f"{v}_seed{s}_precondition.json"),
                               str(ds.root), min(p.kappa, k), p.threads), (("train", v, s),)))
    return tasks, runs


def replicate_dataset(ds: Dataset, p: Protocol, base: Path, fig_dir: Path, fig_prefix: str) -> dict:
    """Train, evaluate, aggregate, judge and draw for one dataset; returns its results dict."""
    import replication_report as rep  # matplotlib and friends: not in the workers

    k = ds.num_classes
    tasks, runs = plan(ds, p, base)
    n_train = sum(t.key[0] == "train" for t in tasks)
    print(f"[{ds.name}] {n_train} runs and {len(tasks) - n_train} extra evaluations, {p.jobs} at a time", flush=True)
    t0 = time.perf_counter()
    out = run_tasks(tasks, p.jobs)
    seconds = time.perf_counter() - t0
    trained = {key[1:]: r for key, r in out.items() if key[0] == "train"}
    evals = {key[1:]: r for key, r in out.items() if key[0] == "eval"}
    res = rep.collect(trained, evals, p, k)
    res.update({"dataset": ds.name, "num_classes": k, "img_size": ds.img_size, "seconds": seconds,
                "reused_runs": sum(bool(r.get("reused")) for r in trained.values()),
                "resumed_runs": sum(bool(r.get("resumed")) for r in trained.values()), "total_runs": len(trained)})
    res["cost"] = rep.cost_table(p, ds.num_classes, ds.img_size, train_variants(p, k), runs)
    t1 = time.perf_counter()
    res["figures"] = rep.draw(res, p, ds.name, runs, fig_dir, fig_prefix)
    res["fp"] = rep.false_positives(runs, ds.root, base / "fp", p.fp_images, fig_dir, fig_prefix)
    res["fp_makeup"] = rep.false_positive_makeup(runs, ds.root, p, k)
    res["precondition"] = rep.precondition_summary({key[1:]: r for key, r in out.items() if key[0] == "diag"}, p)
    res["claims"], res["diagnoses"] = rep.judge(res, p, k)
    res["figure_seconds"] = time.perf_counter() - t1
    return res


# ---------------------------------------------------------------------------------------
# Whole-run bookkeeping


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children (the pool workers)."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                  resource.getrusage(resource.RUSAGE_CHILDREN)))


class LoadSampler:
    """The 1-min load average every `period` s in a daemon thread (other processes included)."""

    def __init__(self, period: float = 30.0) -> None:
        self.samples = [os.getloadavg()[0]]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(period,), daemon=True)
        self._thread.start()

    def _run(self, period: float) -> None:
        while not self._stop.wait(period):
            self.samples.append(os.getloadavg()[0])

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self.samples.append(os.getloadavg()[0])
        s = self.samples
        return {"start": s[0], "end": s[-1], "mean": float(np.mean(s)), "max": float(np.max(s)), "n": len(s)}


def log_invocation(path: Path, rec: dict) -> list[dict]:
    """Append this invocation's timing to `path` (JSON lines) and return every record, so that
    a replication trained over several invocations (interrupted, resumed) reports them all."""
    from rankseg_core.utils.jsonio import dumps

    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(dumps(rec) + "\n")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def publish(results: Path, record: dict, body: str, docs: bool, doc: Path, block: str, report_dir: Path,
            total: float) -> None:
    """What every replication does at its end: the results JSON (atomic), the report into its docs
    block (`docs`) or `report_dir/report.md`, and the report and total time on stdout."""
    from rankseg_core.utils.fsio import atomic_write_json

    atomic_write_json(results, json.loads(json.dumps(record, default=str)))
    if docs:
        write_doc_block(body, doc, name=block)
    else:
        (report_dir / "report.md").write_text(body + "\n")
    print(body)
    print(f"\ntotal {total / 60:.1f} min; results in {results}", flush=True)


def write_doc_block(body: str, doc: Path = DOC, name: str = "results") -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` of the doc."""
    text = doc.read_text() if doc.exists() else "# Mini-replication\n"
    block = f"<!-- {name}:start -->\n{body.strip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    atomic_write_bytes(doc, text.encode())  # an interrupted rewrite must not truncate the doc


@dataclass(frozen=True)
class WorldSpec:
    """A synthetic world (`--world`, docs/synthetic.md "Harder worlds"); the defaults are today's."""

    backgrounds: int | None = None  # B shared backgrounds; None = one per scene
    all_classes: bool = False  # every object class in some scene

    def tag(self, num_classes: int) -> str:
        """The world's suffix of paths and names: "" for today's world (B = S counts as it), so
        its shards, runs and docs block stay where they were."""
        from rankseg_core.convert.synthetic import num_scenes

        bg = self.backgrounds if self.backgrounds is not None and self.backgrounds != num_scenes(num_classes) else None
        return "_".join(([f"bg{bg}"] if bg is not None else []) + (["all"] if self.all_classes else []))


def parse_world(spec: str | None) -> WorldSpec:
    """`--world`: "default", "all-classes", "shared-bg:B" or "shared-bg:B,all-classes"."""
    from rankseg_core.errors import UserError

    if spec is None or spec == "default":
        return WorldSpec()
    m = re.fullmatch(r"shared-bg:(\d+)(,all-classes)?|all-classes", spec)
    if m is None:
        raise UserError(f"--world {spec!r}: use default, all-classes, shared-bg:B or shared-bg:B,all-classes")
    return WorldSpec(int(m.group(1)) if m.group(1) else None, m.group(1) is None or m.group(2) is not None)


def synthetic_root(p: Protocol, work: Path, world: WorldSpec = WorldSpec()) -> Path:
    """The synthetic shards of this protocol and world (made once; the pretrain split only when
    pre-training). Today's world keeps its path, so its shards and runs are reused."""
    from rankseg_core.convert.common import ConvertOptions
    from rankseg_core.convert.synthetic import prepare_synthetic

    pre = p.pretrain_images if p.pretrained else 0
    tag = world.tag(p.num_classes)
    root = work / (f"synthetic_K{p.num_classes}_{p.size}px_{p.images}" + (f"_pre{pre}" if pre else "")
                   + (f"_{tag}" if tag else ""))
    if not (root / "dataset.json").is_file():
        prepare_synthetic(root, num_classes=p.num_classes, images=p.images, val_images=p.val_images, size=p.size,
                          seed=0, pretrain_images=pre, backgrounds=world.backgrounds, all_classes=world.all_classes,
                          opts=ConvertOptions(samples_per_shard=1000))
    return root


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=REPO / "runs" / "replication", help="runs and evaluations")
    ap.add_argument("--data", type=Path, action="append", default=[],
                    help="extra shard directory (repeatable; needs a 'pretrain' split unless --from-scratch)")
    ap.add_argument("--no-synthetic", action="store_true", help="only the --data directories")
    ap.add_argument("--smoke", action="store_true", help="tiny sizes, 2 iterations: checks the pipeline in seconds")
    ap.add_argument("--from-scratch", action="store_true",
                    help="the earlier protocol: every run from random weights, no pre-training")
    ap.add_argument("--docs", action="store_true", help="figures to docs/img, results block into docs/replication.md")
    ap.add_argument("--world", help="synthetic world: default, all-classes, shared-bg:B or shared-bg:B,all-classes "
                                    "(docs/synthetic.md; its own shards, runs and docs block)")
    for name, kind in (("seeds", int), ("iters", int), ("jobs", int), ("threads", int), ("num-classes", int),
                       ("size", int), ("images", int), ("kappa", int), ("lr", float), ("pretrain-images", int),
                       ("pretrain-iters", int), ("pretrain-lr", float)):
        ap.add_argument(f"--{name}", type=kind)
    args = ap.parse_args(argv)

    return keeping_threads(_main, args, argv)


def keeping_threads(fn: Callable[..., dict], *args: Any) -> dict:
    """`fn(*args)` with torch's intra-op thread count restored afterwards: a replication's
    main() also runs in-process (tests), and its jobs set their own thread count."""
    import torch

    threads_before = torch.get_num_threads()
    try:
        return fn(*args)
    finally:
        torch.set_num_threads(threads_before)


def _main(args: argparse.Namespace, argv: list[str] | None) -> dict:
    p = Protocol.smoke(args.from_scratch) if args.smoke else Protocol.from_scratch() if args.from_scratch else Protocol()
    for name in ("seeds", "iters", "jobs", "threads", "num_classes", "size", "images", "kappa", "lr",
                 "pretrain_images", "pretrain_iters", "pretrain_lr"):
        if getattr(args, name) is not None:
            setattr(p, name, getattr(args, name))
    if args.from_scratch:
        p.pretrain_images = p.pretrain_iters = 0
    if not args.smoke and args.images is not None:
        p.val_images = max(1, p.images // 10)
    _threads(p.threads)
    import replication_report as rep

    work = args.work.resolve()
    work.mkdir(parents=True, exist_ok=True)
    regime = "pretrained" if p.pretrained else "scratch"
    world = parse_world(args.world)
    tag = world.tag(p.num_classes)  # "" for today's world: names as they were
    fig_dir = DOC_IMG if args.docs else work / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    t0, cpu0, load = time.perf_counter(), cpu_seconds(), LoadSampler()
    started = time.strftime("%Y-%m-%d %H:%M", time.gmtime()) + " UTC"

    from rankseg_core.errors import UserError
    from rankseg_core.shards.read import ShardIndex

    datasets = []
    if not args.no_synthetic:
        datasets.append(Dataset("synthetic" + (f"_{tag}" if tag else ""), synthetic_root(p, work, world),
                                p.num_classes, p.size))
    for d in args.data:
        idx = ShardIndex(d)
        if p.pretrained and "pretrain" not in idx.splits:
            raise UserError(f"{d} has no 'pretrain' split to pre-train on (a larger split disjoint from train / val); "
                            "add one or pass --from-scratch")
        datasets.append(Dataset(re.sub(r"[^A-Za-z0-9_-]", "_", idx.name or d.name), d.resolve(), idx.num_classes,
                                p.size))
    if not datasets:
        raise UserError("nothing to do: pass --data or drop --no-synthetic")

    results = []
    for ds in datasets:
        prefix = ("smoke_" if args.smoke else "") + f"replication_{'' if regime == 'scratch' else 'pt_'}{ds.name}_"
        results.append(replicate_dataset(ds, p, work / regime / ds.name, fig_dir, prefix))
    total = time.perf_counter() - t0
    command = ("python bench/replicate.py " + " ".join(argv if argv is not None else sys.argv[1:])).strip()
    history = log_invocation(work / regime / f"invocations{'_' + tag if tag else ''}.jsonl", {
        "started": started, "command": command, "wall_s": total, "cpu_s": cpu_seconds() - cpu0, "load": load.stop(),
        **{k: sum(r[f"{k}_runs"] for r in results) for k in ("total", "reused", "resumed")}})
    body = rep.report(results, p, command, args.smoke, "img" if args.docs else ".", history)
    regime = regime + (f"_{tag}" if tag else "")  # a world's results file and docs block are its own
    atomic_write_json(work / f"results_{regime}.json", {"protocol": p.__dict__, "total_seconds": total,
                                                       "results": results})
    if args.docs:
        write_doc_block(body, name=("results" if p.pretrained else "from-scratch") + (f"-{tag}" if tag else ""))
    else:
        (fig_dir / "replication_report.md").write_text(body + "\n")
    print(body)
    print(f"\ntotal {total / 60:.1f} min; results in {work / f'results_{regime}.json'}", flush=True)
    return {"protocol": p, "results": results, "total_seconds": total, "report": body}


INTERRUPTED = ("interrupted: re-run the same command to go on (finished runs and evaluations are reused, "
               "an interrupted run resumes from its last checkpoint)")


def cli(argv: list[str] | None = None, run: Callable[[list[str] | None], Any] | None = None) -> int:
    """The command line of `run` (default: this replication's `main`): exit status 0; 2 with
    one `error:` line for a user mistake (bad --data, ...); 130 with one line on Ctrl-C, as
    `rankseg` commands do."""
    from rankseg_core.errors import UserError

    try:
        (run or main)(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(INTERRUPTED, file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(cli())
