"""The synthetic generator's world options (docs/synthetic.md, "Harder worlds"): B shared
backgrounds (B = S is today's world, byte for byte), every class appearing, their CLI flags and
their record in dataset.json."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.synthetic import (
    CLASSES_PER_SCENE,
    NUM_APPEARANCES,
    World,
    make_sample,
    make_world,
    num_scenes,
    prepare_synthetic,
    scenes_of,
    shown_classes,
    world_of,
)
from rankseg_core.errors import UserError
from rankseg_core.shards.codec import decode_label
from rankseg_core.shards.read import ShardDataset

runner = CliRunner()

# Computed on 2026-12-06 01:25 UTC with the generator as it was BEFORE the world options existed
# (the unmodified make_world / make_sample / prepare_synthetic), so these pin today's world. The
# independent check of the same fact: with the new code and --backgrounds 8, the replication's
# K = 200 shards written at 19:31 the day before (runs/replication/synthetic_K200_64px_2000) came
# out byte-identical, every file but env.json (checked by hand, 2,200 images; too slow here).
# SAMPLE_DIGEST hashes the decoded label (recomputed with the code of commit a673814 when the
# label PNG filter changed; the world and the JPEG bytes are the same as before).
WORLD_DIGEST = {60: "22df1000434cf99be64aad56161dee331b630dd30baa52fbf753c8ab7115484f",
                200: "fffb6f269f7da8b574fc33108275f7f8e1d4d86796f04887a8777d4a54d7c07a"}
SAMPLE_DIGEST = {"train_000000": "93ee1df632a420ceb5c912d2c1d8f87926d26f15842d6b3424965926f10dce19",
                 "train_001999": "c3ef475458db7979fd290ad4df832861ddd5d85f6ac1f0b4ff70d1381e2b44df",
                 "val_000007": "5e5870fe31839d52292615d61ccbed1bf06bed9eb605bdb2eb49a3fe38131b27"}
# The shard directory's content (`_content`: every sample's key, JPEG bytes, decoded label and
# classes, and dataset.json's names) of prepare_synthetic(K = 60, 12 train, 4 val, 32 px, seed 3,
# 500 samples per shard), computed with the code of commit a673814 (the generator pinned above,
# before the label PNGs were written with one row filter: the files' bytes changed then, their
# decoded values did not).
CONTENT_DIGEST = "e8e4cd791dd92f6b04cca31f9bccc8d6fa9c19ecbc550bfa797f11b54ab2a60d"


def _world_digest(w: World) -> str:
    h = hashlib.sha256()
    for a in (w.appearance, w.background_colour, w.scenes_bg, w.scenes_objects, w.scene_weights):
        h.update(np.ascontiguousarray(a).tobytes())
    h.update("\n".join(w.names).encode())
    return h.hexdigest()


def _sample_digest(key: str, world: World) -> str:
    s = make_sample(key, world=world, seed=0, size=64)
    h = hashlib.sha256()
    # The label's decoded values, not its PNG bytes (which depend on the encoder's settings).
    for part in (s.image, decode_label(s.label).tobytes(), s.classes.tobytes(), s.pixels.tobytes()):
        h.update(part)
    return h.hexdigest()


def _content(root: Path) -> str:
    """Digest of what a shard directory holds, independent of how its PNGs were compressed."""
    h = hashlib.sha256()
    index = json.loads((root / "dataset.json").read_text())
    h.update(json.dumps([index["num_classes"], index["class_names"]]).encode())
    for split in ("train", "val"):
        ds = ShardDataset(root, split)
        for i in range(len(ds)):
            image, label = ds.blobs(i)
            h.update(ds.arrays.keys[i].encode())
            h.update(image.tobytes())
            h.update(decode_label(label).tobytes())
            h.update(ds.arrays.classes_of(i).tobytes())
    return h.hexdigest()


def _files(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in root.iterdir()
            if p.is_file() and p.name != "env.json"}  # env.json: the machine, not the data


def _prepare(out: Path, **kw) -> dict:
    return prepare_synthetic(out, num_classes=60, images=12, val_images=4, size=32, seed=3,
                             opts=ConvertOptions(samples_per_shard=500), **kw)


def test_b_equal_s_is_todays_world_byte_for_byte(tmp_path: Path) -> None:
    for k in (60, 200):
        assert _world_digest(make_world(k, 0)) == WORLD_DIGEST[k]
        assert _world_digest(make_world(k, 0, backgrounds=num_scenes(k))) == WORLD_DIGEST[k]
    w = make_world(200, 0, backgrounds=8)
    assert {key: _sample_digest(key, w) for key in SAMPLE_DIGEST} == SAMPLE_DIGEST
    # Whole shard directories: the default and an explicit B = S hold today's world, in the
    # same files byte for byte.
    index = _prepare(tmp_path / "default")
    assert _content(tmp_path / "default") == CONTENT_DIGEST
    assert "backgrounds" not in index["options"] and "all_classes" not in index["options"]
    _prepare(tmp_path / "explicit", backgrounds=num_scenes(60))
    assert _files(tmp_path / "explicit") == _files(tmp_path / "default")


def test_shared_backgrounds_keep_the_vocabulary_and_hide_the_scene() -> None:
    k, s = 200, num_scenes(200)
    for b in (4, 2, 1):
        w = make_world(k, 0, backgrounds=b)
        bgs = np.flatnonzero(w.appearance < 0)
        assert len(bgs) == b and set(w.scenes_bg.tolist()) == set(bgs.tolist())  # freed classes became objects
        # Every background serves S / B scenes, so it no longer names one.
        assert sorted(np.unique(w.scenes_bg, return_counts=True)[1].tolist()) == [s // b] * b
        assert not np.isin(w.scenes_objects, bgs).any()
        for row in w.scenes_objects:  # a scene still shows one class per look
            assert len(set(w.appearance[row].tolist())) == len(row)
        # Drawn images: one background of the shared set, and a scene that could have drawn them.
        for i in range(6):
            c = make_sample(f"train_{i:06d}", world=w, seed=0, size=32).classes.astype(np.int64)
            assert len(set(c.tolist()) & set(bgs.tolist())) == 1
            assert len(scenes_of(w, c)) >= 1


def test_all_classes_puts_every_class_in_a_scene() -> None:
    # Today's world at K = 200 draws scenes' objects with replacement: 65 of 192 objects never appear.
    assert len(shown_classes(make_world(200, 0))) == 135
    for k, b in ((200, None), (200, 4), (200, 1), (100, 2), (60, None), (1000, 10)):
        w = make_world(k, 0, backgrounds=b, all_classes=True)
        assert np.array_equal(shown_classes(w), np.arange(k))
        s, per = w.scenes_objects.shape
        assert s == num_scenes(k) and CLASSES_PER_SCENE <= per <= NUM_APPEARANCES
        # The slots are as few as covering allows: 24, or ceil(objects / S) when that is more.
        assert per == max(CLASSES_PER_SCENE, -(-int((w.appearance >= 0).sum()) // s))
        for row in w.scenes_objects:
            assert len(set(w.appearance[row].tolist())) == len(row)
    # Not the default: the option changes the world (and is seeded like it).
    assert _world_digest(make_world(200, 0, all_classes=True)) != WORLD_DIGEST[200]
    assert _world_digest(make_world(200, 5, all_classes=True)) == _world_digest(make_world(200, 5, all_classes=True))


def test_world_options_refused_in_one_line() -> None:
    for b in (0, -1, 9):
        with pytest.raises(ValueError, match=rf"--backgrounds {b}: must be 1\.\.8"):
            make_world(200, 0, backgrounds=b)
    # K = 74: 2 scenes, 72 objects, 3 classes of one look: no scene can hold two of them.
    with pytest.raises(ValueError, match="--all-classes: a look has 3 classes but there are only 2 scenes"):
        make_world(74, 0, all_classes=True)
    with pytest.raises(UserError, match="--backgrounds 9"):
        prepare_synthetic("/nonexistent/never-written", num_classes=200, images=2, size=32, backgrounds=9)


def test_scenes_of_on_a_hand_built_world() -> None:
    # Two scenes sharing background 0: scene 0 = {0, 1, 2}, scene 1 = {0, 2, 3}.
    w = World(num_classes=4, appearance=np.array([-1, 0, 1, 0]), background_colour=np.zeros((4, 3), np.uint8),
              scenes_bg=np.array([0, 0]), scenes_objects=np.array([[1, 2], [2, 3]]), scene_weights=np.array([.5, .5]),
              names=("b", "x", "y", "z"))
    assert scenes_of(w, np.array([0, 2])).tolist() == [0, 1]  # the shared classes fit both
    assert scenes_of(w, np.array([0, 1])).tolist() == [0]
    assert scenes_of(w, np.array([1, 3])).tolist() == []  # no scene draws both


def test_cli_flags_record_the_world_and_refuse_bad_input(tmp_path: Path) -> None:
    out = tmp_path / "w"
    res = runner.invoke(app, ["prepare", "synthetic", "--out", str(out), "--num-classes", "100", "--images", "4",
                              "--val-images", "2", "--size", "32", "--backgrounds", "2", "--all-classes"])
    assert res.exit_code == 0, res.output
    opts = json.loads((out / "dataset.json").read_text())["options"]
    assert opts["backgrounds"] == 2 and opts["all_classes"] is True
    assert _world_digest(world_of(opts)) == _world_digest(make_world(100, 0, backgrounds=2, all_classes=True))
    base = ["prepare", "synthetic", "--num-classes", "200", "--images", "2", "--size", "32"]
    for extra, msg in ((["--backgrounds", "0"], "--backgrounds 0: must be 1..8"),
                       (["--backgrounds", "9"], "--backgrounds 9: must be 1..8"),
                       (["--video", "--backgrounds", "2"], "videos use the default world"),
                       (["--video", "--all-classes"], "videos use the default world")):
        bad = tmp_path / "bad"
        assert_one_line_error(runner.invoke(app, [*base, "--out", str(bad), *extra]), msg)
        assert not (bad / "dataset.json").exists()
    res = runner.invoke(app, ["prepare", "synthetic", "--out", str(tmp_path / "bad"), "--num-classes", "74",
                              "--all-classes"])
    assert_one_line_error(res, "--all-classes: a look has 3 classes")
    assert "--backgrounds" in runner.invoke(app, ["prepare", "synthetic", "--help"]).output
