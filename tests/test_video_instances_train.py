"""Video instance training (model.mask2former.task=instance, docs/video.md): instance masks move
through the training augmentation exactly like the label, per-clip track targets keep a track's
null frames, a tiny run on synthetic videos trains, resumes exactly and feeds predict-vis /
eval-vis, and the bad combinations are one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import TINY_MASK2FORMER_RUN, assert_one_line_error, train_until_checkpoint
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.synthetic_video import prepare_synthetic_video
from rankseg_core.data.augment import TrainTransform
from rankseg_core.data.loading import AugmentedClips, clip_table, collate_clips
from rankseg_core.engine import runs
from rankseg_core.engine.configure import build_train_config
from rankseg_core.engine.train import train
from rankseg_core.errors import UserError
from rankseg_core.families.mask2former import clip_track_targets
from rankseg_core.shards.read import ShardDataset
from rankseg_core.utils import jsonio

K = 40
INST = TINY_MASK2FORMER_RUN + ["model.clip_len=2", "model.mask2former.task=instance", "eval.batch_size=2",
                               "data.val_split="]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vis") / "data"
    prepare_synthetic_video(out, num_classes=K, videos=3, val_videos=2, frames=3, size=64, seed=0,
                            opts=ConvertOptions(samples_per_shard=8))
    return out


def _transform(crop: int, scale: tuple[int, int], ratio: float, flip: float) -> TrainTransform:
    return TrainTransform(crop=crop, mean=np.zeros(3), std=np.ones(3), scale=scale, ratio_range=(ratio, ratio),
                          cat_max_ratio=1.0, flip_prob=flip, photometric=False)


def test_flip_and_pad_move_masks_by_hand() -> None:
    # 2 x 3 frame, crop 4 > frame (no crop, pad), forced flip: column x goes to 2 - x.
    label = np.array([[1, 2, 2], [1, 1, 2]], np.uint16)
    m = np.zeros((2, 2, 3), np.uint8)
    m[0, 0, 0] = 1  # instance 0: top-left pixel only
    m[1, :, 2] = 1  # instance 1: the right column
    image = np.zeros((2, 3, 3), np.uint8)
    _, lab, masks = _transform(4, (3, 2), 1.0, 1.0).with_instances([image], [label], [m], np.random.default_rng(0))
    want0 = np.zeros((4, 4), bool)
    want0[0, 2] = True
    want1 = np.zeros((4, 4), bool)
    want1[:2, 0] = True
    assert masks[0].shape == (2, 4, 4) and (masks[0][0] == want0).all() and (masks[0][1] == want1).all()
    assert lab[0, 0, :3].tolist() == [2, 2, 1] and (lab[0, 2:] == 65535).all()  # the label moved the same way


def test_crop_drops_an_instance_outside_it_by_hand() -> None:
    # 1 x 4 frame, crop 2: the box starts at x in {0, 1, 2}; the instance at x = 3 survives only for x = 2.
    label = np.array([[0, 1, 2, 3]], np.uint16)
    m = np.zeros((1, 1, 4), np.uint8)
    m[0, 0, 3] = 1
    seen = set()
    for seed in range(20):
        _, lab, masks = _transform(2, (4, 1), 1.0, 0.0).with_instances(
            [np.zeros((1, 4, 3), np.uint8)], [label], [m], np.random.default_rng(seed))
        x = int(lab[0, 0, 0])  # the crop's first column, read off the label
        seen.add(x)
        assert masks[0][0].any() == (x == 2)
        if x == 2:
            assert masks[0][0, 0, 1] and masks[0][0].sum() == 1
    assert seen == {0, 1, 2}


@pytest.mark.parametrize("seed", range(6))
def test_masks_move_exactly_like_the_label_under_resize_crop_flip(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    label = rng.integers(0, 5, (13, 17)).astype(np.uint16)
    label[rng.random((13, 17)) < 0.1] = 65535
    masks = np.stack([(label == c) for c in range(5)]).astype(np.uint8)
    frames = [rng.integers(0, 255, (13, 17, 3), dtype=np.uint8) for _ in range(2)]
    tr = TrainTransform(crop=9, mean=np.zeros(3), std=np.ones(3), scale=(17, 13), ratio_range=(0.5, 2.0),
                        cat_max_ratio=0.75, flip_prob=0.5, photometric=True)
    img, lab, out = tr.with_instances(frames, [label, label], [masks, masks], np.random.default_rng(seed))
    ref = tr(frames, [label, label], np.random.default_rng(seed))  # the image path: same draws, same output
    assert np.array_equal(img, ref[0]) and np.array_equal(lab, ref[1])
    for f in range(2):
        for c in range(5):
            assert np.array_equal(out[f][c], lab[f] == c)


def test_clip_targets_keep_null_frames() -> None:
    a = torch.zeros(3, 3, dtype=torch.bool)
    a[0] = True
    b = torch.zeros(3, 3, dtype=torch.bool)
    b[:, 2] = True
    frames = [  # clip of 2 frames: track 7 (class 4) in both, track 2 (class 1) only in frame 0
        {"labels": torch.tensor([1, 4]), "masks": torch.stack([a, b]), "ids": torch.tensor([2, 7])},
        {"labels": torch.tensor([4]), "masks": b[None], "ids": torch.tensor([7])},
        # second clip: no instance in either frame
        {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 3, 3, dtype=torch.bool),
         "ids": torch.zeros(0, dtype=torch.long)},
        {"labels": torch.zeros(0, dtype=torch.long), "masks": torch.zeros(0, 3, 3, dtype=torch.bool),
         "ids": torch.zeros(0, dtype=torch.long)},
    ]
    t = clip_track_targets({"instances": frames}, 2, torch.device("cpu"))
    assert len(t) == 2 and set(t[0]) == {"labels", "masks"}
    assert t[0]["labels"].tolist() == [1, 4] and t[0]["masks"].shape == (2, 2, 3, 3)
    assert (t[0]["masks"][0, 0] == a).all() and not t[0]["masks"][0, 1].any()  # track 2's null frame
    assert (t[0]["masks"][1, 0] == b).all() and (t[0]["masks"][1, 1] == b).all()
    assert t[1]["labels"].numel() == 0 and t[1]["masks"].shape == (0, 2, 3, 3)


def test_loader_carries_instances_consistent_with_the_label(videos: Path) -> None:
    ds = ShardDataset(videos, "train")
    cfg = build_train_config(None, INST + ["schedule.iters=1", "aug.cat_max_ratio=0.75"], videos)
    from rankseg_core.data.augment import build_train_transform

    clips = clip_table(ds, 2)
    data = AugmentedClips(ds, clips, build_train_transform(cfg, [0.0] * 3, [1.0] * 3), seed=0, instances=True)
    items = [data[(g, g % len(clips))] for g in range(4)]
    batch = collate_clips(items)
    assert batch["image"].shape == (8, 3, 64, 64) and len(batch["instances"]) == 8
    nonempty = 0
    for g, item in enumerate(items):
        for f, inst in enumerate(item["instances"]):
            i = int(clips[g % len(clips)][f])
            row = ds.arrays.row[i]
            with h5py.File(ds.paths[int(ds.arrays.shard[i])]) as h:
                stored = jsonio.loads(h["instances"].asstr()[int(row)] or "[]")
            cats = {int(s["track_id"]): int(s["category"]) for s in stored}
            lab = item["label"][f]
            for c, m, tid in zip(inst["labels"].tolist(), inst["masks"], inst["ids"].tolist(), strict=True):
                assert cats[tid] == c and m.any()  # a kept instance is non-empty and is the shard's
                assert (lab[m] == c).all()  # synthetic: the label is the instance's category on its mask
                nonempty += 1
    assert nonempty > 0


def test_instance_run_trains_resumes_and_feeds_predict_and_eval_vis(
        videos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sets = INST + ["schedule.iters=4", "ckpt_every=2"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    res = train(build_train_config(None, sets, videos), full, progress=False)
    train_until_checkpoint(monkeypatch, 2, lambda: train(build_train_config(None, sets, videos), cut, progress=False))
    train(build_train_config(None, sets, videos), cut, resume=True, progress=False)

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in runs.read_metrics(run) if r["type"] == "train"]

    assert res.iterations == 4 and len(losses(full)) == 4 and losses(cut) == losses(full)
    assert all(np.isfinite(losses(full)))
    out = tmp_path / "results.json"
    r = CliRunner().invoke(app, ["predict-vis", str(full), "--data", str(videos), "--split", "val", "--out", str(out),
                                 "--device", "cpu", "--top-k", "3"])
    assert r.exit_code == 0, r.output
    assert len(json.loads(out.read_text())) == 2 * 3
    r = CliRunner().invoke(app, ["eval-vis", str(out), "--data", str(videos), "--split", "val"])
    assert r.exit_code == 0, r.output
    rep = json.loads((tmp_path / "results_vis_scores.json").read_text())
    assert rep["num_videos"] == 2 and (rep["ap"] is None or 0.0 <= rep["ap"] <= 1.0)


def test_bad_combinations_are_one_line_errors(videos: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="task=instance trains video tracks on clips") as e:
        build_train_config(None, TINY_MASK2FORMER_RUN + ["model.mask2former.task=instance"], videos)
    assert "\n" not in str(e.value)
    # Video shards without tracks (every frame's instances emptied, as semantic-only video shards).
    bare = tmp_path / "bare"
    shutil.copytree(videos, bare)
    for p in sorted(bare.rglob("*.h5")):
        with h5py.File(p, "r+") as h:
            if "instances" in h:
                h["instances"][...] = ["[]"] * len(h["instances"])
    res = CliRunner().invoke(app, ["train", "--data", str(bare), "--out", str(tmp_path / "run"),
                                   *[f"--set={s}" for s in INST + ["schedule.iters=1"]]])
    assert_one_line_error(res, "has no instances")


def test_loader_takes_frames_without_any_instance(videos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame where every track is absent (common in YouTube-VIS) is a frame with no target,
    not a crash: its instance list is empty and the other frame of the clip keeps its own."""
    import rankseg_core.data.loading as loading
    from rankseg_core.data.augment import build_train_transform

    ds = ShardDataset(videos, "train")
    cfg = build_train_config(None, INST + ["schedule.iters=1"], videos)
    clips = clip_table(ds, 2)
    first = int(clips[0][0])
    real = loading.frame_instances

    def emptied(ds_: ShardDataset, i: int):
        masks, cats, ids = real(ds_, i)
        return (masks[:0], cats[:0], ids[:0]) if i == first else (masks, cats, ids)

    monkeypatch.setattr(loading, "frame_instances", emptied)
    data = AugmentedClips(ds, clips, build_train_transform(cfg, [0.0] * 3, [1.0] * 3), seed=0, instances=True)
    item = data[(0, 0)]
    empty, other = item["instances"]
    assert empty["labels"].shape == (0,) and empty["masks"].shape[0] == 0 and empty["ids"].shape == (0,)
    assert other["masks"].shape[1:] == (64, 64)
    targets = clip_track_targets(collate_clips([item]), 2, torch.device("cpu"))
    assert len(targets) == 1 and targets[0]["masks"].shape[1] == 2  # tracks x T frames, the first all-False
    assert not targets[0]["masks"][:, 0].any()
