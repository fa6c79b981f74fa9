"""The weak-shot protocol (docs/weak-shot.md): the official splits, hiding novel pixels after
augmentation, the official BaseIoU / NovelIoU, split files refused in one line, and
`rankseg train --weak-shot` training, resuming and evaluating through the engine."""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import math
import os
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import assert_one_line_error, make_synthetic, tiny_run, train_until_checkpoint
from score_helpers import make_shards
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.config.train import TrainConfig
from rankseg_core.convert.common import ConvertOptions, run_conversion
from rankseg_core.data import weak_shot as ws
from rankseg_core.data.loading import make_loader
from rankseg_core.errors import UserError
from rankseg_core.evaluation.metrics import ConfusionMatrix
from rankseg_core.evaluation.weak_shot import base_novel_scores
from rankseg_core.shards.write import DatasetHeader, encode_sample
from rankseg_core.utils import distributed as D

IGNORE = 65535
REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()


def run(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def table(name: str) -> list[str]:
    doc = json.loads((REPO / "datasets" / name / "classes.json").read_text())
    return [c["name"] for c in doc["classes"]]


def split_doc(name: str) -> dict:
    return json.loads((REPO / "datasets" / "weak_shot" / ws.BUILTIN[name]).read_text())


# ---------------------------------------------------------------------------------------
# The official splits


# The supplement's Table 3: novel ratio of COCO-Stuff-10K splits 4..9.
TABLE3 = {4: 0.25, 5: 0.30, 6: 0.35, 7: 0.40, 8: 0.45, 9: 0.50}
# ADE20K classes whose rankseg (mmsegmentation) name is not the first synonym of the official
# (detectron2 / MaskFormer) name: the same objectInfo150 row under another word.
ADE_RENAMES = {"windowpane": "window", "bathtub": "tub", "railing": "rail", "streetlight": "street lamp",
               "television receiver": "tv", "airplane": "plane", "apparel": "clothes", "swimming pool": "pool",
               "waterfall": "falls", "ashcan": "trash can"}


def test_builtin_splits_are_the_official_lists_in_our_train_ids() -> None:
    coco, ade = table("coco_stuff"), table("ade20k")
    assert len(coco) == 171 and len(ade) == 150
    novel = {}
    for name in ws.BUILTIN:
        doc = split_doc(name)
        names = coco if name.startswith("coco") else ade
        split = ws.load_split(name, names, "coco-stuff-10k" if name.startswith("coco") else "ade20k")
        assert split.spec == name and split.num_classes == len(names)
        assert list(split.novel) == sorted(set(doc["novel"])) and split.novel == tuple(doc["novel"])
        assert doc["novel_names"] == [names[c] for c in split.novel]
        src = doc["source"]
        assert re.fullmatch(r"[0-9a-f]{40}", src["commit"]) and "SimFormer" in src["repository"]
        assert src["path"].endswith("info.py") and len(src["official_names"]) == len(split.novel)
        for ours, official in zip(doc["novel_names"], src["official_names"]):
            if name.startswith("coco"):  # info.py's COCO_CATEGORIES names are the COCO-Stuff names
                assert ours == official
            else:  # same row of objectInfo150: the first synonym, or a known rename
                first = official.split(",")[0].strip()
                assert ours == first or ADE_RENAMES.get(ours) == first, (ours, official)
        novel[name] = set(split.novel)
    for i in range(1, 5):
        assert len(novel[f"coco-stuff-10k/split{i}"]) == 43 and len(novel[f"ade20k/split{i}"]) == 38
    assert len({frozenset(novel[f"coco-stuff-10k/split{i}"]) for i in range(1, 5)}) == 4
    assert len({frozenset(novel[f"ade20k/split{i}"]) for i in range(1, 5)}) == 4
    for s, ratio in TABLE3.items():
        n = len(novel[f"coco-stuff-10k/split{s}"])
        assert abs(n / 171 - ratio) < 0.01, (s, n)
        if s > 4:  # "move random base classes to novel classes" from split 4 on: each split grows the last
            assert novel[f"coco-stuff-10k/split{s - 1}"] < novel[f"coco-stuff-10k/split{s}"]


def test_load_split_by_file_by_ids_or_names_with_its_digest(tmp_path: Path) -> None:
    names = table("ade20k")
    f = tmp_path / "mine.json"
    f.write_bytes(json.dumps({"novel": ["sky", 0, "tree"], "num_classes": 150, "dataset": "ade20k"}).encode())
    split = ws.load_split(str(f), names, "ade20k-150")
    assert split.novel == (0, 2, 4) and split.spec == str(f.resolve())
    assert split.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    assert split.base == [c for c in range(150) if c not in (0, 2, 4)]
    # The {"base", "novel"} subset files of `eval --classes-json` are split files too.
    f.write_text(json.dumps({"base": list(range(1, 150)), "novel": [0]}))
    assert ws.load_split(str(f), names).novel == (0,)


# ---------------------------------------------------------------------------------------
# Bad split files: one line each


def _bad_files(tmp: Path, k: int) -> dict[str, tuple[Path, str]]:
    """name -> (file, a fragment of its error), for a run with K = k synthetic classes."""
    cases = {
        "unknown class name": ({"novel": ["no-such-class"]}, "unknown class 'no-such-class'"),
        "class id out of range": ({"novel": [3, k]}, f"outside the run's train ids 0..{k - 1}"),
        "duplicate": ({"novel": [3, 5, 3]}, "lists class 3 twice"),
        "empty": ({"novel": []}, "'novel' is empty"),
        "all classes novel": ({"novel": list(range(k))}, f"holds all {k} classes"),
        "no novel key": ({"classes": [1]}, '"novel"'),
        "unknown key": ({"novel": [1], "novle_names": []}, "unknown key 'novle_names'"),
        "other vocabulary": ({"novel": [1], "num_classes": 171}, "171"),
        "other dataset": ({"novel": [1], "dataset": "ade20k"}, "ade20k"),
        "base overlaps": ({"novel": [1], "base": [1, 2]}, "both base and novel"),
        "base incomplete": ({"novel": [1], "base": [0, 2]}, "neither base nor novel"),
        "names disagree": ({"novel": [1], "novel_names": ["sky"]}, "the split calls it 'sky'"),
        "bool id": ({"novel": [True]}, "use train ids"),
    }
    out = {}
    for i, (name, (doc, frag)) in enumerate(cases.items()):
        path = tmp / f"bad{i}.json"
        path.write_text(json.dumps(doc))
        out[name] = (path, frag)
    not_json = tmp / "not.json"
    not_json.write_text("{'novel': [1]}")
    out["not JSON"] = (not_json, "not valid JSON")
    nan = tmp / "nan.json"
    nan.write_text('{"novel": [NaN]}')
    out["NaN"] = (nan, "not valid JSON")
    huge = tmp / "huge.json"
    with open(huge, "wb") as f:  # sparse: the size is refused from stat, nothing is read
        f.truncate(ws.MAX_SPLIT_BYTES + 1)
    out["huge file"] = (huge, "over rankseg's limit")
    fifo = tmp / "fifo.json"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    out["FIFO"] = (fifo, "not a regular file")
    out["directory"] = (tmp, "directory")
    out["missing"] = (tmp / "missing.json", "no built-in split has that name")
    return out


def test_bad_split_files_are_one_line_errors(tmp_path: Path, synth: Path) -> None:
    bad = _bad_files(tmp_path, 60)
    for name, (path, frag) in bad.items():
        res = run("train", "--data", synth, "--out", tmp_path / "run", "--weak-shot", path, "--dry-run",
                  *sum((["--set", s] for s in tiny_run()), []))
        assert_one_line_error(res, "--weak-shot", frag)
        assert not (tmp_path / "run").exists(), name


def test_bad_split_errors_name_the_file(tmp_path: Path) -> None:
    names = [f"c{i}" for i in range(6)]
    for name, (path, frag) in _bad_files(tmp_path, 6).items():
        if name in ("other dataset", "missing", "names disagree"):
            continue
        with pytest.raises(UserError) as e:
            ws.load_split(str(path), names, "synthetic", "--novel-classes")
        text = str(e.value)
        assert "\n" not in text and frag in text and "--novel-classes" in text, (name, text)
        assert str(path) in text or name == "missing", (name, text)


def test_weak_shot_refuses_video_clips(tmp_path: Path, synth: Path) -> None:
    f = tmp_path / "split.json"
    f.write_text(json.dumps({"novel": [1, 2]}))
    res = run("train", "--data", synth, "--out", tmp_path / "run", "--weak-shot", f, "--dry-run",
              "--clip-len", "2", *sum((["--set", s] for s in tiny_run()), []))
    assert_one_line_error(res, "single images", "clip_len=2")


# ---------------------------------------------------------------------------------------
# Hiding novel pixels after augmentation


def _coded_image(h: int, w: int) -> np.ndarray:
    """RGB whose red channel is 10 x column and green 10 x row: where a pixel went after a crop
    and flip can be read back from the augmented image (PNG: lossless)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = np.arange(w)[None, :] * 10
    img[..., 1] = np.arange(h)[:, None] * 10
    return img


def _png_sample(key: str, *, images: dict, labels: dict, k: int):
    ok, buf = cv2.imencode(".png", cv2.cvtColor(images[key], cv2.COLOR_RGB2BGR))
    assert ok
    return encode_sample(key, buf.tobytes(), labels[key], k)


def test_hiding_after_crop_and_flip_through_the_loader(tmp_path: Path) -> None:
    """Columns 0-3 novel class 5, 4-7 base 2, 8-11 ignore, 12-15 novel 7, row 0 base 9; the
    loader crops 8 x 8 out of 8 x 16 and flips. Expected from the decoded pixel positions."""
    k, h, w = 12, 8, 16
    label = np.full((h, w), IGNORE, np.uint16)
    label[:, 0:4], label[:, 4:8], label[:, 12:16] = 5, 2, 7
    label[0, :] = 9
    img = _coded_image(h, w)
    header = DatasetHeader("hand", [f"c{i}" for i in range(k)], source="test")
    maker = functools.partial(_png_sample, images={"a": img}, labels={"a": label}, k=k)
    run_conversion(tmp_path / "d", header, {"train": ["a"]}, maker, ConvertOptions(samples_per_shard=4))
    cfg = TrainConfig()
    cfg.data.root, cfg.data.num_workers, cfg.data.novel_classes = str(tmp_path / "d"), 0, [5, 7]
    cfg.model.img_size, cfg.model.num_classes = 8, k
    cfg.aug.scale, cfg.aug.ratio_range, cfg.aug.cat_max_ratio = [16, 8], [1.0, 1.0], 1.0
    cfg.aug.flip_prob, cfg.aug.photometric = 1.0, False
    cfg.schedule.batch_size = 1
    batches = iter(make_loader(cfg, [0.0] * 3, [1.0] * 3, D.DistInfo(), 0))
    crops_without = set()
    for _ in range(12):
        b = next(batches)
        assert set(b) == {"image", "label", "extent", "image_labels", "pad"}  # uint8 image: data/device.py normalises
        assert not b["pad"].any()  # the 8 x 8 crop lies inside the 8 x 16 image
        image, got, present = b["image"][0].numpy(), b["label"][0].numpy(), b["image_labels"][0].numpy()
        cols, rows = np.rint(image[0] / 10).astype(int), np.rint(image[1] / 10).astype(int)
        assert np.all(cols[:, 1:] < cols[:, :-1])  # flipped: columns run right to left
        original = label[rows, cols].astype(np.int64)  # the augmented crop before hiding
        want = np.where(np.isin(original, [5, 7]), IGNORE, original)
        assert np.array_equal(got, want)
        want_present = np.zeros(k, np.float32)
        want_present[[c for c in np.unique(original) if c != IGNORE]] = 1
        assert np.array_equal(present, want_present)
        crops_without |= {c for c in (5, 7) if not present[c]}
    # Some crops lose a novel class of the full image: the image-level labels are the crop's.
    assert crops_without == {5, 7}
    # A 16 x 16 crop of the 8 x 16 image: rows 8-15 are padding, marked for the complementary loss.
    cfg.model.img_size = 16
    b = next(iter(make_loader(cfg, [0.0] * 3, [1.0] * 3, D.DistInfo(), 0)))
    pad = b["pad"][0].numpy()
    assert pad[8:].all() and not pad[:8].any()
    assert (b["label"][0].numpy()[8:] == IGNORE).all()


def test_hide_novel_on_a_hand_built_map() -> None:
    lab = np.array([[[0, 1, IGNORE], [2, 1, 3]], [[3, 3, 3], [IGNORE, IGNORE, 0]]], np.int64)
    hidden, present = ws.hide_novel(lab, ws.novel_table([1, 3], 4))
    assert hidden.tolist() == [[[0, IGNORE, IGNORE], [2, IGNORE, IGNORE]], [[IGNORE] * 3, [IGNORE, IGNORE, 0]]]
    assert present.tolist() == [[1, 1, 1, 1], [1, 0, 0, 1]]
    assert lab[0, 0, 1] == 1  # the input is left as it was


def test_training_batches_never_carry_a_novel_pixel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spy on what `rankseg train --weak-shot` feeds the forward pass and the criterion."""
    from rankseg_core.engine import train as engine_train

    data = make_synthetic(tmp_path / "data", images=8, num_classes=40)
    counts = np.asarray(json.loads((data / "dataset.json").read_text())["splits"]["train"]["class_images"])
    novel = [int(c) for c in np.argsort(-counts)[:4]]  # the most frequent classes: in most crops
    (tmp_path / "split.json").write_text(json.dumps({"novel": novel}))
    seen: list[dict] = []
    real = engine_train.make_loader

    def spy(*args, **kw):
        for batch in real(*args, **kw):
            seen.append({k: v.clone() for k, v in batch.items() if k in ("label", "image_labels")})
            yield batch

    monkeypatch.setattr(engine_train, "make_loader", spy)
    res = run("train", "--data", data, "--out", tmp_path / "run", "--weak-shot", tmp_path / "split.json",
              "--iters", 3, "--set", "data.val_split=", *sum((["--set", s] for s in tiny_run(kappa=4)), []))
    assert res.exit_code == 0, res.output
    assert len(seen) >= 3
    novel_seen = 0
    for b in seen:
        lab, present = b["label"].numpy(), b["image_labels"].numpy()
        assert present.shape == (lab.shape[0], 40)
        assert not np.isin(lab, novel).any()  # fails if the hiding were skipped (novel_seen > 0)
        for i in range(lab.shape[0]):
            kept = set(np.unique(lab[i]).tolist()) - {IGNORE}
            assert kept == {c for c in np.flatnonzero(present[i]) if c not in novel}
            novel_seen += int(present[i, novel].sum())
    assert novel_seen > 0


# ---------------------------------------------------------------------------------------
# BaseIoU / NovelIoU


def simformer_eval(preds: list[np.ndarray], gts: list[np.ndarray], k: int, novel: list[int]) -> dict:
    """SimFormer's WeakShotSemSegEvaluator (prop_former/evaluation.py), re-typed in numpy: a
    (K+1) x (K+1) matrix [prediction, GT] with GT ignore in the last column; IoU / ACC only
    for classes with GT pixels; base / novel means skip the NaNs."""
    conf = np.zeros((k + 1, k + 1), np.int64)
    for p, g in zip(preds, gts):
        g = g.astype(np.int64).copy()
        g[g == IGNORE] = k
        conf += np.bincount((k + 1) * p.reshape(-1).astype(np.int64) + g.reshape(-1),
                            minlength=conf.size).reshape(conf.shape)
    tp = conf.diagonal()[:-1].astype(float)
    pos_gt = conf[:-1, :-1].sum(0).astype(float)
    pos_pred = conf[:-1, :-1].sum(1).astype(float)
    acc_valid, iou_valid = pos_gt > 0, (pos_gt + pos_pred) > 0
    acc, iou = np.full(k, np.nan), np.full(k, np.nan)
    acc[acc_valid] = tp[acc_valid] / pos_gt[acc_valid]
    iou[acc_valid] = tp[acc_valid] / (pos_gt + pos_pred - tp)[acc_valid]
    base = [c for c in range(k) if c not in novel]

    def mean(v: np.ndarray, ids: list[int]) -> float:
        x = [v[c] for c in ids if not np.isnan(v[c])]
        return float(np.mean(x)) if x else float("nan")

    return {"miou": float(np.sum(iou[acc_valid]) / np.sum(iou_valid)), "base_iou": mean(iou, base),
            "novel_iou": mean(iou, novel), "base_acc": mean(acc, base), "novel_acc": mean(acc, novel)}


def test_base_novel_iou_on_a_hand_built_case() -> None:
    """K = 4, novel {2, 3}; class 3 is predicted once but never in the GT: the official
    NovelIoU skips it, the mIoU counts it as 0."""
    gt = np.array([0, 0, 1, 1, 2, 2, 2, IGNORE])
    pred = np.array([0, 1, 1, 3, 2, 0, 2, 3])
    cm = ConfusionMatrix(4, IGNORE)
    cm.update(pred, gt)
    got = base_novel_scores(cm, [2, 3])
    # by hand: IoU 0: 1/(2+2-1), 1: 1/(2+2-1), 2: 2/(3+2-2); acc 1/2, 1/2, 2/3
    assert got["base_iou"] == pytest.approx(1 / 3) and got["novel_iou"] == pytest.approx(2 / 3)
    assert got["base_acc"] == pytest.approx(1 / 2) and got["novel_acc"] == pytest.approx(2 / 3)
    assert (got["num_base"], got["num_novel"], got["base_averaged"], got["novel_averaged"]) == (2, 2, 2, 1)
    assert cm.miou() == pytest.approx((1 / 3 + 1 / 3 + 2 / 3) / 4)  # class 3 counts with 0 here
    ref = simformer_eval([pred], [gt], 4, [2, 3])
    assert ref["miou"] == pytest.approx(cm.miou())
    assert all(got[key] == pytest.approx(ref[key]) for key in ("base_iou", "novel_iou", "base_acc", "novel_acc"))


def test_no_novel_class_in_the_gt_is_undefined_not_zero() -> None:
    cm = ConfusionMatrix(3, IGNORE)
    cm.update(np.array([0, 1, 2]), np.array([0, 1, 1]))
    got = base_novel_scores(cm, [2])
    assert math.isnan(got["novel_iou"]) and math.isnan(got["novel_acc"]) and got["novel_averaged"] == 0


def test_eval_predictions_novel_classes_match_the_official_evaluator(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    k, names = 7, [f"c{i}" for i in range(7)]
    gts = {f"im{i}": rng.integers(0, 6, (9, 11)).astype(np.uint16) for i in range(4)}  # class 6 never in GT
    for g in gts.values():
        g[0, :3] = IGNORE
    data = make_shards(tmp_path / "d", {"val": gts}, names)
    preds = {key: np.where((rng.random(g.shape) < 0.6) & (g != IGNORE), g, rng.integers(0, k, g.shape))
             .astype(np.uint16) for key, g in gts.items()}
    preds["im0"][1, 1] = 6  # a false positive of a class absent from the GT
    pdir = tmp_path / "preds"
    pdir.mkdir()
    for key, p in preds.items():
        cv2.imwrite(str(pdir / f"{key}.png"), p.astype(np.uint8))
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"novel": ["c1", "c4", "c6"]}))
    res = run("eval-predictions", pdir, "--data", data, "--novel-classes", split, "--json", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "r.json").read_text())
    ref = simformer_eval([preds[key] for key in gts], list(gts.values()), k, [1, 4, 6])
    for key in ("base_iou", "novel_iou", "base_acc", "novel_acc"):
        assert rep[key] == pytest.approx(ref[key]), key
    assert rep["miou"] == pytest.approx(ref["miou"])
    assert rep["weak_shot"]["novel_averaged"] == 2 and rep["novel_classes"] == str(split.resolve())
    assert rep["novel_classes_sha256"] == hashlib.sha256(split.read_bytes()).hexdigest()
    assert "NovelIoU" in res.output


# ---------------------------------------------------------------------------------------
# rankseg train --weak-shot: train, resume, evaluate


def _official_means(csv_path: Path, novel: list[int]) -> dict[str, float]:
    """The official base / novel means from the per-class CSV `rankseg eval` writes."""
    rows = list(csv.DictReader(csv_path.open()))
    iou = {int(r["id"]): float(r["iou"]) for r in rows if int(r["gt_pixels"]) > 0}
    acc = {int(r["id"]): float(r["acc"]) for r in rows if int(r["gt_pixels"]) > 0}

    def mean(d: dict, novel_side: bool) -> float:
        x = [v for c, v in d.items() if (c in novel) == novel_side]
        return float(np.mean(x)) if x else float("nan")

    return {"base_iou": mean(iou, False), "novel_iou": mean(iou, True), "base_acc": mean(acc, False),
            "novel_acc": mean(acc, True)}


@pytest.mark.slow
def test_train_resume_and_evaluate_a_weak_shot_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from safetensors.torch import load_file

    from rankseg_core.engine.configure import build_train_config
    from rankseg_core.engine.runs import load_config
    from rankseg_core.engine.train import train

    data = make_synthetic(tmp_path / "data", images=10, num_classes=40, val_images=3)
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"novel": [1, 3, 5, 7, 9, 11], "num_classes": 40}))
    sets = sum((["--set", s] for s in [*tiny_run(kappa=4), "ckpt_every=2"]), [])
    args = ["train", "--data", data, "--weak-shot", split, "--iters", 4, *sets]
    straight = run(*args, "--out", tmp_path / "a")
    assert straight.exit_code == 0, straight.output
    assert "NovelIoU" in straight.output
    cfg = load_config(tmp_path / "a")
    assert cfg.data.novel_classes == [1, 3, 5, 7, 9, 11] and cfg.data.weak_shot == str(split.resolve())
    assert cfg.data.weak_shot_sha256 == hashlib.sha256(split.read_bytes()).hexdigest()

    lib_sets = [*tiny_run(kappa=4), "ckpt_every=2", "schedule.iters=4", f"data.weak_shot={split}"]
    train_until_checkpoint(monkeypatch, 2, lambda: train(build_train_config(None, lib_sets, data), tmp_path / "b",
                                                         progress=False))
    resumed = run("train", "--out", tmp_path / "b", "--resume")
    assert resumed.exit_code == 0, resumed.output
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(np.array_equal(wa[n].numpy(), wb[n].numpy()) for n in wa)  # exact resume

    res = run("eval", tmp_path / "a", "--json", tmp_path / "a.json")
    assert res.exit_code == 0, res.output
    assert "BaseIoU / NovelIoU" in res.output
    rep = json.loads((tmp_path / "a.json").read_text())
    want = _official_means(tmp_path / "a_per_class.csv", [1, 3, 5, 7, 9, 11])
    for key, value in want.items():
        assert rep[key] == pytest.approx(value, nan_ok=True), key
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all("mil" in r and "comp" in r for r in records if r["type"] == "train")  # the novel terms are logged
    final = records[-1]
    assert final["final"] and final["novel_iou"] == pytest.approx(want["novel_iou"], nan_ok=True)
    assert rep["config"]["novel_classes"] == str(split.resolve())
    # Another split for the same run: --novel-classes.
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"novel": [0, 2]}))
    res = run("eval", tmp_path / "a", "--json", tmp_path / "o.json", "--novel-classes", other)
    assert res.exit_code == 0, res.output
    rep = json.loads((tmp_path / "o.json").read_text())
    assert rep["weak_shot"]["num_novel"] == 2 and rep["config"]["novel_classes"] == str(other.resolve())

    # A changed split file is refused on --resume, in one line, before anything is written.
    train_until_checkpoint(monkeypatch, 2, lambda: train(build_train_config(None, lib_sets, data), tmp_path / "c",
                                                         progress=False))
    split.write_text(json.dumps({"novel": [1, 3, 5], "num_classes": 40}))
    before = (tmp_path / "c" / "config.yaml").read_text()
    assert_one_line_error(run("train", "--out", tmp_path / "c", "--resume"), "the split file changed")
    assert (tmp_path / "c" / "config.yaml").read_text() == before


def test_weak_shot_needs_a_family_with_weak_shot_losses(tmp_path: Path) -> None:
    from rankseg_core.engine.configure import build_train_config

    data = make_synthetic(tmp_path / "data", images=2, num_classes=40, val_images=1)
    with pytest.raises(UserError, match=r"deeplabv3-r18\) has no weak-shot losses; use a model of a family that "
                                        r"has: segmenter, mask2former") as err:
        build_train_config(None, ["model.model=deeplabv3-r18", "data.novel_classes=[1,2]"], data)
    assert "\n" not in str(err.value)
