"""Dataset browser: images with their label overlays and class names, to check a conversion.

Per sample one row: the image, the label blended over it in palette colours, and the names of
the classes present with their share of the labelled pixels. The CSV next to the figure also
says whether the class list stored in the shard index matches the decoded label (a
converter bug shows up there as `index_ok = 0`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from matplotlib.figure import Figure

from rankseg_core.errors import UserError
from rankseg_core.shards.codec import IGNORE
from rankseg_core.shards.read import ShardDataset
from rankseg_core.utils.palette import short_name
from rankseg_core.utils.plotting import plt, save_figure
from rankseg_core.viz.common import (
    colorize,
    dataset_palette,
    draw_panels,
    figure_palette,
    legend_handles,
    overlay,
    select_indices,
    write_csv,
    write_json,
)

ROW_HEIGHT = 2.6
PANEL_WIDTH = 2.6
LEGEND_WIDTH = 3.8  # two columns of 'short name (12%)' at 7 pt
MAX_LEGEND = 16


def label_summary(label: np.ndarray, num_classes: int, ignore: int = IGNORE) -> tuple[np.ndarray, np.ndarray, float]:
    """(class ids by area, their share of labelled pixels, ignore share of all pixels)."""
    v = label.ravel().astype(np.int64)
    labelled = v[(v != ignore) & (v < num_classes)]
    counts = np.bincount(labelled, minlength=num_classes)
    ids = np.nonzero(counts)[0]
    ids = ids[np.argsort(-counts[ids], kind="stable")]
    share = counts[ids] / max(len(labelled), 1)
    return ids, share, float(1 - len(labelled) / max(v.size, 1))


def figure_size(n_images: int, show_label: bool = True) -> tuple[float, float]:
    """Figure size in inches of `plot_samples` (the PNG is this x 120 dpi, give or take margins)."""
    return PANEL_WIDTH * (3 if show_label else 2) + LEGEND_WIDTH, ROW_HEIGHT * n_images + 0.3


def plot_samples(items: Sequence[dict], names: Sequence[str], palette: np.ndarray, out: str | Path,
                 show_label: bool = True) -> Path:
    """`draw_samples` written to `out`."""
    return save_figure(draw_samples(items, names, palette, show_label), out)


def draw_samples(items: Sequence[dict], names: Sequence[str], palette: np.ndarray, show_label: bool = True) -> Figure:
    """items: ShardDataset.load() dicts. Rows of image | overlay | [label] | class legend."""
    k = len(names)
    palette = figure_palette(palette, [item["label"] for item in items])
    cols = 3 if show_label else 2
    n = len(items)
    fig = plt.figure(figsize=figure_size(n, show_label))
    grid = fig.add_gridspec(n, cols + 1, width_ratios=[1] * cols + [LEGEND_WIDTH / PANEL_WIDTH],
                            wspace=0.05, hspace=0.25)
    for i, item in enumerate(items):
        img, lab = item["image"], item["label"]
        h, w = lab.shape
        panels = [(img, f"{item['key']}  {w}x{h}"), (overlay(img, lab, palette), "label overlay")]
        if show_label:
            panels.append((colorize(lab, palette), "label (ignore black)"))
        draw_panels(fig, grid, i, panels)
        ids, share, _ = label_summary(lab, k)
        handles = legend_handles(ids, _named(ids, share, names), palette, MAX_LEGEND, shorten=False)
        ax = fig.add_subplot(grid[i, cols])
        ax.axis("off")
        ax.legend(handles=handles, loc="center left", fontsize=7, frameon=False, ncol=1 if len(ids) <= 10 else 2,
                  title=f"{len(ids)} classes", title_fontsize=7)
    return fig


def _named(ids: np.ndarray, share: np.ndarray, names: Sequence[str]) -> list[str]:
    """Legend texts indexed by class id: 'short name (12%)' for present classes."""
    texts = list(names)
    for c, s in zip(ids, share):
        texts[c] = f"{short_name(names[c])} ({100 * s:.0f}%)"
    return texts


def run_samples(data: str | Path, out: str | Path, *, split: str | None = None, keys: Sequence[str] | None = None,
                num: int = 8, per_figure: int = 8) -> dict:
    """Write samples[_NN].png and samples.csv / .json for the chosen samples of a shard split."""
    from rankseg_core.shards.read import ShardIndex

    index = ShardIndex(data)
    split = split or ("val" if "val" in index.splits else index.splits[0])
    if per_figure < 1:
        raise UserError(f"--per-figure {per_figure}: must be >= 1")
    ds = ShardDataset(data, split)
    ids = select_indices(ds, keys, num)
    names, palette = ds.index.class_names, dataset_palette(ds)
    k = ds.num_classes
    items = [ds.load(i) for i in ids]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = []
    chunks = [items[a:a + per_figure] for a in range(0, len(items), per_figure)]
    for c, chunk in enumerate(chunks):
        name = "samples.png" if len(chunks) == 1 else f"samples_{c + 1:02d}.png"
        figures.append(plot_samples(chunk, names, palette, out / name).name)
    rows, records = [], []
    for item in items:
        lab = item["label"]
        ids_, share, ign = label_summary(lab, k)
        index_ok = sorted(ids_.tolist()) == sorted(np.asarray(item["classes"]).tolist())
        rows.append([item["key"], lab.shape[0], lab.shape[1], len(ids_), ign, int(index_ok),
                     ";".join(names[c] for c in ids_)])
        records.append({"key": item["key"], "height": lab.shape[0], "width": lab.shape[1], "ignore_share": ign,
                        "index_ok": index_ok,
                        "classes": [{"id": int(c), "name": names[c], "share": float(s)} for c, s in zip(ids_, share)]})
    write_csv(out / "samples.csv", ["key", "height", "width", "num_classes", "ignore_share", "index_ok", "classes"],
              rows)
    write_json(out / "samples.json", {"dataset": index.name, "split": split, "figures": figures, "samples": records})
    return {"figures": figures, "split": split, "samples": len(items),
            "index_mismatches": [r["key"] for r in records if not r["index_ok"]]}
