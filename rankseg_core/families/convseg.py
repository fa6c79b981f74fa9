"""The dense conv-decoder families: DeepLabv3 and UperNet, baseline and + RankSeg (model/convseg/).

A model classifies the pixel embeddings of a conv decode head with mmseg's 1x1 `conv_seg`
(`--head segmenter`, the baseline) or with RankSeg's pixel classifier (`--head rankseg`:
multi-label branch on the backbone's last map, top-kappa selection of the ORIGINAL class
embeddings, rank-adaptive LayerNorm(kappa); docs/architectures.md), or by ProtoSeg's nearest
prototypes (`--head protoseg`; `--head rankproto` with RankSeg's ml branch and top-kappa selection
of the classes' prototypes; model/convseg/prototypes.py, loss losses/protoseg.py). Training adds mmseg's
auxiliary FCNHead cross-entropy (weight `model.convseg.aux_weight`, logged as "aux"). Prediction
is the Segmenter family's: `inference.predict_probs` over each image's selected classes.

The three families differ only in their recipes, which the engine keys by dataset, not by
model: DeepLabv3 (SGD, mmseg's DeepLabv3 configs), UperNet Swin (AdamW 6e-5, mmseg's Swin
configs) and UperNet BEiT (AdamW with layer-wise lr decay, mmseg's BEiT configs).
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankseg_core.config.model import RANKING_HEADS, ModelConfig
from rankseg_core.config.train import TrainConfig
from rankseg_core.errors import UserError
from rankseg_core.families.base import Family, InferenceProtocol, Multipliers, Predictions, describe_head, listed_groups
from rankseg_core.families.segmenter import describe as describe_segmenter
from rankseg_core.inference.dense import mmseg_scale_sizes, predict_probs
from rankseg_core.losses.protoseg import ProtoSegCriterion
from rankseg_core.losses.rankseg import RankSegCriterion, class_targets, seg_loss
from rankseg_core.model.convseg.classifier import RankSegClassifier
from rankseg_core.model.convseg.layers import sync_batch_norm
from rankseg_core.model.convseg.model import ConvSegModel, ConvSegOutput, ConvSegSpec, build_convseg
from rankseg_core.model.convseg.prototypes import PrototypeClassifier
from rankseg_core.model.convseg.vit_pyramid import BeitPyramid, layer_decay_multipliers
from rankseg_core.model.protoseg import PROTOTYPE_HEADS
from rankseg_core.model.selection import Selection
from rankseg_core.shards.codec import IGNORE

# ---------------------------------------------------------------------------------------
# Architectures and their official options

SPECS: dict[str, ConvSegSpec] = {
    # mmseg ResNetV1c = timm's deep-stem ResNet without avg-down (model/convseg/resnet.py).
    "deeplabv3-r101": ConvSegSpec("resnet", "resnet101c", "aspp"),
    "deeplabv3-r50": ConvSegSpec("resnet", "resnet50c", "aspp"),
    "deeplabv3-r18": ConvSegSpec("resnet", "resnet18", "aspp"),
    # mmseg's UperNet Swin-B (window 12, 384 px IN-22k pretraining) and Swin-T (window 7).
    "upernet-swinb": ConvSegSpec("swin", "swin_base_patch4_window12_384", "upernet"),
    "upernet-swint": ConvSegSpec("swin", "swin_tiny_patch4_window7_224", "upernet"),
    # mmseg's / unilm's UperNet BEiT-L (24 blocks, out_indices 7, 11, 15, 23).
    "upernet-beitl": ConvSegSpec("beit", "beit_large_patch16_224", "upernet"),
    # Ours, for CPU runs: a BEiT with ViT-Tiny's widths (192 wide, 12 blocks, 3 heads; taps 3, 5, 7, 11).
    "upernet-beitt": ConvSegSpec("beit", "beit_base_patch16_224", "upernet",
                                 (("embed_dim", 192), ("depth", 12), ("num_heads", 3))),
}

# The official values of the `model.convseg` options left None, per model: mmseg's configs
# (deeplabv3_r{50,101}-d8: channels 512, aux 256; deeplabv3_r18-d8: 128 / 64) and the fork's
# mlseg heads (hidden_dim = the decoder width, share_embedding; DeepLabv3 downsample 16).
_DEEPLAB = {"channels": 512, "aux_channels": 256, "ml_dim": 512, "ml_pool": 16, "ml_own_embedding": False,
            "backbone_drop_path": 0.0, "layer_decay": None}
OFFICIAL: dict[str, dict[str, Any]] = {
    "deeplabv3-r101": _DEEPLAB,
    "deeplabv3-r50": _DEEPLAB,
    "deeplabv3-r18": {**_DEEPLAB, "channels": 128, "aux_channels": 64, "ml_dim": 128},
    # upernet_swin_mlseg.py: no pooling before the ml block (16 x 16 tokens at 512 px).
    "upernet-swinb": {**_DEEPLAB, "ml_pool": 0, "backbone_drop_path": 0.3},
    "upernet-swint": {**_DEEPLAB, "ml_pool": 0, "backbone_drop_path": 0.3},
    # upernet_beit-large: decoder width 1024; upernet_beit_mlseg.py: hidden 1024, share_embedding
    # False (the ml branch has class tokens of its own), 16 heads; layer decay 0.95.
    "upernet-beitl": {"channels": 1024, "aux_channels": 256, "ml_dim": 1024, "ml_pool": 0, "ml_own_embedding": True,
                      "backbone_drop_path": 0.2, "layer_decay": 0.95},
    # Ours (BEiT-B's rules: drop path 0.1, layer decay 0.9), narrow enough for a CPU.
    "upernet-beitt": {"channels": 256, "aux_channels": 64, "ml_dim": 256, "ml_pool": 0, "ml_own_embedding": True,
                      "backbone_drop_path": 0.1, "layer_decay": 0.9},
}


def with_official(m: ModelConfig) -> ModelConfig:
    """`m` with its None `model.convseg` options set to the model's official values (a copy;
    `m` is unchanged). The ml width follows an explicitly set decoder width for a head that
    shares the class embeddings (the two are one tensor there)."""
    official = OFFICIAL[m.model]
    c = m.convseg
    values = {k: v if getattr(c, k) is None else getattr(c, k) for k, v in official.items()}
    if m.head == "rankproto" and c.ml_own_embedding is None:  # prototypes are no class embeddings to share
        values["ml_own_embedding"] = True
    own = values["ml_own_embedding"]
    if c.ml_dim is None and not own and c.channels is not None:
        values["ml_dim"] = c.channels
    return dataclasses.replace(m, convseg=dataclasses.replace(c, **values))


# ---------------------------------------------------------------------------------------
# Checks, build, loss, prediction


HEADS = ("segmenter", "rankseg", *PROTOTYPE_HEADS)


def _validate_prototypes(m: ModelConfig) -> None:
    """What the prototype heads (model/convseg/prototypes.py) cannot honour, in one line each."""
    if m.oracle:
        raise UserError(f"--oracle (model.oracle): --head {m.head} classifies pixels among its own prototypes and has "
                        "no oracle variant; use --head rankseg or segmenter for the oracle")
    if m.head == "protoseg" and not m.select:
        raise UserError("--no-select (model.select=false) is the +MT ablation of --head rankseg / rankproto; "
                        "--head protoseg selects nothing: drop it")
    if m.head == "rankproto" and m.convseg.ml_own_embedding is False:
        raise UserError("model.convseg.ml_own_embedding=false: --head rankproto's ml branch has no class embeddings "
                        "to share (prototypes are not class embeddings); leave it null or set it true")
    if m.convseg.cosine:
        raise UserError(f"model.convseg.cosine=true is an option of --head rankseg's classifier; --head {m.head} "
                        "always scores unit embeddings by cosine: drop it")


def _validate(m: ModelConfig) -> None:
    if m.head not in HEADS:  # also for models built directly (the CLI checks Family.heads)
        raise UserError(f"model.head={m.head!r}: a {m.model} model takes --head segmenter (baseline) or rankseg, or "
                        "ProtoSeg's protoseg / rankproto")
    if m.head in PROTOTYPE_HEADS:
        _validate_prototypes(m)
    if m.ml_head != "tranenc":
        raise UserError(f"model.ml_head={m.ml_head!r}: the conv decoders' ml branch is the fork's one TranEnc layer; "
                        "use --ml-head tranenc")
    if m.clip_len != 1:
        raise UserError(f"model.clip_len={m.clip_len}: {m.model} segments images; use clip_len=1")
    m.convseg.validate()
    c = with_official(m).convseg
    if m.head == "rankseg" and not m.oracle and not c.ml_own_embedding and c.ml_dim != c.channels:
        raise UserError(f"model.convseg.ml_dim={c.ml_dim}: an ml branch that shares the class embeddings has their "
                        f"width, model.convseg.channels={c.channels}; set both, or ml_own_embedding=true")


def _build(m: ModelConfig) -> nn.Module:
    _validate(m)
    return sync_batch_norm(build_convseg(with_official(m), SPECS[m.model]))


def _resolve(cfg: TrainConfig) -> None:
    """Record the official values of this model in the run's config (config.yaml says what was
    built), and refuse micro-batches a BatchNorm cannot train on."""
    cfg.model.convseg = with_official(cfg.model).convseg
    s = cfg.schedule
    if s.batch_size // s.accum_steps < 2:
        raise UserError(f"schedule.batch_size={s.batch_size} (accum_steps={s.accum_steps}): the decode head's image "
                        "pooling BatchNorm needs >= 2 images per micro-batch; use --batch-size 2 or more")


def aux_loss(aux_logits: Tensor, labels: Tensor, num_classes: int, norm: str) -> Tensor:
    """mmseg's auxiliary cross-entropy: K logits B x K x h x w resized (bilinear) to the labels
    B x H x W, over all K classes, ignore excluded, normalised as the main loss (`norm`)."""
    logits = F.interpolate(aux_logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
    return seg_loss(logits, class_targets(labels, num_classes, IGNORE), IGNORE, norm)


def _criterion(cfg: TrainConfig) -> Any:
    lo, k = cfg.loss, cfg.model.num_classes
    crit = RankSegCriterion(k, IGNORE, cast(str, lo.ml_loss), lo.ml_weight, lo.seg_loss_norm, 1,
                            cast(float, lo.asl_gamma_neg), lo.asl_gamma_pos, lo.asl_clip)
    weight = cfg.model.convseg.aux_weight
    main: Any = crit
    if cfg.model.head in PROTOTYPE_HEADS:  # the prototype update happens inside this loss
        p = cfg.model.protoseg
        main = ProtoSegCriterion(k, IGNORE, p.ppc_weight, p.ppd_weight, p.sinkhorn_eps, p.sinkhorn_iters, p.momentum,
                                 p.update, lo.seg_loss_norm, crit if cfg.model.head == "rankproto" else None)

    def criterion(out: ConvSegOutput, batch: dict[str, Any]) -> dict[str, Tensor]:
        labels = batch["label"]
        parts = main(out, labels)
        aux = aux_loss(out.aux_logits, labels, k, lo.seg_loss_norm) if out.aux_logits is not None \
            else parts["loss"].new_zeros(())
        return {**parts, "loss": parts["loss"] + weight * aux, "aux": aux.detach()}
    return criterion


@torch.no_grad()
def predict(model: nn.Module, cfg: TrainConfig, images: Tensor, sizes: list[tuple[int, int]], protocol: InferenceProtocol,
            selection: Selection) -> Predictions:
    """Class maps at `sizes` and ml probabilities for a batch of equally sized images (mmseg's
    whole / slide inference; the model pads its own inputs, so `patch` is 1)."""
    scales = list(protocol.scales)
    fixed = cast(ConvSegModel, model).fixed_size  # this family's model
    if fixed is not None:
        side = cfg.eval.crop if protocol.mode == "slide" else max(images.shape[-2:]) * max(scales)
        if side is not None and side > fixed:
            raise UserError(f"{cfg.model.model} takes inputs up to its img_size {fixed} (BEiT's relative position "
                            f"bias is built for that grid); predict with --mode slide and eval.crop <= {fixed}")
    probs, ml = predict_probs(model, images, cfg.model.num_classes, sizes, tuple(scales), protocol.flip, protocol.mode,
                              cfg.eval.crop, cfg.eval.stride, mmseg_scale_sizes(cfg.eval, images, sizes, scales), selection,
                              patch=1)
    return Predictions([p.argmax()[0] for p in probs], ml)


# ---------------------------------------------------------------------------------------
# Parameter groups, statistics


def ml_branch_names(model: nn.Module) -> set[str]:
    """The multi-label group of the fork's Swin config (`custom_keys` "decode_head.img_cls_head.
    block." and "...img_cls_head.fc", lr_mult 0.1): the ml branch's transformer block and
    GroupWiseLinear, at lr x optim.ml_lr_mult and decay x optim.ml_wd_mult. Its input
    projection, LayerNorm and the class embeddings stay at the base rates, as there."""
    return {n for n, _ in model.named_parameters() if n.startswith(("classifier.ml_head.block.", "classifier.ml_head.fc."))}


def deeplab_groups(model: nn.Module, cfg: TrainConfig) -> Multipliers:
    """mmseg's DeepLabv3 configs have no paramwise_cfg: every parameter (BatchNorm included)
    at the base lr and weight decay; the ml branch takes the ml multipliers (1 in the recipe)."""
    return listed_groups(model, cfg.optim, no_decay=set(), ml=ml_branch_names(model))


# mmseg's UperNet Swin configs: paramwise_cfg custom_keys decay_mult 0 (mmcv's substring rule).
SWIN_NO_DECAY = ("absolute_pos_embed", "relative_position_bias_table", "norm")


def swin_groups(model: nn.Module, cfg: TrainConfig) -> Multipliers:
    """The fork's Swin keys under mmcv's longest-key-first rule: decay 0 on names holding `norm`
    (every LayerNorm, the output norms, the rank LayerNorm) or a position table, except in the
    ml group, whose longer keys win (its block's norms decay, at the ml multipliers)."""
    ml = ml_branch_names(model)
    no_decay = {n for n, _ in model.named_parameters() if n not in ml and any(k in n for k in SWIN_NO_DECAY)}
    return listed_groups(model, cfg.optim, no_decay=no_decay, ml=ml)


def beit_groups(model: nn.Module, cfg: TrainConfig) -> Multipliers:
    """mmseg's LayerDecayOptimizerConstructor (vit_pyramid.py) at `model.convseg.layer_decay`;
    the ml branch's lr and decay are then scaled by optim.ml_lr_mult / ml_wd_mult."""
    backbone = cast(BeitPyramid, cast(ConvSegModel, model).backbone)  # this family's model
    rate = cfg.model.convseg.layer_decay
    if rate is None:
        rate = with_official(cfg.model).convseg.layer_decay
    mults = layer_decay_multipliers(model, float(cast(float, rate)), backbone.num_layers)
    o = cfg.optim
    for name in ml_branch_names(model):
        if name in mults:
            lr, decay = mults[name]
            mults[name] = (lr * o.ml_lr_mult, decay * o.ml_wd_mult)
    return mults


def stats_extra(model: nn.Module, m: ModelConfig) -> dict[str, Any]:
    cm = cast(ConvSegModel, model)  # this family's model

    def count(mod: nn.Module | None) -> int:
        return sum(p.numel() for p in mod.parameters()) if mod is not None else 0
    head = cm.classifier.ml_head if isinstance(cm.classifier, (RankSegClassifier, PrototypeClassifier)) else None
    return {"params_decode_head": count(cm.decode_head), "params_classifier": count(cm.classifier),
            "params_ml_head": count(head), "params_aux_head": count(cm.auxiliary_head)}


def rank_scale(model: nn.Module) -> tuple[Tensor, Tensor] | None:
    """(1/tau, beta) per rank of a selecting classifier; None for the baseline / +MT."""
    clf = cast(ConvSegModel, model).classifier  # this family's model
    if not isinstance(clf, (RankSegClassifier, PrototypeClassifier)) or not clf.selects:
        return None
    return clf.norm.affine(clf.norm.size)


def describe(m: ModelConfig) -> str:
    """The model variant in words; the prototype heads' line is the Segmenter family's."""
    return describe_segmenter(m) if m.head in PROTOTYPE_HEADS else describe_head(m)


def _family(name: str, models: list[str], recipes: dict[str, dict[str, Any]],
            param_groups: Any = deeplab_groups) -> Family:
    return Family(
        name=name,
        models={n: SPECS[n].arch for n in models},
        build=_build,
        criterion=_criterion,
        stats=("loss", "seg", "ml", "aux", "coverage", "recall", "precision"),
        predict=predict,
        data_config=lambda model: cast(ConvSegModel, model).data_config(),
        recipes=recipes,
        resolve=_resolve,
        validate=_validate,
        param_groups=param_groups,
        ranks=lambda m: m.head in RANKING_HEADS and not m.oracle,
        selects=lambda m: m.head in RANKING_HEADS and m.select or m.oracle,
        stats_extra=stats_extra,
        rank_scale=rank_scale,
        heads=HEADS,
        describe=describe,
    )


# ---------------------------------------------------------------------------------------
# Recipes

# mmseg's DeepLabv3 (deeplabv3_r101-d8_512x512_80k_ade20k: the Table 7 baseline, 45.19 mIoU
# multi-scale): SGD lr 0.01, momentum 0.9, weight decay 5e-4 on every parameter, poly 0.9 with
# min_lr 1e-4, batch 16 (2 x 8 GPUs, SyncBN), crop 512, whole-image test at (2048, 512). The
# fork's mlseg head: kappa 50, ml loss ASL(2, 0) weight 10, no ml-branch multipliers.
# COCO-Stuff: the fork's one released config (deeplabv3_mlseg_r101-d8_512x512_20k_coco-stuff10k,
# 20k iterations). ADE20K-Full / COCO+LVIS have no config: kappa 100 as the paper, else ADE20K's.
DEEPLAB_RECIPES: dict[str, dict[str, Any]] = {
    "*": {"optim.name": "sgd", "optim.lr": 0.01, "optim.momentum": 0.9, "optim.weight_decay": 5e-4,
          "optim.ml_wd_mult": 1.0, "optim.ml_lr_mult": 1.0, "schedule.power": 0.9, "schedule.min_lr": 1e-4,
          "schedule.batch_size": 16, "schedule.iters": 80000, "model.img_size": 512, "model.kappa": 50,
          "loss.ml_weight": 10.0, "eval.mode": "whole"},
    "coco-stuff": {"schedule.iters": 20000},
    "ade20k-full": {"model.kappa": 100},
    "coco-lvis": {"model.kappa": 100},
    # Our own cheap CPU protocol on the built-in data (as the Segmenter's synthetic recipe).
    "synthetic": {"model.img_size": 128, "model.kappa": 25, "schedule.iters": 2000, "schedule.batch_size": 8,
                  "eval.every": 500},
}

# mmseg's UperNet Swin (upernet_swin_base_patch4_window12_512x512_160k_ade20k_pretrain_384x384_22K,
# Table 7's 52.4 multi-scale): AdamW lr 6e-5, betas (0.9, 0.999), weight decay 0.01 (0 on norms
# and position tables), poly power 1.0 to 0 after a 1500-iteration linear warm-up, batch 16,
# 160k iterations, crop 512, whole-image test. The fork's upernet_swin_mlseg config: kappa 50,
# ASL weight 10, lr x 0.1 on the ml block and classifier (supplement sec. H: lr 6e-6); its
# schedule is not upstream's (docs/architectures.md).
_SYNTHETIC = {"model.img_size": 128, "model.kappa": 25, "schedule.iters": 2000, "schedule.batch_size": 8,
              "schedule.warmup_iters": 100, "eval.every": 500, "eval.mode": "whole"}
SWIN_RECIPES: dict[str, dict[str, Any]] = {
    "*": {"optim.name": "adamw", "optim.lr": 6e-5, "optim.betas": [0.9, 0.999], "optim.weight_decay": 0.01,
          "optim.ml_wd_mult": 1.0, "optim.ml_lr_mult": 0.1, "schedule.power": 1.0, "schedule.min_lr": 0.0,
          "schedule.warmup_iters": 1500, "schedule.batch_size": 16, "schedule.iters": 160000, "model.img_size": 512,
          "model.kappa": 50, "loss.ml_weight": 10.0, "eval.mode": "whole"},
    "ade20k-full": {"model.kappa": 100},
    "coco-lvis": {"model.kappa": 100},
    "synthetic": _SYNTHETIC,
}

# mmseg's upernet_beit-large_fp16_8x1_640x640_160k_ade20k (Table 7's 57.0): AdamW lr 2e-5,
# weight decay 0.05, layer-wise lr decay 0.95 over 24 layers, poly power 1.0 to 0, linear
# warm-up; 8 GPUs x 1 image with 2-step gradient accumulation = batch 16, 320k iterations =
# 160k optimizer steps (its 3000 warm-up iterations = 1500 steps); crop 640, test resize to
# (2560, 640) and slide 640 / 426. The fork's upernet_beit_mlseg: kappa 50, ASL weight 5; its
# ml-branch lr_mult 0.1 sits in custom_keys, which the layer-decay constructor never reads.
BEIT_RECIPES: dict[str, dict[str, Any]] = {
    "*": {"optim.name": "adamw", "optim.lr": 2e-5, "optim.betas": [0.9, 0.999], "optim.weight_decay": 0.05,
          "optim.ml_wd_mult": 1.0, "optim.ml_lr_mult": 1.0, "schedule.power": 1.0, "schedule.min_lr": 0.0,
          "schedule.warmup_iters": 1500, "schedule.batch_size": 16, "schedule.iters": 160000, "model.img_size": 640,
          "model.kappa": 50, "loss.ml_weight": 5.0, "eval.mode": "slide", "eval.stride": 426},
    "ade20k-full": {"model.kappa": 100},
    "coco-lvis": {"model.kappa": 100},
    # BEiT predicts slides of its img_size; null = the window (derived from the crop).
    "synthetic": {**_SYNTHETIC, "eval.mode": "slide", "eval.stride": None},
}

CONVSEG: tuple[Family, ...] = (
    _family("deeplabv3", ["deeplabv3-r101", "deeplabv3-r50", "deeplabv3-r18"], DEEPLAB_RECIPES),
    _family("upernet-swin", ["upernet-swinb", "upernet-swint"], SWIN_RECIPES, swin_groups),
    _family("upernet-beit", ["upernet-beitl", "upernet-beitt"], BEIT_RECIPES, beit_groups),
)
