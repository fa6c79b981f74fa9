"""Optimizer parameter groups and the learning-rate schedule (mmseg semantics)."""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from rankseg_core.config import TrainConfig


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """Four groups: (decay | no decay) x (ml branch | rest); each carries its lr multiplier."""
    o = cfg.optim
    no_wd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    ml = model.ml_branch_names() if hasattr(model, "ml_branch_names") else set()
    groups: dict[tuple[bool, bool], list[Tensor]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            groups.setdefault((name in no_wd, name in ml), []).append(p)
    params = []
    for (skip_wd, is_ml), ps in sorted(groups.items()):
        wd = 0.0 if skip_wd else o.weight_decay * (o.ml_wd_mult if is_ml else 1.0)
        params.append({"params": ps, "weight_decay": wd, "lr_mult": o.ml_lr_mult if is_ml else 1.0})
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum)
    return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas))


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
