"""Evaluation and prediction on a tiny trained run: JSON/CSV, mIoU vs a hand recomputation,
the fast path vs the generic inference helpers, subsets, oracle / dynamic kappa, predict."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_synthetic
from typer.testing import CliRunner

from rankseg_cli.common import new_app
from rankseg_cli.train_cmds import evaluate, predict, stats_model
from rankseg_core.engine import runs
from rankseg_core.engine.configure import build_train_config
from rankseg_core.engine.evaluate import EvalOptions, evaluate_model, read_class_subsets
from rankseg_core.engine.train import train
from rankseg_core.errors import UserError
from rankseg_core.families.base import InferenceProtocol
from rankseg_core.families.segmenter import SEGMENTER
from rankseg_core.inference.dense import predict_whole
from rankseg_core.model.selection import NO_SELECTION, SelectionOptions
from rankseg_core.shards.read import ShardDataset

K = 40


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("eval")
    data = root / "data"
    make_synthetic(data, num_classes=K, images=8, val_images=5, size=48, seed=2)
    cfg = build_train_config(None, ["model.model=segmenter-vitt", "model.img_size=32", "model.kappa=6",
                                    "schedule.iters=2", "schedule.batch_size=2", "data.num_workers=0",
                                    "eval.num_workers=0", "eval.short_side=32", "eval.batch_size=2"], data)
    train(cfg, root / "run", progress=False)
    return root / "run"


def cli(*args: str):
    app = new_app("test")
    app.command("eval")(evaluate)
    app.command("predict")(predict)
    app.command("stats-model")(stats_model)
    return CliRunner().invoke(app, [str(a) for a in args])


def hand_miou(preds: list[np.ndarray], labels: list[np.ndarray], k: int) -> tuple[float, np.ndarray]:
    """Independent reference: per-class intersection / union by boolean masks."""
    inter, union = np.zeros(k), np.zeros(k)
    for p, t in zip(preds, labels):
        ok = t < k
        for c in range(k):
            pc, tc = (p == c) & ok, (t == c) & ok
            inter[c] += (pc & tc).sum()
            union[c] += (pc | tc).sum()
    iou = np.where(union > 0, inter / np.maximum(union, 1), np.nan)
    return float(np.nanmean(iou)), iou


def test_eval_json_csv_and_recomputation(run: Path, tmp_path: Path) -> None:
    classes = tmp_path / "subsets.json"
    cfg = runs.load_config(run)
    classes.write_text(json.dumps({"base": list(range(0, 20)), "novel": [cfg.data.class_names[i] for i in range(20, K)]}))
    out_json, preds_dir = tmp_path / "m.json", tmp_path / "preds"
    res = cli("eval", run, "--json", out_json, "--save-predictions", preds_dir, "--classes-json", classes,
              "--device", "cpu")
    assert res.exit_code == 0, res.output
    rep = json.loads(out_json.read_text())
    assert set(rep) == {"miou", "aacc", "map", "recall_at_kappa", "per_class", "subsets", "num_images", "config",
                        "score"}
    assert rep["score"] == rep["miou"]  # what picks best.pt for a segmentation run
    assert rep["num_images"] == 5 and set(rep["subsets"]) == {"base", "novel"}
    assert rep["config"]["kappa"] == 6 and rep["config"]["mode"] == "whole"
    assert list(rep["per_class"]) == cfg.data.class_names

    ds = ShardDataset(cfg.data.root, "val")
    preds, labels = [], []
    for i in range(len(ds)):
        item = ds.load(i)
        pred = cv2.imread(str(preds_dir / f"{item['key']}.png"), cv2.IMREAD_UNCHANGED)
        assert pred.dtype == np.uint16 and pred.shape == item["label"].shape  # original label size
        preds.append(pred.astype(np.int64))
        labels.append(item["label"].astype(np.int64))
    miou, iou = hand_miou(preds, labels, K)
    assert rep["miou"] == pytest.approx(miou, abs=1e-12)
    assert [v for v in rep["per_class"].values()] == pytest.approx([None if np.isnan(v) else v for v in iou])
    base = np.nanmean(iou[:20]) if np.any(~np.isnan(iou[:20])) else None
    assert rep["subsets"]["base"]["miou"] == pytest.approx(base)

    rows = list(csv.DictReader((tmp_path / "m_per_class.csv").open()))
    assert len(rows) == K and rows[3]["name"] == cfg.data.class_names[3]
    gt = np.bincount(np.concatenate([t[t < K] for t in labels]), minlength=K)
    assert [int(r["gt_pixels"]) for r in rows] == gt.tolist()


def test_fast_path_equals_generic_helpers(run: Path) -> None:
    model, cfg = runs.load_run(run, "cpu")
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 56)  # not multiples of 16: padded inside
    sizes = [(37, 61), (40, 56)]
    res = SEGMENTER.predict(model, cfg, x, sizes, InferenceProtocol("whole"), NO_SELECTION)
    fast, ml = res.semantic, res.ml
    logits, ml_ref = predict_whole(model, x, K, return_ml=True)
    for i, s in enumerate(sizes):
        ref = F.interpolate(logits[i:i + 1], size=s, mode="bilinear", align_corners=False)[0].argmax(0)
        assert torch.equal(fast[i], ref)
    assert torch.allclose(ml, ml_ref)


def test_eval_modes_and_selection_options(run: Path, tmp_path: Path) -> None:
    model, cfg = runs.load_run(run, "cpu")
    base = evaluate_model(model, cfg, EvalOptions(progress=False), torch.device("cpu"))
    ms = evaluate_model(model, cfg, EvalOptions(scales=[0.75, 1.0], flip=True, mode="slide", progress=False),
                        torch.device("cpu"))
    assert 0 <= ms["miou"] <= 1 and ms["num_images"] == base["num_images"]
    # kappa = K at test time: the selection cannot miss a GT class.
    full = evaluate_model(model, cfg, EvalOptions(progress=False, selection=SelectionOptions(kappa=K)), torch.device("cpu"))
    assert full["recall_at_kappa"] == pytest.approx(1.0)
    assert full["map"] == pytest.approx(base["map"])  # ml scores do not depend on kappa
    # GT (eval) oracle: every predicted class is one of the image's GT classes.
    preds = tmp_path / "oracle"
    evaluate_model(model, cfg, EvalOptions(save_predictions=preds, progress=False, selection=SelectionOptions(oracle=True)), torch.device("cpu"))
    ds = ShardDataset(cfg.data.root, "val")
    for i in range(len(ds)):
        item = ds.load(i)
        pred = cv2.imread(str(preds / f"{item['key']}.png"), cv2.IMREAD_UNCHANGED)
        assert set(np.unique(pred)) <= set(item["classes"].tolist())
    dyn = evaluate_model(model, cfg, EvalOptions(progress=False, selection=SelectionOptions(dynamic_kappa=0.5)), torch.device("cpu"))
    assert 0 <= dyn["miou"] <= 1
    with pytest.raises(UserError, match="dynamic-kappa"):
        evaluate_model(model, cfg, EvalOptions(progress=False, selection=SelectionOptions(dynamic_kappa=2.0)), torch.device("cpu"))


def test_class_subset_errors(tmp_path: Path) -> None:
    names = ["a", "b", "c"]
    p = tmp_path / "s.json"
    p.write_text(json.dumps({"base": ["a", 2], "novel": [1]}))
    assert read_class_subsets(p, names) == {"base": [0, 2], "novel": [1]}
    for bad, msg in [({"base": ["zebra"]}, "unknown class 'zebra'"), ({"base": [7]}, "outside 0..2"),
                     ([1, 2], "expected"), ({"base": [1.5]}, "use train ids")]:
        p.write_text(json.dumps(bad))
        with pytest.raises(UserError, match=msg):
            read_class_subsets(p, names)
    p.write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_class_subsets(p, names)


def test_eval_cli_errors(run: Path, tmp_path: Path) -> None:
    res = cli("eval", tmp_path / "nope")
    assert res.exit_code == 2 and "not a rankseg run directory" in " ".join(res.output.split())
    res = cli("eval", run, "--scales", "1,x")
    assert res.exit_code == 2 and "--scales" in res.output and "Traceback" not in res.output
    res = cli("eval", run, "--split", "test")
    assert res.exit_code == 2 and "no split 'test'" in res.output


def test_predict_odd_sizes_and_corrupt_file(run: Path, tmp_path: Path) -> None:
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(imgs / "odd.png"), rng.integers(0, 256, (37, 53, 3)).astype(np.uint8))
    cv2.imwrite(str(imgs / "grey.jpg"), rng.integers(0, 256, (70, 21)).astype(np.uint8))
    out = tmp_path / "out"
    res = cli("predict", run, imgs, "--out", out, "--kappa", "4")
    assert res.exit_code == 0, res.output
    cfg = runs.load_config(run)
    for stem, (h, w) in (("odd", (37, 53)), ("grey", (70, 21))):
        label = cv2.imread(str(out / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert label.dtype == np.uint16 and label.shape == (h, w) and label.max() < K
        ov = cv2.imread(str(out / f"{stem}_overlay.png"))
        assert ov.shape[1] > w and ov.shape[0] >= h  # image + legend panel
        meta = json.loads((out / f"{stem}.json").read_text())
        assert (meta["height"], meta["width"]) == (h, w)
        assert {c["id"] for c in meta["classes"]} == set(np.unique(label).tolist())
        assert sum(c["fraction"] for c in meta["classes"]) == pytest.approx(1.0)
        assert len(meta["top_kappa"]) == 4
        probs = [c["probability"] for c in meta["top_kappa"]]
        assert probs == sorted(probs, reverse=True) and all(0 <= p <= 1 for p in probs)
        assert all(c["name"] == cfg.data.class_names[c["id"]] for c in meta["top_kappa"])
    (imgs / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    res = cli("predict", run, imgs / "odd.png", imgs / "broken.jpg", "--out", out)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "broken.jpg" in res.output and "cannot decode image" in " ".join(res.output.split())
    res = cli("predict", run, tmp_path / "missing.png", "--out", out)
    assert res.exit_code == 2 and "no such file" in res.output


def test_stats_model_json() -> None:
    res = cli("stats-model", "--model", "segmenter-vitt", "--num-classes", "50", "--kappa", "10",
              "--img-size", "64", "--json")
    assert res.exit_code == 0, res.output
    stats = json.loads(res.output)
    assert stats["num_classes"] == 50 and stats["kappa"] == 10 and stats["params"] > 5e6 and stats["gflops"] > 0
    base = json.loads(cli("stats-model", "--model", "segmenter-vitt", "--num-classes", "50", "--head", "segmenter",
                          "--img-size", "64", "--json", "--no-flops").output)
    assert base["params"] < stats["params"] and "gflops" not in base


def test_oracle_fill_eval(run: Path, tmp_path: Path) -> None:
    """--oracle-fill ranked with kappa = K selects every class (= plain kappa = K); random keeps
    every GT class and predicts only classes of the selection; the errors are one line."""
    model, cfg = runs.load_run(run, "cpu")
    dev = torch.device("cpu")
    full = evaluate_model(model, cfg, EvalOptions(progress=False, selection=SelectionOptions(kappa=K)), dev)
    ranked = evaluate_model(model, cfg, EvalOptions(progress=False, selection=SelectionOptions(kappa=K, oracle=True, oracle_fill="ranked")), dev)
    assert ranked["miou"] == pytest.approx(full["miou"], abs=1e-12)
    preds = tmp_path / "random"
    rep = evaluate_model(model, cfg, EvalOptions(save_predictions=preds, progress=False, selection=SelectionOptions(oracle=True, oracle_fill="random")), dev)
    assert 0 <= rep["miou"] <= 1
    from rankseg_core.model.selection import random_fill

    ds = ShardDataset(cfg.data.root, "val")
    for i in range(len(ds)):
        item = ds.load(i)
        pred = cv2.imread(str(preds / f"{item['key']}.png"), cv2.IMREAD_UNCHANGED)
        allowed = set(random_fill(item["classes"], K, cfg.model.kappa, item["key"]).tolist())
        assert set(np.unique(pred)) <= allowed
    res = cli("eval", run, "--oracle-fill", "ranked")
    assert res.exit_code == 2 and "add --oracle" in res.output and "Traceback" not in res.output
    res = cli("eval", run, "--oracle", "--oracle-fill", "best")
    assert res.exit_code == 2 and "ranked or random" in res.output
