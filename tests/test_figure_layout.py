"""Every matplotlib figure the package draws, at real data's sizes and with the longest real
class names (ADE20K-Full's WordNet lists, LVIS's glossed names): no text box may overlap
another text box or an axes it does not belong to; and the colours of the classes shown in one
figure differ visibly."""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib.text
import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.transforms import Bbox

from rankseg_core.shards.codec import IGNORE
from rankseg_core.utils.palette import MIN_DELTA_E, make_palette, min_colour_distance, short_name
from rankseg_core.utils.plotting import plt
from rankseg_core.utils.resources import load_json
from rankseg_core.viz import false_positives as fpm
from rankseg_core.viz import predictions, samples, tau
from rankseg_core.viz.common import SamplePrediction, colorize, error_map

DPI = 120  # plotting.save_figure's default



@pytest.fixture(autouse=True)
def _close_figures():
    """The figures drawn here are inspected, not saved: close them after each test."""
    yield
    from rankseg_core.utils.plotting import plt

    plt.close("all")

def real_names(dataset: str) -> list[str]:
    return [c["name"] for c in load_json(f"{dataset}/classes.json")["classes"]]


ADE = real_names("ade20k_full")  # 847 names, up to 113 characters
LVIS = real_names("coco_lvis")  # 1284 names


def longest(names: list[str], n: int) -> np.ndarray:
    """Ids of the n longest names, longest first."""
    return np.argsort([-len(x) for x in names], kind="stable")[:n]


# ---------------------------------------------------------------------------------------
# The helper: text boxes as drawn


def drawn_texts(fig: Figure) -> list[tuple[matplotlib.text.Text, Bbox]]:
    """(text, window extent) of every non-empty text matplotlib actually draws in `fig`
    (ticks outside the view are not drawn, hence the patched draw rather than findobj)."""
    fig.set_dpi(DPI)
    seen: list[matplotlib.text.Text] = []
    real_draw = matplotlib.text.Text.draw

    def record(self, renderer):
        if self.get_visible() and self.get_text().strip():
            seen.append(self)
        return real_draw(self, renderer)

    matplotlib.text.Text.draw = record  # type: ignore[method-assign]
    try:
        fig.canvas.draw()
    finally:
        matplotlib.text.Text.draw = real_draw  # type: ignore[method-assign]
    renderer = fig.canvas.get_renderer()  # type: ignore[attr-defined]
    return [(t, t.get_window_extent(renderer)) for t in dict.fromkeys(seen)]


def _owner(t: matplotlib.text.Text, legends: dict[int, object]):
    return legends.get(id(t), t.axes)


def _overlap(a: Bbox, b: Bbox, pad: float = 1.0) -> bool:
    """Boxes overlap by more than `pad` pixels both ways (antialiased edges may touch)."""
    return min(a.x1, b.x1) - max(a.x0, b.x0) > pad and min(a.y1, b.y1) - max(a.y0, b.y0) > pad


def layout_problems(fig: Figure) -> list[str]:
    """Text boxes that overlap another text box, or the area of an axes (one with its frame
    drawn) other than their own. Legend texts belong to the legend's axes."""
    texts = drawn_texts(fig)
    legends: dict[int, object] = {}
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is not None:
            for t in [*leg.get_texts(), leg.get_title()]:
                legends[id(t)] = ax
    framed = [(ax, ax.get_window_extent()) for ax in fig.axes if ax.axison]
    problems = []
    for i, (t, box) in enumerate(texts):
        for ax, abox in framed:
            if ax is not _owner(t, legends) and _overlap(box, abox):
                problems.append(f"text {t.get_text()!r} overlaps the axes titled {ax.get_title()!r}")
        for u, other in texts[i + 1:]:
            if _overlap(box, other):
                problems.append(f"text {t.get_text()!r} overlaps text {u.get_text()!r}")
    plt.close(fig)
    return problems


def test_the_helper_sees_overlaps() -> None:
    fig, (a, b) = plt.subplots(1, 2, figsize=(4, 2))
    a.set_yticks([0, 1])
    b.set_yticks([0, 1])
    b.set_yticklabels(["a very long class name that runs into the left panel", "x"])
    problems = layout_problems(fig)
    assert any("overlaps the axes" in p for p in problems), problems
    fig, ax = plt.subplots(figsize=(4, 2))
    ax.text(0.5, 0.5, "one label")
    ax.text(0.52, 0.5, "another label")
    assert any("overlaps text" in p for p in layout_problems(fig))
    fig, ax = plt.subplots(figsize=(4, 2))
    ax.set_title("fine")
    assert layout_problems(fig) == []


# ---------------------------------------------------------------------------------------
# Inputs with real sizes and names


def blocks(h: int, w: int, ids: np.ndarray, cols: int = 6) -> np.ndarray:
    """H x W label map of rectangles, one class of `ids` each (a few ignore pixels on top)."""
    rows = -(-len(ids) // cols)
    yy, xx = np.mgrid[0:h, 0:w]
    cell = (yy * rows // h) * cols + xx * cols // w
    label = np.asarray(ids, np.int64)[np.minimum(cell, len(ids) - 1)].astype(np.uint16)
    label[: h // 50] = IGNORE
    return label


def sample(key: str, h: int, w: int, ids: np.ndarray, k: int, seed: int = 0) -> SamplePrediction:
    rng = np.random.default_rng(seed)
    label = blocks(h, w, ids)
    pred = np.roll(label.astype(np.int64), w // 9, axis=1)
    pred[pred == IGNORE] = int(ids[0])
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    probs = rng.random(k)
    probs[ids] += 0.5
    return SamplePrediction(key, image, label, pred, np.clip(probs, 0, 1), np.unique(ids))


SIZES = [(1650, 2386), (512, 683), (683, 512)]  # a large photo, ADE20K landscape and portrait


@pytest.mark.parametrize("names", [ADE, LVIS], ids=["ade20k_full", "coco_lvis"])
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[1]}x{s[0]}")
def test_per_image_false_positives(names: list[str], size: tuple[int, int]) -> None:
    k = len(names)
    ids = longest(names, 18)
    s = sample("ADE_val_00001234_with_a_long_key", *size, ids, k)
    gt = fpm.gt_presence([ids[:14]], k)[0]
    pred = np.zeros(k, bool)
    pred[longest(names, 40)] = True
    fig = fpm.draw_image(s, gt, pred, 100, names, make_palette(k),
                         "rankseg-ade20k-full-swin-l-160k (RankSeg κ=100)", baseline_row=pred)
    assert layout_problems(fig) == []


@pytest.mark.parametrize("names", [ADE, LVIS], ids=["ade20k_full", "coco_lvis"])
def test_false_positive_summary(names: list[str]) -> None:
    k = len(names)
    rng = np.random.default_rng(0)
    gt = rng.random((200, k)) < 0.02
    probs = rng.random((200, k))
    probs[:, longest(names, 30)] += 0.6
    pixels = (rng.random((200, k)) < 0.05) * 100
    pixels[:, longest(names, 30)] = 100
    base = pixels + (rng.random((200, k)) < 0.05) * 100
    stats = fpm.false_positive_stats(gt, probs, pixels, 100, base)
    fig = fpm.draw_summary(stats, names, make_palette(k), "rankseg-ade20k-full (RankSeg κ=100)",
                           "baseline-ade20k-full (baseline)")
    assert layout_problems(fig) == []


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[1]}x{s[0]}")
def test_predictions_rows(size: tuple[int, int]) -> None:
    k = len(ADE)
    rows = [sample(f"ADE_val_{i:08d}", *size, longest(ADE, 24)[i::2], k, seed=i) for i in range(2)]
    fig = predictions.draw_rows([rows, rows], ["baseline-ade20k-full (baseline)", "rankseg-ade20k-full (RankSeg κ=100)"],
                                ADE, make_palette(k))
    assert layout_problems(fig) == []


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[1]}x{s[0]}")
def test_samples_rows(size: tuple[int, int]) -> None:
    k = len(LVIS)
    items = []
    for i, n in enumerate((6, 30)):
        s = sample(f"coco_val_{i:012d}", *size, longest(LVIS, n), k, seed=i)
        items.append({"key": s.key, "image": s.image, "label": s.label})
    fig = samples.draw_samples(items, LVIS, make_palette(k))
    assert layout_problems(fig) == []


def test_tau_figure() -> None:
    rng = np.random.default_rng(0)
    curves = [tau.TauCurve(f"runs/rankseg-ade20k-full-seed{i}: ade20k_full K=847 κ={kap}" + (" (shared τ)" if i else ""),
                           "r", "ade20k_full", 847, kap, "rank", 1 + rng.random(kap), rng.random(kap) - 0.5)
              for i, kap in enumerate((100, 50, 200, 847))]
    assert layout_problems(tau.draw_tau(curves)) == []


def test_replication_figures(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import replication_report as rr

    def block(m: float) -> dict:
        seeds = [m - 0.01, m, m + 0.012]
        return {"miou": {"mean": m, "std": 0.01, "max": max(seeds), "min": min(seeds)},
                "per_seed": {"miou": seeds}}

    runs = {v: block(0.18 + 0.01 * i) for i, v in
            enumerate(("baseline", "mt", "mt_ls", "rankseg", "indep", "oracle", "rankseg_k10", "rankseg_k100",
                       "rankseg_k847"))}
    evals = {n: block(0.2) for n in ("baseline/gt_eval", "rankseg/gt_eval", "rankseg/kappa10", "rankseg/kappa25",
                                     "rankseg/kappa200", "rankseg/kappa847")}
    figs = rr.draw_bar_figures({"num_classes": 847, "runs": runs, "evals": evals}, 3, 50, "ade20k_full")
    assert set(figs) == {"table1", "oracles", "kappa"}
    for name, fig in figs.items():
        assert layout_problems(fig) == [], name
    # The kappa axis reads in numbers (10, 20, 50, ...), not only 10^1, 10^2.
    fig = rr.draw_bar_figures({"num_classes": 847, "runs": runs, "evals": evals}, 3, 50, "ade20k_full")["kappa"]
    fig.canvas.draw()
    ticks = [t.get_text() for t in fig.axes[0].get_xticklabels() if t.get_text()]
    plt.close(fig)
    assert {"10", "100"} <= set(ticks) and len(ticks) >= 4, ticks
    assert not any("^" in t for t in ticks), ticks


# ---------------------------------------------------------------------------------------
# Colours


def shown_colours(fig_palette: np.ndarray, ids) -> np.ndarray:
    return fig_palette[np.asarray(list(ids))]


def test_one_figure_shows_distinct_colours() -> None:
    k = len(ADE)
    pal = make_palette(k)
    # 40 classes a figure of ADE20K-Full shows; with the raw palette some look alike.
    ids = np.arange(0, k, 21)[:40]
    assert min_colour_distance(pal[ids]) < 10  # the problem
    rows = [sample(f"k{i}", 200, 300, ids[i::2], k, seed=i) for i in range(2)]
    fig = predictions.draw_rows([rows], ["run"], ADE, pal)
    images = [im.get_array() for ax in fig.axes for im in ax.get_images()]
    plt.close(fig)
    # The figure's ground-truth panels, read back: their colours are one per class.
    gt = [np.asarray(images[1]), np.asarray(images[4])]
    colours = np.unique(np.concatenate([g.reshape(-1, 3) for g in gt]), axis=0)
    colours = colours[(colours.sum(1) > 0)]  # ignore pixels are black
    assert len(colours) == len(ids)
    assert min_colour_distance(np.concatenate([colours, [[0, 0, 0], [255, 255, 255]]])) >= MIN_DELTA_E


def test_distinct_palette_keeps_distinct_colours() -> None:
    from rankseg_core.utils.palette import distinct_palette

    pal = np.array([[230, 25, 75], [60, 180, 75], [0, 130, 200], [232, 27, 77]], np.uint8)
    out = distinct_palette(pal, [0, 1, 2, 3])
    assert (out[:3] == pal[:3]).all()  # far apart already: the dataset colours stay
    assert min_colour_distance(out) >= MIN_DELTA_E  # class 3 looked like class 0: moved
    assert colorize(np.array([[3]]), out)[0, 0].tolist() == out[3].tolist()
    assert error_map(np.array([[3]]), np.array([[0]]), out)[0, 0].tolist() == out[3].tolist()


def test_short_names() -> None:
    assert short_name("computer, computing machine, computing device, data processor") == "computer"
    assert short_name("building, edifice") == "building, edifice"
    assert short_name("aerosol_can") == "aerosol can"
    assert short_name("peeler_(tool_for_fruit_and_vegetables)") == "peeler"  # the gloss does not fit
    assert short_name("glass_(drink_container)") == "glass (drink container)"  # it does
    cut = short_name("pneumonoultramicroscopicsilicovolcanoconiosis")
    assert len(cut) == 24 and cut.endswith("…")
    assert max(len(short_name(n)) for n in ADE + LVIS) <= 24


# ---------------------------------------------------------------------------------------
# `rankseg predict` overlays (drawn with cv2)


def test_predict_overlay_legend_scales_with_the_image() -> None:
    from rankseg_core.engine.predict import overlay

    h, w = 1650, 2386
    ids = longest(ADE, 12)
    pred = blocks(h, w, ids).astype(np.int64)
    pred[pred == IGNORE] = ids[0]
    out = overlay(np.full((h, w, 3), 128, np.uint8), pred, make_palette(len(ADE)), ADE)
    assert out.shape[0] == h and out.shape[1] > w
    panel = out[:, w:].astype(int)
    # Rows holding text ink (dark, grey-ish pixels right of the swatches): the first entry's
    # vertical extent is its text height.
    swatch_end = int(np.nonzero((np.abs(panel - 255).sum(-1) > 0).any(0))[0][0]) + h // 25
    ink = (panel[:, swatch_end:].max(-1) < 100).any(1)
    rows = np.nonzero(ink)[0]
    first = rows[: np.argmax(np.diff(rows) > 1) + 1]
    text_h = first[-1] - first[0] + 1
    assert 0.012 * h <= text_h <= 0.04 * h, text_h  # ~20-66 px on this photo (it was 9 px)
    # Every name shortened: the legend is narrower than half the image.
    assert out.shape[1] - w < w / 2


def test_predict_overlay_colours_differ() -> None:
    from rankseg_core.engine.predict import overlay

    k = len(ADE)
    ids = np.arange(0, k, 21)[:40]
    pal = make_palette(k)
    assert min_colour_distance(pal[ids]) < 10
    pred = blocks(300, 400, ids).astype(np.int64)
    pred[pred == IGNORE] = ids[0]
    out = overlay(np.zeros((300, 400, 3), np.uint8), pred, pal, ADE, alpha=1.0, max_legend=40)
    colours = np.unique(out[:300, :400].reshape(-1, 3), axis=0)
    assert len(colours) == len(ids)
    assert min_colour_distance(colours) >= MIN_DELTA_E
