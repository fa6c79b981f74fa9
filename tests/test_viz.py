"""`rankseg viz`: the plotted numbers (1/tau, false-positive counts, colours) and every command's
PNG on tiny runs saved through runs.py (plus one run trained for a few iterations, slow)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_synthetic
from PIL import Image
from typer.testing import CliRunner

from rankseg_cli.viz_cmds import viz_app
from rankseg_core.engine import runs
from rankseg_core.engine.configure import build_train_config
from rankseg_core.errors import UserError
from rankseg_core.families.segmenter import SEGMENTER
from rankseg_core.shards.codec import IGNORE
from rankseg_core.viz import false_positives as fpm
from rankseg_core.viz import predictions, samples, tau
from rankseg_core.viz.common import colorize, error_map, ids_by_area, legend_handles, load_viz_run

runner = CliRunner()
DPI = 120  # plotting.save_figure's default


def invoke(*args):
    return runner.invoke(viz_app, [str(a) for a in args])


def assert_png(path: Path, inches: tuple[float, float], lo: float = 0.7, hi: float = 1.2) -> tuple[int, int]:
    """A readable, non-blank PNG whose size is the figure size x dpi within the tight-bbox margin."""
    assert path.is_file() and path.stat().st_size > 1000, path
    with Image.open(path) as im:
        im.load()
        w, h = im.size
        arr = np.asarray(im.convert("RGB"))
    ew, eh = inches[0] * DPI, inches[1] * DPI
    assert lo * ew <= w <= hi * ew and lo * eh <= h <= hi * eh, (path.name, (w, h), (ew, eh))
    assert arr.std() > 10  # not a blank canvas
    return w, h


def assert_user_error(res, *fragments: str) -> None:
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    text = " ".join(res.output.split())
    assert text.startswith("error:"), text
    for f in fragments:
        assert f in text, text


# ---------------------------------------------------------------------------------------
# Tiny runs: a config resolved against real shards + weights, as `rankseg train` leaves them


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("viz") / "d60", images=20, num_classes=60, size=32)  # val: 4 images


def save_run(run_dir: Path, data: Path, *sets: str, seed: int = 0) -> Path:
    cfg = build_train_config(None, ["model.img_size=32", "model.kappa=8", *sets], data)
    torch.manual_seed(seed)
    model = SEGMENTER.build(cfg.model)
    norm = model.head.mask_norm
    with torch.no_grad():  # a non-trivial "learned" 1/tau and bias
        norm.weight.copy_(torch.rand(norm.weight.shape) + 0.5)
        norm.bias.copy_(torch.randn(norm.bias.shape) * 0.1)
    runs.save_config(run_dir, cfg)
    runs.save_weights(runs.run_paths(run_dir).weights, model)
    return run_dir


@pytest.fixture(scope="module")
def rs_run(data, tmp_path_factory) -> Path:
    return save_run(tmp_path_factory.mktemp("runs") / "rankseg", data)


@pytest.fixture(scope="module")
def base_run(data, tmp_path_factory) -> Path:
    return save_run(tmp_path_factory.mktemp("runs") / "baseline", data, "model.head=segmenter")


# ---------------------------------------------------------------------------------------
# 1/tau


def test_tau_is_the_layernorm_weight(rs_run: Path, data: Path, tmp_path: Path) -> None:
    shared = save_run(tmp_path / "shared", data, "model.tau=shared", seed=1)
    kk = save_run(tmp_path / "kappaK", data, "model.kappa=60", seed=2)
    res = invoke("tau", rs_run, shared, kk, "--out", tmp_path / "fig" / "tau.png")
    assert res.exit_code == 0, res.output
    assert_png(tmp_path / "fig" / "tau.png", tau.FIGSIZE, hi=1.4)  # + the legend below

    model = load_viz_run(rs_run).model
    weight = model.head.mask_norm.weight.detach().numpy()
    bias = model.head.mask_norm.bias.detach().numpy()
    rows = list(csv.DictReader(open(tmp_path / "fig" / "tau.csv")))
    mine = [r for r in rows if r["run"] == str(rs_run)]
    assert [int(r["rank"]) for r in mine] == list(range(1, 9))
    np.testing.assert_allclose([float(r["inv_tau"]) for r in mine], weight, atol=1e-6)
    np.testing.assert_allclose([float(r["bias"]) for r in mine], bias, atol=1e-6)
    # Shared tau: one scalar repeated over the kappa ranks; kappa = K: K ranks.
    sw = load_viz_run(shared).model.head.mask_norm.weight.item()
    sh = [float(r["inv_tau"]) for r in rows if r["run"] == str(shared)]
    assert len(sh) == 8 and np.allclose(sh, sw, atol=1e-6)
    assert sum(r["run"] == str(kk) for r in rows) == 60

    js = json.loads((tmp_path / "fig" / "tau.json").read_text())
    first = js["runs"][0]
    assert first["kappa"] == 8 and first["dataset"] == "synthetic" and "κ=8" in first["label"]
    np.testing.assert_allclose(first["inv_tau"], weight, atol=1e-6)
    assert js["runs"][1]["tau"] == "shared"


def test_tau_trend() -> None:
    down = tau.TauCurve("a", "a", "d", 10, 5, "rank", np.array([2.0, 1.5, 1.2, 1.0, 0.5]), np.zeros(5))
    t = down.trend()
    assert t["spearman"] == pytest.approx(-1.0) and t["slope_per_rank"] < 0
    assert t["first_tenth_mean"] == 2.0 and t["last_tenth_mean"] == 0.5
    flat = tau.TauCurve("b", "b", "d", 10, 3, "shared", np.ones(3), np.zeros(3))
    assert np.isnan(flat.trend()["spearman"]) and flat.trend()["slope_per_rank"] == 0.0
    ties = tau._rankdata(np.array([3.0, 1.0, 3.0, 2.0]))
    np.testing.assert_allclose(ties, [3.5, 1.0, 3.5, 2.0])


def test_tau_rejects_class_ordered_runs(base_run: Path, tmp_path: Path) -> None:
    assert_user_error(invoke("tau", base_run, "--out", tmp_path / "t.png"), "baseline", "per class")
    assert_user_error(invoke("tau", tmp_path / "missing"), "no such run directory")
    assert not (tmp_path / "t.png").exists()


# ---------------------------------------------------------------------------------------
# False positives: counts against a hand-built case


def hand_case():
    k = 6
    gt = fpm.gt_presence([np.array([0, 1]), np.array([1, 2]), np.array([0])], k)
    probs = np.array([[0.9, 0.2, 0.8, 0.1, 0.05, 0.7],   # top-3 {0, 2, 5}: FP 2, 5; missed 1
                      [0.1, 0.9, 0.3, 0.85, 0.2, 0.0],   # top-3 {1, 3, 2}: FP 3
                      [0.5, 0.1, 0.6, 0.2, 0.7, 0.0]])   # top-3 {4, 2, 0}: FP 4, 2
    pixels = np.zeros((3, k), np.int64)
    pixels[0, [0, 1, 3, 4]] = [50, 10, 2, 1]
    pixels[1, [1, 2, 5]] = [40, 20, 5]
    pixels[2, [0, 3]] = [60, 4]
    base = np.zeros((3, k), np.int64)
    base[0, [0, 3, 5]] = [30, 5, 3]
    base[1, [1, 4]] = [40, 7]
    base[2, [0]] = [60]
    return gt, probs, pixels, base


def test_false_positive_counts_hand_built() -> None:
    gt, probs, pixels, base = hand_case()
    s = fpm.false_positive_stats(gt, probs, pixels, kappa=3, baseline_pixels=base)
    assert s.gt_images.tolist() == [2, 2, 1, 0, 0, 0]
    assert s.topk_fp.tolist() == [0, 0, 2, 1, 1, 1]
    assert s.topk_missed.tolist() == [0, 1, 0, 0, 0, 0]
    assert s.pred_fp.tolist() == [0, 0, 0, 2, 1, 1]
    assert s.pred_fp_pixels.tolist() == [0, 0, 0, 6, 1, 5]
    assert s.baseline_fp.tolist() == [0, 0, 0, 1, 1, 1]
    assert s.removed.tolist() == [0, 0, 0, 0, 1, 1]  # img0: 5 gone (3 kept); img1: 4 gone
    assert s.added.tolist() == [0, 0, 0, 1, 1, 1]  # img0: 4, img1: 5, img2: 3
    assert s.per_image["topk_fp"] == [2, 1, 2] and s.per_image["pred_fp"] == [2, 1, 1]
    t = s.totals()
    assert t["topk_fp_per_image"] == pytest.approx(5 / 3) and t["removed_per_image"] == pytest.approx(2 / 3)

    header, rows = fpm.fp_table(s, [f"c{i}" for i in range(6)])
    assert header[-3:] == ["baseline_pred_fp", "removed", "added"]
    assert [r[0] for r in rows] == [3, 4, 5, 2]  # by prediction FP, then top-kappa FP, then id
    assert rows[0] == [3, "c3", 0, 1, 2, 6, 0, 1, 0, 1]

    strict = fpm.false_positive_stats(gt, probs, pixels, kappa=3, min_pixels=2)
    assert strict.pred_fp.tolist() == [0, 0, 0, 2, 0, 1]  # class 4 had a single pixel
    assert strict.baseline_fp is None and "baseline_pred_fp" not in fpm.fp_table(strict, list("abcdef"))[0]
    wide = fpm.false_positive_stats(gt, probs, pixels, kappa=6)
    assert wide.topk_missed.sum() == 0 and wide.topk_fp.sum() == 3 * 6 - gt.sum()


def test_fp_helpers() -> None:
    top = fpm.topk_mask(np.array([[0.5, 0.5, 0.9, 0.1]]), 2)
    assert top.tolist() == [[True, False, True, False]]  # tie broken by the lower id
    pred = np.array([[0, 1], [2, 2]])
    lab = np.array([[0, IGNORE], [2, 5]], np.uint16)
    assert fpm.pred_pixels([pred], [lab], 4).tolist() == [[1, 0, 2, 0]]  # ignore pixel not counted
    gt = np.array([True, False, True, False, False])
    tc = fpm.top_classes(np.array([0.1, 0.9, 0.4, 0.3, 0.8]), gt, n=3)
    assert tc == [(1, 0.9, False), (4, 0.8, False), (2, 0.4, True)]


def test_false_positives_command(rs_run: Path, base_run: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "fp"
    res = invoke("false-positives", rs_run, "--data", data, "--keys", "val_000001", "--stats-num", 2,
                 "--baseline", base_run, "--out", out)
    assert res.exit_code == 0, res.output
    assert_png(out / "fp_val_000001.png", fpm.IMAGE_FIGSIZE)
    assert_png(out / "fp_summary.png", (fpm.SUMMARY_PANEL[0] * 3, fpm.SUMMARY_PANEL[1]))
    per = json.loads((out / "fp_per_image.json").read_text())
    assert [p["key"] for p in per] == ["val_000001"] and len(per[0]["top"]) == 20
    probs = [t["probability"] for t in per[0]["top"]]
    assert probs == sorted(probs, reverse=True)
    summary = json.loads((out / "fp_summary.json").read_text())
    assert summary["images"] == 2 and summary["kappa"] == 8  # val_000000, _01; the figure's key is one of them

    # The table is the one the counting function gives for the same predictions.
    from rankseg_core.viz.common import open_split, predict_samples

    run = load_viz_run(rs_run)
    ds = open_split(data, "val", [run])
    sp = predict_samples(run, ds, [0, 1])
    gt = fpm.gt_presence([s.classes for s in sp], 60)
    expect = fpm.false_positive_stats(gt, np.stack([s.probs for s in sp]),
                                      fpm.pred_pixels([s.pred for s in sp], [s.label for s in sp], 60), 8)
    assert per[0]["topk_fp"] == [n for n, t in zip([run.cfg.data.class_names[c] for c in range(60)],
                                                   fpm.topk_mask(sp[1].probs[None], 8)[0] & ~gt[1]) if t]
    rows = list(csv.DictReader(open(out / "fp_table.csv")))
    assert sum(int(r["topk_fp"]) for r in rows) == int(expect.topk_fp.sum())
    assert sum(int(r["pred_fp"]) for r in rows) == int(expect.pred_fp.sum())


def test_false_positives_errors(rs_run: Path, base_run: Path, data: Path, tmp_path: Path) -> None:
    assert_user_error(invoke("false-positives", base_run, "--data", data, "--out", tmp_path),
                      "without a class ranking")
    assert_user_error(invoke("false-positives", rs_run, "--data", data, "--keys", "val_000001,nope",
                             "--out", tmp_path), "unknown key 'nope'")
    other = make_synthetic(tmp_path / "d80", images=4, num_classes=80, size=32)
    assert_user_error(invoke("false-positives", rs_run, "--data", other, "--out", tmp_path),
                      "K=60", "K=80")
    assert_user_error(invoke("false-positives", rs_run, "--data", tmp_path / "nodata", "--out", tmp_path),
                      "no such shard directory")


# ---------------------------------------------------------------------------------------
# Predictions and samples


def test_colours() -> None:
    pal = np.array([[10, 20, 30], [200, 0, 0], [0, 200, 0]], np.uint8)
    lab = np.array([[0, 1], [IGNORE, 2]], np.uint16)
    pred = np.array([[0, 2], [1, 2]])
    c = colorize(lab, pal)
    assert c[0, 0].tolist() == [10, 20, 30] and c[1, 0].tolist() == [0, 0, 0]
    e = error_map(pred, lab, pal)
    assert e[0, 0].tolist() == [255, 255, 255]  # correct
    assert e[0, 1].tolist() == [0, 200, 0]  # wrong: the colour of the predicted class 2
    assert e[1, 0].tolist() == [0, 0, 0]  # ignore
    assert e[1, 1].tolist() == [255, 255, 255]
    assert ids_by_area([lab, pred], 3).tolist() == [2, 0, 1]  # 3 px, 2 px, 2 px (tie by id)
    handles = legend_handles([2, 0, 1], ["a", "b", "c"], pal, max_items=2, extra=[("correct", (255, 255, 255))])
    assert [h.get_label() for h in handles] == ["correct", "c", "a", "... 1 more"]


def test_predictions_command(rs_run: Path, base_run: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "pred"
    res = invoke("predictions", rs_run, "--baseline", base_run, "--data", data, "--num", 3, "--out", out)
    assert res.exit_code == 0, res.output
    assert_png(out / "predictions.png", predictions.figure_size(2, 3))
    rows = list(csv.DictReader(open(out / "predictions.csv")))
    assert len(rows) == 6 and rows[0]["run"] == str(base_run) and rows[3]["run"] == str(rs_run)
    # Per-image numbers match the confusion-matrix definition.
    from rankseg_core.viz.common import open_split, predict_samples

    run = load_viz_run(rs_run)
    s = predict_samples(run, open_split(data, "val", [run]), [0])[0]
    ok = s.label != IGNORE
    assert float(rows[3]["pixel_acc"]) == pytest.approx((s.pred[ok] == s.label[ok]).mean(), abs=1e-6)
    # Two figures when the rows do not fit one.
    res = invoke("predictions", rs_run, "--data", data, "--num", 3, "--per-figure", 2, "--out", tmp_path / "p2")
    assert res.exit_code == 0, res.output
    assert_png(tmp_path / "p2" / "predictions_01.png", predictions.figure_size(1, 2))
    assert_png(tmp_path / "p2" / "predictions_02.png", predictions.figure_size(1, 1))
    assert_user_error(invoke("predictions", rs_run, "--data", data, "--num", 0, "--out", tmp_path), "--num 0")


def test_samples_command(data: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    res = invoke("samples", data, "--keys", "train_000003,train_000001", "--split", "train", "--out", out)
    assert res.exit_code == 0, res.output
    assert_png(out / "samples.png", samples.figure_size(2))
    rows = list(csv.DictReader(open(out / "samples.csv")))
    assert [r["key"] for r in rows] == ["train_000003", "train_000001"]
    assert all(r["index_ok"] == "1" for r in rows)
    from rankseg_core.shards.read import ShardDataset

    item = ShardDataset(data, "train").load(3)
    names = ShardDataset(data, "train").index.class_names
    assert set(rows[0]["classes"].split(";")) == {names[c] for c in item["classes"]}
    assert_user_error(invoke("samples", data, "--keys", "train_999"), "unknown key 'train_999'")
    assert_user_error(invoke("samples", data, "--split", "test"), "no split 'test'")


def test_label_summary() -> None:
    lab = np.array([[3, 3, 3], [1, IGNORE, 1]], np.uint16)
    ids, share, ign = samples.label_summary(lab, 5)
    assert ids.tolist() == [3, 1] and share.tolist() == pytest.approx([0.6, 0.4]) and ign == pytest.approx(1 / 6)


# ---------------------------------------------------------------------------------------
# A run trained by `train` (a few iterations), as a user would have it


@pytest.mark.slow
def test_viz_on_a_trained_run(data: Path, tmp_path: Path) -> None:
    from rankseg_core.engine.train import train

    cfg = build_train_config(None, ["model.img_size=32", "model.kappa=8", "schedule.iters=3", "schedule.batch_size=2",
                                    "data.num_workers=0", "eval.num_workers=0", "eval.every=0"], data)
    run_dir = tmp_path / "trained"
    train(cfg, run_dir, progress=False)
    res = invoke("tau", run_dir, "--out", tmp_path / "tau.png")
    assert res.exit_code == 0, res.output
    trained = load_viz_run(run_dir).model.head.mask_norm.weight.detach().numpy()
    assert not np.allclose(trained, 1.0)  # SGD moved gamma off its init
    rows = list(csv.DictReader(open(tmp_path / "tau.csv")))
    np.testing.assert_allclose([float(r["inv_tau"]) for r in rows], trained, atol=1e-6)
    res = invoke("false-positives", run_dir, "--data", data, "--num", 1, "--stats-num", 2, "--out", tmp_path / "fp")
    assert res.exit_code == 0, res.output
    assert_png(tmp_path / "fp" / "fp_val_000000.png", fpm.IMAGE_FIGSIZE)
    with pytest.raises(UserError):
        load_viz_run(tmp_path / "nothing")
