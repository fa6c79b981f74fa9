"""Optimizer parameter groups and the learning-rate schedule (mmseg semantics)."""

from __future__ import annotations

from typing import cast

import numpy as np
import torch
from torch import nn

from rankseg_core.config.train import TrainConfig
from rankseg_core.families import family_of
from rankseg_core.families.base import param_multipliers


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD / AdamW with one group per (lr_mult, decay_mult); each group carries `lr_mult`
    (the training loop sets lr = schedule x lr_mult) and weight_decay = base x decay_mult.

    Multipliers: `optim.custom_keys` with mmseg's rule (`param_multipliers`; the Segmenter
    family resolves them to the official keys); None = the family's own groups
    (`Family.param_groups`, e.g. Mask2Former's detectron2-style lists).
    """
    o = cfg.optim
    if o.custom_keys is not None:
        mults = param_multipliers(model, o.custom_keys)
    else:
        mults = family_of(cfg.model.model).param_groups(model, cfg)
    groups: dict[tuple[float, float], list[nn.Parameter]] = {}
    named = dict(model.named_parameters())
    for name, m in mults.items():
        groups.setdefault(m, []).append(named[name])
    params = [{"params": ps, "weight_decay": o.weight_decay * decay, "lr_mult": lr}
              for (lr, decay), ps in sorted(groups.items())]
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum)
    betas = cast(tuple[float, float], tuple(o.betas))  # two values (TrainConfig.validate)
    return torch.optim.AdamW(params, lr=o.lr, betas=betas)


def lr_schedule(cfg: TrainConfig) -> np.ndarray:
    """Learning rate at every iteration (iters,): mmseg poly with floor and optional warm-up.

    lr_i = (lr - min_lr) * (1 - i / iters) ** power + min_lr; warm-up scales it linearly from
    1e-6 x to 1 x over warmup_iters (mmseg's linear warm-up).
    """
    s, lr = cfg.schedule, cfg.optim.lr
    i = np.arange(s.iters, dtype=np.float64)
    lrs = (lr - s.min_lr) * (1 - i / s.iters) ** s.power + s.min_lr
    if s.warmup_iters:
        k = np.clip(1 - i / s.warmup_iters, 0, 1)
        lrs *= 1 - k * (1 - 1e-6)
    return lrs
