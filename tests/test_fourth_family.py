"""A fourth model family, defined entirely here, runs through the one engine and the CLI.

The family (a per-pixel linear classifier on a one-layer convolutional backbone) is only
added to `families.FAMILIES`, which is what adding a family to rankseg means
(docs/architecture.md); engine, config and CLI are not touched. It then trains, resumes
exactly, evaluates (checked against an mIoU recomputed here from the saved label maps),
predicts, reports its cost, and refuses selection options it cannot honour in one line.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_one_line_error, make_synthetic, miou_of_saved_maps, train_until_checkpoint
from PIL import Image
from torch import Tensor, nn
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core import families
from rankseg_core.config.model import ModelConfig
from rankseg_core.config.train import TrainConfig
from rankseg_core.engine.configure import build_train_config
from rankseg_core.engine.train import train
from rankseg_core.families.base import Family, InferenceProtocol, Predictions
from rankseg_core.model.selection import Selection
from rankseg_core.shards.codec import IGNORE
from rankseg_core.shards.read import ShardDataset

K = 40


class PixelLinear(nn.Module):
    """images B x 3 x H x W -> logits B x K x H/4 x W/4: one strided conv, one 1x1 classifier."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(cfg.in_chans, 16, 4, stride=4), nn.ReLU())
        self.head = nn.Conv2d(16, cfg.num_classes, 1)

    def forward(self, images: Tensor, selection: Selection) -> Tensor:
        return self.head(self.backbone(images))


def _criterion(cfg: TrainConfig) -> Any:
    def crit(out: Tensor, batch: dict[str, Any]) -> dict[str, Tensor]:
        label = batch["label"]
        logits = F.interpolate(out, size=label.shape[-2:], mode="bilinear", align_corners=False)
        return {"loss": F.cross_entropy(logits, label, ignore_index=IGNORE)}
    return crit


@torch.no_grad()
def _predict(model: nn.Module, cfg: TrainConfig, images: Tensor, sizes: list[tuple[int, int]],
             protocol: InferenceProtocol, selection: Selection) -> Predictions:
    logits = model(images, selection)
    maps = [F.interpolate(logits[i:i + 1], size=s, mode="bilinear", align_corners=False)[0].argmax(0)
            for i, s in enumerate(sizes)]
    return Predictions(semantic=maps)


PIXLIN = Family(
    name="pixlin",
    models={"pixlin-tiny": "none"},
    build=lambda m: PixelLinear(m),
    criterion=_criterion,
    stats=("loss",),
    predict=_predict,
    data_config=lambda model: {"mean": [127.5] * 3, "std": [127.5] * 3},
    recipes={"*": {"optim.lr": 0.05, "eval.mode": "whole"}},
    describe=lambda m: "per-pixel linear classifier",
)

runner = CliRunner()
TRAIN = ["--model", "pixlin-tiny", "--img-size", "32", "--batch-size", "2", "--workers", "0", "--device", "cpu",
         "--set", "eval.num_workers=0", "--set", "log_every=1", "--set", "eval.short_side=32"]


@pytest.fixture()
def with_pixlin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(families, "FAMILIES", (*families.FAMILIES, PIXLIN))


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("pixlin") / "data", images=8, num_classes=K, size=48)


def flag_args_to_sets() -> list[str]:
    """TRAIN (+ 4 iterations, a checkpoint every 2) as the `--set`s the CLI makes of them."""
    return ["model.model=pixlin-tiny", "model.img_size=32", "schedule.batch_size=2", "data.num_workers=0",
            "device=cpu", "eval.num_workers=0", "log_every=1", "eval.short_side=32", "schedule.iters=4",
            "ckpt_every=2"]


def _cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def _train_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]



def test_a_family_defined_here_trains_resumes_evaluates_and_predicts(with_pixlin: None, data: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    res = _cli("train", "--data", data, "--out", full, "--iters", 4, "--set", "ckpt_every=2", *TRAIN)
    assert res.exit_code == 0, res.output
    assert "per-pixel linear classifier" in res.output  # the family describes itself
    cfg = (full / "config.yaml").read_text()
    assert "lr: 0.05" in cfg and "model: pixlin-tiny" in cfg  # its recipe, through the engine

    # Exact resume: a run stopped right after its step-2 checkpoint and resumed equals 4 steps
    # in one go.
    train_until_checkpoint(monkeypatch, 2, lambda: train(build_train_config(None, flag_args_to_sets(), data), cut, progress=False))
    res = _cli("train", "--out", cut, "--resume", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert _train_losses(cut) == _train_losses(full) and len(_train_losses(full)) == 4

    # Evaluation: the reported mIoU is the mean IoU of the saved maps against the labels.
    preds, out_json = tmp_path / "pred", tmp_path / "eval.json"
    res = _cli("eval", full, "--json", out_json, "--save-predictions", preds, "--device", "cpu")
    assert res.exit_code == 0, res.output
    rep = json.loads(out_json.read_text())
    ds = ShardDataset(data, "val")
    assert rep["miou"] == pytest.approx(miou_of_saved_maps(data, preds, K), abs=1e-12)

    # Prediction on a user image, and the model's cost.
    img = tmp_path / "in" / "a.png"
    img.parent.mkdir()
    Image.fromarray(ds.load(0)["image"]).save(img)
    res = _cli("predict", full, img, "--out", tmp_path / "out", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert (tmp_path / "out" / "a.png").is_file()
    res = _cli("stats", "model", "--model", "pixlin-tiny", "--num-classes", K, "--img-size", 32, "--json")
    assert res.exit_code == 0, res.output
    stats = json.loads(res.output)
    assert stats["params"] == 3 * 16 * 16 + 16 + 16 * K + K and stats["params_backbone"] == 3 * 16 * 16 + 16


@pytest.mark.parametrize("flags, fragment", [
    (["--kappa", "5"], "ranks no classes"),
    (["--dynamic-kappa", "0.3"], "does not select among ranked classes"),
    (["--oracle", "--oracle-fill", "ranked"], "has none"),
])
def test_selection_options_it_cannot_honour_are_one_line(with_pixlin: None, data: Path, tmp_path: Path,
                                                         flags: list[str], fragment: str) -> None:
    run = tmp_path / "run"
    res = _cli("train", "--data", data, "--out", run, "--iters", 1, "--set", "data.val_split=", *TRAIN)
    assert res.exit_code == 0, res.output
    res = _cli("eval", run, "--device", "cpu", "--json", tmp_path / "e.json", *flags)
    assert_one_line_error(res, fragment, "pixlin-tiny: per-pixel linear classifier")
    assert not (tmp_path / "e.json").exists()


def test_without_the_entry_the_name_is_unknown(data: Path, tmp_path: Path) -> None:
    res = _cli("train", "--data", data, "--out", tmp_path / "run", *TRAIN)
    assert_one_line_error(res, "model.model='pixlin-tiny' is unknown")
