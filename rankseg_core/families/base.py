"""The interface through which a model family plugs into the one engine.

`rankseg train` (train.py) and `rankseg eval` (evaluate.py) know nothing about a family's
model, loss or inference: they call the four things a `Family` holds. A family is a frozen
dataclass of plain functions; `families.family_of(cfg.model)` picks it from the model name
(`segmenter-vitb` -> "segmenter").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor, nn

if TYPE_CHECKING:  # the engine's config; families only read it
    from rankseg_core.config.model import ModelConfig
    from rankseg_core.config.train import TrainConfig


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
class Family:
    """A model family: how to build it, train it and read predictions from it.

    build: ModelConfig -> model (validated; local weights loaded).
    criterion: TrainConfig -> Criterion.
    stats: the names `criterion` returns, "loss" first (logged to metrics.jsonl).
    predict: (model, cfg, images N x 3 x H x W normalised, sizes [(h, w)] per image, mode,
        scales, flip, **forward kwargs) -> Predictions at `sizes`.
    find_unused_parameters: whether DDP must look for parameters a step does not use.
    uses_segments: whether training needs the panoptic segment maps (shard format v2) in
        the batch (`segments` (B*T) x c x c, `segments_info` per frame).
    """

    name: str
    build: Callable[["ModelConfig"], nn.Module]
    criterion: Callable[["TrainConfig"], Criterion]
    stats: tuple[str, ...]
    predict: Callable[..., Predictions]
    find_unused_parameters: Callable[["ModelConfig"], bool] = lambda m: False
    uses_segments: Callable[["ModelConfig"], bool] = lambda m: False
