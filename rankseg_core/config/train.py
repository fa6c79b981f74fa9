"""Training configuration: one nested dataclass, YAML files and dotted `--set` overrides.

This module holds the schema (every section and its defaults), dotted access with type
coercion, YAML in and out, and the checks every run passes. Which defaults a model family or a
dataset brings, and the resolution against the shards, are the engine's
(rankseg_core/engine/configure.py); what a family allows of `model.*`, the family's.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml

from rankseg_core.config.model import ModelConfig
from rankseg_core.errors import UserError


@dataclass
class DataConfig:
    root: str = ""  # shard directory (`rankseg prepare ... --out DIR`)
    train_split: str = "train"
    val_split: str = "val"  # "" = no evaluation during or after training
    num_workers: int = 2  # DataLoader workers per process; 0 = decode in the training process
    # Filled from dataset.json at resolve time (kept in config.yaml so a run is self-contained).
    name: str = ""
    class_names: list[str] = field(default_factory=list)
    palette: list[list[int]] = field(default_factory=list)
    thing_classes: list[int] | None = None  # panoptic shards (format v2): train ids of thing classes
    # Weak-shot segmentation (docs/weak-shot.md): novel classes keep only image-level labels in
    # training (their pixels become ignore after augmentation). `weak_shot` names the split
    # (`--weak-shot`: a built-in name such as coco-stuff-10k/split1, or a JSON file); resolving
    # it fills `novel_classes` (train ids; None = not weak-shot) and the split file's SHA-256,
    # so config.yaml records exactly which classes were hidden and a changed file is refused
    # on --resume.
    weak_shot: str | None = None
    novel_classes: list[int] | None = None
    weak_shot_sha256: str = ""


@dataclass
class OptimConfig:
    name: str = "sgd"  # "sgd" (the paper) or "adamw"
    lr: float = 0.001  # Segmenter/RankSeg recipe: SGD 1e-3, momentum 0.9
    momentum: float = 0.9
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw only
    weight_decay: float = 0.0  # 0 on COCO-Stuff, 1e-6 on ADE20K / Pascal (dataset defaults)
    # mmseg `paramwise_cfg.custom_keys`: {substring of a parameter name: {lr_mult, decay_mult}};
    # the longest matching key decides (optim.py). None = the official keys (Segmenter), or
    # for other families the model's own groups (no_weight_decay / ml_branch_names).
    custom_keys: dict[str, dict[str, float]] | None = None
    ml_wd_mult: float = 100.0  # decay_mult of the ml branch in the resolved custom_keys (ADE20K/Pascal: 100)
    ml_lr_mult: float = 1.0  # lr_mult of the ml branch in the resolved custom_keys
    # Families whose model defines its groups (custom_keys None): lr x this on `backbone.*`
    # (detectron2's SOLVER.BACKBONE_MULTIPLIER, 0.1 in every Mask2Former config).
    backbone_lr_mult: float = 1.0
    grad_clip: float = 0.0  # max global grad norm; 0 = off (the paper does not clip)


@dataclass
class ScheduleConfig:
    iters: int = 160000  # optimizer steps (iteration-based, as mmseg)
    batch_size: int = 8  # GLOBAL images (clips) per optimizer step, over all processes
    accum_steps: int = 1  # micro-batches per step: per-process micro = batch / (world * accum)
    power: float = 0.9  # poly decay
    min_lr: float = 1e-5  # poly floor (torch's PolynomialLR has none)
    warmup_iters: int = 0  # linear warm-up; the paper uses none


@dataclass
class LossConfig:
    ml_loss: str | None = None  # "asl" or "bce"; None = official: bce for COCO-Stuff TranEnc, else asl
    ml_weight: float = 10.0  # total = seg + w * ml; per-dataset value: the family recipe (docs/method.md sec. 4-5)
    seg_loss_norm: str = "official"  # "official": sum / all pixels; "valid": mean over labelled
    asl_gamma_neg: float | None = None  # None = official per ml head: tranenc 2, trandec / gap 0
    asl_gamma_pos: float = 0.0  # 0 in every official config
    asl_clip: float = 0.05  # probability margin on negatives (the ASL default of every config)
    # Weak-shot runs only (losses/weak_shot.py): novel classes' MIL over pixels + SimFormer's
    # complementary loss. comp None = official per dataset (0.15 COCO-Stuff, 0.2 ADE20K / others).
    weak_shot_comp_weight: float | None = None
    weak_shot_mil_weight: float = 1.0  # SimFormer's class-loss weight (LOSS.AssignCls 1 in every split config)
    weak_shot_mil_pool: str = "max"  # "max" (presence = some pixel) or "topk" (mean of the top fraction)
    weak_shot_mil_topk: float = 0.1  # "topk" fraction of the pooled region (the official top-R rate)


@dataclass
class AugConfig:
    scale: list[int] | None = None  # (long, short) base scale; None = (4 * crop, crop), e.g. 2048x512
    ratio_range: list[float] = field(default_factory=lambda: [0.5, 2.0])
    cat_max_ratio: float = 0.75  # mmseg: a crop may not be > 75% one class (10 tries)
    flip_prob: float = 0.5
    photometric: bool = True  # mmseg PhotoMetricDistortion
    brightness_delta: int = 32
    contrast_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    saturation_range: list[float] = field(default_factory=lambda: [0.5, 1.5])
    hue_delta: int = 18
    mean: list[float] | None = None  # 0..255 scale; None = the backbone's data config
    std: list[float] | None = None


@dataclass
class EvalConfig:
    every: int = 0  # evaluate every N iterations during training (0 = only at the end)
    max_images: int = 0  # cap for the periodic evaluation (0 = whole split); the final one is full
    short_side: int | None = None  # test resize: short side (None = the crop size)
    max_long: int | None = None  # long side cap (None = 4 x short side, i.e. 2048 for 512)
    mode: str = "whole"  # "whole" or "slide"; Segmenter recipes: slide (every official test config)
    crop: int | None = None  # slide window (None = the crop size)
    stride: int | None = None  # slide stride (None = the window, as the official configs)
    scales: list[float] = field(default_factory=lambda: [1.0])
    flip: bool = False
    batch_size: int = 4  # images of the same size are batched
    num_workers: int = 2


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0
    device: str = "auto"  # "auto" = cuda if available, else cpu
    amp: bool = True  # autocast on CUDA only (bf16 where supported, else fp16 + GradScaler)
    # Convolution weights and images in NHWC (torch.channels_last): faster cuDNN convolutions
    # on a GPU for convolutional networks (ResNet backbones, the DeepLab / UperNet heads, the
    # Mask2Former pixel decoder's convolutions); nothing to gain for ViT (one patch-embedding
    # convolution) or on a CPU. Layout only, so a runtime key (a resume may change it).
    channels_last: bool = False
    deterministic: bool = False  # torch.use_deterministic_algorithms (slower on CUDA)
    log_every: int = 20  # iterations between metrics.jsonl records
    ckpt_every: int = 1000  # iterations between checkpoints/last.pt writes
    keep_last: int = 3  # periodic checkpoints/iter_<N>.pt kept (runs.keep_checkpoints); 0 = all
    log_seconds: float = 10.0  # plain progress line period when stderr is not a terminal
    # TensorBoard events of metrics.jsonl's records in RUN/tensorboard/ (engine/scalars.py):
    # None = when the tensorboard package is importable, true = required, false = off.
    tensorboard: bool | None = None
    # Initial weights of a fresh run (mmseg's load_from): a run directory or a weights file
    # (.safetensors / .pt / .pth); tensors matching by name and shape (warm_start.py). A resume
    # never re-applies it: the checkpoint wins.
    init_from: str | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# Keys that may differ when resuming: they change how, not what, is computed.
RUNTIME_KEYS = frozenset({"device", "data.num_workers", "eval.num_workers", "eval.batch_size",
                          "log_seconds", "data.root", "eval.every", "eval.max_images", "ckpt_every",
                          "tensorboard", "keep_last", "channels_last"})

# ---------------------------------------------------------------------------------------
# Dotted access and type coercion


def _sections(obj: Any) -> dict[str, Any]:
    return {f.name: f for f in dataclasses.fields(obj)}


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def all_keys(obj: Any = None, prefix: str = "") -> list[str]:
    """Every dotted leaf key of a config dataclass (e.g. 'optim.lr')."""
    obj = TrainConfig() if obj is None else obj
    keys = []
    for name in _sections(obj):
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            keys += all_keys(value, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _unknown_key(key: str, where: str) -> UserError:
    close = difflib.get_close_matches(key, all_keys(), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(close)}?" if close else "; see docs/training.md for the keys"
    return UserError(f"{where}unknown config key '{key}'{hint}")


def _locate(cfg: Any, key: str, where: str = "") -> tuple[Any, str, Any]:
    """(parent dataclass, field name, field type) for a dotted key, or UserError."""
    parts = key.split(".")
    obj = cfg
    for part in parts[:-1]:
        if not dataclasses.is_dataclass(obj) or part not in _sections(obj) \
                or not dataclasses.is_dataclass(getattr(obj, part)):
            raise _unknown_key(key, where)
        obj = getattr(obj, part)
    leaf = parts[-1]
    if not dataclasses.is_dataclass(obj) or leaf not in _sections(obj) or dataclasses.is_dataclass(getattr(obj, leaf)):
        raise _unknown_key(key, where)
    return obj, leaf, _hints(type(obj))[leaf]


def _parse_text(text: str) -> Any:
    """A `--set` value string: YAML scalars/lists, plus bare comma lists ('0.75,1.0')."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = text
    if isinstance(value, str) and "," in value and not value.startswith(("[", "{")):
        value = [_parse_text(v.strip()) for v in value.split(",")]
    return value


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (from YAML or a --set string) to the annotated type `tp`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "~", "")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if errors else f"{key}: cannot be {value!r}")
    bad = UserError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin is dict:
        if isinstance(value, str):
            value = _parse_text(value)
        if not isinstance(value, dict):
            raise bad
        kt, vt = args if args else (Any, Any)
        return {coerce(k, kt, key): coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if origin in (list, tuple):
        if isinstance(value, str):
            value = _parse_text(value)
        if not isinstance(value, (list, tuple)):
            value = [value]
        inner = args[0] if args else Any
        return [coerce(v, inner, key) for v in value]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in _TRUE | _FALSE:
            return value.lower() in _TRUE
        raise bad
    if tp is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        try:
            f = float(value)
        except (TypeError, ValueError):
            raise bad from None
        if not f.is_integer():
            raise bad
        return int(f)
    if tp is float:
        if isinstance(value, bool):
            raise bad
        try:
            return float(value)
        except (TypeError, ValueError):
            raise bad from None
    if tp is str:
        if value is None:  # `--set data.val_split=` means empty, not the text "None"
            return ""
        if isinstance(value, (dict, list)):
            raise bad
        return str(value)
    raise bad


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def set_key(cfg: TrainConfig, key: str, value: Any, where: str = "") -> None:
    """cfg.<key> = coerced value; UserError for unknown keys or bad values."""
    parent, leaf, tp = _locate(cfg, key, where)
    try:
        setattr(parent, leaf, coerce(value, tp, key))
    except UserError as exc:
        raise UserError(f"{where}{exc}") from None


@functools.cache
def _mapping_keys(cls: type | None = None, prefix: str = "") -> frozenset[str]:
    """Dotted keys whose value is a mapping (e.g. optim.custom_keys): leaves, not sections."""
    out: set[str] = set()
    for name, tp in _hints(cls or TrainConfig).items():
        if dataclasses.is_dataclass(tp):
            out |= _mapping_keys(cast(type, tp), f"{prefix}{name}.")  # a type hint: the class, not an instance
        elif any(typing.get_origin(t) is dict for t in (tp, *typing.get_args(tp))):
            out.add(prefix + name)
    return frozenset(out)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'optim': {'lr': 1}} -> {'optim.lr': 1}; lists and mapping-valued keys stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and f"{prefix}{k}" not in _mapping_keys():
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """'optim.lr=1e-3' -> ('optim.lr', '1e-3'); coercion happens in `set_key`."""
    if "=" not in text:
        raise UserError(f"--set {text!r}: expected key=value, e.g. --set optim.lr=0.001")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"--set {text!r}: empty key")
    _locate(TrainConfig(), key, "--set: ")  # unknown key -> UserError now, not after loading data
    return key, value.strip()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as flat dotted keys (validated against TrainConfig)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise UserError(f"{path}: not valid YAML ({first})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: the top level must be a mapping of sections (model:, optim:, ...)")
    flat = flatten(data)
    probe = TrainConfig()
    for key in flat:
        _locate(probe, key, f"{path}: ")
    return flat


def from_dict(data: dict, where: str = "") -> TrainConfig:
    """A TrainConfig from a nested dict (e.g. a run's config.yaml); unknown keys are errors."""
    cfg = TrainConfig()
    for key, value in flatten(data).items():
        set_key(cfg, key, value, where)
    return cfg


class _Dumper(yaml.SafeDumper):
    """Block-style sections, flow-style scalar lists: a K=1284 palette stays one row per class."""


def _represent_list(dumper: yaml.SafeDumper, data: list) -> yaml.Node:
    flat = all(not isinstance(v, (list, dict)) for v in data)
    return dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=flat)


_Dumper.add_representer(list, _represent_list)


def to_yaml(cfg: TrainConfig) -> str:
    return yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)


# ---------------------------------------------------------------------------------------
# Checks


def validate(cfg: TrainConfig) -> None:
    """UserError naming the first bad option and how to fix it (the family's own checks come
    on top: engine/configure.py `check_model`)."""
    cfg.model.validate()
    o, s, a, e, lo = cfg.optim, cfg.schedule, cfg.aug, cfg.eval, cfg.loss
    checks = [
        (o.name in ("sgd", "adamw"), f"optim.name={o.name!r}: use sgd or adamw"),
        (o.lr > 0, f"optim.lr={o.lr} must be > 0"),
        (len(o.betas) == 2, "optim.betas needs two values, e.g. 0.9,0.999"),
        (o.weight_decay >= 0 and min(o.ml_wd_mult, o.ml_lr_mult, o.backbone_lr_mult) >= 0,
         "optim weight decay / multipliers must be >= 0"),
        (s.iters >= 1, f"schedule.iters={s.iters} must be >= 1"),
        (s.batch_size >= 1 and s.accum_steps >= 1, "schedule.batch_size and schedule.accum_steps must be >= 1"),
        (s.batch_size % s.accum_steps == 0,
         f"schedule.batch_size={s.batch_size} must be divisible by schedule.accum_steps={s.accum_steps}"),
        (0 <= s.min_lr <= o.lr, f"schedule.min_lr={s.min_lr} must be in [0, optim.lr]"),
        (s.power > 0 and s.warmup_iters >= 0, "schedule.power must be > 0 and warmup_iters >= 0"),
        (lo.ml_loss in ("asl", "bce", None), f"loss.ml_loss={lo.ml_loss!r}: use asl or bce"),
        ((lo.asl_gamma_neg or 0) >= 0 and lo.asl_gamma_pos >= 0, "loss.asl_gamma_neg / asl_gamma_pos must be >= 0"),
        (0 <= lo.asl_clip < 1, f"loss.asl_clip={lo.asl_clip} must be in [0, 1)"),
        (lo.seg_loss_norm in ("official", "valid"), f"loss.seg_loss_norm={lo.seg_loss_norm!r}: use official or valid"),
        (lo.ml_weight >= 0, "loss.ml_weight must be >= 0"),
        ((lo.weak_shot_comp_weight or 0) >= 0 and lo.weak_shot_mil_weight >= 0,
         "loss.weak_shot_comp_weight / weak_shot_mil_weight must be >= 0"),
        (lo.weak_shot_mil_pool in ("max", "topk"), f"loss.weak_shot_mil_pool={lo.weak_shot_mil_pool!r}: use max or topk"),
        (0 < lo.weak_shot_mil_topk <= 1, f"loss.weak_shot_mil_topk={lo.weak_shot_mil_topk}: use a fraction in (0, 1]"),
        (a.scale is None or (len(a.scale) == 2 and min(a.scale) > 0), "aug.scale needs two positive sides (long, short)"),
        (len(a.ratio_range) == 2 and 0 < a.ratio_range[0] <= a.ratio_range[1], "aug.ratio_range needs 0 < lo <= hi"),
        (0 < a.cat_max_ratio <= 1, "aug.cat_max_ratio must be in (0, 1]"),
        (0 <= a.flip_prob <= 1, "aug.flip_prob must be in [0, 1]"),
        (a.mean is None or len(a.mean) == cfg.model.in_chans, "aug.mean needs one value per input channel"),
        (a.std is None or (len(a.std) == cfg.model.in_chans and min(a.std) > 0), "aug.std needs one positive value per channel"),
        (e.mode in ("whole", "slide"), f"eval.mode={e.mode!r}: use whole or slide"),
        (all(v is None or v >= 1 for v in (e.short_side, e.max_long, e.crop, e.stride)),
         "eval.short_side, eval.max_long, eval.crop and eval.stride must be >= 1"),
        (e.crop is None or e.stride is None or e.stride <= e.crop,
         f"eval.stride={e.stride} must be <= eval.crop={e.crop} (larger strides leave pixels no window covers)"),
        (len(e.scales) >= 1 and min(e.scales) > 0, "eval.scales must be positive, e.g. 0.75,1.0,1.25"),
        (e.every >= 0 and e.max_images >= 0 and e.batch_size >= 1, "eval.every/max_images >= 0, eval.batch_size >= 1"),
        (cfg.log_every >= 1 and cfg.ckpt_every >= 1, "log_every and ckpt_every must be >= 1"),
        (cfg.keep_last >= 0, f"keep_last={cfg.keep_last} must be >= 0 (the periodic checkpoints to keep; 0 keeps all)"),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise UserError(message)
    _validate_custom_keys(o.custom_keys)
    if cfg.data.class_names and len(cfg.data.class_names) != cfg.model.num_classes:
        raise UserError(f"data.class_names has {len(cfg.data.class_names)} names but model.num_classes="
                        f"{cfg.model.num_classes}")
    _validate_novel(cfg.data.novel_classes, cfg.model.num_classes)
    if cfg.data.novel_classes is not None and cfg.model.clip_len > 1:
        raise UserError(f"--weak-shot trains on single images: model.clip_len={cfg.model.clip_len} must be 1 "
                        "(video clips have no weak-shot protocol here)")


def _validate_novel(novel: list[int] | None, k: int) -> None:
    """A weak-shot run's novel train ids: some, not all, each once, each a class of the run."""
    if novel is None:
        return
    fix = "fix the split (--weak-shot) or data.novel_classes"
    if not novel:
        raise UserError(f"data.novel_classes is empty: a weak-shot run needs at least one novel class; {fix}")
    bad = sorted({c for c in novel if not 0 <= c < k})
    if bad:
        raise UserError(f"data.novel_classes holds {bad[0]}, outside the run's train ids 0..{k - 1}; {fix}")
    if len(set(novel)) != len(novel):
        twice = sorted({c for c in novel if novel.count(c) > 1})
        raise UserError(f"data.novel_classes lists class {twice[0]} twice; {fix}")
    if len(novel) >= k:
        raise UserError(f"data.novel_classes makes all {k} classes novel: no base class keeps its masks; {fix}")


def _validate_custom_keys(keys: dict[str, dict[str, float]] | None) -> None:
    example = "e.g. --set 'optim.custom_keys={norm: {decay_mult: 0}, head.ml_fc: {lr_mult: 10}}'"
    for key, mults in (keys or {}).items():
        if not key:
            raise UserError(f"optim.custom_keys: empty key; {example}")
        unknown = set(mults) - {"lr_mult", "decay_mult"}
        if unknown:
            raise UserError(f"optim.custom_keys['{key}']: unknown field(s) {', '.join(sorted(unknown))}; "
                            f"use lr_mult and decay_mult, {example}")
        if any(v < 0 for v in mults.values()):
            raise UserError(f"optim.custom_keys['{key}']: multipliers must be >= 0")


def diff_configs(a: TrainConfig, b: TrainConfig, ignore: frozenset[str] = RUNTIME_KEYS) -> list[str]:
    """Dotted keys whose values differ (outside `ignore`)."""
    fa, fb = flatten(a.to_dict()), flatten(b.to_dict())
    return [k for k in fa if k not in ignore and fa[k] != fb.get(k)]
