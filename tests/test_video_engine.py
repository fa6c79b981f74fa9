"""Video Mask2Former through the one engine: clips of T frames of synthetic videos train,
resume exactly, evaluate and share one ranking per clip (docs/video.md)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_MASK2FORMER_RUN, train_until_checkpoint
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.synthetic_video import prepare_synthetic_video
from rankseg_core.engine import runs
from rankseg_core.engine.configure import build_train_config
from rankseg_core.engine.evaluate import EvalOptions, evaluate_model
from rankseg_core.engine.train import train
from rankseg_core.errors import UserError
from rankseg_core.families.mask2former import MASK2FORMER, clip_batch_targets
from rankseg_core.model.mask2former.video import VideoMask2FormerModel
from rankseg_core.model.selection import NO_SELECTION

K = 40
CLIP = TINY_MASK2FORMER_RUN + ["model.clip_len=2", "eval.batch_size=2"]


@pytest.fixture(scope="module")
def videos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("video") / "data"
    prepare_synthetic_video(out, num_classes=K, videos=4, val_videos=2, frames=4, size=64, seed=0,
                            opts=ConvertOptions(samples_per_shard=8))
    return out


def test_clip_targets_are_the_union_of_the_clip_frames() -> None:
    labels = torch.full((4, 4, 4), 65535)
    labels[0, :2] = 3  # clip 1, frame 1: class 3
    labels[1, 2:] = 7  # clip 1, frame 2: class 7
    labels[2, :, :1] = 3  # clip 2, frame 1: class 3; frame 2 empty
    targets = clip_batch_targets({"label": labels}, K, 2)
    assert [t["labels"].tolist() for t in targets] == [[3, 7], [3]]
    assert targets[0]["masks"].shape == (2, 2, 4, 4)
    assert targets[0]["masks"][0, 0].sum() == 8 and targets[0]["masks"][0, 1].sum() == 0  # class 3 only in frame 1
    assert targets[1]["masks"][0, 1].sum() == 0  # an empty frame of the clip


def test_clip_runs_train_resume_and_evaluate(videos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sets = CLIP + ["schedule.iters=4", "ckpt_every=2", "data.val_split="]
    full, cut = tmp_path / "full", tmp_path / "cut"
    res = train(build_train_config(None, sets, videos), full, progress=False)
    model, cfg = runs.load_run(full, "cpu")
    assert isinstance(model, VideoMask2FormerModel) and cfg.model.clip_len == 2
    train_until_checkpoint(monkeypatch, 2, lambda: train(build_train_config(None, sets, videos), cut, progress=False))
    train(build_train_config(None, sets, videos), cut, resume=True, progress=False)

    def losses(run: Path) -> list[float]:
        return [r["loss"] for r in runs.read_metrics(run) if r["type"] == "train"]

    assert len(losses(full)) == 4 and losses(cut) == losses(full) and res.iterations == 4
    # Evaluation scores every real frame once, with one ranking per clip.
    ev = evaluate_model(model, cfg, EvalOptions(split="val", progress=False), torch.device("cpu"))
    assert ev["num_images"] == 2 * 4 and 0.0 <= ev["miou"] <= 1.0 and np.isfinite(ev["map"])


def test_frames_of_a_clip_share_the_selection(videos: Path) -> None:
    cfg = build_train_config(None, CLIP + ["schedule.iters=1"], videos)
    torch.manual_seed(0)
    model = MASK2FORMER.build(cfg.model).eval()
    with torch.no_grad():
        out = model(torch.randn(4, 3, 64, 64), NO_SELECTION)  # two clips of two frames
    assert out.pred_masks.shape[:3] == (2, out.pred_logits.shape[1], 2) and out.topk_index.shape[0] == 2


def test_clip_panoptic_and_cli(videos: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="clips of the Mask2Former family segment semantically"):
        build_train_config(None, CLIP + ["model.mask2former.task=panoptic"], videos)
    run = tmp_path / "run"
    flags = [f"--set={s}" for s in CLIP + ["schedule.iters=1"]]
    res = CliRunner().invoke(app, ["train", "--data", str(videos), "--out", str(run), *flags])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["eval", str(run), "--device", "cpu", "--json", str(tmp_path / "e.json")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "e.json").read_text())["num_images"] == 8


# Table 8 (video rows, in units of 2^20 as the image rows): Swin-L Mask2Former at T = 2,
# baseline / + RankSeg; VSPW K = 124 with 100 queries, YouTube-VIS K = 40 with the 200 queries
# of the official Swin-L VIS config.
@pytest.mark.slow
@pytest.mark.parametrize("k, queries, head, printed", [
    (124, 100, "segmenter", 205.50), (124, 100, "rankseg", 208.75), (40, 200, "rankseg", 208.70)])
def test_video_parameter_counts_equal_table8(k: int, queries: int, head: str, printed: float) -> None:
    from rankseg_core.config.mask2former import Mask2FormerConfig
    from rankseg_core.config.model import ModelConfig
    from rankseg_core.engine.model_stats import model_stats

    cfg = ModelConfig(model="mask2former-swinl", num_classes=k, kappa=k, head=head, img_size=640, clip_len=2,
                      mask2former=Mask2FormerConfig(num_queries=queries))
    assert round(model_stats(cfg, flops=False)["params"] / 2**20, 2) == printed
