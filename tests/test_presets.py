"""Named presets (issue 17 item 7): `--config NAME` reads a shipped YAML of the paper's (or our
tiny CPU) recipe. Each preset resolves against shards of its dataset to the values the docs give
(docs/method.md sec. 5 and 9, docs/mask2former.md "Official hyper-parameters", the official
configs' numbers, written here independently of the code); an unknown name is one line; a
file of the same name wins over a preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_one_line_error
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.config.train import read_yaml
from rankseg_core.engine.configure import PRESETS_DIR, build_train_config, config_path, dataset_defaults, preset_names
from rankseg_core.errors import UserError
from rankseg_core.families import family_of
from rankseg_core.families.mask2former import num_queries
from rankseg_core.shards.write import FORMAT, VERSION, VERSION_PANOPTIC

runner = CliRunner()


def shards(root: Path, name: str, k: int, panoptic: bool = False) -> Path:
    """A dataset.json alone (as the converter of `name` writes it): enough to resolve a config."""
    root.mkdir(parents=True)
    meta = {"format": FORMAT, "version": VERSION, "name": name, "num_classes": k,
            "class_names": [f"c{i}" for i in range(k)], "palette": [[i % 256, 0, 0] for i in range(k)], "splits": {}}
    if panoptic:
        meta.update(version=VERSION_PANOPTIC, panoptic=True, thing_classes=list(range(0, k, 2)))
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


# preset -> (dataset.json name, K, panoptic shards): the names the converters write.
DATA = {
    "segmenter-vitb-ade20k-full": ("ade20k-full", 847, False),
    "segmenter-vitb-coco-lvis": ("coco_lvis", 1284, False),
    "segmenter-vitb-ade20k": ("ade20k-150", 150, False),
    "segmenter-vitb-coco-stuff": ("coco-stuff-164k", 171, False),
    "segmenter-vitb-pascal-context": ("pascal-context-60", 60, False),
    "classifier-vitb-coco-stuff": ("coco-stuff-164k", 171, False),
    **{f"m2f-{b}-ade20k-semantic": ("ade20k-150", 150, False) for b in ("r50", "swinb", "swinl")},
    **{f"m2f-{b}-ade20k-panoptic": ("ade20k-panoptic", 150, True) for b in ("r50", "swinb", "swinl")},
    "segmenter-vitt-synthetic-tiny": ("synthetic", 200, False),
    "m2f-r50-synthetic-tiny": ("synthetic", 40, True),
}

# The paper's Segmenter + RankSeg rows (docs/method.md sec. 5 and 9; the official mmseg configs):
# crop, kappa, ml loss weight, iterations, base weight decay; SGD lr 1e-3, batch 8, slide test
# with window = stride = crop after resizing to (short side, long cap).
SEGMENTER = {  # preset: (crop, kappa, ml weight, iterations, weight decay, test short side, long cap)
    "segmenter-vitb-ade20k-full": (512, 100, 100.0, 160_000, 1e-6, 512, 2048),
    "segmenter-vitb-coco-lvis": (512, 100, 300.0, 320_000, 1e-6, 512, 2048),
    "segmenter-vitb-ade20k": (512, 50, 10.0, 160_000, 1e-6, 512, 2048),
    "segmenter-vitb-coco-stuff": (512, 50, 5.0, 80_000, 0.0, 512, 2048),
    "segmenter-vitb-pascal-context": (480, 25, 5.0, 80_000, 1e-6, 520, 4160),
}

# Mask2Former + RankSeg on ADE20K (the official configs: Base-ADE20K-Semantic/Panoptic, the Swin
# res640 configs, the fork's *-rankseg.yaml): crop, queries, test short side / long cap.
M2F = {
    "m2f-r50-ade20k-semantic": ("mask2former-r50", 512, 100, 512, 2048),
    "m2f-swinb-ade20k-semantic": ("mask2former-swinb", 640, 100, 640, 2560),
    "m2f-swinl-ade20k-semantic": ("mask2former-swinl", 640, 100, 640, 2560),
    "m2f-r50-ade20k-panoptic": ("mask2former-r50", 640, 100, 640, 2560),
    "m2f-swinb-ade20k-panoptic": ("mask2former-swinb", 640, 100, 640, 2560),
    "m2f-swinl-ade20k-panoptic": ("mask2former-swinl", 640, 200, 640, 2560),
}

# The flags docs/mask2former.md and docs/training.md showed before the presets existed.
M2F_TINY_FLAGS = [
    "model.model=mask2former-r50", "model.img_size=64", "model.kappa=10", "schedule.batch_size=4",
    "schedule.iters=150", "optim.lr=1e-3", "eval.short_side=64", "model.mask2former.task=panoptic",
    "model.mask2former.freeze_bn=false", "model.mask2former.hidden_dim=64", "model.mask2former.conv_dim=64",
    "model.mask2former.mask_dim=64", "model.mask2former.nheads=4", "model.mask2former.num_queries=16",
    "model.mask2former.dec_layers=3", "model.mask2former.enc_layers=1", "model.mask2former.dim_feedforward=128",
    "model.mask2former.enc_dim_feedforward=128", "model.mask2former.ml_hidden_dim=64",
    "model.mask2former.ml_query_layer=2", "model.mask2former.train_num_points=512",
    "model.mask2former.object_mask_threshold=0.5"]
SEGMENTER_TINY_FLAGS = ["model.model=segmenter-vitt", "model.img_size=64", "schedule.iters=300",
                        "schedule.batch_size=8", "optim.lr=0.01", "model.dropout=0", "model.drop_path=0"]


def resolved(name: str, tmp_path: Path, overrides: list[str] | None = None):
    dataset, k, panoptic = DATA[name]
    return build_train_config(name, overrides or [], shards(tmp_path / name, dataset, k, panoptic))


def test_every_preset_is_listed_and_covered() -> None:
    assert preset_names() == sorted(DATA)
    assert all((PRESETS_DIR / f"{n}.yaml").is_file() for n in preset_names())


@pytest.mark.parametrize("name", sorted(DATA))
def test_preset_resolves_against_its_shards_and_leaves_the_shards_their_say(name: str, tmp_path: Path) -> None:
    dataset, k, _ = DATA[name]
    cfg = resolved(name, tmp_path)
    assert cfg.model.num_classes == k and cfg.data.name == dataset and cfg.data.class_names[-1] == f"c{k - 1}"
    keys = read_yaml(PRESETS_DIR / f"{name}.yaml")
    assert not any(key.startswith("data.") or key == "model.num_classes" for key in keys), keys
    # Only what the dataset recipe does not already say, plus what the name promises.
    recipe = dataset_defaults(str(keys["model.model"]), dataset)
    repeated = {key for key, value in keys.items() if key in recipe and recipe[key] == value}
    assert repeated <= {"model.model", "model.head", "model.img_size"}, repeated
    text = (PRESETS_DIR / f"{name}.yaml").read_text()
    assert text.startswith("# ") and ("docs/" in text or "configs/" in text)  # where its numbers come from


@pytest.mark.parametrize("name", sorted(SEGMENTER))
def test_segmenter_presets_are_the_paper_rows(name: str, tmp_path: Path) -> None:
    crop, kappa, ml_weight, iters, wd, short, long = SEGMENTER[name]
    cfg = resolved(name, tmp_path)
    m = cfg.model
    assert (family_of(m.model).name, m.model, m.head) == ("segmenter", "segmenter-vitb", "rankseg")
    assert (m.img_size, m.kappa, cfg.loss.ml_weight, cfg.schedule.iters) == (crop, kappa, ml_weight, iters)
    assert cfg.optim.weight_decay == pytest.approx(wd)
    assert (cfg.optim.name, cfg.optim.lr, cfg.schedule.batch_size) == ("sgd", pytest.approx(1e-3), 8)
    e = cfg.eval
    assert (e.mode, e.crop, e.stride, e.short_side, e.max_long) == ("slide", crop, crop, short, long)
    assert cfg.loss.ml_loss == ("bce" if name.endswith("coco-stuff") else "asl")
    # The baseline of the same row is one flag away.
    assert resolved(name, tmp_path / "base", ["model.head=segmenter"]).model.head == "segmenter"


@pytest.mark.parametrize("name", sorted(M2F))
def test_mask2former_presets_are_the_official_configs(name: str, tmp_path: Path) -> None:
    model, crop, queries, short, long = M2F[name]
    cfg = resolved(name, tmp_path)
    m = cfg.model
    assert (family_of(m.model).name, m.model, m.head) == ("mask2former", model, "rankseg")
    assert (m.img_size, m.kappa, num_queries(m)) == (crop, 150, queries)
    assert m.mask2former.task == name.rsplit("-", 1)[1]
    o, s = cfg.optim, cfg.schedule
    assert (o.name, o.lr, o.weight_decay, o.backbone_lr_mult, o.ml_lr_mult, o.grad_clip) == (
        "adamw", pytest.approx(1e-4), pytest.approx(0.05), pytest.approx(0.1), pytest.approx(0.1), pytest.approx(0.01))
    assert (s.batch_size, s.iters, cfg.loss.ml_weight) == (16, 160_000, 10.0)
    assert (cfg.eval.mode, cfg.eval.short_side, cfg.eval.max_long) == ("whole", short, long)
    assert (m.mask2former.object_mask_threshold, m.mask2former.overlap_threshold) == (0.8, 0.8)


def test_classifier_preset(tmp_path: Path) -> None:
    cfg = resolved("classifier-vitb-coco-stuff", tmp_path)
    m = cfg.model
    assert (family_of(m.model).name, m.model, m.img_size, m.kappa) == ("classifier", "classifier-vitb", 512, 50)
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay) == ("adamw", pytest.approx(1e-4), pytest.approx(1e-2))
    assert (cfg.schedule.iters, cfg.eval.mode, cfg.loss.ml_loss) == (80_000, "whole", "asl")


@pytest.mark.parametrize("name, flags", [("m2f-r50-synthetic-tiny", M2F_TINY_FLAGS),
                                         ("segmenter-vitt-synthetic-tiny", SEGMENTER_TINY_FLAGS)])
def test_tiny_presets_equal_the_documented_flags(name: str, flags: list[str], tmp_path: Path) -> None:
    dataset, k, panoptic = DATA[name]
    data = shards(tmp_path / "d", dataset, k, panoptic)
    assert build_train_config(name, [], data) == build_train_config(None, flags, data)


def test_overrides_beat_a_preset(tmp_path: Path) -> None:
    cfg = resolved("m2f-swinl-ade20k-panoptic", tmp_path, ["model.kappa=50", "schedule.iters=10"])
    assert (cfg.model.kappa, cfg.schedule.iters, cfg.model.img_size) == (50, 10, 640)


def test_an_existing_file_wins_over_a_preset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("m2f-r50-synthetic-tiny").write_text("model:\n  kappa: 7\n")
    assert config_path("m2f-r50-synthetic-tiny") == Path("m2f-r50-synthetic-tiny")
    cfg = build_train_config("m2f-r50-synthetic-tiny", [], shards(tmp_path / "d", "synthetic", 40))
    assert (cfg.model.model, cfg.model.kappa) == ("segmenter-vitt", 7)  # the file's, not the preset's


def test_unknown_name_is_one_line(tmp_path: Path) -> None:
    data = shards(tmp_path / "d", "synthetic", 40)
    with pytest.raises(UserError) as exc:
        build_train_config("m2f-swinl-ade20k", [], data)
    text = str(exc.value)
    assert "\n" not in text and text.startswith("m2f-swinl-ade20k: config file not found")
    assert all(n in text for n in preset_names())
    res = runner.invoke(app, ["train", "--config", "segmenter-vitb-ade20", "--data", str(data),
                              "--out", str(tmp_path / "run"), "--dry-run"])
    assert_one_line_error(res, "segmenter-vitb-ade20: config file not found", "segmenter-vitb-ade20k-full")


def test_cli_takes_a_preset_name(tmp_path: Path) -> None:
    data = shards(tmp_path / "d", "synthetic", 40, panoptic=True)
    res = runner.invoke(app, ["train", "--config", "m2f-r50-synthetic-tiny", "--data", str(data),
                              "--out", str(tmp_path / "run"), "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "mask2former-r50" in res.output and "object_mask_threshold: 0.5" in res.output
