"""Shared fixtures: a tiny synthetic shard set and the path of ../shared/fixtures."""

from __future__ import annotations

import dataclasses
import signal
from pathlib import Path

import pytest
import torch

from rankseg_core.config.mask2former import Mask2FormerConfig
from rankseg_core.config.model import ModelConfig
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.synthetic import prepare_synthetic
from rankseg_core.convert.synthetic_video import prepare_synthetic_video
from rankseg_core.families.mask2former import MASK2FORMER

# Tiny models on a small shared machine: intra-op threads cost more in sync than they gain
# (measured ~10x slower with the default thread count under load).
torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    # A shell starts background commands with SIGINT ignored (POSIX, no job control), and the
    # ignore is inherited by everything they run: the Ctrl-C tests would then test nothing
    # but that. Take SIGINT as a terminal delivers it; children get the default on exec.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    """Restore one intra-op thread after every test: a test that changes it in-process (the
    replication smoke run sets its per-job threads) must not change the float summation order
    of later tests, whose exact-equality checks compare runs made in different processes."""
    yield
    torch.set_num_threads(1)


FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """`../shared/fixtures` (real files in the official formats); skip where a clone lacks it."""
    if not FIXTURES.is_dir():
        pytest.skip("../shared/fixtures is not present in this checkout")
    return FIXTURES


def make_synthetic(out: Path, images: int = 24, num_classes: int = 60, size: int = 32,
                   seed: int = 0, per_shard: int = 8, val_images: int | None = None, panoptic: bool = False) -> Path:
    """Synthetic shards for a test (`prepare synthetic`; val_images None = a fifth of images)."""
    prepare_synthetic(out, num_classes=num_classes, images=images, val_images=val_images, size=size, seed=seed,
                      panoptic=panoptic, opts=ConvertOptions(samples_per_shard=per_shard))
    return out


# ---------------------------------------------------------------------------------------
# Tiny runs: seconds on one core


def tiny_run(kappa: int = 8, model: str | None = "segmenter-vitt") -> list[str]:
    """`--set` overrides of a tiny Segmenter-sized run (32 px crops, batch 2, no workers, a
    log line per step); model None leaves model.model to the caller."""
    sets = ["model.img_size=32", f"model.kappa={kappa}", "schedule.batch_size=2", "data.num_workers=0",
            "eval.num_workers=0", "log_every=1", "eval.short_side=32"]
    return ([f"model.model={model}"] if model else []) + sets


# A Mask2Former small enough for seconds on one core (docs/mask2former.md, "A tiny recipe"), as
# `--set` overrides of a run ...
TINY_MASK2FORMER_RUN = [
    "model.model=mask2former-r50", "model.img_size=64", "model.kappa=10", "model.mask2former.hidden_dim=32",
    "model.mask2former.conv_dim=32", "model.mask2former.mask_dim=32", "model.mask2former.nheads=4",
    "model.mask2former.num_queries=8", "model.mask2former.dec_layers=3", "model.mask2former.enc_layers=1",
    "model.mask2former.dim_feedforward=64", "model.mask2former.enc_dim_feedforward=64",
    "model.mask2former.ml_hidden_dim=32", "model.mask2former.ml_query_layer=2",
    "model.mask2former.train_num_points=256", "model.mask2former.freeze_bn=false",
    "schedule.batch_size=2", "optim.lr=1e-3", "data.num_workers=0", "eval.num_workers=0", "log_every=1",
    "device=cpu", "eval.short_side=64"]
# ... and as the options of a model built directly.
TINY_M2F = Mask2FormerConfig(hidden_dim=32, conv_dim=32, mask_dim=32, nheads=4, num_queries=6, dec_layers=3,
                             enc_layers=1, dim_feedforward=64, enc_dim_feedforward=64, ml_hidden_dim=32,
                             ml_query_layer=2, train_num_points=256)


# ConvSeg (DeepLabv3 / UperNet) and MaskFormer at the same scale.
TINY_CONV = ["model.convseg.channels=16", "model.convseg.aux_channels=8", "model.convseg.ml_dim=16"]
TINY_MASKFORMER = ["model.model=maskformer-r50"] + [
    x.replace("model.mask2former.dec_layers", "model.mask2former.maskformer.dec_layers") for x in TINY_MASK2FORMER_RUN
    if not x.startswith(("model.model=", "model.mask2former.enc_", "model.mask2former.train_num_points", "log_every"))]
# Every model family, head and task once, as `--set` overrides: name -> (data, sets). data: "images"
# (synthetic, K = 40, 64 px), "panoptic" (the same with segments), "video" (synthetic clips with
# tracks); "SPLIT" stands for a weak-shot split file of the caller's.
_SEGMENTER = [*tiny_run(kappa=20), "optim.name=adamw"]
FAMILY_RECIPES: dict[str, tuple[str, list[str]]] = {
    "segmenter-vitt rankseg": ("images", _SEGMENTER),
    "segmenter-vitt baseline": ("images", [*_SEGMENTER, "model.head=segmenter"]),
    "segmenter-vitt oracle": ("images", [*_SEGMENTER, "model.oracle=true"]),
    "segmenter-vitt protoseg": ("images", [*_SEGMENTER, "model.head=protoseg", "model.protoseg.prototypes=2"]),
    "segmenter-vitt rankproto": ("images", [*_SEGMENTER, "model.head=rankproto", "model.protoseg.prototypes=2"]),
    "segmenter-vitt encnet": ("images", [*_SEGMENTER, "model.head=encnet"]),
    "segmenter-vitt essnet": ("images", [*_SEGMENTER, "model.head=essnet"]),
    "classifier-vitt": ("images", [*tiny_run(model="classifier-vitt"), "optim.name=adamw"]),
    "deeplabv3-r18 rankseg": ("images", [*tiny_run(model="deeplabv3-r18"), *TINY_CONV,
                                         "model.convseg.aspp_dilations=1,2", "model.convseg.ml_pool=0"]),
    "upernet-beitt rankseg": ("images", [*tiny_run(model="upernet-beitt"), *TINY_CONV, "model.convseg.pool_scales=1,2"]),
    "mask2former-r50 semantic": ("images", TINY_MASK2FORMER_RUN),
    "mask2former-r50 panoptic": ("panoptic", [*TINY_MASK2FORMER_RUN, "model.mask2former.task=panoptic"]),
    "maskformer-r50": ("images", TINY_MASKFORMER),
    "mask2former-semaskt": ("images", [*TINY_MASK2FORMER_RUN, "model.model=mask2former-semaskt"]),
    "maskformer-r50 weak-shot": ("images", [*TINY_MASKFORMER, "model.mask2former.simformer.points=20",
                                            "data.weak_shot=SPLIT"]),
    "segmenter-vitt clips": ("video", [*_SEGMENTER, "model.clip_len=2", "eval.batch_size=2"]),
    "mask2former-r50 clips": ("video", [*TINY_MASK2FORMER_RUN, "model.clip_len=2", "eval.batch_size=2"]),
    "mask2former-r50 video instances": ("video", [*TINY_MASK2FORMER_RUN, "model.clip_len=2",
                                                  "model.mask2former.task=instance", "eval.batch_size=2"]),
}


def recipe_data(out: Path, kind: str) -> Path:
    """Synthetic shards for a FAMILY_RECIPES kind ("images", "panoptic", "video"): K = 40
    classes at 64 px, 4 training images (2 videos of 3 frames) and a validation split."""
    if kind == "video":
        prepare_synthetic_video(out, num_classes=40, videos=2, val_videos=1, frames=3, size=64, seed=0,
                                opts=ConvertOptions(samples_per_shard=8))
        return out
    return make_synthetic(out, images=4, num_classes=40, size=64, val_images=2, panoptic=kind == "panoptic")


def weak_shot_split(path: Path) -> Path:
    """A weak-shot split file for FAMILY_RECIPES' K = 40 data (every fifth class novel): `path`."""
    path.write_text('{"novel": [0, 5, 10, 15, 20, 25, 30, 35]}')
    return path


def tiny_m2f_cfg(model: str = "mask2former-r50", num_classes: int = 10, kappa: int = 4, head: str = "rankseg",
                 **kw) -> ModelConfig:
    m2f = dataclasses.replace(TINY_M2F, **kw.pop("m2f", {}))
    return ModelConfig(model=model, num_classes=num_classes, kappa=kappa, head=head, img_size=64,
                       mask2former=m2f, **kw)


def tiny_m2f_model(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MASK2FORMER.build(tiny_m2f_cfg(**kw))


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic shard directory shared by read-only tests."""
    return make_synthetic(tmp_path_factory.mktemp("synth") / "data")


def assert_one_line_error(res, *fragments: str) -> None:
    """A user mistake: exit 2, one `error:` line holding every fragment, no traceback."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "error:" in res.output
    text = " ".join(res.output.split())
    for f in fragments:
        assert f in text, text


def m2f_semantic_map(out, size: tuple[int, int]) -> torch.Tensor:
    """Class map B x H x W of a Mask2Former output: argmax of its compact semantic scores
    mapped back to class ids (what the family's prediction does per pass)."""
    from rankseg_core.inference.mask2former import semantic_inference_compact

    scores, classes, valid = semantic_inference_compact(out, size)
    if valid is not None:
        scores = scores.masked_fill(~valid[:, :, None, None], float("-inf"))
    best = scores.argmax(1)
    return classes.gather(1, best.flatten(1)).reshape(best.shape)


class Stop(Exception):
    """Raised by `train_until_checkpoint` right after the checkpoint it waits for."""


def train_until_checkpoint(monkeypatch: pytest.MonkeyPatch, iteration: int, run_training) -> None:
    """Run `run_training()` and stop it right after checkpoints/last.pt of `iteration` is
    written, as a crash there would (the resume tests' interrupted run)."""
    from rankseg_core.engine import runs

    real_save = runs.save_checkpoint

    def save_then_stop(path: Path, state: dict) -> Path:
        out = real_save(path, state)
        if path.name == "last.pt" and state["iteration"] == iteration:
            raise Stop
        return out

    monkeypatch.setattr(runs, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        run_training()
    monkeypatch.setattr(runs, "save_checkpoint", real_save)


def overfit(model: torch.nn.Module, crit, images: torch.Tensor, targets: list, steps: int = 30) -> list[float]:
    """The losses of `steps` AdamW (lr 1e-3) steps of `model` on one fixed batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        res = crit(model(images), targets)
        opt.zero_grad()
        res["loss"].backward()
        opt.step()
        losses.append(float(res["loss"].detach()))
    return losses


# ---------------------------------------------------------------------------------------
# A family's life through the CLI (train, exact resume, eval against the saved maps, predict)


def train_rows(run: Path) -> list[dict]:
    """The `train` records of a run's metrics.jsonl."""
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["type"] == "train"]


def miou_of_saved_maps(data: Path, preds: Path, num_classes: int, split: str = "val") -> float:
    """mIoU over classes with a non-empty union from the label PNGs `eval --save-predictions`
    wrote, counted pixel by pixel here (independent of the engine's confusion matrix)."""
    import numpy as np
    from PIL import Image

    from rankseg_core.shards.codec import IGNORE
    from rankseg_core.shards.read import ShardDataset

    ds = ShardDataset(data, split)
    inter, union = np.zeros(num_classes), np.zeros(num_classes)
    for i in range(len(ds)):
        item = ds.load(i)
        pred = np.asarray(Image.open(preds / f"{item['key'].replace('/', '__')}.png")).astype(np.int64)
        gt = item["label"].astype(np.int64)
        ok = gt != IGNORE
        for c in range(num_classes):
            p, g = (pred == c) & ok, (gt == c) & ok
            inter[c] += (p & g).sum()
            union[c] += (p | g).sum()
    present = union > 0
    return float((inter[present] / union[present]).mean())


def train_resume_eval_predict(data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sets: list[str],
                              iters: int = 3) -> tuple[list[dict], dict, str]:
    """Train `sets` (`--set` keys) `iters` steps through the CLI; train them again stopped right
    after checkpoint iters-1 and resume through the CLI: the losses must be bit for bit the same;
    evaluate with --save-predictions: the reported mIoU must be that of the saved maps; predict a
    40 x 56 image: a 40 x 56 label PNG. Returns (train records, eval report, train output)."""
    import json

    import numpy as np
    from PIL import Image
    from typer.testing import CliRunner

    from rankseg_cli.app import app
    from rankseg_core.engine.configure import build_train_config
    from rankseg_core.engine.train import train
    from rankseg_core.shards.read import ShardIndex

    def cli(*args: object):
        return CliRunner().invoke(app, [str(a) for a in args])

    sets = [*sets, f"schedule.iters={iters}", "ckpt_every=1", "device=cpu"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    res = cli("train", "--data", data, "--out", full, *[f"--set={s}" for s in sets])
    assert res.exit_code == 0, res.output
    rows = train_rows(full)
    assert len(rows) == iters
    train_until_checkpoint(monkeypatch, iters - 1, lambda: train(build_train_config(None, sets, data), cut,
                                                                 progress=False))
    resumed = cli("train", "--out", cut, "--resume", "--device", "cpu")
    assert resumed.exit_code == 0, resumed.output
    assert [r["loss"] for r in train_rows(cut)] == [r["loss"] for r in rows]  # bit for bit
    out_json, preds = tmp_path / "eval.json", tmp_path / "preds"
    ev = cli("eval", full, "--device", "cpu", "--json", out_json, "--save-predictions", preds)
    assert ev.exit_code == 0, ev.output
    rep = json.loads(out_json.read_text())
    k = int(ShardIndex(data).num_classes)
    assert rep["miou"] == pytest.approx(miou_of_saved_maps(data, preds, k, rep["config"]["split"]), abs=1e-12)
    img = tmp_path / "in.png"
    Image.fromarray(np.full((40, 56, 3), 90, np.uint8)).save(img)
    pr = cli("predict", full, img, "--out", tmp_path / "out", "--device", "cpu")
    assert pr.exit_code == 0, pr.output
    assert np.asarray(Image.open(tmp_path / "out" / "in.png")).shape == (40, 56)
    return rows, rep, res.output
