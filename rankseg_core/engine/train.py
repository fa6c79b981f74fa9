"""Training: run set-up, checkpoints and one explicit loop (`train`) for every model family.

The data stream (loading.py) is a pure function of (seed, global sample position), the
optimizer and schedule come from optim.py, and the model, its loss and its inference from
the run's family (families/). Resuming at step s therefore only needs the checkpoint.
"""

from __future__ import annotations

import math
import random
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch
from torch import Tensor, nn

from rankseg_core.config.train import TrainConfig, diff_configs, to_yaml
from rankseg_core.data.augment import train_mean_std
from rankseg_core.data.device import to_device
from rankseg_core.data.loading import make_loader
from rankseg_core.engine import runs
from rankseg_core.engine.evaluate import EvalOptions, EvalResult, evaluate_model
from rankseg_core.engine.optim import build_optimizer, lr_schedule
from rankseg_core.engine.scalars import ScalarLog, open_scalars, resolve_tensorboard
from rankseg_core.engine.selector import resolve_selector
from rankseg_core.engine.warm_start import check_init_from, init_model
from rankseg_core.errors import UserError
from rankseg_core.families import family_of
from rankseg_core.families.base import Criterion, Family
from rankseg_core.losses.rankseg import present_classes
from rankseg_core.model.selection import NO_SELECTION, Selection
from rankseg_core.shards.codec import IGNORE
from rankseg_core.utils import distributed as D
from rankseg_core.utils import environment, lock, textlog
from rankseg_core.utils.console import printable
from rankseg_core.utils.fsio import os_error
from rankseg_core.utils.progress import Progress

T = TypeVar("T")


# ---------------------------------------------------------------------------------------
# RNG state (checkpointed so that dropout / drop-path continue exactly)


def rng_state() -> dict[str, Any]:
    # The legacy tuple (name, keys, pos, has_gauss, cached): get_state's default.
    np_state = cast(tuple[str, np.ndarray, int, int, float], np.random.get_state())
    state = {"torch": torch.get_rng_state(),
             "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                       "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
             "python": [random.getstate()[0], list(random.getstate()[1])]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    random.setstate((state["python"][0], tuple(state["python"][1]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------------------
# Running statistics between log lines


class Window:
    """NaN-aware sums of the logged statistics (`keys`) since the last log line (checkpointed).

    A step's statistics are added ON THE DEVICE (`add` never waits for the device); `gather`
    all-reduces what is pending over processes and brings it to the host in one transfer.
    The loop gathers at its log, evaluation and checkpoint points only, so a non-finite loss
    is seen there (`gather` reports the first one), not at its own step. `state` (what a
    checkpoint keeps) is the gathered part: the loop gathers before every checkpoint.
    """

    def __init__(self, keys: tuple[str, ...], state: dict | None = None) -> None:
        self.keys = keys
        self.sums = dict(state["sums"]) if state else {k: 0.0 for k in keys}
        self.counts = dict(state["counts"]) if state else {k: 0 for k in keys}
        self.samples = int(state["samples"]) if state else 0
        # (2n + 2,) float64 on the device: finite sums (n), finite counts (n), the iteration of
        # the first non-finite loss (-1 = none) and that loss. float64: iterations stay exact
        # and the sums add like the host floats they replace.
        self._pending: Tensor | None = None

    def add(self, values: Tensor, samples: int, it: int) -> None:
        """One step's statistics (n,) on any device; `it` = the step's iteration (1-based)."""
        finite = torch.isfinite(values)
        loss = values[0].double()
        if self._pending is None:
            self._pending = torch.zeros(2 * len(self.keys) + 2, dtype=torch.float64, device=values.device)
            self._pending[-2] = -1.0
        p = self._pending
        first = ~finite[0] & (p[-2] < 0)  # a 0-dim bool on the device: torch.where, never `if`
        p[:-2] += torch.cat([torch.where(finite, values, 0).double(), finite.double()])
        # Python scalars into torch.where / setitem are kernel arguments; a tensor built from
        # one (torch.tensor(it, device=...)) would be a blocking host-to-device copy.
        p[-2] = torch.where(first, float(it), p[-2])
        p[-1] = torch.where(first, loss, p[-1])
        self.samples += samples

    def gather(self) -> tuple[float, tuple[int, float] | None]:
        """Fold the pending steps into the host sums (an all-reduce and one device-to-host
        copy: a sync point). Returns (mean loss of those steps, NaN if none was finite;
        (iteration, value) of the first non-finite loss over all processes, or None)."""
        if self._pending is None:
            return float("nan"), None
        p, n = self._pending, len(self.keys)
        self._pending = None
        if D.current().enabled:
            import torch.distributed as dist

            # The first bad iteration over ranks: MIN with "none" as +inf.
            bad = torch.where(p[-2:-1] < 0, torch.full_like(p[-2:-1], math.inf), p[-2:-1])
            dist.all_reduce(bad, op=dist.ReduceOp.MIN)
            mine = p[-2:-1] == bad
            p = torch.cat([p[:-2], bad, torch.where(mine, p[-1:], torch.full_like(p[-1:], math.nan))])
            dist.all_reduce(p[:-2], op=dist.ReduceOp.SUM)
        host = p.cpu().tolist()
        sums, counts = host[:n], host[n:2 * n]
        for k, s, c in zip(self.keys, sums, counts):
            self.sums[k] += s
            self.counts[k] += int(c)
        loss = sums[0] / counts[0] if counts[0] else float("nan")
        bad_it = host[-2]
        return loss, (None if bad_it < 0 or not math.isfinite(bad_it) else (int(bad_it), host[-1]))

    def means(self) -> dict[str, float]:
        return {k: (self.sums[k] / self.counts[k] if self.counts[k] else float("nan")) for k in self.keys}

    def state(self) -> dict:
        if self._pending is not None:
            raise RuntimeError("Window.state() with statistics not gathered: gather() first")
        return {"sums": self.sums, "counts": self.counts, "samples": self.samples}


# ---------------------------------------------------------------------------------------
# Set-up shared by fresh and resumed runs


@dataclass
class TrainResult:
    run_dir: Path
    iterations: int
    final_eval: EvalResult | None
    best_score: float  # the best validation `score` (evaluate.py: AP of tracks, else PQ, else mIoU, else mAP)
    already_finished: bool = False  # --resume of a finished run: nothing was done


def check_splits(cfg: TrainConfig) -> None:
    """The train / val splits exist, so a typo does not surface after hours of training."""
    from rankseg_core.shards.read import ShardDataset, ShardIndex

    splits = ShardIndex(cfg.data.root).splits
    for key, split in (("data.train_split", cfg.data.train_split), ("data.val_split", cfg.data.val_split)):
        if split and split not in splits:
            raise UserError(f"{cfg.data.root}: no split '{split}' for {key} (available: {', '.join(splits)}); "
                            f"set --set {key}=<split>" + (" or '' to skip evaluation" if key == "data.val_split" else ""))
    if cfg.data.val_split and family_of(cfg.model.model).instances(cfg.model) and \
            not ShardDataset(cfg.data.root, cfg.data.val_split).has_instances():
        # Its evaluation is AP over the split's tracks: found out now, not at the first evaluation.
        raise UserError(f"{cfg.data.root}: val split {cfg.data.val_split!r} has no annotated tracks to score the "
                        "instance model by AP (YouTube-VIS valid labels are only on the evaluation server); set "
                        "--set data.val_split=<a split with tracks> or '' to skip evaluation")


def prepare_run(cfg: TrainConfig, run_dir: Path, resume: bool) -> bool:
    """Fresh run: refuse to overwrite a run; save config.yaml. Resume: check the config
    matches. Returns True when a resumed run is already finished (nothing to do).

    Call with the run's lock held (`train` does): it decides from files another writer changes.
    """
    paths = runs.run_paths(run_dir)
    if resume:
        if not paths.last.is_file() and not paths.weights.is_file():
            raise UserError(f"{paths.last}: nothing to resume (no checkpoint yet); start without --resume")
        saved = runs.load_config(run_dir)
        changed = diff_configs(saved, cfg)
        finished = paths.weights.is_file()  # written last, after the final checkpoint and evaluation
        if finished and "schedule.iters" in changed:
            raise UserError(f"{run_dir} is finished ({saved.schedule.iters} iterations) and cannot be extended to "
                            f"{cfg.schedule.iters}: the poly learning rate is a function of schedule.iters (it "
                            f"reached its floor at iteration {saved.schedule.iters}), so a longer schedule is another "
                            "run; train one with a new --out")
        if changed:
            raise UserError(f"--resume: {', '.join(changed[:4])} differ(s) from {paths.config}; drop those options "
                            "(a resumed run keeps its config) or start a new --out")
        return finished
    if paths.config.exists() and (paths.last.exists() or paths.weights.exists()):
        raise UserError(f"{run_dir} already holds a run: add --resume to continue it, or choose another --out")
    runs.save_config(run_dir, cfg)
    if paths.metrics.exists():
        paths.metrics.unlink()  # a previous attempt that never checkpointed
    return False


def _claim(cfg: TrainConfig, run_dir: Path, resume: bool, held: list[lock.DirLock]) -> bool:
    """Rank 0's set-up: check the splits, take RUN's lock (appended to `held`), prepare the run."""
    check_splits(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    held.append(lock.acquire(run_dir, "train"))
    return prepare_run(cfg, run_dir, resume)


def _record_session(run_dir: Path, resume: bool) -> None:
    """RUN/env.json (env-<n>.json for a resume: the original stays) and RUN/train.log, which
    from here on gets what this command prints (appended: a resume continues the log).
    Rank 0, after a resume's checkpoint is verified: a refused resume writes nothing."""
    from rankseg_core import __version__

    what = "resume" if resume else "train"
    environment.write_record(run_dir, replace=not resume, what=what)
    textlog.attach(runs.run_paths(run_dir).log,
                   f"rankseg {__version__} {what}: {printable(shlex.join(sys.argv))}")


def _on_rank0(fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0 and hand its result to every rank. A refusal there (run locked,
    already a run, bad split) is raised on every rank, so the others never wait forever in a
    collective for a rank 0 that has left; a single process just calls `fn`."""
    info = D.current()
    if not info.enabled:
        return fn()
    result, message = None, None
    if info.is_main:
        try:
            result = fn()
        except UserError as exc:
            message = str(exc)
        except OSError as exc:
            message = str(os_error(exc.filename or "(file not named by the system)", exc))
    result, message = D.all_gather_objects((result, message))[0]
    if message is not None:
        raise UserError(message)
    return result


def config_for_run(run_dir: str | Path, config_file: str | Path | None, overrides: list[str],
                   data_root: str | Path | None, resume: bool) -> TrainConfig:
    """The config a `rankseg train` command means.

    Fresh run: defaults < dataset defaults < YAML < overrides (`config.build_train_config`).
    Resume: the run's saved config.yaml with the YAML / overrides applied on top; `prepare_run`
    then refuses any change outside the runtime keys (device, workers, ...).
    """
    from rankseg_core.config.train import parse_override, read_yaml, set_key
    from rankseg_core.engine.configure import build_train_config, config_path, resolve
    from rankseg_core.shards.read import load_index

    if not resume:
        return build_train_config(config_file, overrides, data_root)
    cfg = runs.load_config(run_dir)
    layers = [(f"{config_file}: ", read_yaml(config_path(config_file)))] if config_file else []
    layers.append(("--set: ", dict(parse_override(o) for o in overrides)))
    for where, layer in layers:
        for key, value in layer.items():
            set_key(cfg, key, value, where)
    if data_root is not None:
        cfg.data.root = str(data_root)
    meta = load_index(cfg.data.root)
    if int(meta["num_classes"]) != cfg.model.num_classes:
        raise UserError(f"{cfg.data.root}: K={meta['num_classes']} but {run_dir} was trained with "
                        f"K={cfg.model.num_classes}; pass --data with the run's shards")
    return resolve(cfg)


def _evaluate(model: nn.Module, cfg: TrainConfig, device: torch.device, max_images: int) -> EvalResult:
    was = model.training
    model.eval()
    try:
        res = evaluate_model(model, cfg, EvalOptions(split=cfg.data.val_split, max_images=max_images,
                                                     progress=False), device)
    finally:
        model.train(was)
    return res


def _autocast(device: torch.device, enabled: bool) -> tuple[Any, Any]:
    """(autocast context, GradScaler or None). AMP on CUDA only; bf16 needs no scaler."""
    if not enabled or device.type != "cuda":
        return nullcontext(), None
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return torch.autocast("cuda", dtype=dtype), scaler


# ---------------------------------------------------------------------------------------
# The loop


@textlog.captured  # RUN/train.log: attached by _record_session once the run is set up
def train(cfg: TrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True) -> TrainResult:
    """Train (or resume) a run in `run_dir`; see docs/training.md. Call under torchrun for DDP
    (a process group the caller already set up is used and left open)."""
    device = D.resolve_device(cfg.device, D.env_info().local_rank)
    owned = not D.current().enabled
    info = D.init_distributed(device)
    run_dir = Path(run_dir)
    held: list[lock.DirLock] = []
    try:
        resolve_selector(cfg, run_dir)  # config.yaml records the exact selector / init source
        check_init_from(cfg, resume)
        resolve_tensorboard(cfg.tensorboard)  # --tensorboard without the package: refused before RUN is touched
        if _on_rank0(lambda: _claim(cfg, run_dir, resume, held)):
            return _finished(cfg, run_dir)
        return _train(cfg, run_dir, resume, progress, device, info)
    finally:
        for lk in held:  # RUN's lock (rank 0), held to the end of the run
            lk.release()
        if owned:
            D.cleanup()


def _finished(cfg: TrainConfig, run_dir: Path) -> TrainResult:
    evals = [_score(r) for r in runs.read_metrics(run_dir) if r.get("type") == "eval"]
    return TrainResult(run_dir, cfg.schedule.iters, None, max(evals, default=float("-inf")), already_finished=True)


@dataclass
class _State:
    """What a step needs besides the batch (built once by `_setup`)."""

    family: Family
    model: nn.Module  # the bare model (checkpoints, evaluation)
    ddp: nn.Module  # the model to call: DDP-wrapped when distributed
    optimizer: torch.optim.Optimizer
    scaler: Any
    amp: Any
    crit: Criterion
    loader: Iterator[dict[str, Tensor]]
    start: int
    best: float
    window: Window
    norm: tuple[list[float], list[float]]  # the loader's (mean, std): to_device normalises with it


def _setup(cfg: TrainConfig, paths: runs.RunPaths, resume: bool, device: torch.device, info: D.DistInfo) -> _State:
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    family = family_of(cfg.model.model)
    seed_everything(cfg.seed)  # identical initial weights on every rank
    model = family.build(cfg.model).to(device)
    if cfg.channels_last:  # 4-D weights (convolutions) in NHWC; the images follow per step
        model = model.to(memory_format=torch.channels_last)
    # --init-from: fresh runs only (a resume loads last.pt); the family reads foreign layouts.
    init_model(model, cfg, resume, info.is_main, family.foreign_weights)
    optimizer = build_optimizer(model, cfg)
    amp, scaler = _autocast(device, cfg.amp)
    start, best, window = 0, float("-inf"), Window(family.logged_stats(cfg))
    if resume:
        ckpt = _resume_state(paths, model, optimizer, scaler)
        start, best, window = int(ckpt["iteration"]), float(ckpt["best_score"]), Window(family.logged_stats(cfg), ckpt["window"])
        set_rng_state(ckpt["rng"][info.rank] if info.rank < len(ckpt["rng"]) else ckpt["rng"][0])
        if info.is_main:
            runs.truncate_metrics(paths.root, start)
    else:
        torch.manual_seed(cfg.seed + info.rank)  # dropout / drop-path differ across ranks
    _on_rank0(lambda: _record_session(paths.root, resume))
    ddp = model
    if info.enabled:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                  find_unused_parameters=family.find_unused_parameters(cfg.model))
    dc = family.data_config(model)
    loader = iter(make_loader(cfg, dc["mean"], dc["std"], info, start, family.panoptic(cfg.model),
                              family.instances(cfg.model), pin_memory=device.type == "cuda"))
    return _State(family, model, ddp, optimizer, scaler, amp, family.criterion(cfg), loader, start, best, window,
                  train_mean_std(cfg, dc["mean"], dc["std"]))


def _resume_state(paths: runs.RunPaths, model: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any) -> dict:
    """Load checkpoints/last.pt into model / optimizer / scaler; the checkpoint (for the rest).
    A corrupt or foreign last.pt is refused before anything of the run is written."""
    fix = f"cannot resume from it (nothing was changed): {runs.other_weights(paths.last)}, or train a new --out"
    try:
        ckpt = runs.load_checkpoint(paths.last, map_location="cpu", fix=fix)
    except UserError as exc:
        raise UserError(str(exc).replace(fix, _resume_fix(paths))) from None
    if "best_score" not in ckpt and "best_miou" in ckpt:  # checkpoints written before PQ / mAP selection
        ckpt["best_score"] = ckpt["best_miou"]
    need: dict[str, type | tuple[type, ...]] = {"model": dict, "optimizer": dict, "iteration": int,
                                                "best_score": (int, float), "rng": list, "window": dict}
    bad = [k for k, t in need.items() if not isinstance(ckpt.get(k), t)]
    try:
        if bad:
            raise ValueError(f"no valid {', '.join(bad)}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and "scaler" in ckpt:
            scaler.load_state_dict(ckpt["scaler"])
    except (ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise UserError(f"{paths.last} is not a resumable checkpoint of this run "
                        f"({str(exc).splitlines()[0][:200]}); {_resume_fix(paths)}") from None
    return ckpt


def _resume_fix(paths: runs.RunPaths) -> str:
    """What to do when last.pt cannot be resumed: the newest periodic checkpoint that
    verifies, if any (resuming never picks an older state by itself: a damaged last.pt is
    said, not silently skipped), else the run's other weights."""
    older = runs.newest_valid_periodic(paths)
    hint = f"the newest valid checkpoint is {older[1]} (iteration {older[0]}): copy it over last.pt to resume " \
        "from there; or " if older else ""
    return f"cannot resume from it (nothing was changed): {hint}{runs.other_weights(paths.last)}, or train a new --out"


def _forward_backward(st: _State, cfg: TrainConfig, device: torch.device, distributed: bool) -> Tensor:
    """All micro-batches of one step: backward into .grad; returns this process's stats
    (len(stats),) ON THE DEVICE, averaged over micro-batches. Nothing here waits for the
    device: the processes' stats are reduced when the loop gathers (`Window.gather`)."""
    accum, keys = cfg.schedule.accum_steps, st.family.logged_stats(cfg)
    stats = torch.zeros(len(keys), device=device)
    for m in range(accum):
        batch = to_device(next(st.loader), device, *st.norm)
        # A GT (train + eval) oracle selects the crop's classes; everything else trains as built.
        sel = Selection(gt_classes=present_classes(batch["label"], cfg.model.num_classes, IGNORE)) \
            if cfg.model.oracle else NO_SELECTION
        images = batch["image"]
        if cfg.channels_last:  # NHWC: what cuDNN's tensor-core convolutions read without transposing
            images = images.contiguous(memory_format=torch.channels_last)
        # Gradients are all-reduced once per step, on the last micro-batch.
        ddp = cast(nn.parallel.DistributedDataParallel, st.ddp)  # the DDP wrapper when distributed
        with ddp.no_sync() if distributed and m < accum - 1 else nullcontext():
            with st.amp:
                out = st.ddp(images, sel)
            losses = st.crit(out, batch)
            loss = losses["loss"] / accum
            (st.scaler.scale(loss) if st.scaler is not None else loss).backward()
        stats += torch.stack([losses[k].detach().float().to(device, non_blocking=True) for k in keys]) / accum
    return stats


def _optimizer_step(st: _State, cfg: TrainConfig) -> None:
    if st.scaler is not None:
        st.scaler.unscale_(st.optimizer)
    if cfg.optim.grad_clip > 0:
        nn.utils.clip_grad_norm_(st.model.parameters(), cfg.optim.grad_clip)
    if st.scaler is not None:
        st.scaler.step(st.optimizer)
        st.scaler.update()
    else:
        st.optimizer.step()
    st.optimizer.zero_grad(set_to_none=True)


def _gather(st: _State, cfg: TrainConfig, paths: runs.RunPaths) -> float:
    """Gather the window's pending statistics (`Window.gather`); raise at a non-finite loss
    among them. Returns the mean loss of the steps since the last gather."""
    loss, bad = st.window.gather()
    if bad is not None:  # every rank gets the same first bad iteration (a MIN all-reduce)
        raise _non_finite(bad[1], bad[0], cfg, paths)
    return loss


def _non_finite(value: float, it: int, cfg: TrainConfig, paths: runs.RunPaths) -> UserError:
    kept = f"last good checkpoint {paths.last} is kept" if paths.last.exists() else "no checkpoint was written"
    return UserError(f"non-finite loss ({value}) at iteration {it}: training stopped; {kept}. "
                     f"Lower optim.lr (now {cfg.optim.lr:g}) or check the data, then --resume or restart")


def _checkpoint(st: _State, cfg: TrainConfig, paths: runs.RunPaths, path: Path, it: int, info: D.DistInfo) -> None:
    """Save on rank 0 (every rank takes part: RNG states are gathered). Weights that are no
    longer finite are never saved, so last.pt stays the last good state.

    Only last.pt carries the resume state (optimizer, RNG, data order): best.pt is read for
    evaluation only, and without the momentum buffers it is half the size, which matters
    when a sweep improves its best mIoU at every evaluation."""
    # One host sync for all parameters, not one per tensor.
    if not bool(torch.stack([torch.isfinite(p).all() for p in st.model.parameters()]).all()):
        raise _non_finite(float("nan"), it, cfg, paths)
    resumable = path == paths.last
    states = D.all_gather_objects(rng_state()) if resumable else None  # every rank's RNG: DDP resumes exactly
    if info.is_main:
        state = {"model": st.model.state_dict(), "iteration": it, "best_score": st.best}
        if resumable:
            state.update(optimizer=st.optimizer.state_dict(), rng=states, window=st.window.state(),
                         data={"step": it, "seed": cfg.seed, "global_batch": cfg.schedule.batch_size})
            if st.scaler is not None:
                state["scaler"] = st.scaler.state_dict()
        runs.save_checkpoint(path, state)
        if resumable:  # checkpoints/iter_<it>.pt, and the older ones beyond keep_last deleted
            runs.keep_checkpoints(paths, it, cfg.keep_last)


def _train(cfg: TrainConfig, run_dir: Path, resume: bool, progress: bool, device: torch.device,
           info: D.DistInfo) -> TrainResult:
    paths = runs.run_paths(run_dir)
    st = _setup(cfg, paths, resume, device, info)
    # TensorBoard mirrors metrics.jsonl from here (a resume is checked and the log truncated to
    # its checkpoint by now); the writer is closed however the loop ends.
    with open_scalars(run_dir, cfg.tensorboard, st.start, info.is_main) as scalars:
        return _loop(cfg, run_dir, paths, st, scalars, progress, device, info)


def _log(run_dir: Path, record: dict[str, Any], scalars: ScalarLog) -> None:
    """One record to metrics.jsonl and, when enabled, to TensorBoard (main process only)."""
    runs.append_metrics(run_dir, record)
    scalars.write(record)


def _loop(cfg: TrainConfig, run_dir: Path, paths: runs.RunPaths, st: _State, scalars: ScalarLog, progress: bool,
          device: torch.device, info: D.DistInfo) -> TrainResult:
    """The steps from st.start on, the final evaluation and the final weights."""
    lrs, iters = lr_schedule(cfg), cfg.schedule.iters
    st.model.train()
    t_log = time.perf_counter()
    with Progress(iters, "train", unit="it", log_every=cfg.log_seconds, enabled=progress and info.is_main) as bar:
        bar.done = st.start
        for it in range(st.start, iters):
            done = it + 1
            for g in st.optimizer.param_groups:
                g["lr"] = float(lrs[it]) * g["lr_mult"]  # python floats: checkpoints load with weights_only
            stats = _forward_backward(st, cfg, device, info.enabled)
            _optimizer_step(st, cfg)
            st.window.add(stats, cfg.schedule.batch_size, done)
            logging = done % cfg.log_every == 0 or done == iters
            evaluating = bool(cfg.data.val_split and cfg.eval.every and done % cfg.eval.every == 0 and done < iters)
            saving = done % cfg.ckpt_every == 0 or done == iters
            if not (logging or evaluating or saving):
                bar.advance(1)  # no host sync between gather points
                continue
            # A gather point: the only place the loop waits for the device. A non-finite loss
            # since the last one stops here, before any evaluation or checkpoint of its weights.
            loss = _gather(st, cfg, paths)
            bar.advance(1, postfix=f"loss {loss:.4f} lr {lrs[it]:.2e}")
            if logging:
                rec = {"type": "train", "iter": done, **st.window.means(), "lr": float(lrs[it]),
                       "samples_per_s": st.window.samples / max(time.perf_counter() - t_log, 1e-9)}
                if info.is_main:
                    _log(run_dir, rec, scalars)
                st.window, t_log = Window(st.family.logged_stats(cfg)), time.perf_counter()
            if evaluating:
                res = _evaluate(st.model, cfg, device, cfg.eval.max_images)
                if info.is_main:
                    _log(run_dir, {"type": "eval", "iter": done, **_summary(res)}, scalars)
                if _score(res.metrics) > st.best:
                    st.best = _score(res.metrics)
                    _checkpoint(st, cfg, paths, paths.best, done, info)
            if saving:
                _checkpoint(st, cfg, paths, paths.last, done, info)
    st.loader = iter(())  # drop the DataLoader iterator: its workers shut down before evaluating
    final = _evaluate(st.model, cfg, device, 0) if cfg.data.val_split else None
    if final is not None and info.is_main:
        _log(run_dir, {"type": "eval", "iter": iters, "final": True, **_summary(final)}, scalars)
    if final is not None and (_score(final.metrics) > st.best or st.best == float("-inf")):
        st.best = max(st.best, _score(final.metrics))
        _checkpoint(st, cfg, paths, paths.best, iters, info)
    if info.is_main:
        runs.save_weights(paths.weights, st.model)
    D.barrier()
    return TrainResult(run_dir, iters, final, st.best)


def _summary(res: Any) -> dict:
    """What metrics.jsonl keeps of an evaluation (PQ parts only when measured)."""
    keys = ("miou", "aacc") if res["segmentation"] else ()  # a classifier has no class maps
    out = {k: res[k] for k in (*keys, "map", "recall_at_kappa", "num_images", "score")}
    out.update({f"vc{n}": v for n, v in (res.metrics.get("vc") or {}).items()})  # video shards (VSPW)
    # A weak-shot run: the official BaseIoU / NovelIoU (NovelIoU is the headline).
    ws = res.metrics.get("weak_shot")
    if ws:  # strict JSON: an undefined mean (no GT pixel of the group) is null
        out.update({k: ws[k] if math.isfinite(ws[k]) else None for k in ("base_iou", "novel_iou")})
    vis = res.metrics.get("vis")  # a video instance model: YouTube-VIS AP (its score)
    if vis:
        out.update({k: vis[k] for k in ("ap", "ap50", "ap75", "ar1", "ar10")})
    pq = res["pq"]
    if pq:
        out.update(pq=pq["all"]["pq"], sq=pq["all"]["sq"], rq=pq["all"]["rq"], pq_things=pq["things"]["pq"],
                   pq_stuff=pq["stuff"]["pq"])
    return out


def _score(metrics: dict) -> float:
    """The selection score of an evaluation's metrics (or a metrics.jsonl record); undefined = -inf."""
    value = metrics["score"] if "score" in metrics else metrics.get("miou")  # records of older runs: mIoU
    return float("-inf") if value is None or not math.isfinite(value) else float(value)


def describe(cfg: TrainConfig) -> str:
    """The resolved config as YAML (printed by `rankseg train --dry-run`)."""
    return to_yaml(cfg)
