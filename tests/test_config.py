"""TrainConfig: YAML + dotted overrides, coercion, dataset defaults, unknown keys, round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rankseg_core.config.datasets import recipe_dataset
from rankseg_core.config.train import (
    TrainConfig,
    coerce,
    diff_configs,
    from_dict,
    parse_override,
    read_yaml,
    set_key,
    to_yaml,
)
from rankseg_core.engine import runs
from rankseg_core.engine.configure import build_train_config, dataset_defaults, flag_overrides
from rankseg_core.errors import UserError
from rankseg_core.families.segmenter import SEGMENTER
from rankseg_core.shards.write import FORMAT, VERSION


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
    ("coco-stuff-164k", "coco-stuff", 50, 5.0), ("pascal-context-59", "pascal-context", 25, 5.0),
    ("ADE20K_Full", "ade20k-full", 100, 100.0), ("COCO-Stuff", "coco-stuff", 50, 5.0)])
def test_dataset_defaults(tmp_path: Path, name: str, family: str, kappa: int, weight: float) -> None:
    assert recipe_dataset(name) == family
    data = fake_shards(tmp_path / "d", name, 60)
    cfg = build_train_config(None, [], data)
    assert (cfg.model.kappa, cfg.loss.ml_weight) == (kappa, weight)
    assert cfg.model.kappa == SEGMENTER.recipes[family]["model.kappa"]
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


# The official test / train protocol per dataset, read off the RankSeg configs
# (mmseg/configs/segmenter/segmenter-ori_rankseg_*.py and their _base_ datasets): test_cfg
# slide with crop = stride = crop size, MultiScaleFlipAug img_scale (long, short) without
# ratios or flip, train Resize img_scale.
OFFICIAL = {  # name: (crop, eval short / long, train scale, ml loss, ml weight, gamma-, iters, weight decay)
    "ade20k-full": (512, (512, 2048), [2048, 512], "asl", 100.0, 2.0, 160000, 1e-6),
    "coco_lvis": (512, (512, 2048), [2048, 512], "asl", 300.0, 2.0, 320000, 1e-6),
    "ade20k-150": (512, (512, 2048), [2048, 512], "asl", 10.0, 2.0, 160000, 1e-6),
    "coco-stuff-164k": (512, (512, 2048), [2048, 512], "bce", 5.0, 2.0, 80000, 0.0),
    "pascal-context-59": (480, (520, 4160), [4160, 520], "asl", 5.0, 2.0, 80000, 1e-6),
}


@pytest.mark.parametrize("name", sorted(OFFICIAL))
def test_official_protocol_per_dataset(tmp_path: Path, name: str) -> None:
    crop, (short, long), scale, ml_loss, weight, gneg, iters, wd = OFFICIAL[name]
    cfg = build_train_config(None, ["model.model=segmenter-vitb"], fake_shards(tmp_path / "d", name, 60))
    e = cfg.eval
    assert (e.mode, e.crop, e.stride, e.short_side, e.max_long) == ("slide", crop, crop, short, long)
    assert (e.scales, e.flip) == ([1.0], False)
    assert cfg.model.img_size == crop and cfg.aug.scale == scale
    assert (cfg.loss.ml_loss, cfg.loss.ml_weight, cfg.loss.asl_gamma_neg, cfg.loss.asl_gamma_pos) == (ml_loss, weight, gneg, 0)
    assert (cfg.schedule.iters, cfg.optim.weight_decay) == (iters, wd)
    ml_keys = {"head.blocks.0.": {"lr_mult": 1.0, "decay_mult": 100.0}, "head.ml_fc": {"lr_mult": 1.0, "decay_mult": 100.0}}
    zero = {k: {"decay_mult": 0.0} for k in ("pos_embed", "cls_token", "norm")}
    assert cfg.optim.custom_keys == (zero if name.startswith("coco-stuff") else {**zero, **ml_keys})


def test_done_when_ade20k_full_slides_512(tmp_path: Path) -> None:
    """Issue 10: a run on ADE20K-Full-format shards evaluates with slide 512/512 by default,
    and that is what its config.yaml (read by `rankseg eval` and the training evaluations) says."""
    cfg = build_train_config(None, [], fake_shards(tmp_path / "d", "ade20k-full", 847))
    runs.save_config(tmp_path / "run", cfg)
    saved = runs.load_config(tmp_path / "run").eval
    assert (saved.mode, saved.crop, saved.stride) == ("slide", 512, 512)


def test_vit_l_640_scales_with_the_crop(tmp_path: Path) -> None:
    """The 640 configs use img_scale (2560, 640) and slide 640/640: derived from the crop."""
    cfg = build_train_config(None, ["model.model=segmenter-vitl", "model.img_size=640"],
                             fake_shards(tmp_path / "d", "ade20k-150", 150))
    assert cfg.aug.scale == [2560, 640]
    assert (cfg.eval.short_side, cfg.eval.max_long, cfg.eval.crop, cfg.eval.stride) == (640, 2560, 640, 640)


def test_synthetic_keeps_its_cheap_protocol_and_other_families_get_no_segmenter_recipe(tmp_path: Path) -> None:
    data = fake_shards(tmp_path / "d", "synthetic", 40)
    cfg = build_train_config(None, [], data)
    assert cfg.eval.mode == "whole" and cfg.aug.photometric is False and cfg.model.kappa == 25
    assert dataset_defaults("segmenter-vitt", "my-own-data") == {"eval.mode": "slide"}  # the paper's protocol
    with pytest.raises(UserError, match="model.model='someotherfamily-x' is unknown; use one of segmenter-vitt"):
        dataset_defaults("someotherfamily-x", "ade20k-full")


@pytest.mark.parametrize("ml_head, dataset, ml_loss, gneg", [
    ("tranenc", "ade20k-150", "asl", 2.0), ("trandec", "ade20k-150", "asl", 0.0), ("gap", "ade20k-150", "asl", 0.0),
    ("tranenc", "coco-stuff-164k", "bce", 2.0), ("trandec", "coco-stuff-164k", "asl", 0.0),
    ("gap", "coco-stuff-164k", "asl", 0.0)])
def test_ml_loss_and_asl_gamma_follow_the_head(tmp_path: Path, ml_head: str, dataset: str, ml_loss: str,
                                               gneg: float) -> None:
    """Official: TranEnc ASL(2, 0) (COCO-Stuff ViT-B: BCE); Table 6 TranDec / GAP ASL(0, 0)."""
    data = fake_shards(tmp_path / "d", dataset, 60)
    cfg = build_train_config(None, [f"model.ml_head={ml_head}"], data)
    assert (cfg.loss.ml_loss, cfg.loss.asl_gamma_neg, cfg.loss.asl_gamma_pos, cfg.loss.asl_clip) == (ml_loss, gneg, 0, 0.05)
    ml_prefix = "head.blocks.0." if ml_head == "tranenc" else "head.ml_branch."
    assert (ml_prefix in cfg.optim.custom_keys) == dataset.startswith("ade")
    # Explicit values win and are saved as given.
    cfg = build_train_config(None, [f"model.ml_head={ml_head}", "loss.asl_gamma_neg=4", "loss.asl_gamma_pos=1",
                                    "loss.ml_loss=asl"], data)
    assert (cfg.loss.ml_loss, cfg.loss.asl_gamma_neg, cfg.loss.asl_gamma_pos) == ("asl", 4.0, 1.0)
    runs.save_config(tmp_path / "run", cfg)
    assert "asl_gamma_neg: 4.0" in (tmp_path / "run" / "config.yaml").read_text()


def test_custom_keys_from_set_and_yaml_round_trip(tmp_path: Path) -> None:
    data = fake_shards(tmp_path / "d", "ade20k-150", 150)
    cfg = build_train_config(None, ["optim.custom_keys={norm: {decay_mult: 0}, head.ml_fc: {lr_mult: 10, decay_mult: 2}}"],
                             data)
    assert cfg.optim.custom_keys == {"norm": {"decay_mult": 0.0}, "head.ml_fc": {"lr_mult": 10.0, "decay_mult": 2.0}}
    runs.save_config(tmp_path / "run", cfg)
    back = runs.load_config(tmp_path / "run")  # dotted keys inside the mapping are not split
    assert back.optim.custom_keys == cfg.optim.custom_keys and diff_configs(cfg, back) == []
    yml = tmp_path / "c.yaml"
    yml.write_text("optim:\n  custom_keys:\n    head.blocks.0.:\n      decay_mult: 50\n")
    assert read_yaml(yml)["optim.custom_keys"] == {"head.blocks.0.": {"decay_mult": 50}}
    assert build_train_config(yml, [], data).optim.custom_keys == {"head.blocks.0.": {"decay_mult": 50.0}}
    none = build_train_config(None, ["optim.custom_keys={}"], data)
    assert none.optim.custom_keys == {}


@pytest.mark.parametrize("override, fragment", [
    ("optim.custom_keys={norm: {decay: 0}}", "unknown field"),
    ("optim.custom_keys={norm: {decay_mult: -1}}", "must be >= 0"),
    ("optim.custom_keys=norm", "expects"),
    ("optim.custom_keys={norm: {decay_mult: lots}}", "expects float"),
    ("loss.asl_gamma_neg=-1", "must be >= 0"),
    ("loss.asl_clip=1.5", "asl_clip"),
    ("loss.ml_loss=focal", "use asl or bce"),
    ("eval.stride=600", "eval.stride=600 must be <= eval.crop=512"),
    ("eval.crop=0", "must be >= 1"),
])
def test_bad_protocol_options(tmp_path: Path, override: str, fragment: str) -> None:
    data = fake_shards(tmp_path / "d", "ade20k-150", 150)
    with pytest.raises(UserError, match=fragment.replace("(", r"\(")):
        build_train_config(None, [override], data)
