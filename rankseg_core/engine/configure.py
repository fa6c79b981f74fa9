"""A run's configuration: defaults < the family's recipe for the dataset < YAML < `--set`.

Layering, lowest to highest priority (dinov2-style):
    dataclass defaults < the data's defaults and the model family's recipe for the dataset
    (`Family.recipes`, by the shards' name; docs/method.md sec. 4-5) < the user's YAML
    < `--set key=value` (the CLI's flags become `--set`s too).
So a recipe value only applies where the user set nothing. K, the class names and the palette
always come from the shards' `dataset.json`. The resolved config (every derived value filled
in, by the engine and then by the family) is what `runs.save_config` writes next to the run.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import rankseg_core.config
from rankseg_core.config.datasets import DATA_DEFAULTS, recipe_dataset, weak_shot_comp_weight
from rankseg_core.config.train import DataConfig, TrainConfig, parse_override, read_yaml, set_key, validate
from rankseg_core.data.weak_shot import resolve_config as resolve_weak_shot
from rankseg_core.errors import UserError
from rankseg_core.families import FAMILIES, check_head, family_of
from rankseg_core.shards.read import load_index
from rankseg_core.shards.splits import find_split


def dataset_defaults(model_name: str, dataset_name: str) -> dict[str, Any]:
    """The default config keys for a model on a dataset: the data's own defaults, then the
    family's "*" recipe, then its recipe for the model (an architecture's own optimizer or
    crop, e.g. MaskFormer's inside the Mask2Former family), then its recipe for the dataset."""
    dataset = recipe_dataset(dataset_name)
    recipes = family_of(model_name).recipes
    return {**DATA_DEFAULTS.get(dataset or "", {}), **recipes.get("*", {}), **recipes.get(model_name, {}),
            **recipes.get(dataset or "", {})}


def resolve(cfg: TrainConfig, meta: dict | None = None, explicit: Collection[str] = ()) -> TrainConfig:
    """Fill derived values (None = derived) and validate. `meta` is the shards' dataset.json.

    With `meta`, a train / val split the user did not set (not in `explicit`, and still the
    dataclass default) becomes the shards' own (`shards/splits.py`: ADE20K's training /
    validation). A resumed run passes no `meta`, so its config.yaml keeps its split names.
    """
    if meta is not None:
        defaults = DataConfig()
        for key, role in (("train_split", "train"), ("val_split", "val")):
            value = getattr(cfg.data, key)
            if f"data.{key}" in explicit or value != getattr(defaults, key) or value in meta["splits"]:
                continue
            found = find_split(meta["splits"], role)
            if found is not None:  # else check_splits names the splits and the key to set
                setattr(cfg.data, key, found)
        cfg.data.name = str(meta.get("name", ""))
        cfg.data.class_names = [str(n) for n in meta["class_names"]]
        cfg.data.palette = [[int(c) for c in row] for row in meta["palette"]]
        things = meta.get("thing_classes")
        cfg.data.thing_classes = [int(c) for c in things] if meta.get("panoptic") and things is not None else None
        cfg.model.num_classes = int(meta["num_classes"])
    # The split's novel train ids and file digest, recorded in config.yaml (checked on resume).
    resolve_weak_shot(cfg.data, cfg.model.num_classes)
    family = family_of(cfg.model.model)
    crop = cfg.model.img_size
    if cfg.aug.scale is None:
        cfg.aug.scale = [4 * crop, crop]
    e = cfg.eval
    e.short_side = crop if e.short_side is None else e.short_side
    e.max_long = 4 * e.short_side if e.max_long is None else e.max_long
    e.crop = crop if e.crop is None else e.crop
    e.stride = e.crop if e.stride is None else e.stride
    family.resolve(cfg)
    lo = cfg.loss  # what is still None has no family-specific official value: ASL(2, 0)
    lo.ml_loss = "asl" if lo.ml_loss is None else lo.ml_loss
    lo.asl_gamma_neg = 2.0 if lo.asl_gamma_neg is None else lo.asl_gamma_neg
    if cfg.data.novel_classes is not None and lo.weak_shot_comp_weight is None:  # weak-shot runs only
        lo.weak_shot_comp_weight = weak_shot_comp_weight(cfg.data.name)
    validate(cfg)
    check_model(cfg)
    return cfg


def check_model(cfg: TrainConfig) -> None:
    """UserError for model options the run's family cannot honour."""
    m = cfg.model
    family = family_of(m.model)
    m.validate()
    if m.has_selector and not family.accepts_selector:
        takers = ", ".join(f.name for f in FAMILIES if f.accepts_selector)
        raise UserError(f"model.selector.run={m.selector.run}: a {family.name} model ({m.model}) cannot take its "
                        f"classes from a classifier run; use a model of a family that does: {takers}")
    check_head(m)
    if cfg.data.novel_classes is not None and not family.weak_shot:
        takers = ", ".join(f.name for f in FAMILIES if f.weak_shot)
        raise UserError(f"--weak-shot {cfg.data.weak_shot or cfg.data.novel_classes}: a {family.name} model ({m.model}) "
                        f"has no weak-shot losses; use a model of a family that has: {takers}")
    family.validate(m)


# Named presets (`--config NAME`): the paper's recipes and our tiny CPU ones, as YAML files in the
# `--config` format shipped with the package (docs/training.md "Configuration").
PRESETS_DIR = Path(rankseg_core.config.__file__).parent / "presets"


def preset_names() -> list[str]:
    """The names `--config` accepts besides a file path, sorted."""
    return sorted(p.stem for p in PRESETS_DIR.glob("*.yaml"))


def config_path(config: str | Path) -> Path:
    """The YAML file `--config` names: an existing file wins over a preset of the same name;
    anything that is neither is a UserError listing the presets."""
    path = Path(config)
    if path.is_file():
        return path
    if str(config) in preset_names():
        return PRESETS_DIR / f"{config}.yaml"
    raise UserError(f"{config}: config file not found, and no preset has that name; pass a YAML file or one "
                    f"of the presets: {', '.join(preset_names())}")


def build_train_config(config_file: str | Path | None = None, overrides: list[str] | None = None,
                       data_root: str | Path | None = None) -> TrainConfig:
    """Defaults < dataset defaults < YAML < overrides, resolved against the shards.

    `overrides` are 'key=value' strings (the CLI's --set and its flags, flags last).
    """
    layers: list[tuple[str, dict[str, Any]]] = []
    if config_file is not None:
        path = config_path(config_file)
        where = f"{config_file}: " if path == Path(config_file) else f"preset {config_file}: "
        layers.append((where, read_yaml(path)))
    sets = dict(parse_override(text) for text in overrides or [])
    if data_root is not None:
        sets["data.root"] = str(data_root)
    layers.append(("--set: ", sets))
    user = {k: v for _, layer in layers for k, v in layer.items()}
    root = user.get("data.root")
    if not root:
        raise UserError("no training data: pass --data DIR (a shard directory from `rankseg prepare`)")
    meta = load_index(root)
    cfg = TrainConfig()
    # The recipe depends on the model family, which the user's layers may choose.
    model_name = str(user.get("model.model") or cfg.model.model)
    for key, value in dataset_defaults(model_name, str(meta.get("name", ""))).items():
        set_key(cfg, key, value)
    for where, layer in layers:
        for key, value in layer.items():
            set_key(cfg, key, value, where)
    k = int(meta["num_classes"])
    if "model.num_classes" in user and cfg.model.num_classes != k:
        raise UserError(f"model.num_classes={cfg.model.num_classes} but the shards in {root} have K={k}: "
                        "drop the override (K always comes from the shards)")
    return resolve(cfg, meta, explicit=user)


# CLI flags of `rankseg train` and the config keys they set (the flags are `--set` shorthands).
FLAG_KEYS: dict[str, str] = {
    "model": "model.model", "head": "model.head", "kappa": "model.kappa", "tau": "model.tau",
    "ml_head": "model.ml_head", "clip_len": "model.clip_len", "img_size": "model.img_size",
    "backbone_weights": "model.backbone_weights", "ml_loss": "loss.ml_loss", "ml_weight": "loss.ml_weight",
    "seg_loss_norm": "loss.seg_loss_norm", "iters": "schedule.iters", "batch_size": "schedule.batch_size",
    "seed": "seed", "device": "device", "eval_every": "eval.every", "workers": "data.num_workers",
}


def flag_overrides(flags: dict[str, Any]) -> list[str]:
    """CLI flag values (None = not given) -> 'key=value' overrides, in FLAG_KEYS order."""
    out = []
    for name, key in FLAG_KEYS.items():
        value = flags.get(name)
        if value is not None:
            out.append(f"{key}={value}")
    return out
