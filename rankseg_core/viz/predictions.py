"""Side-by-side predictions: image, ground truth, and each model's errors.

Per image one row: the image, the ground truth in palette colours, then one error map per
model (correct pixels white, wrong ones in the colour of the class that was predicted, ignore
black) and a legend of the classes present in that row (GT and predicted) only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from rankseg_core.errors import UserError
from rankseg_core.evaluation.metrics import ConfusionMatrix
from rankseg_core.shards.codec import IGNORE
from rankseg_core.utils.plotting import plt, save_figure
from rankseg_core.viz.common import (
    CORRECT_RGB,
    IGNORE_RGB,
    SamplePrediction,
    VizRun,
    colorize,
    draw_panels,
    error_map,
    figure_palette,
    ids_by_area,
    legend_handles,
    open_split,
    predict_samples,
    run_class_names,
    run_palette,
    select_indices,
    write_csv,
    write_json,
)

ROW_HEIGHT = 2.6  # inches per image row
PANEL_WIDTH = 2.6
LEGEND_WIDTH = 3.4  # two columns of 24-character names (palette.short_name) at 7 pt
MAX_LEGEND = 16


def image_scores(pred: np.ndarray, label: np.ndarray, num_classes: int, ignore: int = IGNORE) -> dict[str, float]:
    """Per-image pixel accuracy and mIoU (over classes in the GT or the prediction), labelled
    pixels only; `error_pixels` counts wrong labelled pixels."""
    cm = ConfusionMatrix(num_classes, ignore)
    cm.update(pred, label.astype(np.int64))
    labelled = int(cm.matrix.sum())
    correct = int(np.trace(cm.matrix))
    return {"pixel_acc": cm.aacc(), "miou": cm.miou(), "error_pixels": labelled - correct,
            "labelled_pixels": labelled}


def figure_size(n_models: int, n_images: int) -> tuple[float, float]:
    """Figure size in inches of `plot_rows` (the PNG is this x 120 dpi, give or take margins)."""
    return PANEL_WIDTH * (2 + n_models) + LEGEND_WIDTH, ROW_HEIGHT * n_images + 0.4


def plot_rows(samples: Sequence[Sequence[SamplePrediction]], model_labels: Sequence[str], names: Sequence[str],
              palette: np.ndarray, out: str | Path) -> Path:
    """`draw_rows` written to `out`."""
    return save_figure(draw_rows(samples, model_labels, names, palette), out)


def draw_rows(samples: Sequence[Sequence[SamplePrediction]], model_labels: Sequence[str], names: Sequence[str],
              palette: np.ndarray) -> Figure:
    """samples[m][i]: model m's prediction of image i (all models on the same images).

    One row per image.
    """
    n_models, n_images = len(samples), len(samples[0])
    k = len(names)
    cols = 2 + n_models
    palette = figure_palette(palette, [s.label for s in samples[0]] + [s.pred for row in samples for s in row])
    fig = plt.figure(figsize=figure_size(n_models, n_images))
    grid = fig.add_gridspec(n_images, cols + 1, width_ratios=[1] * cols + [LEGEND_WIDTH / PANEL_WIDTH],
                            wspace=0.05, hspace=0.25)
    for i in range(n_images):
        first = samples[0][i]
        panels = [(first.image, first.key), (colorize(first.label, palette), "ground truth")]
        for m in range(n_models):
            s = samples[m][i]
            sc = image_scores(s.pred, s.label, k)
            panels.append((error_map(s.pred, s.label, palette),
                           f"{model_labels[m]}\nacc {100 * sc['pixel_acc']:.1f}%  mIoU {100 * sc['miou']:.1f}%"))
        draw_panels(fig, grid, i, panels)
        ids = ids_by_area([first.label] + [samples[m][i].pred for m in range(n_models)], k)
        ax = fig.add_subplot(grid[i, cols])
        ax.axis("off")
        ax.legend(handles=legend_handles(ids, names, palette, MAX_LEGEND,
                                         extra=[("correct", CORRECT_RGB), ("ignore", IGNORE_RGB)]),
                  loc="center left", fontsize=7, frameon=False, ncol=1 if len(ids) <= 10 else 2)
    return fig


def run_predictions(runs: Sequence[VizRun], data: str | Path, out: str | Path, *, split: str = "val",
                    keys: Sequence[str] | None = None, num: int = 6, per_figure: int = 6) -> dict:
    """Predict the chosen samples with every run; write predictions[_NN].png (at most
    `per_figure` rows each) and predictions.csv / .json (per image and model scores)."""
    if not runs:
        raise UserError("no runs given")
    if per_figure < 1:
        raise UserError(f"--per-figure {per_figure}: must be >= 1")
    ds = open_split(data, split, runs)
    ids = select_indices(ds, keys, num)
    names, palette = run_class_names(runs[0].cfg), run_palette(runs[0].cfg)
    preds = [predict_samples(r, ds, ids) for r in runs]
    labels = [r.label for r in runs]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    chunks = [range(a, min(a + per_figure, len(ids))) for a in range(0, len(ids), per_figure)]
    for c, chunk in enumerate(chunks):
        name = "predictions.png" if len(chunks) == 1 else f"predictions_{c + 1:02d}.png"
        figures.append(plot_rows([[p[i] for i in chunk] for p in preds], labels, names, palette, out / name).name)
    rows, records = [], []
    k = len(names)
    for m, run in enumerate(runs):
        for s in preds[m]:
            sc = image_scores(s.pred, s.label, k)
            predicted = ids_by_area([np.where(s.label == IGNORE, IGNORE, s.pred)], k)
            rows.append([s.key, str(run.path), labels[m], sc["pixel_acc"], sc["miou"], sc["error_pixels"],
                         sc["labelled_pixels"], len(s.classes), len(predicted)])
            records.append({"key": s.key, "run": str(run.path), "model": labels[m], **sc,
                            "gt_classes": [names[c] for c in s.classes],
                            "predicted_classes": [names[c] for c in predicted]})
    write_csv(out / "predictions.csv", ["key", "run", "model", "pixel_acc", "miou", "error_pixels",
                                        "labelled_pixels", "gt_classes", "predicted_classes"], rows)
    write_json(out / "predictions.json", {"figures": figures, "images": records})
    return {"figures": figures, "images": len(ids), "models": labels}
