"""False positives of the multi-label ranking and of the final prediction (paper Fig. 5 / 6).

Definitions (per image, then counted over the images):
- a class is a **top-kappa false positive** when it is among the kappa classes with the
  highest existence probability (sigmoid of the ml logits) but absent from the ground truth;
- a class is a **prediction false positive** when the model predicts it on at least
  `min_pixels` labelled pixels (ignore pixels do not count, as in the metrics) but it is absent
  from the ground truth;
- with a baseline run, a baseline prediction false positive is **removed** when RankSeg does
  not predict that class on that image, and RankSeg **adds** one when the reverse holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence, cast

import numpy as np
from matplotlib.figure import Figure

from rankseg_core.errors import UserError
from rankseg_core.families import family_of
from rankseg_core.shards.codec import IGNORE
from rankseg_core.utils.palette import short_name
from rankseg_core.utils.plotting import plt, save_figure
from rankseg_core.viz.common import (
    FP_RED,
    SamplePrediction,
    VizRun,
    colorize,
    figure_palette,
    ids_by_area,
    legend_handles,
    open_split,
    predict_samples,
    rgb01,
    run_class_names,
    run_palette,
    safe_name,
    select_indices,
    variant_name,
    write_csv,
    write_json,
)

TOP_BARS = 20  # classes per image in the bar chart
TOP_CHART = 15  # classes per panel in the dataset-level chart
IMAGE_FIGSIZE = (13.5, 5.2)  # inches, per-image figure
SUMMARY_PANEL = (5.2, 6.0)  # inches per panel of the dataset-level chart


# ---------------------------------------------------------------------------------------
# Numbers


def gt_presence(classes: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
    """Per-image GT class id lists -> N x K bool."""
    out = np.zeros((len(classes), num_classes), bool)
    for i, c in enumerate(classes):
        c = np.asarray(c, np.int64)
        out[i, c[(c >= 0) & (c < num_classes)]] = True
    return out


def pred_pixels(preds: Sequence[np.ndarray], labels: Sequence[np.ndarray], num_classes: int,
                ignore: int = IGNORE) -> np.ndarray:
    """Pixels predicted as each class on labelled pixels: N x K int64 (preds/labels H x W each)."""
    out = np.zeros((len(preds), num_classes), np.int64)
    for i, (p, lab) in enumerate(zip(preds, labels)):
        v = p[lab != ignore].astype(np.int64)
        out[i] = np.bincount(v[(v >= 0) & (v < num_classes)], minlength=num_classes)
    return out


def topk_mask(probs: np.ndarray, kappa: int) -> np.ndarray:
    """N x K scores -> N x K bool marking each row's kappa highest (ties by lower class id)."""
    n, k = probs.shape
    kappa = max(1, min(kappa, k))
    top = np.argsort(-probs, axis=1, kind="stable")[:, :kappa]
    out = np.zeros((n, k), bool)
    np.put_along_axis(out, top, True, axis=1)
    return out


@dataclass
class FPStats:
    """Per-class false-positive counts over N images (each K long, counts of images)."""

    num_images: int
    kappa: int
    gt_images: np.ndarray  # images containing the class
    topk_fp: np.ndarray  # images with the class in the top-kappa but not in GT
    pred_fp: np.ndarray  # images where the class is predicted but not in GT
    pred_fp_pixels: np.ndarray  # labelled pixels predicted as the class on those images
    topk_missed: np.ndarray  # images with the class in GT but outside the top-kappa
    baseline_fp: np.ndarray | None = None  # images where the baseline predicts it but not in GT
    removed: np.ndarray | None = None  # baseline FP that the run does not predict
    added: np.ndarray | None = None  # run FP that the baseline does not predict
    per_image: dict = field(default_factory=dict)  # totals per image (lists of N)

    def totals(self) -> dict[str, float]:
        n = max(self.num_images, 1)
        out = {"images": self.num_images, "kappa": self.kappa,
               "topk_fp_per_image": float(self.topk_fp.sum() / n),
               "pred_fp_per_image": float(self.pred_fp.sum() / n),
               "topk_missed_per_image": float(self.topk_missed.sum() / n),
               "gt_classes_per_image": float(self.gt_images.sum() / n)}
        if self.baseline_fp is not None:
            # removed / added are set together with baseline_fp (false_positive_stats).
            removed, added = cast(np.ndarray, self.removed), cast(np.ndarray, self.added)
            out.update({"baseline_pred_fp_per_image": float(self.baseline_fp.sum() / n),
                        "removed_per_image": float(removed.sum() / n),
                        "added_per_image": float(added.sum() / n)})
        return out


def false_positive_stats(gt: np.ndarray, probs: np.ndarray | None, pixels: np.ndarray, kappa: int,
                         baseline_pixels: np.ndarray | None = None, min_pixels: int = 1) -> FPStats:
    """Count false positives.

    gt: N x K bool GT presence; probs: N x K existence probabilities (None: no top-kappa
    counts); pixels / baseline_pixels: N x K predicted labelled pixels per class
    (`pred_pixels`). A class is "predicted" on an image with >= min_pixels pixels.
    """
    n, k = gt.shape
    pred = pixels >= min_pixels
    pred_fp = pred & ~gt
    if probs is not None:
        top = topk_mask(probs, kappa)
        topk_fp, missed = top & ~gt, gt & ~top
    else:
        topk_fp = missed = np.zeros((n, k), bool)
    stats = FPStats(n, kappa, gt.sum(0), topk_fp.sum(0), pred_fp.sum(0),
                    np.where(pred_fp, pixels, 0).sum(0), missed.sum(0))
    stats.per_image = {"gt": gt.sum(1).tolist(), "topk_fp": topk_fp.sum(1).tolist(),
                       "pred_fp": pred_fp.sum(1).tolist(), "topk_missed": missed.sum(1).tolist()}
    if baseline_pixels is not None:
        base_fp = (baseline_pixels >= min_pixels) & ~gt
        removed, added = base_fp & ~pred, pred_fp & ~(baseline_pixels >= min_pixels)
        stats.baseline_fp, stats.removed, stats.added = base_fp.sum(0), removed.sum(0), added.sum(0)
        stats.per_image.update({"baseline_fp": base_fp.sum(1).tolist(), "removed": removed.sum(1).tolist(),
                                "added": added.sum(1).tolist()})
    return stats


TABLE_HEADER = ["id", "name", "gt_images", "topk_fp", "pred_fp", "pred_fp_pixels", "topk_missed"]


def fp_table(stats: FPStats, names: Sequence[str]) -> tuple[list[str], list[list]]:
    """(header, rows) of classes with any false positive (or any baseline one), most frequent
    first: by prediction FP, then top-kappa FP, then id."""
    header = list(TABLE_HEADER)
    cols = [stats.gt_images, stats.topk_fp, stats.pred_fp, stats.pred_fp_pixels, stats.topk_missed]
    any_fp = (stats.topk_fp > 0) | (stats.pred_fp > 0)
    if stats.baseline_fp is not None:
        header += ["baseline_pred_fp", "removed", "added"]
        # removed / added are set together with baseline_fp (false_positive_stats).
        cols += [stats.baseline_fp, cast(np.ndarray, stats.removed), cast(np.ndarray, stats.added)]
        any_fp |= stats.baseline_fp > 0
    ids = np.nonzero(any_fp)[0]
    order = np.lexsort((ids, -stats.topk_fp[ids], -stats.pred_fp[ids]))
    rows = [[int(i), names[i], *[int(c[i]) for c in cols]] for i in ids[order]]
    return header, rows


def top_classes(probs: np.ndarray, gt: np.ndarray, n: int = TOP_BARS) -> list[tuple[int, float, bool]]:
    """One image's n most probable classes: (class id, probability, in GT), highest first."""
    order = np.argsort(-probs, kind="stable")[:n]
    return [(int(c), float(probs[c]), bool(gt[c])) for c in order]


# ---------------------------------------------------------------------------------------
# Figures


def plot_image(sample: SamplePrediction, gt_row: np.ndarray, pred_row: np.ndarray, kappa: int,
               names: Sequence[str], palette: np.ndarray, out: Path, title: str,
               baseline_row: np.ndarray | None = None) -> Path:
    """`draw_image` written to `out`."""
    return save_figure(draw_image(sample, gt_row, pred_row, kappa, names, palette, title, baseline_row), out)


def draw_image(sample: SamplePrediction, gt_row: np.ndarray, pred_row: np.ndarray, kappa: int,
               names: Sequence[str], palette: np.ndarray, title: str,
               baseline_row: np.ndarray | None = None) -> Figure:
    """Image | ground truth | the top-20 classes by existence probability as bars.

    Names of GT classes are black, false positives red; a dashed line marks the top-kappa cut;
    'pred' / 'base' after a bar mean the run / the baseline predicts that class on the image.
    """
    probs = sample.probs
    assert probs is not None
    top = top_classes(probs, gt_row)
    gt_ids = ids_by_area([sample.label], len(names))
    palette = figure_palette(palette, [sample.label], first=[c for c, _, _ in top])
    fig = plt.figure(figsize=IMAGE_FIGSIZE)
    # Row 2 holds the GT legend under both image panels; the empty third column leaves room
    # for the (shortened) class names of the bar chart.
    grid = fig.add_gridspec(2, 4, width_ratios=[1, 1, 0.62, 1.6], height_ratios=[1, 0.42], wspace=0.06,
                            hspace=0.08)
    ax_img, ax_gt = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    ax_bar, ax_leg = fig.add_subplot(grid[:, 3]), fig.add_subplot(grid[1, :2])
    ax_img.imshow(sample.image)
    ax_img.set_title(sample.key, fontsize=9)
    ax_gt.imshow(colorize(sample.label, palette))
    ax_gt.set_title("ground truth", fontsize=9)
    ax_leg.axis("off")
    ax_leg.legend(handles=legend_handles(gt_ids, names, palette, max_items=12), loc="upper left",
                  fontsize=7, ncol=3, frameon=False, title="GT classes", title_fontsize=7, alignment="left")
    for ax in (ax_img, ax_gt):
        ax.set_xticks([])
        ax.set_yticks([])

    y = np.arange(len(top))
    ax_bar.barh(y, [p for _, p, _ in top], color=[rgb01(palette[c]) for c, _, _ in top], edgecolor="0.3", lw=0.5)
    ax_bar.set_yticks(y)
    ax_bar.set_yticklabels([short_name(names[c]) for c, _, _ in top], fontsize=8)
    for tick, (_, _, tp) in zip(ax_bar.get_yticklabels(), top):
        tick.set_color("black" if tp else FP_RED)
    ax_bar.invert_yaxis()
    ax_bar.set_xlim(0, 1.18)
    ax_bar.set_xlabel("existence probability (sigmoid of ml logit)")
    for yi, (c, p, _) in zip(y, top):
        tags = [t for t, row in (("pred", pred_row), ("base", baseline_row)) if row is not None and row[c]]
        if tags:
            ax_bar.text(min(p, 1.0) + 0.01, float(yi), " ".join(tags), va="center", fontsize=7, color="0.25")
    if kappa < len(top):
        ax_bar.axhline(kappa - 0.5, color="0.3", ls="--", lw=1)
        ax_bar.text(1.17, kappa - 0.6, f"top-κ={kappa}", ha="right", va="bottom", fontsize=7, color="0.3")
    n_gt = int(gt_row.sum())
    in_top = int((topk_mask(probs[None], kappa)[0] & gt_row).sum())
    fp20 = sum(1 for _, _, tp in top if not tp)
    ax_bar.set_title(f"{title}\nGT classes in top-κ: {in_top}/{n_gt}   false positives in top-{len(top)}: {fp20}",
                     fontsize=9)
    return fig


def _panel(ax, ids: np.ndarray, values: np.ndarray, names: Sequence[str], palette: np.ndarray, title: str,
           stacked: np.ndarray | None = None, stacked_label: str = "") -> None:
    y = np.arange(len(ids))
    colours = [rgb01(palette[c]) for c in ids]
    ax.barh(y, values[ids], color=colours, edgecolor="0.3", lw=0.5, label="kept")
    if stacked is not None:
        ax.barh(y, stacked[ids], left=values[ids], color=colours, edgecolor="0.3", lw=0.5, hatch="///",
                alpha=0.45, label=stacked_label)
    ax.set_yticks(y)
    ax.set_yticklabels([short_name(names[c]) for c in ids], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("images")
    ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    if len(ids) == 0:
        ax.text(0.5, 0.5, "none", ha="center", va="center", transform=ax.transAxes)


def _top_ids(values: np.ndarray, n: int = TOP_CHART) -> np.ndarray:
    ids = np.nonzero(values)[0]
    return ids[np.lexsort((ids, -values[ids]))][:n]


def plot_summary(stats: FPStats, names: Sequence[str], palette: np.ndarray, out: Path, run_label: str,
                 baseline_label: str | None = None) -> Path:
    """`draw_summary` written to `out`."""
    return save_figure(draw_summary(stats, names, palette, run_label, baseline_label), out)


def draw_summary(stats: FPStats, names: Sequence[str], palette: np.ndarray, run_label: str,
                 baseline_label: str | None = None) -> Figure:
    """Most frequent false-positive classes: in the top-kappa, in the prediction, and (with a
    baseline) the baseline's prediction FPs split into removed by the run (hatched) / kept."""
    t = stats.totals()
    shown = [_top_ids(stats.topk_fp), _top_ids(stats.pred_fp)]
    if stats.baseline_fp is not None:
        shown.append(_top_ids(stats.baseline_fp))
    palette = figure_palette(palette, first=np.concatenate(shown))
    panels = 3 if stats.baseline_fp is not None else 2
    fig, axes = plt.subplots(1, panels, figsize=(SUMMARY_PANEL[0] * panels, SUMMARY_PANEL[1]))
    _panel(axes[0], _top_ids(stats.topk_fp), stats.topk_fp, names, palette,
           f"in the top-κ={stats.kappa} (not in GT)\n{t['topk_fp_per_image']:.2f} per image")
    _panel(axes[1], _top_ids(stats.pred_fp), stats.pred_fp, names, palette,
           f"in the final prediction (not in GT)\n{t['pred_fp_per_image']:.2f} per image")
    if stats.baseline_fp is not None:
        kept = stats.baseline_fp - stats.removed
        _panel(axes[2], _top_ids(stats.baseline_fp), kept, names, palette,
               f"{baseline_label}: prediction FPs\n{t['baseline_pred_fp_per_image']:.2f} per image, "
               f"{t['removed_per_image']:.2f} removed / {t['added_per_image']:.2f} added by the run",
               stacked=stats.removed, stacked_label="removed by the run")
        from matplotlib.patches import Patch

        axes[2].legend(handles=[Patch(facecolor="0.55", edgecolor="0.3", label="kept (still predicted by the run)"),
                                Patch(facecolor="0.85", edgecolor="0.3", hatch="///", label="removed by the run")],
                       fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2, frameon=False)
    fig.suptitle(f"Most frequent false-positive classes: {run_label}, {stats.num_images} images", fontsize=10)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------
# The command


def run_false_positives(run: VizRun, data: str | Path, out: str | Path, *, split: str = "val",
                        keys: Sequence[str] | None = None, num: int = 8, stats_num: int = 100,
                        baseline: VizRun | None = None, kappa: int | None = None, min_pixels: int = 1) -> dict:
    """Per-image figures for `keys` / the first `num` samples, and the dataset-level chart and
    table over the first `stats_num` samples (0 = the whole split) plus the figure samples.

    Writes into `out`: fp_<key>.png, fp_per_image.json, fp_summary.png, fp_table.csv,
    fp_summary.json. Returns the summary dict.
    """
    family = family_of(run.cfg.model.model)
    if not (family.segments and family.ranks(run.cfg.model)):
        raise UserError(f"{run.path} is a {variant_name(run.cfg)} run ({family.describe(run.cfg.model)}) without a "
                        "class ranking to find false positives in: pass a RankSeg run (and this one as --baseline)")
    ds = open_split(data, split, [run] + ([baseline] if baseline else []))
    fig_ids = select_indices(ds, keys, num)
    n_stats = len(ds) if stats_num <= 0 else min(stats_num, len(ds))
    ids = list(dict.fromkeys(list(range(n_stats)) + fig_ids))  # figure samples always counted
    kappa = kappa or run.cfg.model.effective_kappa
    if kappa < 1:
        raise UserError(f"--kappa {kappa}: must be >= 1")
    k = run.num_classes
    names, palette = run_class_names(run.cfg), run_palette(run.cfg)

    samples = predict_samples(run, ds, ids, kappa=kappa if kappa != run.cfg.model.effective_kappa else None)
    gt = gt_presence([s.classes for s in samples], k)
    # The run has an ml branch (checked above): every sample has probabilities.
    probs = np.stack([cast(np.ndarray, s.probs) for s in samples])
    pixels = pred_pixels([s.pred for s in samples], [s.label for s in samples], k)
    base_pixels = None
    if baseline is not None:
        base = predict_samples(baseline, ds, ids)
        base_pixels = pred_pixels([s.pred for s in base], [s.label for s in base], k)
    stats = false_positive_stats(gt, probs, pixels, kappa, base_pixels, min_pixels)

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pos = {i: j for j, i in enumerate(ids)}
    per_image = []
    for i in fig_ids:
        j = pos[i]
        s = samples[j]
        s_probs = cast(np.ndarray, s.probs)  # the run ranks its classes (checked above)
        pred_row = pixels[j] >= min_pixels
        base_row = base_pixels[j] >= min_pixels if base_pixels is not None else None
        png = plot_image(s, gt[j], pred_row, kappa, names, palette, out / f"fp_{safe_name(s.key)}.png",
                         run.label, base_row)
        rec = {"key": s.key, "figure": png.name, "gt": [names[c] for c in np.nonzero(gt[j])[0]],
               "top": [{"id": c, "name": names[c], "probability": p, "in_gt": tp, "predicted": bool(pred_row[c])}
                       for c, p, tp in top_classes(s_probs, gt[j])],
               "topk_fp": [names[c] for c in np.nonzero(topk_mask(s_probs[None], kappa)[0] & ~gt[j])[0]],
               "pred_fp": [names[c] for c in np.nonzero(pred_row & ~gt[j])[0]]}
        if base_row is not None:
            rec["baseline_pred_fp"] = [names[c] for c in np.nonzero(base_row & ~gt[j])[0]]
            rec["removed"] = [names[c] for c in np.nonzero(base_row & ~gt[j] & ~pred_row)[0]]
            rec["added"] = [names[c] for c in np.nonzero(pred_row & ~gt[j] & ~base_row)[0]]
        per_image.append(rec)
    write_json(out / "fp_per_image.json", per_image)
    header, rows = fp_table(stats, names)
    write_csv(out / "fp_table.csv", header, rows)
    plot_summary(stats, names, palette, out / "fp_summary.png", run.label, baseline.label if baseline else None)
    summary = {"run": str(run.path), "baseline": str(baseline.path) if baseline else None, "split": split,
               "min_pixels": min_pixels, **stats.totals(),
               "most_frequent": {"topk": [names[c] for c in _top_ids(stats.topk_fp)],
                                 "prediction": [names[c] for c in _top_ids(stats.pred_fp)]}}
    write_json(out / "fp_summary.json", summary)
    return summary
