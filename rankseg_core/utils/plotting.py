"""Matplotlib set-up shared by every figure: headless backend, format from the file name,
atomic writes."""

from __future__ import annotations

import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402

from rankseg_core.errors import UserError  # noqa: E402
from rankseg_core.utils.fsio import atomic_write_bytes  # noqa: E402

__all__ = ["FIGURE_FORMATS", "figure_format", "plt", "save_figure"]

# Raster for quick looks, vector for papers; matplotlib writes all three without extra packages.
FIGURE_FORMATS = ("png", "pdf", "svg")


def figure_format(path: str | Path) -> str:
    """The format a figure at `path` is written in, from its extension (case-insensitive).

    Raises UserError for any other extension, so that a command can check its `--plot` /
    `--out` before doing any work.
    """
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in FIGURE_FORMATS:
        supported = ", ".join(f".{f}" for f in FIGURE_FORMATS)
        raise UserError(f"{path}: unknown figure format {Path(path).suffix or '(no extension)'}; "
                        f"use one of {supported}")
    return fmt


def save_figure(fig, path: str | Path, dpi: int = 120) -> Path:
    """Save `fig` in the format its extension names (.png, .pdf, .svg), atomically, and close it.

    `dpi` sets the resolution of PNGs (and of images embedded in PDF / SVG).
    """
    path = Path(path)
    try:
        fmt = figure_format(path)
        buf = io.BytesIO()
        fig.savefig(buf, dpi=dpi, bbox_inches="tight", format=fmt)
    finally:
        plt.close(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue())
    return path
