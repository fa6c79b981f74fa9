"""The DeepLabv3 / UperNet families end to end through the CLI: train, exact resume, eval,
predict, the baseline and RankSeg heads, the cost report, and bad options in one line.

Tiny models (`model.convseg.*` knobs: 16-wide decoder, two ASPP branches) on 32 px crops of a
synthetic shard set, a few iterations each.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import assert_one_line_error, make_synthetic, miou_of_saved_maps, train_until_checkpoint
from PIL import Image
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.engine.configure import build_train_config
from rankseg_core.engine.train import train
from rankseg_core.shards.read import ShardDataset

K = 40
TINY = ["model.convseg.channels=16", "model.convseg.aux_channels=8", "model.convseg.ml_dim=16",
        "model.convseg.aspp_dilations=1,2", "model.convseg.pool_scales=1,2"]
RUN = ["model.img_size=32", "model.kappa=5", "schedule.batch_size=2", "data.num_workers=0", "device=cpu",
       "eval.num_workers=0", "log_every=1", "eval.short_side=32", *TINY]
runner = CliRunner()


def sets(*extra: str) -> list[str]:
    return [a for s in (*RUN, *extra) for a in ("--set", s)]


def cli(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("convseg") / "data", images=8, num_classes=K, size=48)


def train_losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if r["type"] == "train"]


@pytest.mark.slow
def test_deeplab_rankseg_trains_resumes_evaluates_and_predicts(data: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    full, cut = tmp_path / "full", tmp_path / "cut"
    res = cli("train", "--data", data, "--out", full, "--model", "deeplabv3-r18", "--iters", 4,
              *sets("ckpt_every=2"))
    assert res.exit_code == 0, res.output
    assert "rankseg kappa=5" in res.output
    cfg = yaml.safe_load((full / "config.yaml").read_text())
    # mmseg's DeepLabv3 recipe and the resolved official values of what the user left open.
    assert (cfg["optim"]["name"], cfg["optim"]["lr"], cfg["optim"]["weight_decay"]) == ("sgd", 0.01, 5e-4)
    assert (cfg["schedule"]["min_lr"], cfg["model"]["convseg"]["ml_pool"]) == (1e-4, 16)
    assert cfg["model"]["convseg"]["ml_own_embedding"] is False and cfg["model"]["convseg"]["channels"] == 16
    rows = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["type"] == "train"]
    assert all(r["aux"] > 0 and r["ml"] > 0 for r in train_rows)

    # Exact resume: stopped after the step-2 checkpoint and resumed = 4 steps in one go.
    args = [*RUN, "model.model=deeplabv3-r18", "schedule.iters=4", "ckpt_every=2"]
    train_until_checkpoint(monkeypatch, 2, lambda: train(build_train_config(None, args, data), cut, progress=False))
    res = cli("train", "--out", cut, "--resume", "--device", "cpu")
    assert res.exit_code == 0, res.output
    assert train_losses(cut) == train_losses(full) and len(train_losses(full)) == 4

    preds, out_json = tmp_path / "pred", tmp_path / "eval.json"
    res = cli("eval", full, "--json", out_json, "--save-predictions", preds, "--device", "cpu")
    assert res.exit_code == 0, res.output
    rep = json.loads(out_json.read_text())
    assert rep["miou"] == pytest.approx(miou_of_saved_maps(data, preds, K), abs=1e-12)
    assert rep["map"] is not None  # the ml branch ranks the classes

    res = cli("eval", full, "--device", "cpu", "--json", tmp_path / "k.json", "--kappa", 3, "--oracle",
              "--oracle-fill", "ranked")
    assert res.exit_code == 0, res.output

    img = tmp_path / "in" / "a.png"
    img.parent.mkdir()
    Image.fromarray(ShardDataset(data, "val").load(0)["image"]).save(img)
    res = cli("predict", full, img, "--out", tmp_path / "out", "--device", "cpu")
    assert res.exit_code == 0, res.output
    pred = np.asarray(Image.open(tmp_path / "out" / "a.png"))
    assert pred.shape[:2] == (48, 48)


@pytest.mark.slow
def test_baseline_and_mt_heads(data: Path, tmp_path: Path) -> None:
    base = tmp_path / "base"
    res = cli("train", "--data", data, "--out", base, "--model", "deeplabv3-r18", "--head", "segmenter", "--iters", 2,
              *sets())
    assert res.exit_code == 0, res.output
    res = cli("eval", base, "--device", "cpu", "--json", tmp_path / "b.json")
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "b.json").read_text())["map"] is None  # no ml branch
    res = cli("eval", base, "--device", "cpu", "--kappa", 3)
    assert_one_line_error(res, "ranks no classes", "deeplabv3-r18: segmenter")

    mt = tmp_path / "mt"
    res = cli("train", "--data", data, "--out", mt, "--model", "deeplabv3-r18", "--no-select", "--iters", 1,
              *sets("data.val_split="))
    assert res.exit_code == 0, res.output
    res = cli("eval", mt, "--device", "cpu", "--dynamic-kappa", 0.3)
    assert_one_line_error(res, "does not select among ranked classes")


@pytest.mark.slow
def test_beit_upernet_trains_and_evaluates_with_slide_windows(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "beit"
    res = cli("train", "--data", data, "--out", run, "--model", "upernet-beitt", "--iters", 2,
              *sets("model.convseg.ml_dim=null"))
    assert res.exit_code == 0, res.output
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert (cfg["optim"]["name"], cfg["loss"]["ml_weight"], cfg["eval"]["mode"]) == ("adamw", 5.0, "slide")
    assert cfg["model"]["convseg"]["ml_own_embedding"] is True and cfg["model"]["convseg"]["layer_decay"] == 0.9
    res = cli("eval", run, "--device", "cpu", "--json", tmp_path / "e.json")
    assert res.exit_code == 0, res.output
    # A whole 48 px image is larger than the BEiT's 32 px grid: refused, naming the fix.
    res = cli("eval", run, "--device", "cpu", "--mode", "whole", "--scales", "1.5")
    assert_one_line_error(res, "upernet-beitt takes inputs up to its img_size 32", "--mode slide")


@pytest.mark.parametrize("flags, fragment", [
    (["--ml-head", "gap"], "use --ml-head tranenc"),
    (["--head", "essnet"], "model.head=essnet: a deeplabv3 model"),
    (["--batch-size", "1"], "needs >= 2 images per micro-batch"),
    (["--set", "model.convseg.channels=0"], "model.convseg.channels=0 must be >= 1"),
    (["--set", "model.convseg.ml_dim=32"], "model.convseg.ml_dim=32: an ml branch that shares"),
    (["--set", "model.convseg.aspp_dilations=0,1"], "model.convseg.aspp_dilations"),
])
def test_bad_options_are_refused_in_one_line(data: Path, tmp_path: Path, flags: list[str], fragment: str) -> None:
    res = cli("train", "--data", data, "--out", tmp_path / "run", "--model", "deeplabv3-r18", *sets(), *flags)
    assert_one_line_error(res, fragment)
    assert not (tmp_path / "run" / "config.yaml").exists()


@pytest.mark.parametrize("k, kappa, head, printed", [(150, 50, "segmenter", 87.21), (1284, 100, "rankseg", 93.21)])
def test_stats_model_gives_table7(k: int, kappa: int, head: str, printed: float) -> None:
    res = cli("stats", "model", "--model", "deeplabv3-r101", "--num-classes", k, "--kappa", kappa, "--head", head,
              "--no-flops", "--json")
    assert res.exit_code == 0, res.output
    stats = json.loads(res.output)
    assert round(stats["params_m"], 2) == printed
    assert stats["params_backbone"] == 42_519_392  # mmseg's ResNetV1c-101
    assert stats["params_aux_head"] == 9 * 1024 * 256 + 2 * 256 + 256 * k + k
