"""Synthetic video data (`prepare synthetic --video`): one shard set for VSPW-like semantic and
YouTube-VIS-like instance tasks, checked against the decoded shards themselves."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import assert_one_line_error, tiny_run
from pycocotools import mask as mask_utils
from typer.testing import CliRunner
from video_lvis_trees import read_samples

from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.synthetic import make_world
from rankseg_core.convert.synthetic_video import make_frame, prepare_synthetic_video
from rankseg_core.data.loading import clip_table
from rankseg_core.engine.configure import build_train_config
from rankseg_core.engine.train import train
from rankseg_core.shards.codec import IGNORE, decode_label
from rankseg_core.shards.read import ShardDataset, load_index
from rankseg_core.shards.verify import verify_shards

K, VIDEOS, VAL_VIDEOS, FRAMES, SIZE = 40, 6, 2, 6, 32


def prepare(out: Path, seed: int = 0, per_shard: int = 16) -> Path:
    prepare_synthetic_video(out, num_classes=K, videos=VIDEOS, val_videos=VAL_VIDEOS, frames=FRAMES, size=SIZE,
                            seed=seed, opts=ConvertOptions(samples_per_shard=per_shard))
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare(tmp_path_factory.mktemp("synthetic_video") / "data")


@pytest.fixture(scope="module")
def samples(data: Path) -> dict[str, dict]:
    return {**read_samples(data, "train"), **read_samples(data, "val")}


def tracks_of(samples: dict[str, dict]) -> dict[tuple[str, int], dict[int, np.ndarray]]:
    """(video, track id) -> {frame: decoded mask} over every frame the track is listed in."""
    out: dict[tuple[str, int], dict[int, np.ndarray]] = {}
    for s in samples.values():
        for inst in json.loads(s["instances"]):
            out.setdefault((s["video"], inst["track_id"]), {})[s["frame"]] = mask_utils.decode(
                {"size": inst["rle"]["size"], "counts": inst["rle"]["counts"].encode()}).astype(bool)
    return out


def file_hashes(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*.h5"))}


def test_layout_and_determinism(data: Path, samples: dict[str, dict], tmp_path: Path) -> None:
    meta = load_index(data)
    assert meta["name"] == "synthetic" and meta["num_classes"] == K
    assert meta["options"]["video"] is True and meta["options"]["frames"] == FRAMES
    assert {s: meta["splits"][s]["num_samples"] for s in ("train", "val")} == {
        "train": VIDEOS * FRAMES, "val": VAL_VIDEOS * FRAMES}
    # Every video has its frames 0..F-1, keys `<video>/<frame>`.
    by_video: dict[str, list[int]] = {}
    for key, s in samples.items():
        assert key == f"{s['video']}/{s['frame']:04d}"
        by_video.setdefault(s["video"], []).append(s["frame"])
    assert len(by_video) == VIDEOS + VAL_VIDEOS
    assert all(sorted(f) == list(range(FRAMES)) for f in by_video.values())
    # Same seed: the same bytes, shard by shard (hashed here, and as dataset.json records them).
    again = prepare(tmp_path / "again")
    assert file_hashes(again) == file_hashes(data) and len(file_hashes(data)) >= 2
    recorded = {sh["file"]: sh["sha256"] for s in ("train", "val") for sh in meta["splits"][s]["shards"]}
    assert recorded == file_hashes(data)
    # Any frame is made alone, in any order, from (seed, split, video, frame).
    world = make_world(K, 0)
    alone = make_frame("train_000003/0004", world=world, seed=0, size=SIZE, frames=FRAMES)
    stored = samples["train_000003/0004"]
    assert np.array_equal(decode_label(alone.label), stored["label"]) and alone.image == stored["image"]
    assert alone.instances == stored["instances"]
    # Another seed, another dataset.
    other = prepare(tmp_path / "other", seed=1)
    assert not set(file_hashes(other).values()) & set(file_hashes(data).values())


def test_tracks_move(samples: dict[str, dict]) -> None:
    moves, pairs = [], 0
    for frames in tracks_of(samples).values():
        centroid = {t: np.argwhere(m).mean(0) for t, m in frames.items()}
        for t in centroid:
            if t + 1 in centroid:
                pairs += 1
                moves.append(float(np.hypot(*(centroid[t + 1] - centroid[t]))))
    assert pairs > 50
    # Every track moves at >= 0.4 px per frame at 32 px; occlusion may hide it for a pair.
    assert np.mean(np.array(moves) > 0.2) > 0.9, moves
    assert 0.3 < np.median(moves) < 4, moves


def test_tracks_appear_and_disappear(samples: dict[str, dict]) -> None:
    appear = disappear = gap = 0
    for frames in tracks_of(samples).values():
        present = sorted(frames)
        assert all(frames[t].any() for t in present)  # a listed track has pixels
        appear += present[0] > 0
        disappear += present[-1] < FRAMES - 1
        gap += len(present) < FRAMES
    assert appear >= 2 and disappear >= 2 and gap >= 4, (appear, disappear, gap)


def test_labels_agree_with_instances(samples: dict[str, dict]) -> None:
    background = make_world(K, 0).appearance < 0
    category_of: dict[tuple[str, int], int] = {}
    for key, s in samples.items():
        label, insts = s["label"], json.loads(s["instances"])
        covered = np.zeros(label.shape, np.int64)
        assert len({i["track_id"] for i in insts}) == len(insts)
        for inst in insts:
            assert inst["iscrowd"] == 0 and inst["rle"]["size"] == list(label.shape)
            # A track keeps its class in every frame.
            assert category_of.setdefault((s["video"], inst["track_id"]), inst["category"]) == inst["category"]
            m = mask_utils.decode({"size": inst["rle"]["size"], "counts": inst["rle"]["counts"].encode()}).astype(bool)
            assert (label[m] == inst["category"]).all(), key  # the visible (top) track is the label
            assert not background[inst["category"]]
            covered += m
        assert covered.max() <= 1, key  # visible masks: one track per pixel
        labelled = label != IGNORE
        objects = labelled & ~background[np.where(labelled, label, 0)]
        # Object pixels are exactly the instances' pixels; the rest is the one scene background.
        assert np.array_equal(objects, covered == 1), key
        assert len(set(label[labelled & ~objects].tolist())) <= 1
        assert set(s["classes"]) == set(label[labelled].tolist())


def test_video_targets_are_unions_of_frames(data: Path, samples: dict[str, dict]) -> None:
    meta = load_index(data)
    union: dict[str, set[int]] = {}
    for s in samples.values():
        labelled = s["label"][s["label"] != IGNORE]
        union.setdefault(s["video"], set()).update(labelled.tolist())
    for split, n in (("train", VIDEOS), ("val", VAL_VIDEOS)):
        videos = meta["splits"][split]["videos"]
        assert len(videos) == n
        for v, rec in videos.items():
            assert rec == {"frames": FRAMES, "classes": sorted(union[v])}
    # Videos differ in what they show: the targets are not all one set.
    assert len({tuple(sorted(c)) for c in union.values()}) > 1


def test_verify_passes(data: Path) -> None:
    assert list(verify_shards(data, decode_images=True)) == []
    from rankseg_cli.app import app

    res = CliRunner().invoke(app, ["verify", str(data)])
    assert res.exit_code == 0 and "verified" in res.output, res.output


def test_cli(tmp_path: Path) -> None:
    from rankseg_cli.app import app

    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["prepare", "synthetic", "--out", str(out), "-k", "40", "--video", "--images", "2",
                                   "--frames", "3", "--size", "32", "-j", "0"])
    assert res.exit_code == 0, res.output
    meta = load_index(out)
    assert meta["options"]["videos"] == 2 and meta["options"]["val_videos"] == 1
    assert meta["splits"]["train"]["num_samples"] == 6 and meta["splits"]["val"]["num_samples"] == 3
    # The same options through the library: the same bytes (the CLI adds nothing of its own).
    prepare_synthetic_video(tmp_path / "lib", num_classes=40, videos=2, frames=3, size=32,
                            opts=ConvertOptions(samples_per_shard=500))
    assert file_hashes(tmp_path / "lib") == file_hashes(out)
    for args, fragments in ((["--video", "--panoptic"], ["--panoptic is for images"]),
                            (["--video", "--pretrain-images", "4"], ["--pretrain-images is for images"]),
                            (["--frames", "4"], ["--frames", "add --video"]),
                            (["--video", "--frames", "1"], ["--frames must be in 2..1000"]),
                            (["--video", "--size", "40"], ["--size must be a multiple of 16"]),
                            (["--video", "--images", "0"], ["must be >= 1"])):
        res = CliRunner().invoke(app, ["prepare", "synthetic", "--out", str(tmp_path / "bad"), "-k", "40", *args])
        assert_one_line_error(res, *fragments)
    assert not (tmp_path / "bad").exists()


def test_segmenter_clips_train_and_evaluate(data: Path, tmp_path: Path) -> None:
    ds = ShardDataset(data, "train")
    clips = clip_table(ds, 2)
    assert clips.shape == (VIDEOS * (FRAMES - 1), 2)  # every window of 2 consecutive frames
    for a, b in clips:
        assert ds.arrays.video[a] == ds.arrays.video[b] and ds.arrays.frame[b] == ds.arrays.frame[a] + 1
    cfg = build_train_config(None, tiny_run() + ["schedule.iters=2", "model.clip_len=2"], data)
    res = train(cfg, tmp_path / "run", progress=False)
    assert res.iterations == 2 and res.final_eval is not None
    assert res.final_eval["num_images"] == VAL_VIDEOS * FRAMES  # every val frame scored once
    assert 0.0 <= res.final_eval["miou"] <= 1.0 and math.isfinite(res.final_eval["miou"])
