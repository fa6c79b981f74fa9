"""The Mask2Former family: Mask2Former baseline and Mask2Former + RankSeg (model/mask2former/),
and MaskFormer (+ RankSeg) as its configuration with the standard transformer decoder
(`maskformer-*` model names: model/mask2former/maskformer.py, losses/maskformer.py).

Training targets come from the batch: one segment per class present in the crop's label
(semantic task, as Mask2Former's semantic mapper) or one per non-crowd segment of the crop's
segment map (panoptic task, shard format v2); clips take one target per class of the clip
(semantic) or per track (instance task: the frames' instances, `clip_track_targets`). Prediction is whole-image at the test size, as
every official Mask2Former config; multi-scale / flip average the per-class scores over the
selected classes only (never K channels) and the panoptic output comes from the single-scale
pass.
"""

from __future__ import annotations

import dataclasses
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankseg_core.config.datasets import recipe_dataset
from rankseg_core.config.mask2former import Mask2FormerConfig
from rankseg_core.config.model import ModelConfig
from rankseg_core.config.train import TrainConfig
from rankseg_core.errors import UserError
from rankseg_core.families.base import Family, InferenceProtocol, Multipliers, Predictions, listed_groups
from rankseg_core.inference.dense import ClassMaps
from rankseg_core.inference.mask2former import panoptic_inference, semantic_inference_compact
from rankseg_core.inference.video_instances import video_instance_predictions
from rankseg_core.losses.mask2former import Mask2FormerCriterion
from rankseg_core.losses.mask2former_video import (
    VideoMask2FormerCriterion,
    clip_semantic_targets,
    clip_targets_from_tracks,
)
from rankseg_core.losses.maskformer import MaskFormerCriterion
from rankseg_core.losses.rankseg import ml_loss_fn
from rankseg_core.losses.semask import SemanticPriorCriterion
from rankseg_core.losses.simformer import SimFormerCriterion
from rankseg_core.losses.targets import panoptic_targets, semantic_targets
from rankseg_core.model.convseg.layers import sync_batch_norm
from rankseg_core.model.convseg.vit_pyramid import layer_decay_multipliers
from rankseg_core.model.mask2former.detectron2_weights import detectron2_warm_start
from rankseg_core.model.mask2former.model import Mask2FormerModel, Mask2FormerOutput, build_mask2former
from rankseg_core.model.mask2former.multilabel import QueryRankNorm
from rankseg_core.model.mask2former.semask import SeMaskSwin
from rankseg_core.model.mask2former.simformer import build_simformer
from rankseg_core.model.mask2former.video import VideoMask2FormerOutput, build_video_mask2former, frame_output
from rankseg_core.model.mask2former.vit_adapter import ViTAdapter
from rankseg_core.model.selection import Selection
from rankseg_core.shards.codec import IGNORE
from rankseg_core.utils.transfer import host_to


def _panoptic(m: ModelConfig) -> bool:
    return m.mask2former.task == "panoptic"


def _instance(m: ModelConfig) -> bool:
    return m.mask2former.task == "instance"


def is_maskformer(m: ModelConfig) -> bool:
    """A MaskFormer (standard decoder, FPN pixel decoder, full-mask focal loss): its name says so."""
    return m.model.startswith("maskformer-")


def is_semask(m: ModelConfig) -> bool:
    """A Mask2Former on a SeMask Swin backbone (model/mask2former/semask.py)."""
    return m.model in SEMASK_SIZES


def batch_targets(batch: dict[str, Any], num_classes: int, panoptic: bool) -> list[dict[str, Tensor]]:
    """Per image {"labels": n, "masks": n x c x c} from a collated training batch: the segment
    map + records (panoptic) or the semantic label (one segment per present class)."""
    # The batch functions: one host transfer per batch learns every image's target count.
    if panoptic:
        return panoptic_targets(batch["segments"], batch["segments_info"], num_classes)
    return semantic_targets(batch["label"], num_classes, IGNORE)


def clip_batch_targets(batch: dict[str, Any], num_classes: int, clip_len: int) -> list[dict[str, Tensor]]:
    """Per clip {"labels": n, "masks": n x T x c x c} from a collated batch of (B*T) frames: one
    target per class present in any of the clip's frames (the fork's VSPW mapper)."""
    return clip_semantic_targets(batch["label"], clip_len, num_classes, IGNORE)


def clip_track_targets(batch: dict[str, Any], clip_len: int, device: torch.device) -> list[dict[str, Tensor]]:
    """Per clip {"labels": n, "masks": n x T x c x c} from a collated batch whose `instances`
    hold one {"labels", "masks", "ids"} per frame (clip-major): one target per track of the
    clip, all-False in the frames where it is absent (cropped out or not annotated: the null
    frames of YouTube-VIS); a track with no pixel left in any frame is no target. On `device`."""
    frames = batch["instances"]
    if len(frames) % clip_len:
        raise ValueError(f"{len(frames)} frames of instances do not make clips of {clip_len}")
    # The instances stay on the host (`to_device` passes lists through): the tracks are host
    # work, and go to `device` without a blocking copy.
    out = []
    for c in range(0, len(frames), clip_len):
        tg = clip_targets_from_tracks(frames[c:c + clip_len])
        out.append({"labels": host_to(tg["labels"], device), "masks": host_to(tg["masks"], device)})
    return out


def _criterion(cfg: TrainConfig) -> Any:
    k, t = cfg.model.num_classes, cfg.model.clip_len
    if t > 1 and _instance(cfg.model):  # clips of tracks (YouTube-VIS): one target per track
        icrit = VideoMask2FormerCriterion(cfg.model, ml_loss_fn(cfg.loss), cfg.loss.ml_weight)
        return lambda out, batch: icrit(out, clip_track_targets(batch, t, out.pred_masks.device))
    if t > 1:  # clips: video Mask2Former on the T-frame masks (semantic task)
        vcrit = VideoMask2FormerCriterion(cfg.model, ml_loss_fn(cfg.loss), cfg.loss.ml_weight)
        return lambda out, batch: vcrit(out, clip_batch_targets(batch, k, t))
    criterion = MaskFormerCriterion if is_maskformer(cfg.model) else Mask2FormerCriterion
    crit = criterion(cfg.model, ml_loss_fn(cfg.loss), cfg.loss.ml_weight)
    panoptic = _panoptic(cfg.model)

    def image_loss(out: Mask2FormerOutput, batch: dict[str, Any]) -> dict[str, Tensor]:
        return crit(out, batch_targets(batch, k, panoptic))
    loss = _simformer_criterion(cfg, crit) if cfg.data.novel_classes is not None else image_loss
    # SeMask: + CATE_WEIGHT (0.4) x the CE of its semantic prior (losses/semask.py).
    return SemanticPriorCriterion(loss, IGNORE) if is_semask(cfg.model) else loss


# ---------------------------------------------------------------------------------------
# Weak-shot runs (issue 21, docs/weak-shot.md): SimFormer's criterion (losses/simformer.py)

# CROSS_IMG_SIM.DISTILL_LOSS of the official *_crosim configs: ADE20K 0.5 (every split), COCO-Stuff
# 0.1 (splits 2-9; split 1 has 0). Other datasets get ADE20K's, as the complementary weight does.
SIMFORMER_DISTILL_WEIGHT = {"coco-stuff": 0.1, "ade20k": 0.5}


def holds_pair_net(m: ModelConfig) -> bool:
    """The model can carry SimFormer's pair net: a single-image timm-backbone MaskFormer /
    Mask2Former (model/mask2former/simformer.py; not SeMask, ViT-Adapter or clip models)."""
    return m.model in MODELS and not is_semask(m) and m.clip_len == 1


def _check_weak_shot(cfg: TrainConfig) -> None:
    if cfg.model.mask2former.task != "semantic":
        raise UserError(f"model.mask2former.task={cfg.model.mask2former.task}: weak-shot runs (--weak-shot) train "
                        "semantic segmentation; use task=semantic")


def _simformer_criterion(cfg: TrainConfig, crit: Mask2FormerCriterion) -> SimFormerCriterion:
    _check_weak_shot(cfg)
    comp = cfg.loss.weak_shot_comp_weight
    if comp is None or cfg.data.novel_classes is None:  # engine/configure.py `resolve` fills the official value
        raise UserError("loss.weak_shot_comp_weight is unset in a weak-shot run: set it, e.g. "
                        "--set loss.weak_shot_comp_weight=0.2")
    return SimFormerCriterion(crit, cfg.data.novel_classes, comp, cfg.model.mask2former.simformer)


def _resolve(cfg: TrainConfig) -> None:
    """SimFormer's official values in weak-shot runs (model.mask2former.simformer.*; None =
    official): cross-image pixel pairs where the model can hold the pair net, the distillation
    weight of the dataset's configs, the "cce" distillation. Other runs must leave them unset."""
    s = cfg.model.mask2former.simformer
    if cfg.data.novel_classes is None:
        if s.pixel_pairs not in (None, "off"):
            raise UserError(f"model.mask2former.simformer.pixel_pairs={s.pixel_pairs}: SimFormer's pixel pairs train "
                            "weak-shot runs only; add --weak-shot SPLIT or leave it unset")
        return
    _check_weak_shot(cfg)
    if s.pixel_pairs is None:
        s.pixel_pairs = "cross" if holds_pair_net(cfg.model) else "off"
    if s.distill_weight is None:
        s.distill_weight = SIMFORMER_DISTILL_WEIGHT.get(recipe_dataset(cfg.data.name) or "",
                                                        SIMFORMER_DISTILL_WEIGHT["ade20k"])
    s.distill_func = s.distill_func or "cce"
    micro = cfg.schedule.batch_size // max(1, cfg.schedule.accum_steps)
    if s.pixel_pairs == "cross" and micro % 2:
        raise UserError(f"model.mask2former.simformer.pixel_pairs=cross pairs the images of a micro-batch, which has "
                        f"{micro} (schedule.batch_size / accum_steps); use an even number, or pixel_pairs=self / off")


def _one(out: Mask2FormerOutput, i: int) -> Mask2FormerOutput:
    """The output of image i alone (inference needs no auxiliary predictions)."""
    def pick(t):
        return (None if t is None else t[i:i + 1])
    return dataclasses.replace(out, pred_logits=out.pred_logits[i:i + 1], pred_masks=out.pred_masks[i:i + 1],
                               aux=[], ml_logits=pick(out.ml_logits), topk_index=pick(out.topk_index),
                               valid=pick(out.valid))


def _scores(out: Mask2FormerOutput, size: tuple[int, int], flipped: bool) -> ClassMaps:
    """One image's per-class scores over its selected classes, as ClassMaps 1 x C x H x W
    with sorted class ids (padding columns of a variable-length selection dropped)."""
    scores, classes, valid = semantic_inference_compact(out, size)
    scores, classes = scores[0], classes[0]
    if valid is not None and valid.shape[-1] == classes.numel():
        scores, classes = scores[valid[0]], classes[valid[0]]
    order = classes.argsort()
    maps = scores[order][None]
    return ClassMaps(maps.flip(-1) if flipped else maps, classes[order])


@torch.no_grad()
def predict(model: nn.Module, cfg: TrainConfig, images: Tensor, sizes: list[tuple[int, int]], protocol: InferenceProtocol,
            selection: Selection) -> Predictions:
    """Semantic class maps (and panoptic segments for the panoptic task) at `sizes`.

    images N x 3 x H x W at the test size. Scores per pass: sum over queries of class
    probability x sigmoid mask, masks resized to the output size first (official
    `semantic_inference`); passes are averaged (scores of a class a pass did not select: 0).
    """
    if protocol.mode != "whole":
        raise UserError(f"eval mode {protocol.mode!r}: Mask2Former predicts whole images (every official config does); "
                        "use --mode whole")
    h, w = images.shape[-2:]
    n = images.shape[0]
    totals: list[ClassMaps | None] = [None] * n
    ml_sum, passes, panoptic = None, 0, None
    for scale in protocol.scales:
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        x = images if size == (h, w) else F.interpolate(images, size=size, mode="bilinear", align_corners=False)
        for flipped in ((False, True) if protocol.flip else (False,)):
            clip_out = model(x.flip(-1) if flipped else x, selection)
            # A clip model predicts B x Q x T masks: per frame, they are the image inference's input.
            out = frame_output(clip_out) if isinstance(clip_out, VideoMask2FormerOutput) else clip_out
            for i in range(n):
                s = _scores(_one(out, i), cast(tuple[int, int], tuple(sizes[i])), flipped)
                t = totals[i]
                if t is None:
                    totals[i] = s
                else:
                    classes = torch.unique(torch.cat([t.classes, s.classes]))
                    totals[i] = ClassMaps(t.widen(classes, 0.0) + s.widen(classes, 0.0), classes)
            if _panoptic(cfg.model) and size == (h, w) and not flipped:
                m = cfg.model.mask2former
                things = cfg.data.thing_classes or []
                keep = m.maskformer.object_mask_threshold if is_maskformer(cfg.model) else m.object_mask_threshold
                panoptic = [panoptic_inference(_one(out, i), cast(tuple[int, int], tuple(sizes[i])), things,
                                               keep, m.overlap_threshold)[0] for i in range(n)]
            if clip_out.ml_logits is not None:  # one ranking per clip (per image for T = 1)
                p = clip_out.ml_logits.float().sigmoid()
                ml_sum = p if ml_sum is None else ml_sum + p
            passes += 1
    filled = cast(list[ClassMaps], totals)  # every pass filled every image
    semantic = [t.argmax()[0] for t in filled]  # averaging does not change the argmax: no division
    return Predictions(semantic, None if ml_sum is None else ml_sum / passes, panoptic)


# ---------------------------------------------------------------------------------------
# Names, recipes, parameter groups

# `model.model` name -> timm architecture. The Swin windows / pretraining sizes are the ones
# the official configs load (Swin-T/S: window 7 at 224; Swin-B/L: IN21k window 12 at 384).
MODELS = {
    "mask2former-r50": "resnet50",
    "mask2former-swint": "swin_tiny_patch4_window7_224",
    "mask2former-swins": "swin_small_patch4_window7_224",
    "mask2former-swinb": "swin_base_patch4_window12_384",
    "mask2former-swinl": "swin_large_patch4_window12_384",
    # MaskFormer (facebookresearch/MaskFormer's ADE20K configs load the same backbones)
    "maskformer-r50": "resnet50",
    "maskformer-swint": "swin_tiny_patch4_window7_224",
    "maskformer-swins": "swin_small_patch4_window7_224",
    "maskformer-swinb": "swin_base_patch4_window12_384",
    "maskformer-swinl": "swin_large_patch4_window12_384",
    # SeMask Swin (model/mask2former/semask.py): the official SeMask-L, and ours for CPU runs
    "mask2former-semaskl": "swin_large_patch4_window12_384",
    "mask2former-semaskt": "swin_tiny_patch4_window7_224",
}

# SeMask models -> their Swin's size overrides (SeMaskSwin `swin_kwargs`). SeMask-L as the official
# config (Picsart-AI-Research/SeMask-Segmentation maskformer2_semask_swin_large_IN21k_384_bs16_160k
# _res640.yaml): Swin-L, window 12 and semantic window 12, pretrained at 384, one semantic
# attention per stage. semaskt: width 16, 2 blocks per stage, window 4.
SEMASK_SIZES: dict[str, dict[str, Any]] = {
    "mask2former-semaskl": {},
    "mask2former-semaskt": {"embed_dim": 16, "depths": (2, 2, 2, 2), "num_heads": (1, 2, 4, 8), "window_size": 4},
}

# The official Mask2Former recipe (configs/ade20k/semantic-segmentation/maskformer2_R50_bs16_160k
# .yaml and the panoptic / Swin configs on top; docs/mask2former.md): AdamW 1e-4, weight decay
# 0.05 (0 on norms and embeddings: `no_weight_decay`), backbone lr x 0.1, the RankSeg ml head
# lr x 0.1 (SOLVER.MLHEAD_MULTIPLIER) with no extra decay, full-model gradient-norm clipping at
# 0.01, poly 0.9 without floor or warm-up, batch 16, 160k iterations, crop 512 (640 for the
# Swin-B/L configs: pass --img-size 640), whole-image test at the short side of the crop (long
# side <= 4x), ml loss ASL(2, 0) with weight 10 (RANKSEG.LOSS_WEIGHT).
RECIPES: dict[str, dict[str, Any]] = {
    "*": {"optim.name": "adamw", "optim.lr": 1e-4, "optim.weight_decay": 0.05, "optim.backbone_lr_mult": 0.1,
          "optim.ml_lr_mult": 0.1, "optim.ml_wd_mult": 1.0, "optim.grad_clip": 0.01, "schedule.min_lr": 0.0,
          "schedule.batch_size": 16, "schedule.iters": 160000, "model.img_size": 512, "aug.cat_max_ratio": 1.0,
          "loss.ml_weight": 10.0, "eval.mode": "whole"},
    # MaskFormer's own optimizers (facebookresearch/MaskFormer configs/ade20k-150: R50 weight
    # decay 1e-4; Swin AdamW 6e-5, decay 0.01, backbone lr x 1, 1500 warm-up iterations, crop
    # 640 for Swin-B/L). Its panoptic R50 config (crop 640, 720k iterations) depends on the task,
    # not the model: docs/architectures.md gives the keys.
    "maskformer-r50": {"optim.weight_decay": 1e-4},
    **{f"maskformer-swin{s}": {"optim.lr": 6e-5, "optim.weight_decay": 0.01, "optim.backbone_lr_mult": 1.0,
                               "schedule.warmup_iters": 1500, **({"model.img_size": 640} if s in "bl" else {})}
       for s in ("t", "s", "b", "l")},
    # SeMask-L: the official config is Mask2Former's Swin-L ADE20K recipe above at crop 640 (test
    # short side 640, long <= 2560), + the semantic-prior loss (weight 0.4, losses/semask.py).
    "mask2former-semaskl": {"model.img_size": 640},
    # Our own cheap CPU protocol on the built-in data (as the Segmenter's synthetic recipe).
    "synthetic": {"model.img_size": 128, "schedule.iters": 2000, "schedule.batch_size": 8, "eval.every": 500},
}


def num_queries(m: ModelConfig) -> int:
    """Number of object queries: the explicit value, else the official one (200 for the
    Swin-L panoptic and YouTube-VIS configs, 100 for every other)."""
    if m.mask2former.num_queries is not None:
        return m.mask2former.num_queries
    return 200 if m.model == "mask2former-swinl" and (_panoptic(m) or _instance(m)) else 100


# The official build_optimizer's norm_module_types (mask2former/train_net.py), plus the rank
# LayerNorm, which the official model builds as an nn.LayerNorm(TOPK + 1) and ours as a RankNorm.
_NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
               nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
               QueryRankNorm)


def official_exempt(module_name: str, module: nn.Module, param_name: str) -> bool:
    """The official RankSeg fork's weight-decay test for one parameter (`param_name`, owned
    directly by `module`, which is named `module_name`), line for line from its
    build_optimizer: Swin's position tables by parameter name, norm layers and embeddings by
    module type, and `"cls_emb" in module_name`. That last test reads the MODULE name, and the
    ml head's class embeddings are a parameter `cls_emb` of the module `ml_head`: it never
    matches them, so the official runs decay `ml_head.cls_emb` at 0.05 (docs/mask2former.md)."""
    if "relative_position_bias_table" in param_name or "absolute_pos_embed" in param_name:
        return True
    return isinstance(module, (*_NORM_TYPES, nn.Embedding)) or "cls_emb" in module_name


def no_weight_decay(model: nn.Module) -> set[str]:
    """Official exemptions (`official_exempt`): parameters of norm layers and embeddings,
    Swin's relative position bias tables; biases of linears and the ml head's `cls_emb` DO
    decay, as in the official code."""
    names = set()
    for mod_name, mod in model.named_modules():
        for p_name, _ in mod.named_parameters(recurse=False):
            if official_exempt(mod_name, mod, p_name):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def ml_branch_names(model: nn.Module) -> set[str]:
    """Parameters of the multi-label head (the official SOLVER.MLHEAD_MULTIPLIER group: lr x
    the run's optim.ml_lr_mult, 0.1 in the recipe); the rank LayerNorm is not part of it."""
    return {n for n, _ in model.named_parameters() if n.startswith("ml_head.")}


def param_groups(model: nn.Module, cfg: TrainConfig) -> Multipliers:
    """detectron2's groups as the official build_optimizer makes them (docs/mask2former.md)."""
    return listed_groups(model, cfg.optim, no_weight_decay(model), ml_branch_names(model))


def _validate(m: ModelConfig) -> None:
    if is_semask(m) and (m.clip_len != 1 or m.mask2former.task != "semantic"):
        raise UserError(f"model.mask2former.task={m.mask2former.task}, model.clip_len={m.clip_len}: {m.model} segments "
                        "images semantically (its semantic-prior loss reads the semantic label, as the official "
                        "SeMask configs); use task=semantic and clip_len=1, or a mask2former-swin* model")
    if m.clip_len != 1 and _panoptic(m):
        raise UserError(f"model.clip_len={m.clip_len}: clips of the Mask2Former family segment semantically (VSPW) "
                        "or track instances (YouTube-VIS); use model.mask2former.task=semantic / instance, or "
                        "clip_len=1 for panoptic")
    if m.clip_len == 1 and _instance(m):
        raise UserError("model.mask2former.task=instance trains video tracks on clips: set model.clip_len >= 2 "
                        "(e.g. --set model.clip_len=2), or use task=semantic / panoptic for images")
    if is_maskformer(m) and m.clip_len != 1:
        raise UserError(f"model.clip_len={m.clip_len}: {m.model} segments images; use clip_len=1, or a "
                        "mask2former-* model for clips")
    m.mask2former.validate(maskformer=is_maskformer(m))
    if m.mask2former.simformer.pixel_pairs in ("cross", "self") and not holds_pair_net(m):
        raise UserError(f"model.mask2former.simformer.pixel_pairs={m.mask2former.simformer.pixel_pairs}: {m.model} "
                        "cannot hold SimFormer's pair net (timm-backbone mask2former-* / maskformer-* image models "
                        "only); use pixel_pairs=off")


def _build(m: ModelConfig) -> nn.Module:
    _validate(m)
    if is_semask(m):
        arch = MASK2FORMER.arch(m.model)
        semask = SeMaskSwin(arch, m.num_classes, m.mask2former, m.in_chans, **SEMASK_SIZES[m.model])
        return build_mask2former(m, arch, num_queries(m), backbone=semask)
    if m.clip_len > 1:  # Mask2Former-VIS-style clip queries (docs/video.md)
        return build_video_mask2former(m, MASK2FORMER.arch(m.model), num_queries(m))
    if m.mask2former.simformer.pixel_pairs in ("cross", "self"):  # + SimFormer's pair net (weak-shot runs)
        return build_simformer(m, MASK2FORMER.arch(m.model), num_queries(m),
                               decoder="standard" if is_maskformer(m) else "masked")
    return build_mask2former(m, MASK2FORMER.arch(m.model), num_queries(m),
                             decoder="standard" if is_maskformer(m) else "masked")


def stats_extra(model: nn.Module, m: ModelConfig) -> dict[str, Any]:
    m2f = cast(Mask2FormerModel, model)  # this family's model
    head = m2f.ml_head
    return {"task": m.mask2former.task, "decoder": type(m2f.decoder).__name__,
            "pixel_decoder": type(m2f.pixel_decoder).__name__, "queries": m2f.num_queries,
            "params_ml_head": sum(p.numel() for p in head.parameters()) if head is not None else 0}


def rank_scale(model: nn.Module) -> tuple[Tensor, Tensor] | None:
    """(1/tau, beta) per class rank of the rank LayerNorm (no-object column excluded)."""
    m2f = cast(Mask2FormerModel, model)  # this family's model
    if m2f.ml_norm is None or not m2f.selects:
        return None
    scale, bias = m2f.ml_norm.affine(m2f.kappa + 1)
    return scale[:-1], bias[:-1]


MASK2FORMER = Family(
    name="mask2former",
    models=MODELS,
    build=_build,
    criterion=_criterion,
    resolve=_resolve,
    stats=("loss", "ce", "mask", "dice", "ml", "kept"),
    # A weak-shot run (SimFormer, losses/simformer.py) also logs its similarity-transfer terms.
    more_stats=lambda cfg: ("comp", "pair", "distill") if cfg.data.novel_classes else (),
    weak_shot=True,
    predict=predict,
    data_config=lambda model: cast(Mask2FormerModel, model).data_config(),
    recipes=RECIPES,
    validate=_validate,
    param_groups=param_groups,
    ranks=lambda m: m.head == "rankseg" and not m.oracle,
    selects=lambda m: m.head == "rankseg" and m.select or m.oracle,
    panoptic=_panoptic,
    instances=lambda m: m.mask2former.task == "instance",
    predict_tracks=lambda model, cfg, frames, size, top_k: video_instance_predictions(model, frames, size, top_k),
    foreign_weights=detectron2_warm_start,  # official Mask2Former / MaskFormer model_final .pkl files
    # The GT (train + eval) oracle has no ml head in the graph.
    find_unused_parameters=lambda m: m.oracle,
    stats_extra=stats_extra,
    rank_scale=rank_scale,
)


# ---------------------------------------------------------------------------------------
# ViT-Adapter backbones (model/mask2former/vit_adapter.py). The official ViT-Adapter runs are
# mmseg's, with their own recipe (layer-wise lr decay, warm-up, crop 896, no gradient clipping),
# hence a family of their own that shares everything else with MASK2FORMER.


@dataclasses.dataclass(frozen=True)
class AdapterSpec:
    """A ViT-Adapter Mask2Former: the timm BEiT, its size overrides and the adapter's widths
    (ViTAdapter arguments), and the official values of the head options (`head`, Mask2FormerConfig
    names) and query count."""

    timm_name: str
    beit: dict[str, Any]
    adapter: dict[str, Any]
    head: dict[str, Any]
    queries: int


VIT_ADAPTER_SPECS: dict[str, AdapterSpec] = {
    # czczup/ViT-Adapter segmentation/configs/ade20k/mask2former_beit_adapter_large_896_80k_ade20k_ss.py:
    # BEiT-L, SPM width 64, 16 deformable heads (n_points 4, cffn 0.25, deform ratio 0.5: the
    # ViTAdapter defaults), with_cp (activations recomputed in the backward pass); mmdet's
    # Mask2FormerHead at width 1024 with 32 heads, FFNs of 4096 in the pixel decoder and the
    # decoder, 200 queries. The ml head at width 1024 (the head's): the paper's +13.97M for
    # RankSeg (Table 7) is what that width adds (docs/architectures.md).
    "mask2former-vitadapterl": AdapterSpec(
        "beit_large_patch16_224", {}, {"conv_inplane": 64, "deform_num_heads": 16, "with_cp": True},
        {"hidden_dim": 1024, "conv_dim": 1024, "mask_dim": 1024, "nheads": 32, "dim_feedforward": 4096,
         "enc_dim_feedforward": 4096, "ml_hidden_dim": 1024}, 200),
    # Ours, for CPU runs and tests: the same structure at ViT width 32 (4 blocks, one per group).
    "mask2former-vitadaptert": AdapterSpec(
        "beit_base_patch16_224", {"embed_dim": 32, "depth": 4, "num_heads": 2},
        {"conv_inplane": 16, "deform_num_heads": 2},
        {"hidden_dim": 32, "conv_dim": 32, "mask_dim": 32, "nheads": 4, "dim_feedforward": 64,
         "enc_dim_feedforward": 64, "ml_hidden_dim": 32}, 16),
}

# The official ViT-Adapter recipe (mask2former_beit_adapter_large_896_80k_ade20k_ss.py, the
# 60.5 multi-scale mIoU of Table 7 / supplement Table 6): AdamW lr 2e-5, betas (0.9, 0.999),
# weight decay 0.05 (0 on 1-D parameters and biases), layer-wise lr decay 0.9 over the 24 blocks
# (`vit_adapter_groups`), no gradient clipping (mmseg's optimizer_config = {}), poly power 1.0 to
# 0 after a 1500-iteration linear warm-up from 1e-6 x, batch 16 (16 GPUs x 1), 80k iterations
# (after 80k on COCO-Stuff: its load_from), crop 896 from (3584, 896) x [0.5, 2] with
# cat_max_ratio 0.75, test at short side 896 (long <= 3584). RankSeg's values for Mask2Former
# (supplement Table 2, "the same for ViT-Adapter"): kappa = K, ml loss weight 10.
VIT_ADAPTER_RECIPES: dict[str, dict[str, Any]] = {
    "*": {"optim.name": "adamw", "optim.lr": 2e-5, "optim.betas": [0.9, 0.999], "optim.weight_decay": 0.05,
          "optim.ml_lr_mult": 1.0, "optim.ml_wd_mult": 1.0, "optim.grad_clip": 0.0, "schedule.power": 1.0,
          "schedule.min_lr": 0.0, "schedule.warmup_iters": 1500, "schedule.batch_size": 16, "schedule.iters": 80000,
          "model.img_size": 896, "aug.cat_max_ratio": 0.75, "loss.ml_weight": 10.0, "eval.mode": "whole"},
    "ade20k": {"model.kappa": 150},
    # Our own cheap CPU protocol on the built-in data (as the Mask2Former synthetic recipe).
    "synthetic": {"model.img_size": 128, "schedule.iters": 2000, "schedule.batch_size": 8,
                  "schedule.warmup_iters": 100, "eval.every": 500},
}

VIT_ADAPTER_LAYER_DECAY = 0.9  # paramwise_cfg layer_decay_rate of every official ViT-Adapter-L config
# Head parameters the official LayerDecayOptimizerConstructor puts in layer 0 with the patch
# embedding (lr x 0.9^25): its decode_head.{mask_embed, cls_embed, level_embed, query_embed,
# query_feat}, in our names.
_LAYER0_HEAD = ("decoder.mask_embed.", "class_embed.", "decoder.level_embed.", "decoder.query_embed.",
                "decoder.query_feat.")


def with_official_head(m: ModelConfig) -> ModelConfig:
    """`m` (a copy) with each head option of `AdapterSpec.head` that is still at its
    Mask2FormerConfig default (the detectron2 value) set to the ViT-Adapter model's official one."""
    spec, default = VIT_ADAPTER_SPECS[m.model], Mask2FormerConfig()
    values = {k: v for k, v in spec.head.items() if getattr(m.mask2former, k) == getattr(default, k)}
    return dataclasses.replace(m, mask2former=dataclasses.replace(m.mask2former, **values))


def _validate_vit_adapter(m: ModelConfig) -> None:
    if m.clip_len != 1:
        raise UserError(f"model.clip_len={m.clip_len}: {m.model} segments images (clip models use the timm "
                        "pyramid backbones); use clip_len=1, or a mask2former-r50 / -swin* model for clips")
    if m.img_size % 32:
        raise UserError(f"model.img_size={m.img_size}: ViT-Adapter needs a multiple of 32 (its stride-32 level is "
                        "half the ViT grid); use e.g. 896 (the official crop) or 64")
    _validate(with_official_head(m))


def _build_vit_adapter(m: ModelConfig) -> nn.Module:
    _validate_vit_adapter(m)
    m = with_official_head(m)
    spec = VIT_ADAPTER_SPECS[m.model]
    backbone = ViTAdapter(spec.timm_name, img_size=m.img_size, in_chans=m.in_chans,
                          drop_path=m.mask2former.backbone_drop_path, **spec.beit, **spec.adapter)
    queries = spec.queries if m.mask2former.num_queries is None else m.mask2former.num_queries
    # SyncBN as the official SPM / output norms when training on several GPUs (1 image each there).
    return sync_batch_norm(build_mask2former(m, spec.timm_name, queries, backbone=backbone))


def _resolve_vit_adapter(cfg: TrainConfig) -> None:
    """Record the official head widths in the run's config (config.yaml says what was built)."""
    cfg.model = with_official_head(cfg.model)


def vit_adapter_groups(model: nn.Module, cfg: TrainConfig) -> Multipliers:
    """The official LayerDecayOptimizerConstructor (ViT-Adapter's mmcv_custom): mmseg's BEiT
    layer decay (`layer_decay_multipliers`: patch embedding and cls token at layer 0, block i at
    i + 1, the rest, the adapter included, at the base lr; no decay on 1-D parameters and
    biases) with the head's query / level embeddings, class and mask embeddings at layer 0. The
    ml branch's lr and decay are then scaled by optim.ml_lr_mult / ml_wd_mult."""
    backbone = cast(ViTAdapter, cast(Mask2FormerModel, model).backbone)  # this family's model
    rate, depth = VIT_ADAPTER_LAYER_DECAY, backbone.num_layers
    mults = layer_decay_multipliers(model, rate, depth)
    ml, o = ml_branch_names(model), cfg.optim
    for name, (lr, decay) in mults.items():
        if name.startswith(_LAYER0_HEAD):
            mults[name] = (rate ** (depth + 1), decay)
        elif name in ml:
            mults[name] = (lr * o.ml_lr_mult, decay * o.ml_wd_mult)
    return mults


MASK2FORMER_VITADAPTER = dataclasses.replace(
    MASK2FORMER,
    name="mask2former-vitadapter",
    models={name: spec.timm_name for name, spec in VIT_ADAPTER_SPECS.items()},
    build=_build_vit_adapter,
    recipes=VIT_ADAPTER_RECIPES,
    resolve=_resolve_vit_adapter,
    validate=_validate_vit_adapter,
    param_groups=vit_adapter_groups,
)
