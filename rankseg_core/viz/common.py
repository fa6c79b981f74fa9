"""Shared pieces of the `rankseg viz` figures: runs and samples, prediction, colours, legends.

Colour conventions used by every figure:
- class colours come from the dataset palette (`dataset.json`, copied into the run's
  config), so a class has the same colour across figures and `rankseg predict` overlays,
  except where two classes shown in one figure would look alike: then the less prominent one
  takes a distinct colour for that figure (`figure_palette`);
- class names are shortened to their leading synonyms (`short_name`) in legends and ticks;
- ground-truth ignore pixels are black;
- in error maps, correctly predicted pixels are white and wrong ones take the colour of the
  class that was (wrongly) predicted;
- legends list only the classes that appear in the panel they explain.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence, cast

import numpy as np
import torch

from rankseg_core.config.train import TrainConfig
from rankseg_core.errors import UserError
from rankseg_core.shards.codec import IGNORE
from rankseg_core.shards.read import ShardDataset
from rankseg_core.utils.fsio import atomic_write_bytes, atomic_write_json
from rankseg_core.utils.palette import distinct_palette, make_palette, short_name

IGNORE_RGB = (0, 0, 0)
CORRECT_RGB = (255, 255, 255)
FP_RED = "#d62728"


# ---------------------------------------------------------------------------------------
# Runs, data, keys


@dataclass
class VizRun:
    """A loaded run: model in eval mode, its config, and a short label for figures."""

    path: Path
    model: torch.nn.Module
    cfg: TrainConfig

    @property
    def num_classes(self) -> int:
        return self.cfg.model.num_classes

    @property
    def label(self) -> str:
        return f"{self.path.name} ({variant_name(self.cfg)})"


def variant_name(cfg: TrainConfig) -> str:
    """The paper's name of a run's variant: baseline, +MT, +MT+LS, RankSeg, oracle."""
    from rankseg_core.families import family_of

    m = cfg.model
    if not family_of(m.model).segments:
        return f"multi-label classifier κ={m.effective_kappa}"
    if m.oracle:
        return "GT oracle"
    if m.head == "segmenter":
        return "baseline"
    if not m.select:
        return "+MT"
    kappa = m.effective_kappa
    k = "K" if kappa >= m.num_classes else str(kappa)
    return f"+MT+LS κ={k}" if m.tau == "shared" else f"RankSeg κ={k}"


def load_viz_run(run_dir: str | Path, device: str | torch.device = "cpu", weights: str = "auto") -> VizRun:
    """`runs.load_run` with a one-line error for a path that is not a run directory."""
    from rankseg_core.engine.runs import load_run

    path = Path(run_dir)
    if not path.is_dir():
        raise UserError(f"{path}: no such run directory (a `rankseg train --out DIR` output)")
    model, cfg = load_run(path, device, weights)
    return VizRun(path, model, cfg)


def open_split(data: str | Path, split: str, runs: Sequence[VizRun] = ()) -> ShardDataset:
    """The split of a shard directory; UserError if a run was trained for another K."""
    ds = ShardDataset(data, split)
    for run in runs:
        if run.num_classes != ds.num_classes:
            raise UserError(f"{run.path} was trained with K={run.num_classes} classes but {data} has "
                            f"K={ds.num_classes}: pass the shards the run was trained on (--data)")
    return ds


def select_indices(ds: ShardDataset, keys: Sequence[str] | None, num: int) -> list[int]:
    """Sample indices for `--keys K1,K2` (in the given order) or the first `num` samples."""
    if keys:
        lookup = ds.key_to_index()
        missing = [k for k in keys if k not in lookup]
        if missing:
            example = ", ".join(ds.arrays.keys[:3])
            raise UserError(f"{ds.index.root} ({ds.split}): unknown key {missing[0]!r}; keys look like "
                            f"{example} (list them with `rankseg inspect {ds.index.root} --jsonl`)")
        return [lookup[k] for k in keys]
    if num < 1:
        raise UserError(f"--num {num}: must be >= 1")
    return list(range(min(num, len(ds))))


def parse_keys(text: str | None) -> list[str] | None:
    """'a,b , c' -> ['a', 'b', 'c']; None / empty -> None."""
    if not text:
        return None
    keys = [k.strip() for k in text.split(",") if k.strip()]
    return keys or None


# ---------------------------------------------------------------------------------------
# Colours


def run_palette(cfg: TrainConfig) -> np.ndarray:
    """K x 3 uint8: the dataset palette stored in the run, else the generated one."""
    k = cfg.model.num_classes
    if len(cfg.data.palette) == k:
        return np.asarray(cfg.data.palette, np.uint8)
    return make_palette(k)


def run_class_names(cfg: TrainConfig) -> list[str]:
    k = cfg.model.num_classes
    return list(cfg.data.class_names) if len(cfg.data.class_names) == k else [str(i) for i in range(k)]


def dataset_palette(ds: ShardDataset) -> np.ndarray:
    pal = ds.index.palette
    return pal if pal.shape == (ds.num_classes, 3) else make_palette(ds.num_classes)


def colorize(label: np.ndarray, palette: np.ndarray, ignore: int = IGNORE) -> np.ndarray:
    """H x W class ids (ignore allowed) -> H x W x 3 uint8; ignore / out-of-range pixels black."""
    lab = label.astype(np.int64)
    ok = (lab >= 0) & (lab < len(palette)) & (lab != ignore)
    out = np.empty(lab.shape + (3,), np.uint8)
    out[:] = IGNORE_RGB
    out[ok] = palette[lab[ok]]
    return out


def overlay(image: np.ndarray, label: np.ndarray, palette: np.ndarray, alpha: float = 0.55,
            ignore: int = IGNORE) -> np.ndarray:
    """Blend the coloured label over the image; ignore pixels keep the image. H x W x 3 uint8."""
    colour = colorize(label, palette, ignore).astype(np.float32)
    keep = (label == ignore) | (label.astype(np.int64) >= len(palette))
    out = image.astype(np.float32) * (1 - alpha) + colour * alpha
    out[keep] = image[keep]
    return np.clip(out, 0, 255).astype(np.uint8)


def error_map(pred: np.ndarray, label: np.ndarray, palette: np.ndarray, ignore: int = IGNORE) -> np.ndarray:
    """Correct pixels white, wrong ones in the colour of the predicted class, ignore black.

    pred, label: H x W class ids -> H x W x 3 uint8.
    """
    out = colorize(pred, palette, ignore=-1)
    lab = label.astype(np.int64)
    labelled = lab != ignore
    out[labelled & (pred == lab)] = CORRECT_RGB
    out[~labelled] = IGNORE_RGB
    return out


def figure_palette(palette: np.ndarray, maps: Sequence[np.ndarray] = (),
                   first: Sequence[int] | np.ndarray = ()) -> np.ndarray:
    """The palette for one figure: the classes in `first` (in that order), then those of
    `maps` by area, get colours distinct from each other and from white / black
    (`palette.distinct_palette`)."""
    ids = list(dict.fromkeys([int(c) for c in first] + [int(c) for c in ids_by_area(maps, len(palette))]))
    return distinct_palette(palette, ids)


def ids_by_area(maps: Sequence[np.ndarray], num_classes: int, ignore: int = IGNORE) -> np.ndarray:
    """Class ids present in the maps, largest total area first (ties by id)."""
    counts = np.zeros(num_classes, np.int64)
    for m in maps:
        v = m.ravel().astype(np.int64)
        v = v[(v >= 0) & (v < num_classes) & (v != ignore)]
        counts += np.bincount(v, minlength=num_classes)
    ids = np.nonzero(counts)[0]
    return ids[np.argsort(-counts[ids], kind="stable")]


def legend_handles(ids: Sequence[int] | np.ndarray, names: Sequence[str], palette: np.ndarray, max_items: int = 24,
                   extra: Sequence[tuple[str, tuple[int, int, int]]] = (), shorten: bool = True) -> list:
    """matplotlib Patch handles for `extra` entries then up to `max_items` classes (names
    shortened by `short_name` unless `shorten` is False: the caller did it).

    When more classes are present than fit, the last entry says how many were left out.
    """
    from matplotlib.patches import Patch

    def face(rgb: Sequence[int]) -> tuple[float, float, float]:
        return cast(tuple[float, float, float], tuple(float(c) / 255 for c in rgb))  # an RGB triple

    handles = [Patch(facecolor=face(rgb), edgecolor="0.4", linewidth=0.5, label=text) for text, rgb in extra]
    ids = list(ids)
    for i in ids[:max_items]:
        handles.append(Patch(facecolor=face(palette[i]), edgecolor="0.4", linewidth=0.5, label=short_name(names[i]) if shorten else names[i]))
    if len(ids) > max_items:
        handles.append(Patch(facecolor="none", edgecolor="none", label=f"... {len(ids) - max_items} more"))
    return handles


def draw_panels(fig: Any, grid: Any, row: int, panels: Sequence[tuple[np.ndarray, str]]) -> None:
    """Draw a row of (image, title) panels into `grid[row, 0..]`, without axes ticks."""
    for c, (img, title) in enumerate(panels):
        ax = fig.add_subplot(grid[row, c])
        ax.imshow(img, interpolation="nearest")
        ax.set_title(title, fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])


def rgb01(rgb: Sequence[int]) -> tuple[float, float, float]:
    return (rgb[0] / 255, rgb[1] / 255, rgb[2] / 255)


# ---------------------------------------------------------------------------------------
# Prediction on stored samples


@dataclass
class SamplePrediction:
    """One stored sample and a model's output on it.

    image H x W x 3 uint8 RGB; label H x W uint16 (65535 = ignore); pred H x W int64 class
    ids at the label size; probs (K,) sigmoid multi-label scores or None (no ml branch);
    classes: GT class ids stored in the shard index.
    """

    key: str
    image: np.ndarray
    label: np.ndarray
    pred: np.ndarray
    probs: np.ndarray | None
    classes: np.ndarray


@torch.no_grad()
def predict_samples(run: VizRun, ds: ShardDataset, indices: Sequence[int],
                    kappa: int | None = None) -> list[SamplePrediction]:
    """Predict stored samples exactly as `rankseg eval` does (test resize, the run's eval mode,
    scales and flip), one image at a time (any size). GT (train + eval) oracle runs receive
    the image's GT classes, as in evaluation."""
    from rankseg_core.data.augment import build_test_transform
    from rankseg_core.engine.evaluate import check_selection
    from rankseg_core.families import family_of
    from rankseg_core.families.base import InferenceProtocol
    from rankseg_core.model.selection import SelectionOptions, batch_selection

    cfg, model = run.cfg, run.model
    family = family_of(cfg.model.model)
    check_selection(family, cfg.model, SelectionOptions(kappa=kappa))
    if not family.segments:
        raise UserError(f"{run.path}: a multi-label classifier run has no segmentation to draw")
    dc = family.data_config(model)
    tf = build_test_transform(cfg, dc["mean"], dc["std"])
    dev = next(model.parameters()).device  # load_viz_run put the model on the chosen device
    protocol = InferenceProtocol(cfg.eval.mode, tuple(cfg.eval.scales), cfg.eval.flip)
    out = []
    for i in indices:
        item = ds.load(int(i))
        x = torch.from_numpy(tf(item["image"]))[None].to(dev)
        if cfg.model.clip_len > 1:  # a video model on one frame: a clip of T copies
            x = x.repeat(cfg.model.clip_len, 1, 1, 1)
        sel = batch_selection(SelectionOptions(kappa=kappa), cfg.model, [item["classes"]] * len(x), dev)
        size = tuple(item["label"].shape)
        res = family.predict(model, cfg, x, [size] * len(x), protocol, sel)
        assert res.semantic is not None  # a segmenting family (checked above)
        probs = res.ml[0].float().cpu().numpy() if res.ml is not None else None
        out.append(SamplePrediction(item["key"], item["image"], item["label"],
                                    res.semantic[0].cpu().numpy().astype(np.int64), probs, item["classes"]))
    return out


# ---------------------------------------------------------------------------------------
# Numbers next to figures


def write_csv(path: str | Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    """Atomic CSV write (floats with 6 decimals, None / NaN as empty)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    for row in rows:
        w.writerow([_cell(v) for v in row])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buf.getvalue().encode())
    return path


def _cell(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6f}" if np.isfinite(v) else ""
    if isinstance(v, np.integer):
        return int(v)
    return v


def write_json(path: str | Path, data: Any) -> Path:
    """Atomic strict JSON write (NaN and Infinity become null: `jsonio`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, _jsonable(data))
    return path


def _jsonable(v: Any) -> Any:
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return float(v) if np.isfinite(v) else None
    if isinstance(v, Path):
        return str(v)
    return v


def safe_name(key: str) -> str:
    """A sample key as a file name (keys may contain '/')."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in key)
