"""Which prototype each pixel took: the sub-class structure a ProtoSeg head learned (issue 20).

A `protoseg` / `rankproto` run (model/protoseg.py) scores every pixel embedding against M
prototypes per class and predicts the class of the best one. Per image one row:

    image | predicted classes (palette) | the prototype each pixel took | class legend

The third panel colours a pixel by the index m in [0, M) of the nearest prototype of its
predicted class (`prototype_assignment`), one distinct hue per m, with the predicted classes'
outlines drawn in black. Distinct hues rather than M shades of the class colour: at the default
M = 10 shades of one colour cannot be told apart, and shades of neighbouring classes collide;
the outlines keep classes apart, so equal hues in two classes (indices are per class, not
shared) are never read as one prototype.

Both panels come from one whole-image pass at the run's test size (no sliding window, scales or
flip: the assignment belongs to one forward). The assignment exists on the model's grid (the
patch grid, 1/16 of the test size, for Segmenter; the decoder's 1/8 for DeepLabv3, 1/4 for
UperNet); it is upsampled to the image by nearest neighbour, the padded grid
stretched over the image as the official inference stretches the logits (inference/dense.py),
so its class regions line up with the predicted-classes panel, whose logits are upsampled
bilinearly. Numbers go next to the figure: `<stem>.csv` (patches per image, class and
prototype) and `<stem>.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.collections import LineCollection
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from torch import Tensor

from rankseg_core.data.augment import TestTransform, build_test_transform
from rankseg_core.engine.predict import list_images, read_image
from rankseg_core.errors import UserError
from rankseg_core.families import family_of
from rankseg_core.inference.dense import compact_logits
from rankseg_core.model.protoseg import PROTOTYPE_HEADS, ProtoSegOutput, prototype_assignment
from rankseg_core.model.selection import Selection
from rankseg_core.utils.palette import short_name
from rankseg_core.utils.plotting import figure_format, plt, save_figure
from rankseg_core.viz.common import (
    VizRun,
    colorize,
    draw_panels,
    figure_palette,
    ids_by_area,
    legend_handles,
    rgb01,
    run_class_names,
    run_palette,
    write_csv,
    write_json,
)

PANEL_WIDTH = 2.6  # inches, as the other per-image figures
MAX_ASPECT = 1.4  # a portrait image's panels are at most this x PANEL_WIDTH tall
TITLE_HEIGHT = 0.42  # inches above a row: two lines of 7 pt panel titles
LEGEND_LINE = 0.16  # inches per legend line at 7 pt
LEGEND_WIDTH = 2.4  # one column of 'short name  100% · 10/10' (24-character names) at 7 pt
MAX_LEGEND = 12
MAX_IMAGES = 16  # rows in one figure: more is a poster nobody reads (and a huge PNG)
OUTLINE_PT = 0.9  # class outlines in the prototype panel: visible after downsampling a 2k photo
CHUNK_CHANNELS = 16  # class maps resized at once: 16 x 2200 x 1650 floats = 230 MB


@dataclass
class PrototypeImage:
    """One image and where its pixels went.

    image H x W x 3 uint8 RGB; pred H x W int64 predicted class ids (whole-image pass, logits
    upsampled bilinearly); grid_class / grid_proto h x w int64 on the model's (padded) grid: the
    predicted class and the index in [0, M) of its nearest prototype.
    """

    path: Path
    image: np.ndarray
    pred: np.ndarray
    grid_class: np.ndarray
    grid_proto: np.ndarray

    @property
    def size(self) -> tuple[int, int]:
        return int(self.image.shape[0]), int(self.image.shape[1])

    def prototype_map(self) -> np.ndarray:
        """H x W prototype index per pixel: the grid nearest-upsampled to the image."""
        return upsample_nearest(self.grid_proto, self.size)

    def class_map(self) -> np.ndarray:
        """H x W class per pixel as the prototype panel has it (the grid, nearest-upsampled)."""
        return upsample_nearest(self.grid_class, self.size)


# ---------------------------------------------------------------------------------------
# Checks before any work


def output_paths(out: str | Path) -> tuple[Path, Path, Path]:
    """(figure, <stem>.csv, <stem>.json); UserError for an extension that is no figure format."""
    out = Path(out)
    figure_format(out)
    return out, out.with_suffix(".csv"), out.with_suffix(".json")


def check_inputs(inputs: Sequence[str | Path], out: str | Path) -> list[Path]:
    """The image files to draw (directories expand as for `rankseg predict`); refuses too many
    images and an output (figure, CSV or JSON) that is one of the inputs."""
    targets = output_paths(out)
    files = list_images(inputs)
    if len(files) > MAX_IMAGES:
        raise UserError(f"{len(files)} images: one figure holds at most {MAX_IMAGES} rows; pass fewer images "
                        "(run the command once per group)")
    for target in targets:
        if not target.exists():
            continue
        for f in files:
            if f.exists() and target.samefile(f):
                raise UserError(f"--out {out}: {target} would overwrite the input {f}; choose another --out")
    return files


def prototype_count(run: VizRun) -> int:
    """M of a prototype run; UserError naming the run for any other head."""
    head = run.cfg.model.head
    if head not in PROTOTYPE_HEADS:
        raise UserError(f"{run.path}: its head {head!r} has no prototypes; `rankseg viz prototypes` draws runs "
                        f"trained with --head {' or '.join(PROTOTYPE_HEADS)}")
    return int(run.cfg.model.protoseg.prototypes)


# ---------------------------------------------------------------------------------------
# The model's side


def transform_of(run: VizRun) -> TestTransform:
    """The run's test resize and normalisation (as `rankseg eval` / `predict`)."""
    dc = family_of(run.cfg.model.model).data_config(run.model)
    return build_test_transform(run.cfg, dc["mean"], dc["std"])


def _resized_argmax(grid: Tensor, channels: Tensor, test_size: tuple[int, int], size: tuple[int, int],
                    best: Tensor | None = None, arg: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Max and argmax over `channels` of the C x h x w grid logits resized as the official
    whole-image pass (bilinear to the unpadded test size, then to the image), CHUNK_CHANNELS at
    a time; continues from (best, arg) of other channels. Ties go to the lowest channel, as one
    argmax over all channels would."""
    if best is None or arg is None:
        best = torch.full(size, -torch.inf, device=grid.device)
        arg = torch.full(size, len(grid), dtype=torch.long, device=grid.device)
    for part in channels.split(CHUNK_CHANNELS) if len(channels) else ():  # split() of nothing is one empty part
        logits = F.interpolate(grid[part][None], size=test_size, mode="bilinear", align_corners=False)
        top, idx = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)[0].max(0)
        idx = part[idx]
        better = (top > best) | ((top == best) & (idx < arg))
        best, arg = torch.where(better, top, best), torch.where(better, idx, arg)
    return best, arg


def predict_one_pass(out: ProtoSegOutput, num_classes: int, test_size: tuple[int, int],
                     size: tuple[int, int]) -> Tensor:
    """H x W class ids of one whole-image forward, as `rankseg predict` computes them (logits
    bilinearly resized to the unpadded test size, then to the image; argmax), in bounded memory
    and time: the dense path holds all C maps at the image size (K = 847 on a 2200 x 1650 photo:
    12 GB) and resizes each (46 s on one core).

    Exact, by elimination: the classes that are the top-1 of some grid cell ("seeds") are resized
    first; their pixel max is a lower bound on the winning logit. Each resized pixel is a convex
    combination of cells within 2 of the cell under its centre (each resize mixes two
    neighbours per axis, and a cell is at least a test pixel), so a class whose largest logit
    over that 5 x 5 window stays below the bound everywhere can win nowhere: it is never resized."""
    maps = compact_logits(out, num_classes)  # 1 x C x h x w over the forward's classes
    grid = maps.maps[0].float()
    gh, gw = grid.shape[-2:]
    seeds = grid.flatten(1).argmax(0).unique()
    best, arg = _resized_argmax(grid, seeds, test_size, size)
    # The cell under each pixel's centre, (y + 0.5) h / H in cells: the bilinear kernels sit
    # centred there, whatever the scale (the stretched nearest map is off by up to h / 2H cells).
    rows = (2 * torch.arange(size[0], device=grid.device) + 1) * gh // (2 * size[0])
    cols = (2 * torch.arange(size[1], device=grid.device) + 1) * gw // (2 * size[1])
    cell = (rows[:, None] * gw + cols[None, :]).flatten()
    floor = torch.full((gh * gw,), torch.inf, device=grid.device).scatter_reduce(0, cell, best.flatten(), "amin")
    reach = F.max_pool2d(grid[None], 5, 1, 2)[0].flatten(1)  # C x cells: the most a class reaches near a cell
    rest = (reach >= floor[None]).any(1)
    rest[seeds] = False
    _, arg = _resized_argmax(grid, rest.nonzero()[:, 0], test_size, size, best, arg)
    return maps.classes[arg]


@torch.no_grad()
def assign_image(run: VizRun, rgb: np.ndarray, path: Path, tf: TestTransform | None = None) -> PrototypeImage:
    """Predict one H x W x 3 uint8 image and find each patch's prototype (see the module doc)."""
    cfg, model = run.cfg, run.model
    tf = tf or transform_of(run)
    dev = next(model.parameters()).device  # load_viz_run put the model on the chosen device
    x = torch.from_numpy(tf(rgb))[None].to(dev)
    # As the whole-image pass (inference/dense.py): padded bottom / right to the patch size (a
    # model without `patch_size` pads its own inputs), the trained selection.
    patch = int(getattr(model, "patch_size", 1))
    h, w = x.shape[-2:]
    fixed = getattr(model, "fixed_size", None)  # a BEiT: its relative position bias is built for one grid
    if fixed is not None and max(h, w) > fixed:
        raise UserError(f"{run.path}: {cfg.model.model} takes inputs of at most {fixed}x{fixed} and predicts larger "
                        f"images by sliding windows, but {path} is {w}x{h} at the test size; `rankseg viz prototypes` "
                        "draws one whole-image pass: give an image whose test size fits, or a run of another model")
    out = model(F.pad(x, (0, -w % patch, 0, -h % patch)), Selection())
    if not isinstance(out, ProtoSegOutput):
        raise UserError(f"{run.path}: the model returned no prototype assignment (head {cfg.model.head!r}); "
                        "was config.yaml edited?")
    pred = predict_one_pass(out, cfg.model.num_classes, (int(h), int(w)), (int(rgb.shape[0]), int(rgb.shape[1])))
    cls, proto = prototype_assignment(out)
    return PrototypeImage(path, rgb, pred.cpu().numpy().astype(np.int64),
                          cls[0].cpu().numpy().astype(np.int64), proto[0].cpu().numpy().astype(np.int64))


# ---------------------------------------------------------------------------------------
# Drawing


def upsample_nearest(grid: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """h x w -> H x W, pixel (y, x) takes cell (floor(y h / H), floor(x w / W)): the grid
    stretched over the image (torch's `interpolate(mode="nearest")`, in exact integers)."""
    gh, gw = grid.shape
    rows = (np.arange(size[0]) * gh) // size[0]
    cols = (np.arange(size[1]) * gw) // size[1]
    return grid[rows[:, None], cols[None, :]]


def prototype_colours(m: int) -> np.ndarray:
    """M x 3 uint8 hues, one per prototype index: matplotlib's tab10 / tab20 (qualitative,
    colour-blind-aware ordering), a hue circle beyond 20."""
    if m <= 10:
        cols = plt.get_cmap("tab10").colors[:m]  # type: ignore[attr-defined]
    elif m <= 20:
        cols = plt.get_cmap("tab20").colors[:m]  # type: ignore[attr-defined]
    else:
        import colorsys

        cols = [colorsys.hsv_to_rgb(i / m, 0.75, 0.9 if i % 2 else 0.65) for i in range(m)]
    return np.round(np.asarray(cols, np.float64) * 255).astype(np.uint8)


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-D bool array."""
    edges = np.diff(np.concatenate([[0], flags.astype(np.int8), [0]]))
    return list(zip(np.nonzero(edges == 1)[0].tolist(), np.nonzero(edges == -1)[0].tolist()))


def outline_segments(class_map: np.ndarray) -> list[list[tuple[float, float]]]:
    """Line segments between pixels of different classes of an H x W map, in the coordinates
    `imshow` gives its pixels (pixel (y, x) spans x +- 0.5, y +- 0.5), one per straight run.

    Taken from the upsampled map rather than the grid: an image smaller than its grid leaves
    some cells no pixel, and an edge of such a cell must not be drawn."""
    segs: list[list[tuple[float, float]]] = []
    across = class_map[:, 1:] != class_map[:, :-1]  # between columns x and x + 1
    for x in np.nonzero(across.any(0))[0]:
        segs += [[(x + 0.5, y0 - 0.5), (x + 0.5, y1 - 0.5)] for y0, y1 in _runs(across[:, x])]
    down = class_map[1:] != class_map[:-1]  # between rows y and y + 1
    for y in np.nonzero(down.any(1))[0]:
        segs += [[(x0 - 0.5, y + 0.5), (x1 - 0.5, y + 0.5)] for x0, x1 in _runs(down[y])]
    return segs


def class_usage(item: PrototypeImage, num_classes: int, m: int) -> np.ndarray:
    """K x M patch counts: how many grid cells of each predicted class took each prototype."""
    counts = np.zeros(num_classes * m, np.int64)
    np.add.at(counts, item.grid_class.ravel() * m + item.grid_proto.ravel(), 1)
    return counts.reshape(num_classes, m)


def legend_lines(item: PrototypeImage, num_classes: int) -> int:
    """Lines of a row's class legend: its title, the classes shown, '... N more'."""
    n = len(ids_by_area([item.pred], num_classes))
    return 1 + min(n, MAX_LEGEND) + (n > MAX_LEGEND)


def panel_heights(items: Sequence[PrototypeImage], num_classes: int) -> list[float]:
    """Inches per row without its titles: the image panels at their aspect ratio (portrait ones
    capped), or the class legend where it is taller, so rows neither gape nor overlap."""
    return [max(PANEL_WIDTH * min(it.size[0] / it.size[1], MAX_ASPECT), LEGEND_LINE * legend_lines(it, num_classes))
            for it in items]


def figure_size(items: Sequence[PrototypeImage], num_classes: int) -> tuple[float, float]:
    """Figure size in inches of `draw_prototypes` without the key below it (the PNG is this x
    120 dpi, give or take margins, plus the key's ~0.4 in)."""
    return PANEL_WIDTH * 3 + LEGEND_WIDTH, sum(panel_heights(items, num_classes)) + TITLE_HEIGHT * (len(items) + 0.7)


def draw_prototypes(items: Sequence[PrototypeImage], names: Sequence[str], palette: np.ndarray, m: int,
                    title: str) -> Figure:
    """Rows of image | predicted classes | prototype index per pixel | class legend, and a key
    of the M prototype hues below."""
    k = len(names)
    palette = figure_palette(palette, [it.pred for it in items])
    hues = prototype_colours(m)
    heights = panel_heights(items, k)
    width, height = figure_size(items, k)
    fig = plt.figure(figsize=(width, height))
    # Each row's titles sit in the gap above it: one TITLE_HEIGHT per row (hspace is a fraction
    # of the mean panel height), one more at the top for the run's title.
    grid = fig.add_gridspec(len(items), 4, width_ratios=[1, 1, 1, LEGEND_WIDTH / PANEL_WIDTH], height_ratios=heights,
                            wspace=0.05, hspace=TITLE_HEIGHT / float(np.mean(heights)), left=0.0, right=1.0,
                            bottom=0.0, top=1.0 - 1.7 * TITLE_HEIGHT / height)
    for r, it in enumerate(items):
        (hh, ww), (gh, gw) = it.size, it.grid_proto.shape
        draw_panels(fig, grid, r, [
            (it.image, f"{it.path.name}  {ww}x{hh}"),
            (colorize(it.pred, palette), "predicted classes"),
            (hues[it.prototype_map()], f"prototype m of the predicted class\n(grid {gw}x{gh}, nearest-upsampled)"),
        ])
        fig.axes[-1].add_collection(LineCollection(outline_segments(it.class_map()), colors="black",  # panel 3
                                                   linewidths=OUTLINE_PT, capstyle="projecting"), autolim=False)
        ids = ids_by_area([it.pred], k)
        usage = class_usage(it, k, m)
        area = np.bincount(it.pred.ravel(), minlength=k) / it.pred.size
        texts = list(names)
        for c in ids[:MAX_LEGEND]:
            share = f"{100 * area[c]:.0f}%" if area[c] >= 0.005 else "<1%"
            texts[c] = f"{short_name(names[c])}  {share} · {int((usage[c] > 0).sum())}/{m}"
        ax = fig.add_subplot(grid[r, 3])
        ax.axis("off")
        ax.legend(handles=legend_handles(ids, texts, palette, MAX_LEGEND, shorten=False), loc="center left",
                  fontsize=7, frameon=False, title="class  area · prototypes used", title_fontsize=7,
                  alignment="left", borderaxespad=0.2)
    key = [Patch(facecolor=rgb01(hues[i]), edgecolor="0.4", linewidth=0.5, label=f"m={i}") for i in range(m)]
    fig.suptitle(title, fontsize=8, y=1.0 - 0.3 * TITLE_HEIGHT / height, va="center")
    fig.legend(handles=key, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(m, 10), fontsize=7,
               frameon=False, handlelength=1.2, columnspacing=1.0,
               title="prototype index m within the pixel's predicted class (indices are per class); "
                     "black lines: predicted-class outlines on the model's grid", title_fontsize=7)
    return fig


def run_title(run: VizRun) -> str:
    m = run.cfg.model
    ranked = f", top-κ={m.effective_kappa}" if m.head == "rankproto" and m.select else ""
    return f"{run.path.name}: {m.head} M={m.protoseg.prototypes}{ranked}, K={m.num_classes}"


# ---------------------------------------------------------------------------------------
# The command


def run_prototypes(run: VizRun, files: Sequence[Path], out: str | Path) -> dict:
    """Draw `files` (from `check_inputs`) with a prototype run: the figure `out` and its
    `<stem>.csv` (one row per image, class and prototype with patches > 0) and `<stem>.json`."""
    m = prototype_count(run)
    fig_path, csv_path, json_path = output_paths(out)
    names, palette, k = run_class_names(run.cfg), run_palette(run.cfg), run.num_classes
    tf = transform_of(run)
    items = [assign_image(run, read_image(f), f, tf) for f in files]
    rows, records, used = [], [], []
    for it in items:
        usage = class_usage(it, k, m)
        area = np.bincount(it.pred.ravel(), minlength=k) / it.pred.size
        classes = []
        for c in ids_by_area([it.pred, it.class_map()], k):
            for p in np.nonzero(usage[c])[0]:
                rows.append([str(it.path), int(c), names[c], int(p), int(usage[c, p]), float(area[c])])
            if usage[c].any():  # a class only the bilinear prediction has holds no patch
                used.append(int((usage[c] > 0).sum()))
            classes.append({"id": int(c), "name": names[c], "pixel_share": float(area[c]),
                            "patches": int(usage[c].sum()), "prototype_patches": usage[c].tolist()})
        records.append({"image": str(it.path), "height": it.size[0], "width": it.size[1],
                        "grid": list(it.grid_proto.shape), "classes": classes})
    save_figure(draw_prototypes(items, names, palette, m, run_title(run)), fig_path)
    write_csv(csv_path, ["image", "class_id", "class", "prototype", "patches", "pixel_share"], rows)
    write_json(json_path, {"run": str(run.path), "head": run.cfg.model.head, "prototypes": m,
                           "protocol": "whole image, test size, one pass", "images": records})
    return {"figure": fig_path, "csv": csv_path, "json": json_path, "images": len(items), "prototypes": m,
            "classes": len(used), "mean_used": float(np.mean(used)) if used else 0.0}
