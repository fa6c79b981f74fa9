"""The interface through which a model family plugs into the one engine.

`rankseg train`, `eval`, `predict`, `stats model` and `viz` (rankseg_core/engine/, viz/) know
nothing about a family's models, recipes, losses or inference: they call what its `Family`
holds, and ask it what it can do (`segments`, `ranks`, `panoptic`, ...) instead of comparing
model names. A family is a frozen dataclass of plain functions and tables;
`families.family_of(cfg.model.model)` picks it by model name. docs/architecture.md says how
to add one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from rankseg_core.config.model import ModelConfig
from rankseg_core.config.train import OptimConfig, TrainConfig
from rankseg_core.errors import UserError
from rankseg_core.evaluation.video_instances import PredictedTrack
from rankseg_core.model.selection import NO_SELECTION, Selection


class Criterion(Protocol):
    """loss parts of one micro-batch: `crit(model_output, batch) -> {"loss": total, ...}`.

    batch: the collated training batch, `image` (B*T) x 3 x c x c float and `label`
    (B*T) x c x c long (65535 = ignore), plus whatever else the loader carries. Every value
    returned is a 0-dim tensor; "loss" is the one that gets `.backward()`, the others are
    logged as they are (detached).
    """

    def __call__(self, out: Any, batch: dict[str, Any]) -> dict[str, Tensor]: ...


@dataclass
class Predictions:
    """What a family's `predict` returns for a batch of N images.

    semantic: per image an h x w long class map at the requested size (None: the family
        does not segment, e.g. a multi-label classifier).
    ml: N x K multi-label probabilities (clips x K for video models), or None.
    panoptic: per image (h x w int32 segment-id map with 0 = void, [{"id", "category",
        "isthing", "score"}]) for families that predict instances, else None.
    """

    semantic: list[Tensor] | None
    ml: Tensor | None = None
    panoptic: list[tuple[Tensor, list[dict]]] | None = None


@dataclass(frozen=True)
class InferenceProtocol:
    """How an image is predicted: mode ("whole" or "slide"), scales (x the test size), flip."""

    mode: str = "whole"
    scales: tuple[float, ...] = (1.0,)
    flip: bool = False


Multipliers = dict[str, tuple[float, float]]  # parameter name -> (lr_mult, decay_mult)

# (model, cfg, frames T x 3 x H' x W' of ONE whole video at the test size, the original frame
# size (H, W), tracks to keep) -> the video's tracks, highest score first (one RLE or None per frame).
# (model, a weights file) -> (its tensors under the model's names, the file's names that fit
# nothing), or None for a file the family does not read itself (the engine reads it).
ForeignReader = Callable[[nn.Module, Path], tuple[dict[str, Tensor], list[str]] | None]

TrackPredictor = Callable[[nn.Module, TrainConfig, Tensor, tuple[int, int], int], list[PredictedTrack]]


def uniform_groups(model: nn.Module, cfg: TrainConfig) -> Multipliers:
    """Every trainable parameter at the base lr and weight decay, except lr x
    `optim.backbone_lr_mult` on `backbone.*` (detectron2's SOLVER.BACKBONE_MULTIPLIER)."""
    return listed_groups(model, cfg.optim, no_decay=set(), ml=set())


def listed_groups(model: nn.Module, o: OptimConfig, no_decay: set[str], ml: set[str]) -> Multipliers:
    """Multipliers from explicit name lists, as detectron2 builds its groups: decay 0 for
    `no_decay`, `optim.ml_lr_mult` / `optim.ml_wd_mult` for the multi-label branch `ml`, lr x
    `optim.backbone_lr_mult` for `backbone.*`."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lr = (o.ml_lr_mult if name in ml else 1.0) * (o.backbone_lr_mult if name.startswith("backbone.") else 1.0)
        out[name] = (lr, 0.0 if name in no_decay else (o.ml_wd_mult if name in ml else 1.0))
    return out


def sorted_custom_keys(custom_keys: dict[str, dict[str, float]]) -> list[str]:
    """The order in which mmcv's DefaultOptimizerConstructor tries the keys: longest first,
    equal lengths alphabetically."""
    return sorted(sorted(custom_keys), key=len, reverse=True)


def param_multipliers(model: nn.Module, custom_keys: dict[str, dict[str, float]]) -> dict[str, tuple[float, float]]:
    """{parameter name: (lr_mult, decay_mult)} for the trainable parameters.

    mmcv's rule: the first key of `sorted_custom_keys` that is a substring of the name decides
    (its missing fields are 1); a parameter no key matches gets (1, 1). The official RankSeg
    configs set no bias / norm rules (norms are exempt only through the "norm" key).
    UserError for a key that matches no parameter (a typo would otherwise do nothing).
    """
    order = sorted_custom_keys(custom_keys)
    used: set[str] = set()
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        # mmcv matches f"{module prefix}.{name}": a parameter of the root module reads ".name".
        full = name if "." in name else f".{name}"
        hits = [k for k in order if k in full]
        used.update(hits)
        mults = custom_keys[hits[0]] if hits else {}
        out[name] = (float(mults.get("lr_mult", 1.0)), float(mults.get("decay_mult", 1.0)))
    unused = [k for k in order if k not in used]
    if unused and out:
        raise UserError(f"optim.custom_keys: '{unused[0]}' matches no trainable parameter (names look like "
                        f"'{next(iter(out))}'); fix the key or remove it")
    return out


def _no_resolve(cfg: TrainConfig) -> None:
    return None


def _no_checks(m: ModelConfig) -> None:
    return None


def describe_head(m: ModelConfig) -> str:
    """The variant of a RankSeg-style head in words (what `rankseg train` says it trains)."""
    if m.oracle:
        return "oracle (GT train+eval)"
    if m.head == "segmenter":
        return m.head
    return f"rankseg kappa={m.effective_kappa}" if m.select else "+MT"


def oracle_selection(m: ModelConfig) -> Selection:
    """What a cost-counting forward passes: an oracle needs GT classes; kappa of them is its
    largest, costliest case."""
    return Selection(gt_classes=[torch.arange(m.effective_kappa)] * m.clip_len) if m.oracle else NO_SELECTION


def _no_more_stats(cfg: TrainConfig) -> tuple[str, ...]:
    return ()


def _no_extra_stats(model: nn.Module, m: ModelConfig) -> dict[str, Any]:
    return {}


def _never(m: ModelConfig) -> bool:
    return False


def _no_rank_scale(model: nn.Module) -> tuple[Tensor, Tensor] | None:
    return None


@dataclass(frozen=True)
class Family:
    """A model family: its names, recipes and capabilities, and how to build, train and
    read predictions from its models.

    name: the family's name, the prefix of its model names ("segmenter").
    models: `model.model` name -> timm backbone architecture, e.g. "segmenter-vitb" ->
        "vit_base_patch16_384".
    build: ModelConfig -> model (validated; local weights loaded). Every model is called as
        `model(images, selection)` (training and inference; `selection` may be ignored).
    criterion: TrainConfig -> Criterion.
    stats: the names `criterion` returns, "loss" first (logged to metrics.jsonl).
    weak_shot: its criterion trains novel classes from image-level labels (`--weak-shot`).
    more_stats: TrainConfig -> further names its criterion returns in that run (e.g. the
        weak-shot terms); `logged_stats` is what a run logs.
    predict: (model, cfg, images N x 3 x H x W normalised, sizes [(h, w)] per image,
        InferenceProtocol, Selection) -> Predictions at `sizes`.
    data_config: model -> {"mean", "std"} on the 0..255 scale (input normalisation).
    recipes: dataset key (config/datasets.py) or model name -> {dotted config key: value};
        "*" applies to every dataset, a model's entry on top, the dataset's own entry on top of
        that (the paper's / official recipes; `engine.configure.dataset_defaults`).
    resolve: fill the defaults of a resolved TrainConfig that depend on this family (None =
        the family's official value), after the recipes and the user's keys.
    validate: UserError for a model option this family cannot honour (beyond
        `ModelConfig.validate`, which every family shares).
    param_groups: (model, cfg) -> {parameter: (lr_mult, decay_mult)} when `optim.custom_keys`
        is None (the mmseg custom-keys rule, `param_multipliers`, applies otherwise, for every
        family).
    segments: the family predicts class maps (a multi-label classifier does not).
    ranks: the model ranks the K classes (multi-label logits or a frozen selector), so that
        --kappa, --dynamic-kappa and --oracle-fill ranked have a meaning.
    selects: the model classifies pixels over a selection that GT classes can replace
        (--oracle; a class-ordered baseline restricts its K channels instead).
    panoptic: the model predicts segments (and trains on the shards' segment maps).
    instances: the model trains on per-frame instance tracks and predicts tracks of whole
        videos (video instance segmentation: scored by AP, written as results.json).
    predict_tracks: how such a model predicts the tracks of one video (required where
        `instances` can be true).
    foreign_weights: the family's reader of checkpoints in another code base's layout
        (`rankseg train --init-from` of a detectron2 .pkl), asked before the engine's own reader.
    accepts_selector: a frozen classifier run may rank its classes (--selector).
    heads: the values of `model.head` this family builds ("segmenter" = its baseline,
        "rankseg" = with RankSeg, plus any comparison heads of its own).
    find_unused_parameters: whether DDP must look for parameters a step does not use.
    describe: the model variant in a few words (what `rankseg train` says it trains).
    stats_extra: (model, ModelConfig) -> extra rows of `rankseg stats model`.
    stats_selection: the Selection a cost-counting forward needs (an oracle needs GT classes).
    rank_scale: model -> (1/tau per rank, beta per rank) of its rank LayerNorm, or None.
    """

    name: str
    models: dict[str, str]
    build: Callable[[ModelConfig], nn.Module]
    criterion: Callable[[TrainConfig], Criterion]
    stats: tuple[str, ...]
    predict: Callable[[nn.Module, TrainConfig, Tensor, list[tuple[int, int]], InferenceProtocol, Selection], Predictions]
    data_config: Callable[[nn.Module], dict[str, Any]]
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    resolve: Callable[[TrainConfig], None] = _no_resolve
    validate: Callable[[ModelConfig], None] = _no_checks
    param_groups: Callable[[nn.Module, TrainConfig], Multipliers] = uniform_groups
    segments: bool = True
    ranks: Callable[[ModelConfig], bool] = _never
    selects: Callable[[ModelConfig], bool] = _never
    panoptic: Callable[[ModelConfig], bool] = _never
    instances: Callable[[ModelConfig], bool] = _never
    predict_tracks: TrackPredictor | None = None
    foreign_weights: ForeignReader | None = None
    accepts_selector: bool = False
    heads: tuple[str, ...] = ("segmenter", "rankseg")
    find_unused_parameters: Callable[[ModelConfig], bool] = _never
    describe: Callable[[ModelConfig], str] = describe_head
    stats_extra: Callable[[nn.Module, ModelConfig], dict[str, Any]] = _no_extra_stats
    stats_selection: Callable[[ModelConfig], Selection] = oracle_selection
    rank_scale: Callable[[nn.Module], tuple[Tensor, Tensor] | None] = _no_rank_scale
    more_stats: Callable[[TrainConfig], tuple[str, ...]] = _no_more_stats
    weak_shot: bool = False

    def logged_stats(self, cfg: TrainConfig) -> tuple[str, ...]:
        """The statistics a run of this config logs to metrics.jsonl, "loss" first."""
        return self.stats + self.more_stats(cfg)

    def track_predictor(self, m: ModelConfig) -> TrackPredictor:
        """`predict_tracks` of a model that predicts tracks (UserError for one that does not)."""
        if not self.instances(m) or self.predict_tracks is None:
            raise UserError(f"this run ({m.model}: {self.describe(m)}) predicts no video instance tracks: YouTube-VIS "
                            "results need a video instance model (e.g. a Mask2Former with model.clip_len > 1 and "
                            "model.mask2former.task=instance)")
        return self.predict_tracks

    def arch(self, model_name: str) -> str:
        """The timm architecture of one of this family's model names (UserError for others)."""
        if model_name not in self.models:
            raise UserError(f"model.model={model_name!r} is not a {self.name} model; use one of "
                            f"{', '.join(self.models)}")
        return self.models[model_name]
