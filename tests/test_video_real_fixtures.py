"""Both video tasks end to end from shards converted out of the real fixtures' formats (issue
18): the real YouTube-VIS 2019 train.json excerpt (video 0043f083b5, 20 frames of 720 x 1280, two
"sedan" tracks with null frames; frames generated at the annotation's size) trains a video
instance Mask2Former that resumes exactly, is scored by AP in `rankseg eval` and whose
results.json `eval-vis` scores the same; a VSPW tree (the real label table) trains Segmenter and
Mask2Former on clips and reports mIoU with VC8 / VC16."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TINY_MASK2FORMER_RUN, tiny_run, train_until_checkpoint
from typer.testing import CliRunner
from video_lvis_trees import vspw_tree, ytvis_frames

from rankseg_cli.app import app
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.vspw import prepare_vspw
from rankseg_core.convert.youtube_vis import prepare_youtube_vis
from rankseg_core.engine import runs
from rankseg_core.engine.configure import build_train_config
from rankseg_core.engine.train import train

OPTS = ConvertOptions(workers=0)


@pytest.fixture(scope="module")
def ytvis_shards(tmp_path_factory: pytest.TempPathFactory, shared_fixtures: Path) -> Path:
    src = shared_fixtures / "youtube_vis_2019" / "annotations_tfds_excerpt" / "train.json"
    root = tmp_path_factory.mktemp("ytvis") / "ytvis_2019"
    root.mkdir()
    (root / "train.json").write_bytes(src.read_bytes())
    ytvis_frames(root, "train", json.loads(src.read_text()))
    out = root.parent / "shards"
    prepare_youtube_vis(root, out, splits=["train"], opts=OPTS)
    return out


def test_youtube_vis_excerpt_trains_resumes_and_is_scored_by_ap(
        ytvis_shards: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sets = TINY_MASK2FORMER_RUN + ["model.clip_len=2", "model.mask2former.task=instance", "eval.batch_size=2",
                                   "data.val_split=", "schedule.iters=2", "ckpt_every=1"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    res = train(build_train_config(None, sets, ytvis_shards), full, progress=False)
    train_until_checkpoint(monkeypatch, 1, lambda: train(build_train_config(None, sets, ytvis_shards), cut,
                                                         progress=False))
    train(build_train_config(None, sets, ytvis_shards), cut, resume=True, progress=False)

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in runs.read_metrics(run) if r["type"] == "train"]

    assert losses(cut) == losses(full) and len(losses(full)) == 2 and res.iterations == 2
    rep_path = tmp_path / "eval.json"
    r = CliRunner().invoke(app, ["eval", str(full), "--data", str(ytvis_shards), "--split", "train", "--json",
                                 str(rep_path), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    rep = json.loads(rep_path.read_text())
    entries = json.loads(Path(rep["config"]["results"]).read_text())
    assert entries and all(len(e["segmentations"]) == 20 for e in entries)  # one mask or null per frame
    for e in entries:
        assert all(m is None or m["size"] == [720, 1280] for m in e["segmentations"])  # the original size
    r = CliRunner().invoke(app, ["eval-vis", rep["config"]["results"], "--data", str(ytvis_shards), "--split", "train",
                                 "--json", str(tmp_path / "vis.json")])
    assert r.exit_code == 0, r.output
    vis = json.loads((tmp_path / "vis.json").read_text())
    assert vis["ap"] == rep["vis"]["ap"] and vis["num_videos"] == 1


def test_vspw_tree_trains_both_families_on_clips_with_video_consistency(tmp_path: Path) -> None:
    root = tmp_path / "VSPW_480p"
    vspw_tree(root)
    shards = tmp_path / "vspw"
    prepare_vspw(root, shards, opts=OPTS)
    for name, sets in (("seg", tiny_run(kappa=8) + ["model.clip_len=2", "schedule.iters=2", "eval.every=0"]),
                       ("m2f", TINY_MASK2FORMER_RUN + ["model.clip_len=2", "schedule.iters=2", "eval.every=0",
                                                       "eval.batch_size=2"])):
        run = tmp_path / name
        r = CliRunner().invoke(app, ["train", "--data", str(shards), "--out", str(run),
                                     *[f"--set={s}" for s in sets]])
        assert r.exit_code == 0, r.output
        r = CliRunner().invoke(app, ["eval", str(run), "--json", str(tmp_path / f"{name}.json"), "--device", "cpu"])
        assert r.exit_code == 0, r.output
        rep = json.loads((tmp_path / f"{name}.json").read_text())
        assert 0.0 <= rep["miou"] <= 1.0 and "vc8" in rep and "vc16" in rep and "vis" not in rep
