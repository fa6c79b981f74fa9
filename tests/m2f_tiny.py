"""Tiny Mask2Former configs shared by the tests/test_mask2former*.py files (CPU, seconds)."""

from __future__ import annotations

import dataclasses

import torch

from rankseg_core.config.mask2former import Mask2FormerConfig
from rankseg_core.config.model import ModelConfig
from rankseg_core.families.mask2former import MASK2FORMER

TINY = Mask2FormerConfig(hidden_dim=32, conv_dim=32, mask_dim=32, nheads=4, num_queries=6, dec_layers=3,
                         enc_layers=1, dim_feedforward=64, enc_dim_feedforward=64, ml_hidden_dim=32,
                         ml_query_layer=2, train_num_points=256)


def tiny_cfg(model: str = "mask2former-r50", num_classes: int = 10, kappa: int = 4, head: str = "rankseg",
             **kw) -> ModelConfig:
    m2f = dataclasses.replace(TINY, **kw.pop("m2f", {}))
    return ModelConfig(model=model, num_classes=num_classes, kappa=kappa, head=head, img_size=64,
                       mask2former=m2f, **kw)


def tiny_model(seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    return MASK2FORMER.build(tiny_cfg(**kw))
