"""Parameter and FLOP counts (`rankseg stats model`), cf. docs/method.md sec. 9.

FLOPs come from `torch.utils.flop_counter.FlopCounterMode`, which counts every matmul and
conv as 2 x MACs. The score products inside fused scaled-dot-product attention kernels are
NOT counted, on any device: PyTorch has a formula for the CUDA kernels but none for the CPU
one, so counting them would make the numbers depend on the device (`_FUSED_ATTENTION`).
Attention written as explicit matmuls is counted. The paper's "FLOPs" are mmcv / fvcore
module-hook MACs that also skip functional matmuls (attention scores, nn.MultiheadAttention
projections), so absolute numbers differ (ViT-B/16 at 512: paper 78.8G vs our 105.7 GMACs for
the baseline); compare variants with the same counter (docs/model.md lists both).
"""

from __future__ import annotations

from dataclasses import replace
from typing import cast

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from rankseg_core.config.model import ModelConfig
from rankseg_core.families import check_head, family_of
from rankseg_core.model.selection import NO_SELECTION, Selection


def _not_counted(*args: object, **kwargs: object) -> int:
    return 0


# The fused attention kernels PyTorch can count (CUDA): counted as 0, as the CPU kernel is.
_FUSED_ATTENTION = {getattr(torch.ops.aten, name): _not_counted for name in (
    "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_cudnn_attention", "_flash_attention_forward", "_efficient_attention_forward")
    if hasattr(torch.ops.aten, name)}


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (shared tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


@torch.no_grad()
def count_flops(model: nn.Module, m: ModelConfig, img_size: int | tuple[int, int] | None = None,
                selection: Selection = NO_SELECTION) -> dict[str, int]:
    """FLOPs / MACs of one eval forward on a clip_len x in_chans x H x W input (default size
    m.img_size) under `selection`.

    Returns flops (= 2 x macs: matmuls and convs; fused attention kernels not counted), macs, backbone / head flops (the
    head: a `head` submodule where the model has one, else everything after the backbone).
    """
    size = m.img_size if img_size is None else img_size
    h, w = (size, size) if isinstance(size, int) else size
    param = next(model.parameters())
    x = torch.zeros(m.clip_len, m.in_chans, h, w, dtype=param.dtype, device=param.device)
    was_training = model.training
    model.eval()
    counter = FlopCounterMode(display=False, custom_mapping=_FUSED_ATTENTION)
    try:
        with counter:
            model(x, selection)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    total = counter.get_total_flops()
    backbone = int(sum(counts.get(f"{root}.backbone", {}).values()))
    # Segmenter has one `head` module; Mask2Former's head is everything after the backbone.
    head = int(sum(counts[f"{root}.head"].values())) if f"{root}.head" in counts else int(total) - backbone
    return {"flops": int(total), "macs": int(total // 2), "backbone_flops": backbone, "head_flops": head}


def model_stats(cfg: ModelConfig, flops: bool = True) -> dict[str, float | int | str]:
    """Params (total / backbone / head, in units and millions) and GFLOPs / GMACs at cfg.img_size.

    params_mi is the total in units of 2^20: the "M" of the paper's Mask2Former table (main
    paper Table 8 equals our counts divided by 1,048,576 to the printed 0.01), while its
    Segmenter numbers are in units of 10^6 (docs/mask2former.md, "Cost")."""
    family = family_of(cfg.model)
    check_head(cfg)
    family.validate(cfg)
    model = family.build(replace(cfg, backbone_weights=None))  # counting needs no weights
    total = count_parameters(model)
    backbone = count_parameters(cast(nn.Module, model.backbone))  # every family's model has a `backbone`
    stats: dict[str, float | int | str] = {
        "model": cfg.model,
        "head": "oracle" if cfg.oracle else cfg.head,
        "num_classes": cfg.num_classes,
        "kappa": cfg.effective_kappa,
        "img_size": cfg.img_size,
        "params": total,
        "params_backbone": backbone,
        "params_head": total - backbone,
        "params_m": total / 1e6,
        "params_mi": total / 2**20,
    }
    stats.update(family.stats_extra(model, cfg))
    if flops:
        f = count_flops(model, cfg, selection=family.stats_selection(cfg))
        stats.update({
            "gflops": f["flops"] / 1e9,
            "gmacs": f["macs"] / 1e9,
            "backbone_gflops": f["backbone_flops"] / 1e9,
            "head_gflops": f["head_flops"] / 1e9,
        })
    return stats
