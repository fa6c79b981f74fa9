"""TrainConfig: YAML + dotted overrides, coercion, dataset defaults, unknown keys, round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rankseg_core import runs
from rankseg_core.config import (DATASET_DEFAULTS, TrainConfig, build_train_config, coerce, dataset_family,
                                 diff_configs, flag_overrides, from_dict, parse_override, set_key, to_yaml)
from rankseg_core.errors import UserError
from rankseg_core.shards import FORMAT, VERSION


def fake_shards(root: Path, name: str, k: int) -> Path:
    """A dataset.json alone: enough for config resolution (no samples are read)."""
    root.mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({
        "format": FORMAT, "version": VERSION, "name": name, "num_classes": k,
        "class_names": [f"c{i}" for i in range(k)], "palette": [[i % 256, 0, 0] for i in range(k)],
        "splits": {}}))
    return root


def test_yaml_then_set_precedence(tmp_path: Path) -> None:
    data = fake_shards(tmp_path / "d", "synthetic", 40)
    yml = tmp_path / "c.yaml"
    yml.write_text("model:\n  model: segmenter-vitt\n  kappa: 7\noptim:\n  lr: 0.05\n  name: adamw\n"
                   "eval:\n  scales: [0.5, 1.0]\n")
    cfg = build_train_config(yml, ["optim.lr=2e-3", "eval.flip=yes", "model.backbone_weights=none",
                                   "aug.mean=1,2,3"], data)
    assert cfg.model.kappa == 7  # YAML beats the synthetic default (25)
    assert cfg.optim.lr == pytest.approx(2e-3) and isinstance(cfg.optim.lr, float)  # --set beats YAML
    assert cfg.optim.name == "adamw"
    assert cfg.eval.scales == [0.5, 1.0] and cfg.eval.flip is True
    assert cfg.model.backbone_weights is None
    assert cfg.aug.mean == [1.0, 2.0, 3.0]
    # K, names and palette always come from the shards; derived values are filled in.
    assert cfg.model.num_classes == 40 and cfg.data.class_names[3] == "c3" and len(cfg.data.palette) == 40
    assert cfg.aug.scale == [4 * cfg.model.img_size, cfg.model.img_size]
    assert cfg.eval.short_side == cfg.model.img_size and cfg.eval.max_long == 4 * cfg.model.img_size


@pytest.mark.parametrize("name,family,kappa,weight", [
    # the names our converters write, and other spellings
    ("ade20k-full", "ade20k-full", 100, 100.0), ("ade20k-full-top300", "ade20k-full", 100, 100.0),
    ("coco_lvis", "coco-lvis", 100, 300.0), ("ade20k-150", "ade20k", 50, 10.0),
    ("coco-stuff-164k", "coco-stuff", 50, 10.0), ("pascal-context-59", "pascal-context", 25, 5.0),
    ("ADE20K_Full", "ade20k-full", 100, 100.0), ("COCO-Stuff", "coco-stuff", 50, 10.0)])
def test_dataset_defaults(tmp_path: Path, name: str, family: str, kappa: int, weight: float) -> None:
    assert dataset_family(name) == family
    data = fake_shards(tmp_path / "d", name, 60)
    cfg = build_train_config(None, [], data)
    assert (cfg.model.kappa, cfg.loss.ml_weight) == (kappa, weight)
    assert cfg.model.kappa == DATASET_DEFAULTS[family]["model.kappa"]
    # An explicit value wins over the dataset default.
    cfg = build_train_config(None, ["model.kappa=11", "loss.ml_weight=3"], data)
    assert (cfg.model.kappa, cfg.loss.ml_weight) == (11, 3.0)


def test_unknown_dataset_keeps_plain_defaults(tmp_path: Path) -> None:
    cfg = build_train_config(None, [], fake_shards(tmp_path / "d", "my-own-data", 45))
    assert cfg.model.kappa == TrainConfig().model.kappa and cfg.loss.ml_weight == TrainConfig().loss.ml_weight


@pytest.mark.parametrize("override,fragment", [
    ("optim.lrr=1", "did you mean optim.lr"),
    ("nonsense=1", "unknown config key 'nonsense'"),
    ("model=1", "unknown config key 'model'"),  # a section, not a leaf
    ("optim.lr=fast", "expects float"),
    ("model.kappa=2.5", "expects int"),
    ("eval.flip=maybe", "expects bool"),
    ("optim.lr", "expected key=value"),
])
def test_bad_overrides(tmp_path: Path, override: str, fragment: str) -> None:
    data = fake_shards(tmp_path / "d", "synthetic", 40)
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        build_train_config(None, [override], data)


def test_bad_yaml(tmp_path: Path) -> None:
    data = fake_shards(tmp_path / "d", "synthetic", 40)
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: 1\n  momentun: 0.8\n")
    with pytest.raises(UserError, match=r"bad.yaml: unknown config key 'optim.momentun'; did you mean optim.momentum"):
        build_train_config(bad, [], data)
    bad.write_text("optim: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML"):
        build_train_config(bad, [], data)
    with pytest.raises(UserError, match="config file not found"):
        build_train_config(tmp_path / "missing.yaml", [], data)


def test_validation_and_k_mismatch(tmp_path: Path) -> None:
    data = fake_shards(tmp_path / "d", "synthetic", 40)
    with pytest.raises(UserError, match="K always comes from the shards"):
        build_train_config(None, ["model.num_classes=41"], data)
    with pytest.raises(UserError, match="multiple of 16"):
        build_train_config(None, ["model.img_size=50"], data)
    with pytest.raises(UserError, match="divisible by schedule.accum_steps"):
        build_train_config(None, ["schedule.batch_size=6", "schedule.accum_steps=4"], data)
    with pytest.raises(UserError, match="no training data"):
        build_train_config(None, [], None)


def test_coerce_types() -> None:
    assert coerce("3", int, "k") == 3 and coerce("1e3", int, "k") == 1000
    assert coerce("1e-3", float, "k") == pytest.approx(0.001)
    assert coerce("off", bool, "k") is False and coerce("TRUE", bool, "k") is True
    assert coerce("null", int | None, "k") is None and coerce("5", int | None, "k") == 5
    assert coerce("0.75,1.0,1.25", list[float], "k") == [0.75, 1.0, 1.25]
    assert coerce("[1, 2]", list[int], "k") == [1, 2]
    with pytest.raises(UserError):
        coerce(True, int, "k")


def test_round_trip_and_diff(tmp_path: Path) -> None:
    data = fake_shards(tmp_path / "d", "synthetic", 40)
    cfg = build_train_config(None, ["optim.lr=0.02", "eval.scales=0.5,1.5"], data)
    runs.save_config(tmp_path / "run", cfg)
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert text == to_yaml(cfg) and "  - [" in text  # palette rows one per line
    back = runs.load_config(tmp_path / "run")
    assert back == cfg and diff_configs(cfg, back) == []
    set_key(back, "optim.lr", "0.5")
    set_key(back, "device", "cpu")  # runtime key: not a difference
    assert diff_configs(cfg, back) == ["optim.lr"]
    with pytest.raises(UserError, match="unknown config key 'optim.foo'"):
        from_dict({"optim": {"foo": 1}})
    with pytest.raises(UserError, match="not a rankseg run directory"):
        runs.load_config(tmp_path / "nowhere")


def test_flag_overrides_and_parse() -> None:
    assert flag_overrides({"kappa": 5, "head": None, "iters": 10}) == ["model.kappa=5", "schedule.iters=10"]
    assert parse_override("optim.lr = 0.1") == ("optim.lr", "0.1")
