"""`prepare synthetic --pretrain-images N`: a disjoint pre-training split of the same world that
leaves the train / val shards byte-identical."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from conftest import assert_one_line_error
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.synthetic import make_world, prepare_synthetic
from rankseg_core.shards.read import ShardDataset

runner = CliRunner()


def _prepare(out: Path, pretrain: int) -> dict:
    return prepare_synthetic(out, num_classes=60, images=6, val_images=3, size=32, seed=0, pretrain_images=pretrain,
                             opts=ConvertOptions(samples_per_shard=4))


def _pixels(root: Path, split: str) -> set[str]:
    ds = ShardDataset(root, split)
    return {hashlib.sha256(np.ascontiguousarray(ds[i]["image"]).tobytes()).hexdigest() for i in range(len(ds))}


def test_pretrain_split_leaves_train_val_identical_and_is_disjoint(tmp_path: Path) -> None:
    plain = _prepare(tmp_path / "plain", 0)
    more = _prepare(tmp_path / "more", 10)
    # Without the option, nothing records it; with it, only dataset.json's options and splits differ.
    assert "pretrain_images" not in plain["options"] and "pretrain" not in plain["splits"]
    assert more["options"]["pretrain_images"] == 10 and more["splits"]["pretrain"]["num_samples"] == 10
    for split in ("train", "val"):
        names = sorted(p.name for p in (tmp_path / "plain").glob(f"{split}-*.h5"))
        assert names and names == sorted(p.name for p in (tmp_path / "more").glob(f"{split}-*.h5"))
        for name in names:
            assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "more" / name).read_bytes()
        assert plain["splits"][split] == more["splits"][split]
    # Same world (K, class names), other images: no pretrain image repeats a train / val one.
    assert more["class_names"] == plain["class_names"] == list(make_world(60, 0).names)
    pre = _pixels(tmp_path / "more", "pretrain")
    assert len(pre) == 10 and not pre & (_pixels(tmp_path / "more", "train") | _pixels(tmp_path / "more", "val"))
    # ...drawn from the same scenes: every pretrain image holds one scene's background and its objects.
    world = make_world(60, 0)
    scenes = [set(o.tolist()) | {int(b)} for o, b in zip(world.scenes_objects, world.scenes_bg)]
    ds = ShardDataset(tmp_path / "more", "pretrain")
    for i in range(len(ds)):
        assert any(set(ds[i]["classes"].tolist()) <= s for s in scenes)


def test_cli_pretrain_images(tmp_path: Path) -> None:
    res = runner.invoke(app, ["prepare", "synthetic", "--out", str(tmp_path / "d"), "--num-classes", "60",
                              "--images", "4", "--size", "32", "--pretrain-images", "5"])
    assert res.exit_code == 0, res.output
    assert "pretrain: 5 samples" in " ".join(res.output.split())
    meta = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert list(meta["splits"]) == ["train", "val", "pretrain"]
    res = runner.invoke(app, ["prepare", "synthetic", "--out", str(tmp_path / "e"), "--pretrain-images", "-1"])
    assert_one_line_error(res, "--pretrain-images must be >= 0")
    assert not (tmp_path / "e").exists()
