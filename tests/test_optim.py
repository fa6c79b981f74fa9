"""Parameter groups against an independent re-typing of mmcv's DefaultOptimizerConstructor
(mmcv/runner/optimizer/default_constructor.py, `add_params`), the official RankSeg
paramwise_cfg, and hand-checked cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankseg_core.config.model import ModelConfig
from rankseg_core.config.train import TrainConfig
from rankseg_core.engine.configure import resolve
from rankseg_core.engine.optim import build_optimizer
from rankseg_core.errors import UserError
from rankseg_core.families.base import listed_groups, param_multipliers, sorted_custom_keys
from rankseg_core.families.segmenter import SEGMENTER, official_custom_keys

BASE_LR, BASE_WD = 0.001, 1e-6


def mmcv_param_groups(model: nn.Module, custom_keys: dict, base_lr: float, base_wd: float) -> dict[int, tuple]:
    """{id(param): (lr, weight_decay)} as mmcv's add_params builds them (no bias / norm /
    dwconv multipliers set, as in the RankSeg configs: they default to 1)."""
    out: dict[int, tuple] = {}

    def add_params(module: nn.Module, prefix: str = "") -> None:
        sorted_keys = sorted(sorted(custom_keys.keys()), key=len, reverse=True)
        for name, param in module.named_parameters(recurse=False):
            group = {"lr": base_lr, "weight_decay": base_wd}
            for key in sorted_keys:
                if key in f"{prefix}.{name}":
                    group["lr"] = base_lr * custom_keys[key].get("lr_mult", 1.0)
                    group["weight_decay"] = base_wd * custom_keys[key].get("decay_mult", 1.0)
                    break
            out[id(param)] = (group["lr"], group["weight_decay"])
        for child_name, child in module.named_children():
            add_params(child, f"{prefix}.{child_name}" if prefix else child_name)

    add_params(model)
    return out


def ours(model: nn.Module, cfg: TrainConfig) -> dict[int, tuple]:
    opt = build_optimizer(model, cfg)
    return {id(p): (BASE_LR * g["lr_mult"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}


def make(ml_head: str = "tranenc", head: str = "rankseg", oracle: bool = False, **optim) -> tuple[nn.Module, TrainConfig]:
    cfg = TrainConfig()
    cfg.model = ModelConfig(img_size=32, num_classes=7, kappa=3, ml_head=ml_head, head=head, oracle=oracle)
    cfg.optim.lr, cfg.optim.weight_decay = BASE_LR, BASE_WD
    for k, v in optim.items():
        setattr(cfg.optim, k, v)
    resolve(cfg)
    return SEGMENTER.build(cfg.model), cfg


@pytest.mark.parametrize("variant", [{}, {"ml_head": "trandec"}, {"ml_head": "gap"}, {"head": "segmenter"},
                                     {"oracle": True}, {"ml_wd_mult": 1.0}, {"ml_lr_mult": 10.0}])
def test_matches_mmcv_add_params(variant: dict) -> None:
    model, cfg = make(**variant)
    ref = mmcv_param_groups(model, cfg.optim.custom_keys, BASE_LR, BASE_WD)
    got = ours(model, cfg)
    assert got.keys() == ref.keys()
    for pid, (lr, wd) in ref.items():
        assert got[pid] == pytest.approx((lr, wd), rel=1e-12, abs=0)


def test_official_ade20k_keys_by_hand() -> None:
    """custom_keys of segmenter-ori_rankseg_vit-b16_512x512_160k_ade20k.py, in our names."""
    model, cfg = make()
    assert cfg.optim.custom_keys == {"pos_embed": {"decay_mult": 0.0}, "cls_token": {"decay_mult": 0.0},
                                     "norm": {"decay_mult": 0.0},
                                     "head.blocks.0.": {"lr_mult": 1.0, "decay_mult": 100.0},
                                     "head.ml_fc": {"lr_mult": 1.0, "decay_mult": 100.0}}
    wd = {n: m[1] for n, m in param_multipliers(model, cfg.optim.custom_keys).items()}
    assert wd["backbone.vit.pos_embed"] == wd["backbone.vit.cls_token"] == 0
    assert wd["head.blocks.0.norm1.weight"] == 100  # "head.blocks.0." is longer than "norm"
    assert wd["head.blocks.0.attn.qkv.bias"] == wd["head.ml_fc.b"] == wd["head.ml_fc.W"] == 100
    assert wd["head.decoder_norm2.weight"] == wd["head.mask_norm.bias"] == wd["head.blocks.1.norm2.bias"] == 0
    assert wd["backbone.vit.norm.weight"] == wd["backbone.vit.blocks.3.norm1.bias"] == 0
    # No bias / class-embedding rule in the official configs: these decay at the base rate.
    assert wd["head.cls_emb"] == wd["head.proj_dec.bias"] == wd["backbone.vit.blocks.0.attn.qkv.bias"] == 1


def test_ml_keys_select_the_models_ml_branch() -> None:
    """The config's ml-branch keys (official names, renamed) select exactly the parameters of
    the model's ml branch: block 0 and ml_fc of TranEnc (its decoder_norm2 is exempt through
    "norm", as in the official configs), the whole ml_branch of TranDec / GAP."""
    for ml_head in ("tranenc", "trandec", "gap"):
        model, cfg = make(ml_head=ml_head)
        hundred = {n for n, m in param_multipliers(model, cfg.optim.custom_keys).items() if m[1] == 100}
        branch = ("head.blocks.0.", "head.ml_fc.") if ml_head == "tranenc" else ("head.ml_branch.",)
        assert hundred == {n for n, _ in model.named_parameters() if n.startswith(branch)}, ml_head
    model, cfg = make(head="segmenter")
    assert all(m[1] != 100 for m in param_multipliers(model, cfg.optim.custom_keys).values())


def test_key_order_longest_then_alphabetical() -> None:
    keys = {"b": {}, "norm": {}, "a": {}, "blocks.0.": {}, "head": {}}
    assert sorted_custom_keys(keys) == ["blocks.0.", "head", "norm", "a", "b"]
    model = nn.Sequential(nn.Linear(2, 2), nn.LayerNorm(2))  # names 0.weight, 0.bias, 1.weight, 1.bias
    # Equal length: "0.w" < "ght" alphabetically, so "0.w" decides 0.weight.
    mults = param_multipliers(model, {"ght": {"decay_mult": 3.0}, "0.w": {"decay_mult": 5.0}})
    assert mults["0.weight"] == (1.0, 5.0) and mults["1.weight"] == (1.0, 3.0) and mults["0.bias"] == (1.0, 1.0)


def test_root_parameters_match_with_a_leading_dot() -> None:
    class Root(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.sub = nn.Linear(1, 1)

    mults = param_multipliers(Root(), {".scale": {"lr_mult": 2.0}, "sub.weight": {"decay_mult": 0.0}})
    assert mults == {"scale": (2.0, 1.0), "sub.weight": (1.0, 0.0), "sub.bias": (1.0, 1.0)}


def test_unknown_key_is_a_user_error() -> None:
    model, cfg = make()
    cfg.optim.custom_keys = {**cfg.optim.custom_keys, "pos_embd": {"decay_mult": 0.0}}
    with pytest.raises(UserError, match="'pos_embd' matches no trainable parameter"):
        build_optimizer(model, cfg)


def test_lr_mult_and_adamw_and_unresolved_config() -> None:
    model, cfg = make(ml_lr_mult=10.0, name="adamw")
    opt = build_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    by_id = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert by_id[id(model.head.ml_fc.W)]["lr_mult"] == 10.0
    assert by_id[id(model.head.proj_dec.weight)]["lr_mult"] == 1.0
    # An unresolved config (custom_keys None) gets the official keys, as resolve would.
    raw = TrainConfig()
    raw.model = cfg.model
    assert official_custom_keys(raw) == make()[1].optim.custom_keys
    assert len(build_optimizer(model, raw).param_groups) == 3  # (1, 0), (1, 1), (1, 100)


def test_listed_groups_follow_detectron2() -> None:
    """Families without custom keys (Mask2Former) list their groups: decay 0 for the no-decay
    list, the ml multipliers for the ml branch, the backbone multiplier on backbone.*."""
    class Other(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.backbone, self.ml_head, self.norm = nn.Linear(2, 2), nn.Linear(2, 2), nn.LayerNorm(2)

    cfg = TrainConfig()
    cfg.optim.weight_decay, cfg.optim.ml_lr_mult, cfg.optim.ml_wd_mult, cfg.optim.backbone_lr_mult = 0.05, 0.1, 3.0, 0.5
    model = Other()
    mults = listed_groups(model, cfg.optim, no_decay={"norm.weight", "norm.bias"}, ml={"ml_head.weight", "ml_head.bias"})
    assert mults["backbone.weight"] == (0.5, 1.0) and mults["norm.bias"] == (1.0, 0.0)
    assert mults["ml_head.weight"] == (0.1, 3.0)
