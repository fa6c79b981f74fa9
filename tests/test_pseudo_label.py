"""SimFormer* pseudo labels (`rankseg pseudo-label`, engine/pseudo_label.py): the official
merge rule, new shards checked against an independent route (`rankseg eval --save-predictions`
of the same run + the official function re-typed here), images byte for byte, the other splits
copied, one-line refusals, and an interrupted call that resumes to the same bytes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml
from conftest import assert_one_line_error, make_synthetic, tiny_run
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.data.weak_shot import novel_table
from rankseg_core.engine import pseudo_label as pl
from rankseg_core.errors import UserError
from rankseg_core.shards.read import ShardDataset, ShardIndex
from rankseg_core.utils import integrity
from rankseg_core.utils.lock import is_lock_file

IGNORE = 65535
K = 40
NOVEL = [1, 3, 5, 7, 9, 11]


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def official_generate_pseudo_label(pred: np.ndarray, gt: np.ndarray, novel: list[int], k: int) -> np.ndarray:
    """`prop_former/pseudo_labeling.py` `generate_pseudo_label`, "existing" images, re-typed:
    uint8 maps with 255 = ignore, c_did_to_cid the identity (the official dids are our train
    ids, docs/weak-shot.md). Converted from / to our 65535 ignore at the edges."""
    assert k < 255
    gt_raw = np.where(gt == IGNORE, 255, gt).astype(np.int64)
    base = [c for c in range(k) if c not in novel]
    mixed = np.ones_like(gt_raw) * 255
    for did in np.unique(gt_raw):
        if did == 255:
            continue
        if did in novel:
            mixed[pred == did] = did
    for did in np.unique(gt_raw):
        if did == 255:
            continue
        if did in base:
            mixed[gt_raw == did] = did
    mixed = mixed.astype(np.uint8).astype(np.int64)  # the official file is a uint8 PNG
    return np.where(mixed == 255, IGNORE, mixed).astype(np.uint16)


# ---------------------------------------------------------------------------------------
# The rule


def test_rule_on_a_hand_built_case() -> None:
    """K = 5, novel {2, 3, 4}; the image's original label holds novel 2 and 3, not 4."""
    g = IGNORE
    gt = np.array([[0, 1, 2, 2],
                   [g, g, 3, 1],
                   [0, 2, g, 2]], np.uint16)
    pred = np.array([[2, 1, 2, 4],
                     [2, 0, 3, 3],
                     [1, 3, 4, 0]])
    want = np.array([[0, 1, 2, g],  # base GT kept over a novel prediction; 4 is not in the image
                     [2, g, 3, 1],  # an unlabelled pixel takes a present novel prediction, not a base one
                     [0, 3, g, g]], np.uint16)  # a present novel class kept even if wrong; base over hidden -> ignore
    got = pl.pseudo_label(gt, pred, novel_table([2, 3, 4], 5))
    assert got.dtype == np.uint16 and got.tolist() == want.tolist()
    assert official_generate_pseudo_label(pred, gt, [2, 3, 4], 5).tolist() == want.tolist()
    # No novel class in the original label: the base GT, nothing else (novel predictions dropped).
    only_base = np.array([[0, 1], [g, 1]], np.uint16)
    assert pl.pseudo_label(only_base, np.array([[2, 3], [4, 0]]), novel_table([2, 3, 4], 5)).tolist() == \
        [[0, 1], [g, 1]]
    with pytest.raises(ValueError, match="differ in size"):
        pl.pseudo_label(gt, pred[:, :3], novel_table([2], 5))


def test_rule_equals_the_official_function_on_random_maps() -> None:
    rng = np.random.default_rng(0)
    for trial in range(30):
        k = int(rng.integers(3, 12))
        novel = sorted(rng.choice(k, int(rng.integers(1, k)), replace=False).tolist())
        gt = rng.integers(0, k, (7, 9)).astype(np.uint16)
        gt[rng.random(gt.shape) < 0.2] = IGNORE
        pred = rng.integers(0, k, gt.shape)
        got = pl.pseudo_label(gt, pred, novel_table(novel, k))
        assert np.array_equal(got, official_generate_pseudo_label(pred, gt, novel, k)), trial


# ---------------------------------------------------------------------------------------
# A tiny weak-shot run, its pseudo-labelled shards (shared by the tests below)


@pytest.fixture(scope="module")
def ws(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Synthetic shards (10 train, 3 val images, K = 40), a 2-step weak-shot Segmenter run whose
    test protocol is NOT the official one (scale 0.5), and its pseudo labels written
    with the official protocol (3 samples per shard: 4 train shards)."""
    root = tmp_path_factory.mktemp("pseudo")
    data = make_synthetic(root / "data", images=10, num_classes=K, val_images=3, per_shard=4)
    split = root / "split.json"
    split.write_text(json.dumps({"novel": NOVEL}))
    sets = [*tiny_run(kappa=4), "data.val_split=", "eval.scales=[0.5]", "device=cpu"]
    res = run("train", "--data", data, "--out", root / "run", "--weak-shot", split, "--iters", 2,
              *sum((["--set", s] for s in sets), []))
    assert res.exit_code == 0, res.output
    res = run("pseudo-label", root / "run", "--out", root / "new", "--samples-per-shard", 3, "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert "train (pseudo labels)" in res.output and "val (copied)" in res.output
    return {"root": root, "data": data, "run": root / "run", "new": root / "new", "split": split}


def saved_predictions(run_dir: Path, out: Path, *eval_args: object) -> dict[str, np.ndarray]:
    """`rankseg eval RUN --split train --save-predictions OUT ...`: key -> predicted map."""
    res = run("eval", run_dir, "--split", "train", "--device", "cpu", "--json", out.with_suffix(".json"),
              "--save-predictions", out, *eval_args)
    assert res.exit_code == 0, res.output
    return {p.stem: cv2.imread(str(p), cv2.IMREAD_UNCHANGED).astype(np.int64) for p in out.glob("*.png")}


def check_against_eval(data: Path, new: Path, preds: dict[str, np.ndarray]) -> dict[str, int]:
    """Every train label of `new` is the official rule applied to (original label, saved
    prediction), every image is the source's bytes; returns pixel counts of the rule's cases."""
    src, dst = ShardDataset(data, "train"), ShardDataset(new, "train")
    assert dst.arrays.keys == sorted(src.arrays.keys) and len(preds) == len(src)
    where = src.key_to_index()
    counts = {"base": 0, "novel_kept": 0, "novel_hidden_dropped": 0}
    for i, key in enumerate(dst.arrays.keys):
        j = where[key]
        assert dst.raw(i)[0] == src.raw(j)[0]  # the image, byte for byte
        gt, label = src.load(j)["label"], dst.load(i)["label"]
        want = official_generate_pseudo_label(preds[key], gt, NOVEL, K)
        assert np.array_equal(label, want), key
        novel_gt = np.isin(gt, NOVEL)
        counts["base"] += int(((gt != IGNORE) & ~novel_gt).sum())
        counts["novel_kept"] += int(np.isin(label, NOVEL).sum())
        counts["novel_hidden_dropped"] += int((novel_gt & (label == IGNORE)).sum())
        assert dst.arrays.classes_of(i).tolist() == sorted(set(np.unique(label).tolist()) - {IGNORE})
    return counts


def test_new_shards_are_the_rule_applied_to_eval_predictions(ws: dict[str, Path]) -> None:
    data, new, run_dir = ws["data"], ws["new"], ws["run"]
    assert run("verify", new, "--images").exit_code == 0
    # The independent route: the official protocol (whole, scale 1, no flip) through `eval`.
    preds = saved_predictions(run_dir, ws["root"] / "preds_official", "--mode", "whole", "--scales", "1")
    counts = check_against_eval(data, new, preds)
    assert min(counts.values()) > 0, counts  # every case of the rule occurs in these images
    # The other split: copied sample by sample, images and labels byte for byte.
    src_val, new_val = ShardDataset(data, "val"), ShardDataset(new, "val")
    assert new_val.arrays.keys == src_val.arrays.keys
    assert all(new_val.raw(i) == src_val.raw(i) for i in range(len(src_val)))
    # The header: the source's dataset, what made the labels, and the run's weights digest.
    src, meta = ShardIndex(data).meta, ShardIndex(new).meta
    assert (meta["name"], meta["class_names"], meta["num_classes"]) == (src["name"], src["class_names"], K)
    made = meta["options"]["pseudo_label"]
    header = integrity.safetensors_metadata((run_dir / "model.safetensors").read_bytes())
    assert made["weights_sha256"] == header[integrity.KEY]
    assert made["source"] == str(data.resolve()) and made["run"] == str(run_dir.resolve())
    assert made["weights"] == str((run_dir / "model.safetensors").resolve())
    assert made["split"] == "train" and made["novel_classes"] == NOVEL
    assert made["protocol"]["mode"] == "whole" and made["protocol"]["scales"] == [1.0] and not made["protocol"]["flip"]
    assert [s["num_samples"] for s in meta["splits"]["train"]["shards"]] == [3, 3, 3, 1]
    assert meta["splits"]["val"]["class_pixels"] == src["splits"]["val"]["class_pixels"]


def test_run_protocol_and_retraining(ws: dict[str, Path]) -> None:
    """--run-protocol predicts as `rankseg eval` does by default (the run's scale 0.5);
    a finished --out made with another protocol is refused; the new shards, whose training
    labels hold novel pixels, train without --weak-shot (the retraining)."""
    root, data, run_dir = ws["root"], ws["data"], ws["run"]
    res = run("pseudo-label", run_dir, "--out", root / "new_run_protocol", "--run-protocol", "--device", "cpu")
    assert res.exit_code == 0, res.output
    preds = saved_predictions(run_dir, root / "preds_run")
    check_against_eval(data, root / "new_run_protocol", preds)
    made = ShardIndex(root / "new_run_protocol").meta["options"]["pseudo_label"]
    assert made["protocol"]["scales"] == [0.5]
    official, ours = ShardDataset(ws["new"], "train"), ShardDataset(root / "new_run_protocol", "train")
    assert any(official.raw(i)[1] != ours.raw(i)[1] for i in range(len(ours)))  # the option matters here
    res = run("pseudo-label", run_dir, "--out", ws["new"], "--run-protocol", "--samples-per-shard", 3)
    assert_one_line_error(res, "holds pseudo labels made with other inputs (protocol differ)")

    novel_pixels = np.asarray(ShardIndex(ws["new"]).meta["splits"]["train"]["class_pixels"])[NOVEL]
    assert novel_pixels.sum() > 0
    res = run("train", "--data", ws["new"], "--out", root / "retrained", "--iters", 1,
              *sum((["--set", s] for s in [*tiny_run(kappa=4), "data.val_split=", "device=cpu"]), []))
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load((root / "retrained" / "config.yaml").read_text())
    assert cfg["data"]["novel_classes"] is None and cfg["data"]["root"] == str(ws["new"])


# ---------------------------------------------------------------------------------------
# Refusals: one line, nothing written


def test_bad_inputs_are_refused_in_one_line(ws: dict[str, Path], tmp_path: Path) -> None:
    data, run_dir = ws["data"], ws["run"]

    def refused(*args: object, fragments: tuple[str, ...], out: Path | None = None) -> None:
        target = out if out is not None else tmp_path / "never"
        before = sorted(p.name for p in target.iterdir()) if target.is_dir() else None
        assert_one_line_error(run("pseudo-label", *args, "--out", target, "--device", "cpu"), *fragments)
        assert (sorted(p.name for p in target.iterdir()) if target.is_dir() else None) == before

    plain = tmp_path / "plain_run"  # the same run, its config without a weak-shot split
    plain.mkdir()
    cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
    cfg["data"].update(novel_classes=None, weak_shot=None, weak_shot_sha256="")
    (plain / "config.yaml").write_text(yaml.safe_dump(cfg))
    refused(plain, fragments=("is not a weak-shot run", "--weak-shot"))
    refused(run_dir, "--data", data, fragments=("must be outside the source shards",), out=data)
    refused(run_dir, fragments=("must be outside the source shards",), out=data / "inner")
    refused(run_dir, "--data", data, fragments=("must be outside the source shards",), out=data.parent)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    refused(run_dir, fragments=("is not empty and was not made by `rankseg pseudo-label`",), out=foreign)
    other_shards = make_synthetic(tmp_path / "other", images=2, num_classes=41, val_images=1)
    refused(run_dir, fragments=("is not empty and was not made by `rankseg pseudo-label`",), out=other_shards)
    refused(run_dir, "--split", "nope", fragments=("--split nope", "has no such split", "train, val"))
    refused(run_dir, "--data", other_shards, fragments=("K=41 but the run was trained with K=40",))
    refused(run_dir, "--scales", "0", fragments=("--scales 0",))
    with pytest.raises(UserError, match="--samples-per-shard 0"):
        pl.make_pseudo_labels(run_dir, tmp_path / "never", opts=pl.PseudoLabelOptions(samples_per_shard=0))


# ---------------------------------------------------------------------------------------
# Ctrl-C, then the same command again


def test_interrupted_call_leaves_only_complete_shards_and_resumes_to_the_same_bytes(
        ws: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "cut"
    real, calls = pl.pseudo_label, []

    def interrupt_at_8th(*args, **kwargs):
        calls.append(1)
        if len(calls) == 8:  # train shards hold 3, 3, 3, 1 samples: the third is being made
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(pl, "pseudo_label", interrupt_at_8th)
    args = ("pseudo-label", ws["run"], "--out", out, "--samples-per-shard", 3, "--device", "cpu")
    res = run(*args)
    assert res.exit_code == 130 and "re-run the same command to resume" in res.output, res.output
    assert not (out / "dataset.json").exists()
    assert sorted(p.name for p in out.glob("*.h5")) == ["train-00000-of-00004.h5", "train-00001-of-00004.h5"]
    assert not list(out.glob("*.tmp"))
    with pytest.raises(UserError, match="dataset.json is missing"):
        ShardIndex(out)
    assert_one_line_error(run("verify", out), "dataset.json is missing")  # not usable as a shard set
    assert_one_line_error(run("train", "--data", out, "--out", tmp_path / "r", "--dry-run"), "dataset.json is missing")

    calls.clear()
    monkeypatch.setattr(pl, "pseudo_label", lambda *a, **k: (calls.append(1), real(*a, **k))[1])
    res = run(*args)
    assert res.exit_code == 0, res.output
    assert len(calls) == 4  # only the unfinished shards were predicted
    made = sorted(p.name for p in ws["new"].iterdir() if not is_lock_file(p.name))
    assert sorted(p.name for p in out.iterdir() if not is_lock_file(p.name)) == made
    for name in made:  # shards, sidecars, dataset.json, marker: byte for byte the uninterrupted call's
        assert (out / name).read_bytes() == (ws["new"] / name).read_bytes(), name
    # Done is done: the same command again writes nothing and keeps the bytes.
    calls.clear()
    assert run(*args).exit_code == 0 and not calls
    shutil.rmtree(out)
