"""Fig. 7: the learned 1/tau (rank LayerNorm weight gamma) and bias beta against rank.

RankSeg's mask LayerNorm(kappa) normalises each pixel's kappa cosine scores, whose columns
are in rank order, then applies a per-rank affine gamma_r * z + beta_r. gamma_r plays the
role of 1/tau_r (a temperature per rank); the paper's Fig. 7 shows it decreasing with rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from matplotlib.figure import Figure

from rankseg_core.errors import UserError
from rankseg_core.families import family_of
from rankseg_core.utils.plotting import plt, save_figure
from rankseg_core.viz.common import VizRun, variant_name, write_csv, write_json

FIGSIZE = (11.0, 4.2)  # inches; the legend below adds ~0.3 in per two runs


@dataclass
class TauCurve:
    """gamma (1/tau) and beta per rank of one run; rank 1 is the most confident class."""

    label: str
    run: str
    dataset: str
    num_classes: int
    kappa: int
    tau: str  # "rank" (per-rank affine) or "shared" (one scalar)
    scale: np.ndarray  # kappa, 1/tau
    bias: np.ndarray  # kappa

    def trend(self) -> dict[str, float]:
        """How 1/tau changes with rank: Spearman rho, least-squares slope per rank, first/last
        tenth means. rho < 0 means 1/tau decreases with rank, as in the paper's Fig. 7."""
        n = len(self.scale)
        ranks = np.arange(1, n + 1, dtype=np.float64)
        y = self.scale.astype(np.float64)
        tenth = max(1, n // 10)
        if n < 2 or np.ptp(y) == 0:
            rho, slope = float("nan"), 0.0
        else:
            rho = float(np.corrcoef(_rankdata(ranks), _rankdata(y))[0, 1])
            slope = float(np.polyfit(ranks, y, 1)[0])
        return {"spearman": rho, "slope_per_rank": slope, "first_tenth_mean": float(y[:tenth].mean()),
                "last_tenth_mean": float(y[-tenth:].mean()), "mean": float(y.mean())}


def _rankdata(x: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as scipy.stats.rankdata."""
    order = np.argsort(x, kind="mergesort")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(len(x), dtype=np.float64)
    uniq, inv = np.unique(x, return_inverse=True)
    sums = np.bincount(inv, weights=ranks)
    counts = np.bincount(inv)
    return (sums / counts)[inv] + 1


def tau_curve(run: VizRun) -> TauCurve:
    """The per-rank gamma/beta of a selecting run (RankSeg, +MT+LS, kappa = K, oracle).

    The baseline and +MT normalise over the K classes in class order: their LayerNorm
    weight is per class, not per rank, so they raise UserError.
    """
    pair = family_of(run.cfg.model.model).rank_scale(run.model)
    if pair is None:
        raise UserError(f"{run.path} is a {variant_name(run.cfg)} run: it has no rank LayerNorm (a baseline or +MT "
                        "normalises its K classes in class order, per class, not per rank; a classifier "
                        "selects nothing); plot RankSeg runs (model.head=rankseg with selection)")
    with torch.no_grad():
        scale = pair[0].detach().float().cpu().numpy().copy()
        bias = pair[1].detach().float().cpu().numpy().copy()
    cfg = run.cfg
    dataset = cfg.data.name or "?"
    kappa = len(scale)
    label = f"{run.path.name}: {dataset} K={cfg.model.num_classes} κ={kappa}"
    if cfg.model.tau == "shared":
        label += " (shared τ)"
    if cfg.model.oracle:
        label += " (GT oracle: position by class id)"
    return TauCurve(label, str(run.path), dataset, cfg.model.num_classes, kappa, cfg.model.tau, scale, bias)


def plot_tau(curves: Sequence[TauCurve], out: str | Path, spread: dict[str, np.ndarray] | None = None) -> Path:
    """`draw_tau` written to `out` (.png, .pdf or .svg)."""
    return save_figure(draw_tau(curves, spread), out)


def draw_tau(curves: Sequence[TauCurve], spread: dict[str, np.ndarray] | None = None) -> Figure:
    """Two panels (1/tau and beta against rank), one line per curve, the legend below.

    spread: optional {label: (lo_scale, hi_scale)} 2 x kappa bands drawn around the line
    (used by the replication to show the seed range).
    """
    if not curves:
        raise UserError("no runs to plot")
    fig, axes = plt.subplots(1, 2, figsize=FIGSIZE)
    colours = plt.get_cmap("tab10")
    for i, c in enumerate(curves):
        r = np.arange(1, len(c.scale) + 1)
        colour = colours(i % 10)
        style = "o-" if len(r) <= 30 else "-"
        axes[0].plot(r, c.scale, style, ms=3, lw=1.5, color=colour, label=c.label)
        axes[1].plot(r, c.bias, style, ms=3, lw=1.5, color=colour, label=c.label)
        if spread and c.label in spread:
            lo, hi = spread[c.label]
            axes[0].fill_between(r, lo, hi, color=colour, alpha=0.2, lw=0)
    axes[0].axhline(1.0, color="0.6", lw=0.8, ls=":")  # the initial value
    axes[1].axhline(0.0, color="0.6", lw=0.8, ls=":")
    axes[0].set(xlabel="rank (1 = highest multi-label score)", ylabel="learned 1/τ (LayerNorm weight γ)",
                title="Rank-adaptive scale 1/τ")
    axes[1].set(xlabel="rank", ylabel="learned bias β", title="Per-rank bias")
    for ax in axes:
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.tight_layout()
    # Below the panels, clear of the rank axis label: its top edge at the figure's bottom.
    fig.legend(handles, labels, loc="upper center", ncol=min(2, len(curves)), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 0.0))
    return fig


def tau_rows(curves: Sequence[TauCurve]) -> list[list]:
    """CSV rows: run, dataset, K, kappa, tau, rank, inv_tau, bias."""
    rows = []
    for c in curves:
        for r, (s, b) in enumerate(zip(c.scale, c.bias), start=1):
            rows.append([c.run, c.dataset, c.num_classes, c.kappa, c.tau, r, float(s), float(b)])
    return rows


def write_tau(curves: Sequence[TauCurve], out: str | Path) -> dict[str, Path]:
    """The figure `out` plus `<stem>.csv` (one row per run and rank) and `<stem>.json`."""
    out = Path(out)
    png = plot_tau(curves, out)
    csv_path = write_csv(out.with_suffix(".csv"), ["run", "dataset", "num_classes", "kappa", "tau", "rank",
                                                   "inv_tau", "bias"], tau_rows(curves))
    json_path = write_json(out.with_suffix(".json"), {"runs": [
        {"run": c.run, "label": c.label, "dataset": c.dataset, "num_classes": c.num_classes, "kappa": c.kappa,
         "tau": c.tau, "inv_tau": c.scale, "bias": c.bias, "trend": c.trend()} for c in curves]})
    return {"png": png, "csv": csv_path, "json": json_path}
