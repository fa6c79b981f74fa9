"""Class-count statistics (the paper's Fig. 2): how many classes do images contain?

Reads only the stored per-sample class lists (`class_offsets` of each shard), never an image
or a label, so 100,000 samples take well under a second per dataset.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rankseg_core.errors import UserError
from rankseg_core.shards.read import ShardIndex


@dataclass
class ClassCDF:
    name: str
    path: str
    num_classes: int
    num_images: int
    cdf: list[float]  # cdf[n-1] = share of images with <= n classes, n = 1..max_classes
    share_below_25: float  # share of images with fewer than 25 classes

    def as_json(self) -> dict:
        return self.__dict__.copy()


def class_cdf(counts: np.ndarray, max_classes: int) -> np.ndarray:
    """Share of images with <= n classes for n = 1..max_classes, from per-image class counts."""
    if counts.size == 0:
        return np.zeros(max_classes)
    hist = np.bincount(np.minimum(counts, max_classes + 1), minlength=max_classes + 2)
    return np.cumsum(hist)[1:max_classes + 1] / counts.size


def dataset_class_cdf(root: str | Path, max_classes: int = 40, splits: list[str] | None = None) -> ClassCDF:
    """`ClassCDF` of a shard directory over the given splits (default: all)."""
    if max_classes < 1:
        raise UserError("--max-classes must be >= 1")
    idx = ShardIndex(root)
    counts = np.concatenate([idx.class_counts_only(s) for s in (splits or idx.splits)])
    cdf = class_cdf(counts, max_classes)
    below = float((counts < 25).mean()) if counts.size else 0.0
    return ClassCDF(idx.name, str(root), idx.num_classes, int(counts.size),
                    [float(x) for x in cdf], below)


def plot_class_cdf(results: list[ClassCDF], path: str | Path) -> None:
    """One curve per dataset (K in the legend), like Fig. 2 of the paper."""
    from rankseg_core.utils.plotting import plt, save_figure

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in results:
        n = np.arange(1, len(r.cdf) + 1)
        ax.plot(n, np.asarray(r.cdf) * 100, marker="o", ms=3, label=f"{r.name} (K={r.num_classes})")
    ax.set_xlabel("number of classes in an image (n)")
    ax.set_ylabel("images with <= n classes (%)")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("Classes per image (cumulative)")
    save_figure(fig, path)
