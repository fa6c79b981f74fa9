"""The CLI as a new user meets it: defaults from the data, one spelling per option, one line per
mistake (issue 17, items 5 and 10)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import typer
from conftest import assert_one_line_error
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.config.train import TrainConfig
from rankseg_core.engine.configure import resolve
from rankseg_core.errors import UserError
from rankseg_core.shards.read import load_index
from rankseg_core.shards.splits import default_split, find_split
from rankseg_core.utils.parallel import default_workers


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args])


def default_of(*path: str, option: str):
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]  # type: ignore[attr-defined]
    return next(p.default for p in command.params if p.name == option)


def test_split_rule() -> None:
    assert find_split(["training", "validation"], "train") == "training"
    assert find_split(["training", "validation"], "val") == "validation"
    assert find_split(["train", "valid"], "val") == "valid"
    assert find_split(["train", "val", "validation"], "val") == "val"
    assert find_split(["train", "test"], "val") == "test"  # COCO-Stuff-10K's release split
    assert find_split(["train", "val", "test"], "val") == "val"
    with pytest.raises(UserError, match=r"shards/x: no validation split .* \(train; pretrain\): pass --split NAME"):
        default_split("shards/x", ["train", "pretrain"], "val", "--split NAME")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("synth") / "data"
    res = run("prepare", "synthetic", "--out", data, "--num-classes", 40, "--images", 2, "--val-images", 1,
              "--size", 32)
    assert res.exit_code == 0, res.output
    return data


def test_run_splits_come_from_the_shards(synth: Path) -> None:
    meta = load_index(synth)
    meta["splits"] = {{"train": "training", "val": "validation"}[k]: v for k, v in meta["splits"].items()}
    cfg = resolve(TrainConfig(), meta)
    assert (cfg.data.train_split, cfg.data.val_split) == ("training", "validation")
    explicit = TrainConfig()
    explicit.data.val_split = "other"  # an explicit value always wins
    assert resolve(explicit, meta).data.val_split == "other"
    kept = resolve(TrainConfig(), load_index(synth))  # shards with train / val keep them
    assert (kept.data.train_split, kept.data.val_split) == ("train", "val")


def test_inspect_lists_only_classes_that_occur(synth: Path) -> None:
    res = run("inspect", synth)
    assert res.exit_code == 0, res.output
    lines = [line for line in res.output.splitlines() if "most frequent classes" in line]
    assert lines and not any("(0)" in line for line in lines)
    assert all(", " not in line.split(":", 1)[1] for line in lines)  # names joined with "; "


def test_defaults_match_the_other_commands() -> None:
    assert default_of("prepare", "synthetic", option="workers") == default_workers()
    assert default_of("viz", "predictions", option="device") == "auto"
    assert default_of("viz", "false-positives", option="device") == "auto"
    for path in (("eval",), ("eval-predictions",), ("viz", "predictions"), ("viz", "false-positives")):
        assert default_of(*path, option="split") is None  # from the shards / the run


def test_coco_lvis_takes_root_and_refuses_an_empty_result(tmp_path: Path) -> None:
    from test_convert_coco_lvis import merge_tree
    from video_lvis_trees import coco_image  # noqa: F401  (the trees the converter tests use)

    coco, lj, sj = merge_tree(tmp_path)
    for folder in ("train2017", "val2017"):
        shutil.rmtree(coco / folder, ignore_errors=True)
    res = run("prepare", "coco-lvis", "--root", coco, "--lvis-json", lj, "--stuff-json", sj,
              "--out", tmp_path / "out", "--workers", 0, "--on-error", "skip")
    assert_one_line_error(res, "no image converted")


def test_ade20k_full_without_validation_images_hints_the_training_split(tmp_path: Path) -> None:
    from convert_trees import ade_full_tree

    root = tmp_path / "ADE20K_2021_17_01"
    ade_full_tree(root, n_train=2, n_val=0)
    res = run("prepare", "ade20k-full", "--root", root, "--out", tmp_path / "out", "--workers", "0")
    assert_one_line_error(res, "no validation images found", "pass --split training")
    res = run("prepare", "ade20k-full", "--root", root, "--out", tmp_path / "out", "--workers", "0",
              "--split", "training")
    assert res.exit_code == 0, res.output
