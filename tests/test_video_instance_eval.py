"""`rankseg eval` (and the periodic evaluation) of a video instance run: whole-video tracks
scored by the YouTube-VIS AP, best checkpoint by that AP, results.json written next to the
report (docs/video.md, "AP in rankseg eval").

Independent checks: a track predictor that returns the ground-truth tracks scores AP = 1 and
one that returns nothing AP = 0; the AP `rankseg eval` reports equals `rankseg eval-vis` scoring
the results.json it wrote (a separate reading of the file and of the shards)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import TINY_MASK2FORMER_RUN, assert_one_line_error
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core import families
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.synthetic_video import prepare_synthetic_video
from rankseg_core.engine import runs
from rankseg_core.engine.configure import build_train_config
from rankseg_core.engine.video_results import evaluate_tracks
from rankseg_core.evaluation.video_instances import PredictedTrack, ground_truth_videos, video_ids
from rankseg_core.families.mask2former import MASK2FORMER
from rankseg_core.shards.read import ShardDataset

K = 40
INST = TINY_MASK2FORMER_RUN + ["model.clip_len=2", "model.mask2former.task=instance", "eval.batch_size=2"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("vis") / "data"
    prepare_synthetic_video(out, num_classes=K, videos=3, val_videos=3, frames=3, size=64, seed=1,
                            opts=ConvertOptions(samples_per_shard=4))
    return out


@pytest.fixture(scope="module")
def run(videos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run") / "run"
    res = CliRunner().invoke(app, ["train", "--data", str(videos), "--out", str(out),
                                   *[f"--set={s}" for s in INST + ["schedule.iters=4", "eval.every=2"]]])
    assert res.exit_code == 0, res.output
    assert "val AP" in " ".join(res.output.split())
    return out


def _with_tracks(monkeypatch: pytest.MonkeyPatch, predict) -> None:
    """Make the Mask2Former family predict tracks with `predict` (FAMILIES is read at call time)."""
    fam = dataclasses.replace(MASK2FORMER, predict_tracks=predict)
    monkeypatch.setattr(families, "FAMILIES", tuple(fam if f.name == fam.name else f for f in families.FAMILIES))


def test_ap_is_one_for_ground_truth_tracks_and_zero_for_none(videos: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = build_train_config(None, INST, videos)
    model = MASK2FORMER.build(cfg.model).eval()
    gts = iter(list(ground_truth_videos(videos, "val", video_ids(videos, "val"))))
    seen: list[int] = []

    def oracle(model, cfg, frames: torch.Tensor, size: tuple[int, int], top_k: int) -> list[PredictedTrack]:
        gt = next(gts)
        assert frames.shape[0] == len(gt.sizes) and size == gt.sizes[0]  # the whole video, at its size
        seen.append(gt.video_id)
        return [PredictedTrack(t.category, 1.0, t.masks) for t in gt.tracks]

    _with_tracks(monkeypatch, oracle)
    ds = ShardDataset(videos, "val")
    scores, results = evaluate_tracks(model, cfg, ds, keep_results=True)
    assert seen == [1, 2, 3] and scores.num_videos == 3
    assert scores.ap == pytest.approx(1.0) and scores.ap50 == pytest.approx(1.0) and scores.ar10 == pytest.approx(1.0)
    assert results is not None and sorted({e["video_id"] for e in results}) == [1, 2, 3]
    # No tracks at all: nothing is found (AP 0 over the categories with ground truth).
    _with_tracks(monkeypatch, lambda *a: [])
    assert evaluate_tracks(model, cfg, ds)[0].ap == 0.0
    # --max-images: whole videos in name order until that many frames (at least one video).
    gts = iter(list(ground_truth_videos(videos, "val", video_ids(videos, "val"))))
    seen.clear()
    _with_tracks(monkeypatch, oracle)
    assert evaluate_tracks(model, cfg, ds, max_images=4)[0].num_videos == 1 and seen == [1]


def test_training_scores_by_ap_and_keeps_the_best_ap(run: Path) -> None:
    evals = [r for r in runs.read_metrics(run) if r["type"] == "eval"]
    assert len(evals) == 2  # eval.every=2 of 4 iterations, and the final one
    for r in evals:
        assert set(r) >= {"ap", "ap50", "ap75", "ar1", "ar10", "miou", "score"}
        assert r["score"] == r["ap"]  # the selection score of an instance run is its AP
    best = torch.load(run / "checkpoints" / "best.pt", weights_only=True, map_location="cpu")
    assert best["best_score"] == max(r["ap"] for r in evals)


def test_eval_writes_ap_and_results_that_eval_vis_scores_the_same(run: Path, videos: Path, tmp_path: Path) -> None:
    rep_path = tmp_path / "val.json"
    res = CliRunner().invoke(app, ["eval", str(run), "--json", str(rep_path), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "AP / AP50 / AP75 (tracks)" in res.output
    rep = json.loads(rep_path.read_text())
    results = tmp_path / "val_results.json"
    assert rep["config"]["results"] == str(results) and rep["score"] == rep["vis"]["ap"]
    assert rep["vis"]["num_videos"] == 3 and len(rep["vis"]["per_class_ap"]) == K
    entries = json.loads(results.read_text())
    assert {e["video_id"] for e in entries} == {1, 2, 3} and all(len(e["segmentations"]) == 3 for e in entries)
    res = CliRunner().invoke(app, ["eval-vis", str(results), "--data", str(videos), "--split", "val"])
    assert res.exit_code == 0, res.output
    vis = json.loads((tmp_path / "val_results_vis_scores.json").read_text())
    for k in ("ap", "ap50", "ap75", "ar1", "ar10"):
        assert vis[k] == pytest.approx(rep["vis"][k], abs=1e-12)
    # --save-results elsewhere; the same entries as predict-vis writes for the split.
    other = tmp_path / "sub" / "r.json"
    other.parent.mkdir()
    res = CliRunner().invoke(app, ["eval", str(run), "--json", str(tmp_path / "v2.json"), "--save-results",
                                   str(other), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["predict-vis", str(run), "--data", str(videos), "--split", "val", "--out",
                                   str(tmp_path / "pv.json"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert json.loads(other.read_text()) == json.loads((tmp_path / "pv.json").read_text()) == entries


def test_bad_results_targets_and_splits_are_one_line_errors(run: Path, videos: Path, tmp_path: Path) -> None:
    before = (videos / "dataset.json").read_bytes()
    res = CliRunner().invoke(app, ["eval", str(run), "--json", str(tmp_path / "a.json"), "--save-results",
                                   str(videos / "dataset.json"), "--device", "cpu"])
    assert_one_line_error(res, "dataset.json")
    assert (videos / "dataset.json").read_bytes() == before
    # A file that is not a results list is never replaced.
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": 1}')
    res = CliRunner().invoke(app, ["eval", str(run), "--json", str(tmp_path / "b.json"), "--save-results", str(notes),
                                   "--device", "cpu"])
    assert_one_line_error(res, "notes.json", "choose another --out")
    assert notes.read_text() == '{"mine": 1}'
    # A val split without tracks: refused when training starts, not at the first evaluation.
    bare = tmp_path / "bare"
    shutil.copytree(videos, bare)
    for p in sorted(bare.rglob("*.h5")):
        with h5py.File(p, "r+") as h:
            if "instances" in h and "val" in p.name:
                h["instances"][...] = ["[]"] * len(h["instances"])
    res = CliRunner().invoke(app, ["train", "--data", str(bare), "--out", str(tmp_path / "r2"),
                                   *[f"--set={s}" for s in INST + ["schedule.iters=1"]]])
    assert_one_line_error(res, "no annotated tracks", "data.val_split")
    assert not (tmp_path / "r2" / "checkpoints").exists()


def test_save_results_on_a_semantic_run_is_refused(videos: Path, tmp_path: Path) -> None:
    sem = tmp_path / "sem"
    sets = TINY_MASK2FORMER_RUN + ["model.clip_len=2", "eval.batch_size=2", "schedule.iters=1", "data.val_split="]
    res = CliRunner().invoke(app, ["train", "--data", str(videos), "--out", str(sem), *[f"--set={s}" for s in sets]])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["eval", str(sem), "--split", "val", "--save-results", str(tmp_path / "r.json"),
                                   "--device", "cpu"])
    assert_one_line_error(res, "--save-results", "predicts no video instance tracks")
    res = CliRunner().invoke(app, ["predict-vis", str(sem), "--data", str(videos), "--split", "val", "--out",
                                   str(tmp_path / "r.json"), "--device", "cpu"])
    assert_one_line_error(res, "predicts no video instance tracks")


def _frame_folders(videos: Path, root: Path) -> list[Path]:
    """The val videos' frames as folders of PNGs (as the release's JPEGImages/<video>/)."""
    import cv2

    ds = ShardDataset(videos, "val")
    out: dict[str, Path] = {}
    for i in range(len(ds)):
        s = ds.load(i)
        folder = root / s["video"]
        folder.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(folder / f"{int(s['frame']):05d}.png"), cv2.cvtColor(s["image"], cv2.COLOR_RGB2BGR))
        out[s["video"]] = folder
    return [out[k] for k in sorted(out)]


def test_predict_on_folders_of_frames_writes_the_same_results_as_predict_vis(
        run: Path, videos: Path, tmp_path: Path) -> None:
    folders = _frame_folders(videos, tmp_path / "JPEGImages")
    out = tmp_path / "sub"
    res = CliRunner().invoke(app, ["predict", str(run), *map(str, folders), "--out", str(out), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "3 video(s)" in res.output
    res = CliRunner().invoke(app, ["predict-vis", str(run), "--data", str(videos), "--split", "val", "--out",
                                   str(tmp_path / "pv.json"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    # PNG frames are lossless and ids are 1..N in input order = the shards' name order.
    assert json.loads((out / "results.json").read_text()) == json.loads((tmp_path / "pv.json").read_text())
    listed = json.loads((out / "videos.json").read_text())
    assert [(v["id"], v["name"], v["frames"]) for v in listed] == [(i + 1, f.name, 3) for i, f in enumerate(folders)]
    # Ids from a release JSON, by folder name.
    release = tmp_path / "valid.json"
    release.write_text(json.dumps({"videos": [{"id": 10 + i, "file_names": [f"{f.name}/00000.jpg"]}
                                              for i, f in enumerate(folders)]}))
    out2 = tmp_path / "sub2"
    res = CliRunner().invoke(app, ["predict", str(run), *map(str, folders[::-1]), "--out", str(out2),
                                   "--videos-json", str(release), "--device", "cpu", "--top-k", "2"])
    assert res.exit_code == 0, res.output
    doc = json.loads((out2 / "results.json").read_text())
    assert sorted({e["video_id"] for e in doc}) == [10, 11, 12] and len(doc) == 3 * 2


def test_predict_on_folders_refuses_bad_inputs(run: Path, videos: Path, tmp_path: Path) -> None:
    folders = _frame_folders(videos, tmp_path / "J")
    frame = next(folders[0].iterdir())
    res = CliRunner().invoke(app, ["predict", str(run), str(frame), "--out", str(tmp_path / "o1"), "--device", "cpu"])
    assert_one_line_error(res, frame.name, "one directory of frames per video")
    res = CliRunner().invoke(app, ["predict", str(run), str(folders[0]), "--out", str(tmp_path / "o2"), "--kappa", "3",
                                   "--device", "cpu"])
    assert_one_line_error(res, "--kappa", "--top-k")
    release = tmp_path / "valid.json"
    release.write_text(json.dumps({"videos": [{"id": 1, "file_names": ["other/00000.jpg"]}]}))
    res = CliRunner().invoke(app, ["predict", str(run), str(folders[0]), "--out", str(tmp_path / "o3"),
                                   "--videos-json", str(release), "--device", "cpu"])
    assert_one_line_error(res, "valid.json", folders[0].name)
    import cv2

    cv2.imwrite(str(folders[1] / "99999.png"), np.zeros((40, 48, 3), np.uint8))  # a frame of another size
    res = CliRunner().invoke(app, ["predict", str(run), str(folders[1]), "--out", str(tmp_path / "o4"),
                                   "--device", "cpu"])
    assert_one_line_error(res, folders[1].name, "differ in size")
    assert not (tmp_path / "o4" / "results.json").exists()
    # The output directory is an input video: refused, nothing written among the frames.
    before = sorted(p.name for p in folders[2].iterdir())
    res = CliRunner().invoke(app, ["predict", str(run), str(folders[2]), "--out", str(folders[2]), "--device", "cpu"])
    assert_one_line_error(res, "choose another --out")
    assert sorted(p.name for p in folders[2].iterdir()) == before
