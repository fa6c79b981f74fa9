"""The Segmenter family: Segmenter baseline, RankSeg and their ablations (model/, losses/rankseg.py),
and the supplement's EncNet / ESSNet comparison heads (model/encnet.py, model/essnet.py).

Prediction follows the official mmseg protocol (`inference.predict_probs`: whole or sliding
window, logits resized to the original size before the softmax, multi-scale / flip averaging
the softmax) over each image's selected classes only, never over all K channels.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from rankseg_core.config.datasets import recipe_dataset
from rankseg_core.config.model import RANKING_HEADS, ModelConfig
from rankseg_core.config.train import TrainConfig
from rankseg_core.errors import UserError
from rankseg_core.families.base import (
    Family,
    InferenceProtocol,
    Multipliers,
    Predictions,
    describe_head,
    param_multipliers,
)
from rankseg_core.families.classifier import CLASSIFIER
from rankseg_core.families.vit import RECIPES, VIT_SIZES
from rankseg_core.inference.dense import mmseg_scale_sizes, predict_probs
from rankseg_core.losses.encnet import EncNetCriterion
from rankseg_core.losses.essnet import EssNetCriterion, neighbours
from rankseg_core.losses.protoseg import ProtoSegCriterion
from rankseg_core.losses.rankseg import RankSegCriterion
from rankseg_core.losses.weak_shot import WeakShotCriterion
from rankseg_core.model.segmenter import RankSegModel, build_model
from rankseg_core.model.selection import Selection
from rankseg_core.shards.codec import IGNORE


def _criterion(cfg: TrainConfig) -> Any:
    lo, m = cfg.loss, cfg.model
    _check_weak_shot(cfg)
    if m.head == "encnet":  # the supplement's comparisons: their own losses (docs/architectures.md)
        enc = EncNetCriterion(m.num_classes, IGNORE, m.encnet.se_weight, lo.seg_loss_norm)
        return lambda out, batch: enc(out, batch["label"])
    if m.head == "essnet":
        ess = EssNetCriterion(m.num_classes, IGNORE, neighbours(m), m.essnet.margin, m.essnet.candidates,
                              lo.seg_loss_norm)
        return lambda out, batch: ess(out, batch["label"])
    # A frozen selector does not learn: its ASL on the crop is logged ("ml"), never added to the loss.
    ml_weight = 0.0 if cfg.model.has_selector else lo.ml_weight
    # ml_loss and asl_gamma_neg: set by _resolve (family.resolve) before the criterion is built.
    crit = RankSegCriterion(cfg.model.num_classes, IGNORE, cast(str, lo.ml_loss), ml_weight, lo.seg_loss_norm,
                            cfg.model.clip_len, cast(float, lo.asl_gamma_neg), lo.asl_gamma_pos, lo.asl_clip)
    if m.head in PROTOTYPE_HEADS:  # issue 20: the prototype update happens inside this loss
        p = m.protoseg
        proto = ProtoSegCriterion(m.num_classes, IGNORE, p.ppc_weight, p.ppd_weight, p.sinkhorn_eps, p.sinkhorn_iters,
                                  p.momentum, p.update, lo.seg_loss_norm, crit if m.head == "rankproto" else None)
        return lambda out, batch: proto(out, batch["label"])
    if cfg.data.novel_classes is not None:  # a weak-shot run (issue 21): novel classes by image labels only
        if lo.weak_shot_comp_weight is None:  # engine/configure.py `resolve` fills the official value
            raise UserError("loss.weak_shot_comp_weight is unset in a weak-shot run: set it, e.g. "
                            "--set loss.weak_shot_comp_weight=0.2")
        ws = WeakShotCriterion(crit, cfg.data.novel_classes, lo.weak_shot_mil_weight, lo.weak_shot_comp_weight,
                               lo.weak_shot_mil_pool, lo.weak_shot_mil_topk)
        return lambda out, batch: ws(out, batch["label"], _image_labels(batch), batch.get("pad"))
    return lambda out, batch: crit(out, batch["label"])


WEAK_SHOT_HEADS = ("segmenter", "rankseg")


def _check_weak_shot(cfg: TrainConfig) -> None:
    """The heads a weak-shot run trains: the per-pixel baseline and RankSeg (+MT included)."""
    m = cfg.model
    if cfg.data.novel_classes is None:
        return
    if m.head not in WEAK_SHOT_HEADS:
        raise UserError(f"--head {m.head} has no weak-shot loss (novel classes from image labels): use --head "
                        "segmenter or rankseg with --weak-shot / data.novel_classes")
    if m.oracle:
        raise UserError("--oracle selects the crop's labelled classes, which a weak-shot run hides for novel "
                        "classes: drop --oracle or --weak-shot")


def _image_labels(batch: dict[str, Any]) -> Tensor:
    labels = batch.get("image_labels")
    if labels is None:  # the loader's contract for weak-shot runs (data/loading.py)
        raise ValueError("a weak-shot training batch must carry image_labels (B x K class presence)")
    return cast(Tensor, labels)

@torch.no_grad()
def predict(model: nn.Module, cfg: TrainConfig, images: Tensor, sizes: list[tuple[int, int]], protocol: InferenceProtocol,
            selection: Selection) -> Predictions:
    """Class maps at `sizes` and ml probabilities for a batch of equally sized images."""
    scales = list(protocol.scales)
    probs, ml = predict_probs(model, images, cfg.model.num_classes, sizes, tuple(scales), protocol.flip, protocol.mode,
                              cfg.eval.crop, cfg.eval.stride, mmseg_scale_sizes(cfg.eval, images, sizes, scales), selection,
                              patch=cast(RankSegModel, model).patch_size)  # this family's model
    return Predictions([p.argmax()[0] for p in probs], ml)


# ---------------------------------------------------------------------------------------
# Names, recipes, parameter groups

MODELS = {f"segmenter-{size}": arch for size, arch in VIT_SIZES.items()}

# ASL gamma- of each multi-label head in the official configs: TranEnc 2 (ADE20K, Pascal),
# the TranDec and global-pooling heads of Table 6 0 (their COCO-Stuff configs); gamma+ is 0.
ASL_GAMMA_NEG = {"tranenc": 2.0, "trandec": 0.0, "gap": 0.0}


def ml_prefixes(m: ModelConfig) -> list[str]:
    """Parameter-name prefixes of the multi-label branch (model/heads.py): the official keys
    "decode_head.blocks.0." and "decode_head.ml_fc" for TranEnc, renamed; the whole
    `ml_branch` of the TranDec / GAP heads. This is the one definition of the ml group.

    TranEnc's `head.decoder_norm2` is not in it, as in the official configs: the longer
    "norm" key gives it decay 0 there (mmcv matches the longest key first)."""
    if m.head not in RANKING_HEADS or m.oracle or m.has_selector:  # no ml branch of its own
        return []
    return ["head.blocks.0.", "head.ml_fc"] if m.ml_head == "tranenc" else ["head.ml_branch."]


def official_custom_keys(cfg: TrainConfig) -> dict[str, dict[str, float]]:
    """The official `paramwise_cfg.custom_keys` for this model, in our parameter names.

    Every Segmenter / RankSeg config: pos_embed, cls_token and norm get decay_mult 0; the
    ADE20K / Pascal ones add decay_mult 100 on the ml branch (`optim.ml_wd_mult`; COCO-Stuff
    has no such key, which ml_wd_mult = ml_lr_mult = 1 reproduces).
    """
    keys = {k: {"decay_mult": 0.0} for k in ("pos_embed", "cls_token", "norm")}
    o = cfg.optim
    if (o.ml_wd_mult, o.ml_lr_mult) != (1.0, 1.0):
        for prefix in ml_prefixes(cfg.model):
            keys[prefix] = {"lr_mult": o.ml_lr_mult, "decay_mult": o.ml_wd_mult}
    return keys


def param_groups(model: nn.Module, cfg: TrainConfig) -> Multipliers:
    """The official keys with mmseg's rule (for a config that was not resolved: a resolved one
    holds them in `optim.custom_keys`, which the engine applies itself)."""
    return param_multipliers(model, official_custom_keys(cfg))


def _resolve(cfg: TrainConfig) -> None:
    """The official per-head defaults: BCE only for the ViT-B COCO-Stuff TranEnc configs, ASL
    gamma- by ml head, the official custom keys."""
    lo = cfg.loss
    if lo.ml_loss is None:
        coco = recipe_dataset(cfg.data.name) == "coco-stuff"
        lo.ml_loss = "bce" if coco and cfg.model.ml_head == "tranenc" else "asl"
    if lo.asl_gamma_neg is None:
        lo.asl_gamma_neg = ASL_GAMMA_NEG.get(cfg.model.ml_head, 2.0)
    if cfg.optim.custom_keys is None:
        cfg.optim.custom_keys = official_custom_keys(cfg)
    _check_weak_shot(cfg)


# protoseg: ProtoSeg (issue 20), not in Table 1; rankproto: RankSeg + ProtoSeg's prototypes (in neither paper).
COMPARISON_HEADS = ("encnet", "essnet", "protoseg")
PROTOTYPE_HEADS = ("protoseg", "rankproto")


def _validate(m: ModelConfig) -> None:
    if m.head == "rankproto" and (m.oracle or m.clip_len != 1):
        raise UserError("--head rankproto classifies single images among its own top-kappa classes' prototypes: drop "
                        "--oracle / model.clip_len, or use --head rankseg for the oracle and clips")
    if m.has_selector and (m.head != "rankseg" or not m.select or m.oracle):
        raise UserError(f"model.selector.run={m.selector.run}: the selector replaces the RankSeg selection; use "
                        "--head rankseg without --no-select / --oracle")
    if m.head in COMPARISON_HEADS:  # the supplement's Table 1 comparisons
        if m.oracle:
            raise UserError(f"--oracle (model.oracle): --head {m.head} classifies every pixel over all K classes and "
                            "has no selection to replace; use --head rankseg or segmenter for the oracle")
        if not m.select:
            raise UserError(f"--no-select (model.select=false) is the +MT ablation of --head rankseg; --head {m.head} "
                            "selects nothing: drop it")
        if m.clip_len != 1:
            raise UserError(f"model.clip_len={m.clip_len}: --head {m.head} segments single images; use 1, or "
                            "--head segmenter / rankseg for clips")


def _build(m: ModelConfig) -> nn.Module:
    _validate(m)
    selector = CLASSIFIER.arch(m.selector.model or "") if m.has_selector and m.selector.model else None
    return build_model(m, SEGMENTER.arch(m.model), selector)


def describe(m: ModelConfig) -> str:
    """The model variant in words, for the line `rankseg train` starts with."""
    if m.has_selector:
        return f"rankseg kappa={m.effective_kappa} selected by the frozen classifier {m.selector.run}"
    if m.head == "encnet":
        return f"encnet codewords={m.encnet.codewords} se_weight={m.encnet.se_weight:g}"
    if m.head == "essnet":
        e = m.essnet
        return f"essnet dim={e.dim} k={neighbours(m)} logits={e.logits} T={e.temperature:g} margin={e.margin:g}"
    if m.head in PROTOTYPE_HEADS:
        p = m.protoseg
        ranked = (f" kappa={m.effective_kappa}" if m.select else " +MT") if m.head == "rankproto" else ""
        return (f"{m.head}{ranked} M={p.prototypes} sinkhorn_eps={p.sinkhorn_eps:g} iters={p.sinkhorn_iters} "
                f"momentum={p.momentum:g} ppc={p.ppc_weight:g} ppd={p.ppd_weight:g} update={p.update}")
    return describe_head(m)


def ranks(m: ModelConfig) -> bool:
    """An ml branch of its own or a frozen selector ranks the classes (the oracle does not; nor
    do encnet, whose SE logits select nothing, and essnet, whose kNN is per pixel and only in
    its loss: its k is model.kappa at training, `rankseg train --kappa`)."""
    return m.head in RANKING_HEADS and not m.oracle


def rank_scale(model: nn.Module) -> tuple[Tensor, Tensor] | None:
    """(1/tau, beta) per rank of a selecting head; None for a class-ordered LayerNorm(K)."""
    head = cast(RankSegModel, model).head  # this family's model
    if not head.selects:
        return None
    norm = head.mask_norm
    return norm.affine(norm.size)


SEGMENTER = Family(
    name="segmenter",
    models=MODELS,
    build=_build,
    criterion=_criterion,
    stats=("loss", "seg", "ml", "coverage", "recall", "precision"),
    predict=predict,
    data_config=lambda model: cast(RankSegModel, model).data_config(),
    recipes=RECIPES,
    resolve=_resolve,
    validate=_validate,
    param_groups=param_groups,
    ranks=ranks,
    selects=lambda m: m.head in RANKING_HEADS and m.select or m.oracle,
    accepts_selector=True,
    heads=("segmenter", "rankseg", *COMPARISON_HEADS, "rankproto"),
    # The GT (train+eval) oracle has no ml branch in the graph of some steps.
    find_unused_parameters=lambda m: m.oracle,
    describe=describe,
    rank_scale=rank_scale,
    # A weak-shot run also logs the novel classes' terms (losses/weak_shot.py).
    more_stats=lambda cfg: ("mil", "comp") if cfg.data.novel_classes else (),
    weak_shot=True,
)
