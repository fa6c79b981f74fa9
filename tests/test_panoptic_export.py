"""COCO panoptic export, read back with this file's own decoder; and the synthetic panoptic set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_synthetic
from panoptic_trees import bbox, read_coco_panoptic, read_png_ids
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.convert.coco_panoptic_format import (
    Category,
    categories_of,
    id2rgb,
    image_id_of,
    rgb2id,
    write_coco_panoptic,
)
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.synthetic import make_world, prepare_synthetic, render_panoptic
from rankseg_core.errors import UserError
from rankseg_core.evaluation.panoptic_quality import PanopticQuality, gt_from_shard
from rankseg_core.shards.codec import IGNORE
from rankseg_core.shards.verify import verify_shards

runner = CliRunner()
CATS = [Category(1, "person", True), Category(7, "train", True), Category(92, "banner", False)]


def test_rgb_id_round_trip() -> None:
    ids = np.array([[0, 1, 255], [256, 65535, 65536], [123456, 2 ** 24 - 1, 7]])
    rgb = id2rgb(ids)
    assert rgb[1, 2].tolist() == [0, 0, 1] and rgb[0, 2].tolist() == [255, 0, 0]  # R is the low byte
    assert np.array_equal(rgb2id(rgb), ids)
    with pytest.raises(ValueError):
        id2rgb(np.array([[2 ** 24]]))


def test_export_reads_back(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    preds = []
    for i in range(3):
        blocks = np.kron(rng.integers(0, 4, (6, 8)), np.ones((5, 5), np.int64))
        ids = np.where(blocks == 0, 0, blocks * 70001 + i)  # block 0 = void; ids use all 3 bytes
        seg_ids = [int(v) for v in np.unique(ids) if v]
        info = [{"id": s, "category": int(rng.integers(0, 3))} for s in seg_ids]
        info.append({"id": 999_999, "category": 0})  # no pixel: dropped from the export
        preds.append((100 + i, f"{100 + i:012d}.png", ids, info))
    path = write_coco_panoptic(tmp_path / "exp", preds, CATS)
    assert path == tmp_path / "exp" / "predictions.json"
    doc = json.loads(path.read_text())
    assert doc["categories"] == [{"id": 1, "name": "person", "isthing": 1}, {"id": 7, "name": "train", "isthing": 1},
                                 {"id": 92, "name": "banner", "isthing": 0}]
    for (image_id, name, ids, info), ann in zip(preds, doc["annotations"]):
        assert ann["image_id"] == image_id and ann["file_name"] == name
        back = read_png_ids(tmp_path / "exp" / "predictions" / name)
        assert np.array_equal(back, ids)
        want = [{"id": r["id"], "category_id": CATS[r["category"]].id, "iscrowd": 0,
                 "area": int((ids == r["id"]).sum()), "bbox": bbox(ids == r["id"]),
                 "isthing": int(CATS[r["category"]].isthing)} for r in info if (ids == r["id"]).any()]
        assert ann["segments_info"] == want
    # the library's reader agrees
    for (ann, ids), pred in zip(read_coco_panoptic(path), preds):
        assert np.array_equal(ids, pred[2])
    with pytest.raises(UserError, match="exists"):
        write_coco_panoptic(tmp_path / "exp", preds, CATS)


def test_export_bad_inputs(tmp_path: Path) -> None:
    ids = np.array([[1, 2], [2, 0]])
    with pytest.raises(ValueError, match="not in segments_info"):
        write_coco_panoptic(tmp_path / "a", [(1, "a.png", ids, [{"id": 1, "category": 0}])], CATS)
    with pytest.raises(ValueError, match="train id"):
        write_coco_panoptic(tmp_path / "b", [(1, "a.png", ids, [{"id": 1, "category": 0},
                                                                 {"id": 2, "category": 3}])], CATS)
    with pytest.raises(ValueError, match="unique"):
        write_coco_panoptic(tmp_path / "c", [(1, "a.png", ids, [{"id": 1, "category": 0}] * 2)], CATS)
    ok = [{"id": 1, "category": 0}, {"id": 2, "category": 2}]
    with pytest.raises(ValueError, match=r"\*.png"):
        write_coco_panoptic(tmp_path / "d", [(1, "../a.png", ids, ok)], CATS)
    with pytest.raises(ValueError, match="unique"):
        write_coco_panoptic(tmp_path / "e", [(1, "a.png", ids, ok), (2, "a.png", ids, ok)], CATS)
    assert not (tmp_path / "e" / "predictions.json").exists()  # no JSON: the export is not complete


def test_categories_of_and_image_ids() -> None:
    meta = {"class_names": ["a", "b", "c"], "thing_classes": [1], "options": {"category_ids": [5, 9, 11]}}
    assert categories_of(meta) == [Category(5, "a", False), Category(9, "b", True), Category(11, "c", False)]
    assert [c.id for c in categories_of({"class_names": ["a", "b"], "thing_classes": []})] == [0, 1]
    with pytest.raises(UserError, match="category_ids"):
        categories_of({"class_names": ["a"], "options": {"category_ids": [1, 2]}})
    assert image_id_of("000000142238") == 142238 and image_id_of("ADE_val_00000001") == "ADE_val_00000001"


# --- synthetic panoptic ------------------------------------------------------------------------------

def test_synthetic_panoptic(tmp_path: Path) -> None:
    from rankseg_core.shards.read import ShardDataset

    index = prepare_synthetic(tmp_path / "a", num_classes=60, images=16, size=48, seed=2, panoptic=True,
                              opts=ConvertOptions(samples_per_shard=8))
    world = make_world(60, 2)
    assert index["version"] == 2 and index["options"]["panoptic"] is True
    assert index["thing_classes"] == [k for k in range(60) if world.appearance[k] >= 0]
    assert list(verify_shards(tmp_path / "a", decode_images=True)) == []
    ds = ShardDataset(tmp_path / "a", "train")
    repeated = 0
    pq = PanopticQuality(60, index["thing_classes"])
    for i in range(len(ds)):
        item = ds.load(i)
        seg, info = item["segments"].astype(np.int64), item["segments_info"]
        cats = [r["category"] for r in info]
        # one stuff segment (the scene background) and >= 1 thing instance per image
        assert sum(world.appearance[c] < 0 for c in cats) == 1 and len(cats) >= 2
        repeated += len(cats) - len(set(cats))
        # neighbouring pixels of two different segments never touch: a void line separates them
        for a, b in ((seg[1:], seg[:-1]), (seg[:, 1:], seg[:, :-1])):
            assert not ((a != b) & (a > 0) & (b > 0)).any()
        want = np.array([IGNORE] + cats)[seg]
        assert np.array_equal(item["label"], want)
        pq.update(*gt_from_shard(seg, info), *gt_from_shard(seg, info))
    assert repeated > 0  # several instances of one class occur
    assert pq.compute()["all"]["pq"] == 1.0
    # same seed, same bytes
    make_synthetic(tmp_path / "b", num_classes=60, images=16, size=48, seed=2, panoptic=True)
    for f in sorted(p.name for p in (tmp_path / "a").glob("*.h5")):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_render_panoptic_regions() -> None:
    world = make_world(100, 0)
    image, ids, segment_class = render_panoptic(world, np.random.default_rng([0, 1, 5]), 64)
    assert image.shape == (64, 64, 3) and ids.shape == (64, 64)
    n = len(segment_class) - 1
    assert set(np.unique(ids).tolist()) <= set(range(n + 1))
    assert world.appearance[segment_class[n]] < 0  # the last segment is the background (stuff)
    assert all(world.appearance[c] >= 0 for c in segment_class[1:n])


def test_synthetic_panoptic_cli(tmp_path: Path) -> None:
    out = tmp_path / "p"
    res = runner.invoke(app, ["prepare", "synthetic", "--out", str(out), "--num-classes", "40", "--images", "4",
                              "--size", "32", "--panoptic"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "dataset.json").read_text())["panoptic"] is True
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    assert "--panoptic" in runner.invoke(app, ["prepare", "synthetic", "--help"]).output
