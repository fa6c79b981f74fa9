"""Training curves of one or several runs from their metrics.jsonl: losses, learning rate and
evaluation metrics against iteration, a panel per metric, a line per run.

metrics.jsonl holds {"type": "train" | "eval", "iter": s, <metric>: value, ...} records
(docs/training.md, "Run directory"). A run's log is read as `runs.read_metrics` reads it (a torn
last line of a run still training is skipped, NaN of old versions is null), then cleaned of
what an interrupted attempt left behind (`clean_records`), so a log of a resumed run draws as
one uninterrupted curve. Undefined values (null) are not drawn.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, MaxNLocator

from rankseg_core.engine import runs
from rankseg_core.errors import UserError
from rankseg_core.utils.fsio import check_writable_target, os_error
from rankseg_core.utils.plotting import figure_format, plt, save_figure
from rankseg_core.viz.common import write_csv

KINDS = ("train", "eval")
# Logged, but bookkeeping rather than a curve to read: drawn only when asked for by name.
NOT_BY_DEFAULT = frozenset({"samples_per_s", "num_images", "score"})
# Fractions drawn in percent (the paper's tables are in %); the CSV keeps the logged value.
PERCENT = frozenset({"coverage", "recall", "precision", "kept", "miou", "aacc", "map", "recall_at_kappa", "score",
                     "pq", "sq", "rq", "pq_things", "pq_stuff", "base_iou", "novel_iou", "ap", "ap50", "ap75",
                     "ar1", "ar10"})
VC = re.compile(r"vc\d+")  # VSPW video consistency VC_n, a fraction
# Panel titles; other metrics are titled by their key.
TITLES = {
    "loss": "loss (total)", "seg": "segmentation loss", "ml": "multi-label loss", "aux": "auxiliary loss",
    "ce": "class loss (CE)", "mask": "mask loss (BCE)", "dice": "mask loss (dice)", "mil": "MIL loss",
    "comp": "complementary loss", "pair": "pair loss", "distill": "distillation loss",
    "coverage": "top-κ pixel coverage", "recall": "top-κ recall", "precision": "top-κ precision",
    "kept": "GT segments kept by top-κ", "lr": "learning rate", "samples_per_s": "samples / s",
    "miou": "mIoU", "aacc": "aAcc", "map": "mAP (multi-label)", "recall_at_kappa": "recall@κ",
    "score": "selection score", "num_images": "images evaluated", "pq": "PQ", "sq": "SQ", "rq": "RQ",
    "pq_things": "PQ things", "pq_stuff": "PQ stuff", "base_iou": "BaseIoU", "novel_iou": "NovelIoU",
    "ap": "AP", "ap50": "AP50", "ap75": "AP75", "ar1": "AR1", "ar10": "AR10",
}
NOT_SMOOTHED = frozenset({"lr"})  # a schedule, not a noisy measurement
LAST_OF_TRAIN = ("lr", "samples_per_s")  # after the losses and statistics, whatever the runs' order
FEW = 30  # a series this short is drawn with markers, never smoothed
PANEL_SIZE = (3.4, 2.5)  # inches per panel
MAX_COLS = 3


# ---------------------------------------------------------------------------------------
# Reading


def clean_records(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The records of an uninterrupted run, in iteration order, one per (type, iteration).

    A record at or before the last iteration already seen for its type starts a new attempt: a
    resume from an earlier checkpoint c, in a log written before `--resume` truncated it (or a
    record appended twice). What the earlier attempt logged after c is dropped, as TensorBoard's
    purge hides it. c is not in the log, but the new attempt's first record bounds it:
    - a train record at iteration i is logged after step i, and the resumed loop starts after
      c, so c < i: every record at i or later goes;
    - an eval record at i can be the final evaluation at c itself (a crash after it, before the
      final weights): the records after i go, and the evaluation at i, not the train record.
    Records without an integer "iter" or a known "type" are skipped.
    """
    kept: list[dict[str, Any]] = []
    last: dict[str, int] = {}
    for rec in records:
        kind, it = rec.get("type"), rec.get("iter")
        if kind not in KINDS or not isinstance(it, int) or isinstance(it, bool):
            continue
        if kind in last and it <= last[kind]:
            if kind == "train":
                kept = [r for r in kept if r["iter"] < it]
            else:
                kept = [r for r in kept if r["iter"] < it or (r["iter"] == it and r["type"] != kind)]
            last = {}
            for r in kept:
                last[r["type"]] = max(last.get(r["type"], r["iter"]), r["iter"])
        kept.append(rec)
        last[str(kind)] = it
    return kept


@dataclass
class RunLog:
    """One run's cleaned metrics.jsonl and its label in figures."""

    path: Path  # the run directory (or the metrics.jsonl file given)
    metrics: Path
    records: list[dict[str, Any]]
    label: str = ""

    def metric_names(self) -> list[tuple[str, str]]:
        """(type, metric) pairs with at least one number, in first-logged order."""
        seen: dict[tuple[str, str], None] = {}
        for r in self.records:
            for key, value in r.items():
                if key not in ("type", "iter", "final") and _number(value):
                    seen[(r["type"], key)] = None
        return list(seen)

    def series(self, kind: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(iterations int64, values float64) of one metric; undefined values left out."""
        pts = [(r["iter"], float(r[metric])) for r in self.records if r["type"] == kind and _number(r.get(metric))]
        if not pts:
            return np.zeros(0, np.int64), np.zeros(0, np.float64)
        its, vals = zip(*pts)
        return np.asarray(its, np.int64), np.asarray(vals, np.float64)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_run_log(run: str | Path) -> RunLog:
    """A run directory's (or its metrics.jsonl file's) cleaned records; UserError for a missing
    run, a run without metrics.jsonl, or one with no record yet."""
    path = Path(run)
    if path.is_file() and path.name == runs.METRICS:
        metrics = path
    elif path.is_dir():
        metrics = runs.run_paths(path).metrics
    elif path.exists():
        raise UserError(f"{path}: not a run directory (a `rankseg train --out DIR` output) nor a metrics.jsonl")
    else:
        raise UserError(f"{path}: no such run directory (a `rankseg train --out DIR` output)")
    if not metrics.exists():
        raise UserError(f"{metrics}: not found: {path} is not a training run, or it has not logged a record yet "
                        "(the first comes after log_every iterations)")
    if not metrics.is_file():  # a FIFO would block the read
        raise UserError(f"{metrics}: not a regular file; give a run directory written by `rankseg train`")
    try:
        records = runs.read_metrics(metrics.parent)
    except OSError as exc:
        raise os_error(metrics, exc, "cannot read") from None
    cleaned = clean_records(records)
    if not cleaned:
        raise UserError(f"{metrics}: no training or evaluation record yet (the first comes after log_every "
                        "iterations); plot it once the run has logged")
    return RunLog(path, metrics, cleaned)


def run_labels(paths: Sequence[Path]) -> tuple[list[str], str]:
    """Legend labels of runs and the prefix they share (removed from the labels).

    Each run is named by its directory (a metrics file by its parent directory), with as many
    parent directories as needed to tell runs apart (a/run, b/run); a prefix common to all
    labels, up to a separator (- _ . / space), is cut off and returned, e.g.
    ade-vitb-rankseg, ade-vitb-baseline -> (rankseg, baseline), "ade-vitb-".
    """
    parts = [(p.parent if p.is_file() else p).absolute().parts for p in paths]
    depth, longest = 1, max(len(x) for x in parts)
    labels = ["/".join(x[-depth:]) for x in parts]
    while len(set(labels)) < len(labels) and depth < longest:
        depth += 1
        labels = ["/".join(x[-depth:]) for x in parts]
    if len(labels) < 2:
        return labels, ""
    common = os.path.commonprefix(labels)
    cut = max((i + 1 for i, c in enumerate(common) if c in "-_./ "), default=0)
    if cut == 0 or any(len(x) <= cut for x in labels):
        return labels, ""
    return [x[cut:] for x in labels], common[:cut]


def load_logs(run_dirs: Sequence[str | Path]) -> list[RunLog]:
    """Read every run (UserError at the first bad one) and label them for the legend."""
    if not run_dirs:
        raise UserError("no runs to plot: give one or more run directories")
    seen: dict[Path, Path] = {}
    for r in run_dirs:
        key = Path(r).absolute()
        if key in seen:
            raise UserError(f"{r}: given twice; give each run once")
        seen[key] = Path(r)
    logs = [read_run_log(r) for r in run_dirs]
    labels, _ = run_labels([log.path for log in logs])
    for log, label in zip(logs, labels):
        log.label = label
    return logs


def check_out(out: str | Path, logs_or_runs: Sequence[str | Path]) -> dict[str, Path]:
    """The figure and CSV paths of `--out`, checked before any work: an output may not be an
    input (a run directory or its metrics.jsonl), the figure format comes from the extension."""
    fig = Path(out)
    csv_path = fig.with_suffix(".csv")
    inputs: set[Path] = set()
    for r in logs_or_runs:
        p = Path(r).absolute()
        inputs |= {p, p / runs.METRICS} if not p.is_file() else {p, p.parent}
    for target in (fig, csv_path):
        if target.absolute() in inputs or (target.exists() and any(_same(target, i) for i in inputs)):
            raise UserError(f"--out {out}: {target} is one of the inputs; write the figure elsewhere "
                            "(e.g. --out RUN/viz/curves.png)")
    figure_format(fig)
    for target in (fig, csv_path):
        check_writable_target(target)
    return {"figure": fig, "csv": csv_path}


def _same(a: Path, b: Path) -> bool:
    try:
        return b.exists() and a.samefile(b)
    except OSError:
        return False


# ---------------------------------------------------------------------------------------
# Which panels


def known_metrics(logs: Sequence[RunLog]) -> list[tuple[str, str]]:
    """Every (type, metric) of the runs: the train losses and statistics in logged order ("loss"
    first), lr, samples/s, then the eval metrics in logged order."""
    seen: dict[tuple[str, str], None] = {}
    for log in logs:
        for pair in log.metric_names():
            seen[pair] = None
    first = {p: i for i, p in enumerate(seen)}
    return sorted(seen, key=lambda p: (KINDS.index(p[0]), p[0] == "train" and p[1] in LAST_OF_TRAIN,
                                       LAST_OF_TRAIN.index(p[1]) if p[1] in LAST_OF_TRAIN else 0, first[p]))


def choose_metrics(logs: Sequence[RunLog], names: Sequence[str] | None) -> list[tuple[str, str]]:
    """The panels: `names` (case-insensitive; "train/x" or "eval/x" to pick one type), or every
    logged metric but the bookkeeping ones (samples_per_s, num_images, score)."""
    known = known_metrics(logs)
    if not names:
        return [p for p in known if p[1] not in NOT_BY_DEFAULT]
    chosen: list[tuple[str, str]] = []
    for name in names:
        want = name.strip().lower()
        kind, _, metric = want.rpartition("/")
        hits = [p for p in known if p[1].lower() == metric and (not kind or p[0] == kind)]
        if not hits:
            listed = ", ".join(dict.fromkeys(p[1] for p in known))
            raise UserError(f"--metrics: unknown metric {name.strip()!r}; the runs logged: {listed}")
        chosen += [p for p in hits if p not in chosen]
    return chosen


# ---------------------------------------------------------------------------------------
# Drawing


def smooth_values(values: np.ndarray, weight: float) -> np.ndarray:
    """TensorBoard's scalar smoothing: an exponential moving average with weight `weight` on the
    past, debiased so that the first points are not pulled towards 0. weight 0 = the values."""
    if weight <= 0 or len(values) == 0:
        return values.astype(np.float64)
    out = np.empty(len(values), np.float64)
    acc = 0.0
    for i, v in enumerate(values):
        acc = acc * weight + (1 - weight) * float(v)
        out[i] = acc / (1 - weight ** (i + 1))
    return out


def percent(kind: str, metric: str) -> bool:
    return metric in PERCENT or (kind == "eval" and bool(VC.fullmatch(metric)))


def panel_title(kind: str, metric: str) -> str:
    name = TITLES.get(metric, metric)
    if VC.fullmatch(metric):
        name = f"VC{metric[2:]}"
    return f"{'train' if kind == 'train' else 'eval'}: {name}" + (" (%)" if percent(kind, metric) else "")


@dataclass
class Curve:
    """One drawn line: a run's metric, as logged (iters, values) and as drawn (y)."""

    log: RunLog
    kind: str
    metric: str
    iters: np.ndarray
    values: np.ndarray
    y: np.ndarray
    smoothed: bool  # y is a moving average of the values (drawn over them)

    @property
    def shown(self) -> np.ndarray:
        """The values on the panel's scale (percent for fractions), before smoothing."""
        return self.values * 100 if percent(self.kind, self.metric) else self.values


def make_curves(logs: Sequence[RunLog], metrics: Sequence[tuple[str, str]], smooth: float) -> list[Curve]:
    """The lines of every panel: percent for fractions; train curves smoothed by `smooth`."""
    if not 0 <= smooth < 1:
        raise UserError(f"--smooth {smooth:g}: must be in [0, 1) (0 = the logged values; default 0.9)")
    curves = []
    for kind, metric in metrics:
        for log in logs:
            its, vals = log.series(kind, metric)
            if not len(its):
                continue
            y = vals * 100 if percent(kind, metric) else vals
            smoothed = kind == "train" and metric not in NOT_SMOOTHED and smooth > 0 and len(its) > FEW
            curves.append(Curve(log, kind, metric, its, vals, smooth_values(y, smooth) if smoothed else y, smoothed))
    return curves


def _iteration_label(x: float, _pos: int = 0) -> str:
    """40000 -> 40k (schedules are 80k / 160k iterations)."""
    if abs(x) >= 1000:
        return f"{x / 1000:g}k"
    return f"{x:g}"


def _robust_limits(ys: Sequence[np.ndarray]) -> tuple[float, float] | None:
    """y limits that ignore outliers (TensorBoard's default): the 1st-99th percentile range plus
    a margin, when the full range is over twice as wide (the first losses of a run dwarf the
    rest); None = matplotlib's own."""
    allv = np.concatenate([y for y in ys if len(y)]) if ys else np.zeros(0)
    if len(allv) < 50:
        return None
    lo, hi = np.percentile(allv, [1, 99])
    full = float(allv.max() - allv.min())
    if hi <= lo or full <= 2 * (hi - lo):
        return None
    pad = 0.08 * (hi - lo)
    return float(lo - pad), float(hi + pad)


def draw_curves(logs: Sequence[RunLog], metrics: Sequence[tuple[str, str]], smooth: float = 0.9,
                title: str | None = None) -> tuple[Figure, list[Curve]]:
    """A grid of panels (one per metric, at most 3 a row), one line per run; the legend below
    (several runs) or the run's name as title (one run)."""
    curves = make_curves(logs, metrics, smooth)
    if not curves:
        raise UserError("nothing to plot: the runs logged none of the chosen metrics")
    metrics = [m for m in metrics if any((c.kind, c.metric) == m for c in curves)]
    n = len(metrics)
    cols = 2 if n == 4 else min(n, MAX_COLS)  # 2 x 2 rather than 3 + 1
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_SIZE[0] * cols, PANEL_SIZE[1] * rows), squeeze=False)
    colours = plt.get_cmap("tab10")
    styles = ("-", "--", ":", "-.")
    x_max = max(int(c.iters.max()) for c in curves)
    order = {id(log): i for i, log in enumerate(logs)}  # a run's colour and line style
    for k, (kind, metric) in enumerate(metrics):
        ax = axes[k // cols][k % cols]
        mine = [c for c in curves if (c.kind, c.metric) == (kind, metric)]
        # The logged values faint behind their moving averages (as TensorBoard draws them), all
        # runs' first, so that no run's faint band covers another's line.
        for c in mine:
            if c.smoothed:
                i = order[id(c.log)]
                ax.plot(c.iters, c.shown, styles[(i // 10) % len(styles)], color=colours(i % 10), lw=0.6, alpha=0.2)
        for c in mine:
            i = order[id(c.log)]
            ax.plot(c.iters, c.y, styles[(i // 10) % len(styles)], color=colours(i % 10), lw=1.4,
                    marker="o" if len(c.iters) <= FEW else None, ms=3, label=c.log.label)
        limits = _robust_limits([c.y for c in mine])
        if limits:
            ax.set_ylim(*limits)
        ax.set_title(panel_title(kind, metric), fontsize=9)
        ax.set_xlim(0, x_max * 1.02)
        ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
        ax.xaxis.set_major_formatter(FuncFormatter(_iteration_label))
        if metric == "lr":  # 1e-3 .. 1e-6: "0.0010" ticks read worse than a x1e-3 offset
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
        ax.tick_params(labelsize=7.5)
        ax.yaxis.get_offset_text().set_fontsize(7.5)
        ax.grid(alpha=0.3, lw=0.5)
        if k + cols >= n:  # the lowest panel of its column
            ax.set_xlabel("iteration", fontsize=8)
    for k in range(n, rows * cols):
        axes[k // cols][k % cols].remove()
    fig.tight_layout(h_pad=1.2, w_pad=1.0)
    if len(logs) > 1:
        _, prefix = run_labels([log.path for log in logs])
        handles = [plt.Line2D([], [], color=colours(i % 10), ls=styles[(i // 10) % len(styles)], lw=1.6,
                              label=log.label) for i, log in enumerate(logs)]
        fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(4, len(logs)),
                   fontsize=8, frameon=False, title=f"{prefix}…" if prefix else None, title_fontsize=8)
    head = title if title is not None else (logs[0].label if len(logs) == 1 else None)
    if head:
        fig.suptitle(head, fontsize=10, y=1.0, va="bottom")
    return fig, curves


def curve_rows(curves: Sequence[Curve]) -> list[list[Any]]:
    """CSV rows: run, label, type, metric, iter, value (as logged), y (as drawn: % for
    fractions, smoothed train curves). Numbers in full (the shortest text that reads back as
    the same double), not rounded: a learning rate of 1e-7 must not become 0."""
    return [[str(c.log.path), c.log.label, c.kind, c.metric, int(i), repr(float(v)), repr(float(y))]
            for c in curves for i, v, y in zip(c.iters, c.values, c.y)]


CSV_HEADER = ["run", "label", "type", "metric", "iter", "value", "y"]


def write_curves(run_dirs: Sequence[str | Path], out: str | Path, metrics: Sequence[str] | None = None,
                 smooth: float = 0.9) -> dict[str, Path]:
    """`rankseg viz curves`: the figure `out` (.png / .pdf / .svg) and `<stem>.csv` next to it.

    Every input is checked before anything is written.
    """
    targets = check_out(out, run_dirs)
    logs = load_logs(run_dirs)
    chosen = choose_metrics(logs, metrics)
    fig, curves = draw_curves(logs, chosen, smooth)
    save_figure(fig, targets["figure"], dpi=150)
    write_csv(targets["csv"], CSV_HEADER, curve_rows(curves))
    return targets
