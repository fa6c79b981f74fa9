"""SimFormer's weak-shot criterion for the MaskFormer / Mask2Former family (issue 21).

Weak-shot batches (data/weak_shot.py) carry the label with every novel pixel hidden (ignore)
and `image_labels`, the B x K presence of every class in the crop. Semantics of the official
code (bcmi/SimFormer-Weak-Shot-Semantic-Segmentation, `prop_former/modeling/`), re-implemented:

Proposal-pixel similarity transfer (`prop_criterion.py`, `hungarian_matcher.py`), every
prediction step (the last layer and each deep-supervision layer):
- targets: one per base class present in the label (its mask), then one per novel class of
  the image labels, WITHOUT a mask (the official mapper's labels_A + labels_B);
- matching: base targets by the family's cost (class + mask + dice); novel targets by the
  class cost alone (ASM.NoMaskCls 1, NoMaskMask 0), in the same Hungarian assignment;
- class CE over all queries (matched to base or novel, else no-object) as the family's;
- mask terms on the base pairs only, normalised by the number of base targets;
- complementary loss: per image with a matched novel query, the per-pixel max over those
  queries' mask logits and the fixed ignore logit (logit 0.05) must reproduce the not-base
  region (every pixel not labelled with a base class, minus the crop's padding), scored by the
  family's own mask terms and weights (the official "EQ" type); the mean over such images,
  x loss.weak_shot_comp_weight (0.15 COCO-Stuff, 0.2 ADE20K).
RankSeg: the ml head learns every class from `image_labels`; base and novel targets alike are
renumbered to the selected columns (a target whose class is not selected is dropped).

Pixel-pixel similarity transfer (`loss_cross_img_base_sim_novel_distill`), last layer only,
on the pixel decoder's mask features (model/mask2former/simformer.py):
- the batch is cut into pairs of images (`pair_partners`); each pair picks one base class both
  images hold; per image J = 100 points: 80 in that class's region, 20 in the rest of the
  non-padded crop (random order: top-k of region + U(0, 0.1));
- pair net on the J x J cross-image pairs of DETACHED features; class-balanced BCE against
  "same label", over pairs where at least one pixel is base (`base_pair_loss`);
- distillation, for images whose pair shares a novel class: J points per image in the
  not-base region; teacher = the pair net (no gradient) on their cross-image pairs; student =
  relu(cosine) of the novel classes' score vectors sum_q softmax(class_q)[novel] sigmoid(mask_q)
  at those points; loss "cce" or "ce" (`distill_map`), the mean over all pairs.

Deviations (docs/weak-shot.md): the partner image is another image of the batch chosen by the
official preference (one shared novel class, else several, else a shared base class) instead of
the official mapper's draw from the whole dataset; the student pairs are the teacher's cross-
image pairs (the official code pairs the input image's points with themselves: `student_pairs
= "within"` reproduces it); "self" pairs reuse the same augmented crop (the official mapper
augments the image a second time); the crop's padding is the loader's `batch["pad"]` (or, for a
batch built without it, recovered from the image: 0 at the bottom / right, `loader_padding`); in the balance
counts (never in the loss) two hidden pixels count as "same".
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rankseg_core.config.mask2former import SimFormerConfig
from rankseg_core.errors import UserError
from rankseg_core.losses.mask2former import Mask2FormerCriterion, column_targets
from rankseg_core.losses.maskformer import MaskFormerCriterion, maskformer_cost
from rankseg_core.losses.matcher import assign_pairs, matching_cost
from rankseg_core.losses.points import point_sample, uncertain_points
from rankseg_core.losses.rankseg import class_histogram
from rankseg_core.losses.weak_shot import IGNORE_LOGIT, complementary_loss
from rankseg_core.model.mask2former.model import Mask2FormerOutput
from rankseg_core.model.mask2former.simformer import PairBalance, PairSimilarityNet, SimFormerOutput
from rankseg_core.shards.codec import IGNORE
from rankseg_core.utils.transfer import host_to

# The official base points: int(0.8 J) in the common class, int(0.2 J) elsewhere (two constants:
# int(J * (1 - 0.8)) would give 19 for J = 100).
POS_FRACTION, NEG_FRACTION = 0.8, 0.2
SAMPLE_JITTER = 0.1  # rand_max of the official point sampler
EPS = 1e-5  # the official normaliser floor of the pair loss
LOG_EPS = 0.01  # the official clamp of teacher and student in the "ce" distillation


@dataclass
class WeakShotTargets:
    """A weak-shot batch's targets and the class sets the pixel-pair losses read.

    targets: per image {"labels": n long, "masks": n x H x W bool} on the labels' device, and
        "has": n bool ON THE HOST, whether the target has a mask (base) or not (novel); base
        classes first, in class order, then novel ones.
    base / novel: per image its base classes (in the label) and novel classes (image labels).
    """

    targets: list[dict[str, Tensor]]
    base: list[set[int]]
    novel: list[set[int]]


def weak_shot_targets(labels: Tensor, image_labels: Tensor, novel: Tensor | np.ndarray) -> WeakShotTargets:
    """Each image's targets: base classes with masks, then novel classes without.

    labels: B x H x W train ids with novel pixels hidden; image_labels: B x K presence; novel:
    K bool (an array or a host tensor). Which classes an image has decides every shape after
    it, so the host learns it once per batch: one copy of a B x 2K table (base classes in the
    label, classes in the image labels), as `targets.semantic_targets`. ValueError if a novel
    class still has pixels in a label (the loader must hide them).
    """
    novel = torch.from_numpy(np.array(novel, dtype=bool))  # the split's table, a host copy
    k = len(novel)
    lab = labels.long()
    table = torch.cat([class_histogram(lab, k, IGNORE) > 0, image_labels > 0], dim=1).cpu()  # the batch's one sync
    base_present, novel_present = table[:, :k], table[:, k:] & novel
    leaked = (base_present & novel).nonzero()
    if leaked.numel():
        raise ValueError(f"novel class {int(leaked[0, 1])} has pixels in a weak-shot label: the loader must hide them")
    targets, base, novel_sets = [], [], []
    for b in range(lab.shape[0]):
        base_ids, novel_ids = base_present[b].nonzero().flatten(), novel_present[b].nonzero().flatten()
        classes = host_to(base_ids, lab.device)
        empty = torch.zeros((len(novel_ids), *lab.shape[-2:]), dtype=torch.bool, device=lab.device)
        targets.append({"labels": host_to(torch.cat([base_ids, novel_ids]), lab.device),
                        "masks": torch.cat([lab[b][None] == classes[:, None, None], empty]),
                        "has": torch.cat([torch.ones_like(base_ids, dtype=torch.bool),
                                          torch.zeros_like(novel_ids, dtype=torch.bool)])})
        base.append(set(base_ids.tolist()))
        novel_sets.append(set(novel_ids.tolist()))
    return WeakShotTargets(targets, base, novel_sets)


def loader_padding(images: Tensor) -> Tensor:
    """The crop padding of training images B x 3 x H x W -> B x H x W bool.

    The training transform (data/augment.py) pads a crop at the bottom / right with image 0
    (after normalisation) and label ignore; the padding is what lies below the last row and
    right of the last column holding a non-zero value (an image pixel equals the mean in all
    three channels exactly only by accident, and a whole row of them never)."""
    nz = images.ne(0).any(1)  # B x H x W
    h, w = nz.shape[-2:]

    def extent(hit: Tensor, n: int) -> Tensor:  # B x n -> index after the last hit (0 if none)
        last = n - hit.flip(1).int().argmax(1)
        return torch.where(hit.any(1), last, torch.zeros_like(last))

    rows, cols = extent(nz.any(2), h), extent(nz.any(1), w)
    r = torch.arange(h, device=images.device)[None, :, None] >= rows[:, None, None]
    c = torch.arange(w, device=images.device)[None, None, :] >= cols[:, None, None]
    return r | c


@torch.no_grad()
def weak_shot_match(crit: Mask2FormerCriterion, logits: Tensor, masks: Tensor, targets: list[dict[str, Tensor]]
                    ) -> list[tuple[Tensor, Tensor]]:
    """Per image (query indices, target indices), on the host, of one Hungarian assignment in
    which targets with a mask (`has`) cost as the family's matcher and the others cost the
    class term alone (-class_weight x softmax probability of the class).

    logits B x Q x (C+1), masks B x Q x h x w; targets[b] {"labels": n columns, "masks":
    n x H x W, "has": n bool on the host} (`weak_shot_targets`, then `column_targets`).
    """
    m = crit.m
    dense = isinstance(crit, MaskFormerCriterion)

    def cost_of(b: int, pts: Tensor) -> Tensor:
        t = targets[b]
        cost = -m.class_weight * logits[b].float().softmax(-1)[:, t["labels"]]
        with_mask = t["has"].nonzero().flatten()  # host data: no sync to learn which
        if len(with_mask):
            idx = host_to(with_mask, logits.device)
            lab, tm = t["labels"].index_select(0, idx), t["masks"].index_select(0, idx)
            cost[:, idx] = (maskformer_cost(logits[b], masks[b], lab, tm, m.class_weight, m.mask_weight, m.dice_weight)
                            if dense else
                            matching_cost(logits[b], masks[b], lab, tm, pts, m.class_weight, m.mask_weight,
                                          m.dice_weight))
        return cost

    if dense:  # MaskFormer scores every pixel: no points to draw
        return assign_pairs(targets, 0, torch.empty(0, 2, device=logits.device), logits.device, cost_of, on_host=True)
    return assign_pairs(targets, m.train_num_points, None, logits.device, cost_of, on_host=True)


def complementary_points(novel: list[Tensor], notbase: Tensor, num_points: int, oversample: float, importance: float,
                         mask_weight: float, dice_weight: float, ignore_logit: float = IGNORE_LOGIT) -> Tensor:
    """The complementary loss with Mask2Former's point-sampled mask terms (our extension: the
    official code is MaskFormer's).

    novel: per image n_b x h x w mask logits of its matched novel queries (n_b may be 0);
    notbase: B x H x W 0/1 target. Per image with n_b >= 1: points drawn by uncertainty of the
    low-resolution max map; at the points, m = max(max_q logit_q, ignore_logit) (each proposal
    sampled first, as the dense loss upsamples first); loss = mask_weight x mean BCE(m, target)
    + dice_weight x dice; the mean over those images (0 in the graph if none).
    """
    losses = []
    for logits, target in zip(novel, notbase):
        if logits.shape[0] == 0:
            continue
        with torch.no_grad():
            low = logits.detach().float().amax(0).clamp_min(ignore_logit)
            coords = uncertain_points(low[None, None], num_points, oversample, importance)  # 1 x P x 2
        pred = point_sample(logits[:, None].float(), coords.expand(logits.shape[0], -1, -1))[:, 0]
        pred = pred.amax(0).clamp_min(ignore_logit)  # P
        tgt = point_sample(target[None, None].float(), coords)[0, 0]
        p = pred.sigmoid()
        dice = 1 - (2 * (p * tgt).sum() + 1) / (p.sum() + tgt.sum() + 1)
        losses.append(mask_weight * F.binary_cross_entropy_with_logits(pred, tgt) + dice_weight * dice)
    if not losses:
        return notbase.new_zeros((), dtype=torch.float32)
    return torch.stack(losses).mean()


def complementary_dense(novel: list[Tensor], notbase: Tensor, mask_weight: float, dice_weight: float,
                        ignore_logit: float = IGNORE_LOGIT) -> Tensor:
    """The official complementary loss (MaskFormer): each matched novel query's mask logits
    upsampled (bilinear) to the target size, then `losses/weak_shot.py` `complementary_loss`
    (per-pixel max with the ignore logit, focal x mask_weight + dice x dice_weight, mean over
    the images with a novel query). novel: per image n_b x h x w; notbase: B x H x W."""
    size = notbase.shape[-2:]
    n = max((t.shape[0] for t in novel), default=0)
    if n == 0:
        return notbase.new_zeros((), dtype=torch.float32)
    rows, used = [], []
    for t in novel:
        up = (F.interpolate(t[None].float(), size=size, mode="bilinear", align_corners=False)[0] if t.shape[0]
              else t.new_zeros(0, *size, dtype=torch.float32))  # bilinear refuses an empty batch
        rows.append(torch.cat([up, up.new_zeros(n - t.shape[0], *size)]))
        used.append(torch.arange(n, device=notbase.device) < t.shape[0])
    return complementary_loss(torch.stack(rows), torch.stack(used), notbase.bool(), ignore_logit, mask_weight,
                              dice_weight)


# ---------------------------------------------------------------------------------------
# Pixel-pixel similarity transfer


def sample_region_points(region: Tensor, n: int) -> Tensor:
    """The official point sampler: region B x N bool (flattened maps) -> B x n flat indices,
    the top n of region + U(0, 0.1): region pixels in random order, topped up with random
    pixels outside it when it has fewer than n (n is capped at N)."""
    score = region.float() + torch.rand(region.shape, device=region.device) * SAMPLE_JITTER
    return score.topk(min(n, region.shape[1]), dim=1).indices


def pair_partners(base: Sequence[set[int]], novel: Sequence[set[int]], mode: str) -> list[int]:
    """The reference image of each image of a batch.

    "self": itself. "cross": a pairing of the batch (B even), built greedily in batch order:
    each unpaired image takes the unpaired later image it shares exactly one novel class
    with (the official "Deconf" pairs), else several novel classes, else a base class, else
    the next one."""
    n = len(base)
    if mode == "self":
        return list(range(n))
    if n % 2:
        raise UserError(f"model.mask2former.simformer.pixel_pairs=cross pairs a micro-batch's images two by two, "
                        f"and this one has {n}; use an even schedule.batch_size per process (and accum step), "
                        "or pixel_pairs=self")

    def rank(a: int, b: int) -> int:
        shared = len(novel[a] & novel[b])
        return 0 if shared == 1 else 1 if shared else 2 if base[a] & base[b] else 3

    partner = [-1] * n
    for a in range(n):
        if partner[a] < 0:
            b = min((c for c in range(a + 1, n) if partner[c] < 0), key=lambda c: (rank(a, c), c))
            partner[a], partner[b] = b, a
    return partner


def grid_pairs(a: Tensor, b: Tensor) -> Tensor:
    """Features B x J x D and B x J' x D -> B x J x J' x 2D, [a_i, b_j] at (i, j)."""
    j, j2 = a.shape[1], b.shape[1]
    return torch.cat([a[:, :, None].expand(-1, -1, j2, -1), b[:, None].expand(-1, j, -1, -1)], dim=-1)


def base_pair_loss(prob: Tensor, same: Tensor, valid: Tensor, weights: tuple[Tensor | float, Tensor | float]
                   ) -> Tensor:
    """Class-balanced BCE of the pair net: prob / same / valid B x J x J (probability, label,
    pair counts), weights (w_dissimilar, w_similar), numbers or 0-dim tensors:
    sum(w BCE valid) / max(sum valid, 1e-5)."""
    w = torch.where(same, weights[1], weights[0])
    bce = F.binary_cross_entropy(prob.float(), same.float(), reduction="none")
    v = valid.float()
    return (w * bce * v).sum() / v.sum().clamp(min=EPS)


def distill_map(teacher: Tensor, student: Tensor, func: str) -> Tensor:
    """The official distillation losses per pair (teacher, student in [0, 1]):
    "ce": BCE with both clamped to [0.01, 0.99]; "cce": -relu(t - 0.5) log(1 + s) -
    relu(0.5 - t) log(2 - s) (pull similar pairs up, dissimilar ones down)."""
    if func == "ce":
        t, s = teacher.clamp(LOG_EPS, 1 - LOG_EPS), student.clamp(LOG_EPS, 1 - LOG_EPS)
        return -t * s.log() - (1 - t) * (1 - s).log()
    if func == "cce":
        return -(teacher - 0.5).relu() * (student + 1).log() - (0.5 - teacher).relu() * (2 - student).log()
    raise ValueError(f"distill function {func!r}: use ce or cce")


def novel_scores_at(out: Mask2FormerOutput, points: Tensor, novel: Tensor) -> Tensor:
    """The novel classes' semantic scores sum_q softmax(class_q)[c] sigmoid(mask_q) at points
    B x J (flat indices into the h x w mask grid) -> B x J x N, N = len(novel) class ids. A
    selecting (RankSeg) model's columns go back to class ids first (an unselected class scores 0)."""
    b, q = out.pred_logits.shape[:2]
    probs = out.pred_logits.float().softmax(-1)[..., :-1]  # B x Q x C
    if out.topk_index is not None:
        src = probs if out.valid is None else probs * out.valid[:, None, :].to(probs.dtype)
        full = probs.new_zeros(b, q, out.num_classes)
        probs = full.scatter_add(2, out.topk_index[:, None, :].expand(-1, q, -1), src)
    probs = probs[:, :, novel]
    masks = out.pred_masks.float().flatten(2).gather(2, points[:, None, :].expand(-1, q, -1)).sigmoid()
    return torch.einsum("bqn,bqj->bjn", probs, masks)


def pixel_pair_losses(out: SimFormerOutput, label: Tensor, pad: Tensor, base: list[set[int]], novel: list[set[int]],
                      novel_ids: Tensor, sim: SimFormerConfig) -> tuple[Tensor, Tensor]:
    """(pair loss, distillation loss) of one batch (see the module docstring).

    label / pad: B x h x w on the grid of the mask features (hidden label, crop padding);
    base / novel: per image its base classes (label) and novel classes (image labels);
    novel_ids: the split's novel class ids; sim: resolved options (pixel_pairs, distill_*).
    """
    feats, net, balance = out.pixel_features, out.pair_net, out.pair_balance
    if feats is None or not isinstance(net, PairSimilarityNet) or not isinstance(balance, PairBalance):
        raise ValueError("pixel pairs need a SimFormerModel output (model.mask2former.simformer.pixel_pairs)")
    bsz, dim = feats.shape[:2]
    k = out.num_classes
    partners = pair_partners(base, novel, str(sim.pixel_pairs))
    part = host_to(torch.as_tensor(partners), feats.device)
    lab, padf = label.flatten(1).long(), pad.flatten(1)
    is_base = (lab >= 0) & (lab < k)
    flat = feats.flatten(2).float()  # the pair net runs in fp32 (the criterion runs outside autocast)

    def at(points: Tensor) -> Tensor:  # B x J flat indices -> B x J x D features
        return flat.gather(2, points[:, None, :].expand(-1, dim, -1)).transpose(1, 2)

    # One common base class per pair (the same for both of its images), drawn uniformly.
    chosen: dict[tuple[int, int], int | None] = {}
    pos = torch.empty_like(is_base)
    for i, j in enumerate(partners):
        key = (min(i, j), max(i, j))
        if key not in chosen:
            common = sorted(base[i] & base[j])
            # A host draw (Python's generator: seeded, and kept in checkpoints, by the engine).
            chosen[key] = common[random.randrange(len(common))] if common else None
        c = chosen[key]
        pos[i] = is_base[i] if c is None else lab[i] == c
    j_pts = sim.points
    points = torch.cat([sample_region_points(pos, int(j_pts * POS_FRACTION)),
                        sample_region_points(~padf & ~pos, int(j_pts * NEG_FRACTION))], dim=1)
    plab, pval, pf = lab.gather(1, points), is_base.gather(1, points), at(points)
    same = plab[:, :, None] == plab[part][:, None, :]
    valid = pval[:, :, None] | pval[part][:, None, :]
    prob = net(grid_pairs(pf, pf[part]).detach())  # BASE_DETACH: the pair loss trains the pair net only
    balance.update(same)
    pair = base_pair_loss(prob, same, valid, balance.weights())

    zero = out.pred_masks.sum() * 0.0
    weight = sim.distill_weight or 0.0
    which = [i for i in range(bsz) if novel[i] & novel[partners[i]]]
    if weight == 0.0 or not which:
        return pair, zero
    idx = host_to(torch.as_tensor(which), feats.device)
    dpts = sample_region_points(~is_base, j_pts)  # hidden novel, unlabelled and padded pixels
    df = at(dpts)
    with torch.no_grad():  # TEACH_DETACH: the teacher gives targets only
        teacher = net(grid_pairs(df[idx], df[part[idx]]))
    scores = novel_scores_at(out, dpts, host_to(novel_ids, feats.device))
    ref = scores[part[idx]] if sim.student_pairs == "cross" else scores[idx]
    student = F.cosine_similarity(scores[idx][:, :, None, :], ref[:, None, :, :], dim=-1).relu()
    return pair, distill_map(teacher, student, str(sim.distill_func)).mean()


# ---------------------------------------------------------------------------------------
# The criterion


class SimFormerCriterion:
    """`crit(out, batch) -> {"loss", "ce", "mask", "dice", "ml", "kept", "comp", "pair", "distill"}`.

    crit: the family's criterion (Mask2FormerCriterion or MaskFormerCriterion: its weights,
        mask terms, ml loss); novel_classes: the split's novel train ids; comp_weight:
        loss.weak_shot_comp_weight; sim: model.mask2former.simformer with resolved values.
    "ce" / "mask" / "dice" are the last layer's unweighted parts, "comp" its complementary loss
    before comp_weight (its mask terms carry the family's mask / dice weights, as the official
    "EQ" loss), "pair" / "distill" the unweighted pixel-pixel losses (0 without pixel pairs).
    """

    def __init__(self, crit: Mask2FormerCriterion, novel_classes: Sequence[int], comp_weight: float,
                 sim: SimFormerConfig) -> None:
        k = crit.num_classes
        if not novel_classes or any(not 0 <= c < k for c in novel_classes):
            raise UserError(f"data.novel_classes={list(novel_classes)}: need >= 1 train id in [0, {k})")
        self.crit, self.comp_weight, self.sim = crit, comp_weight, sim
        self.novel_ids = torch.as_tensor(sorted(novel_classes), dtype=torch.long)
        self.novel = np.zeros(k, dtype=bool)  # host data: read by the host's target table
        self.novel[sorted(novel_classes)] = True
        self.dense = isinstance(crit, MaskFormerCriterion)

    def _comp(self, masks: Tensor, novel: list[Tensor], notbase: Tensor) -> Tensor:
        """The complementary loss of the queries matched to novel targets (`novel`: per image
        their indices on the device)."""
        m = self.crit.m
        props = [masks[b].index_select(0, q) for b, q in enumerate(novel)]
        if self.dense:
            return complementary_dense(props, notbase, m.mask_weight, m.dice_weight)
        return complementary_points(props, notbase, m.train_num_points, m.oversample_ratio, m.importance_sample_ratio,
                                    m.mask_weight, m.dice_weight)

    def _step(self, logits: Tensor, masks: Tensor, targets: list[dict[str, Tensor]], num_masks: float,
              notbase: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(class CE, mask, dice, comp) of one prediction step."""
        device = logits.device
        pairs = weak_shot_match(self.crit, logits, masks, targets)  # on the host
        ce = self.crit.class_loss(logits, [(host_to(q, device), host_to(j, device)) for q, j in pairs], targets)
        # Split by the host's "has": mask terms on the base pairs only (a novel target has no
        # mask to learn from), the complementary loss on the novel ones.
        split = [(q, j, t["has"][j]) for (q, j), t in zip(pairs, targets, strict=True)]
        comp = self._comp(masks, [host_to(q[~h], device) for q, _, h in split], notbase)
        base = [(host_to(q[h], device), host_to(j[h], device)) for q, j, h in split]
        if sum(len(q) for q, _ in base) == 0:
            zero = masks.sum() * 0.0
            return ce, zero, zero, comp
        src = torch.cat([masks[b].index_select(0, q) for b, (q, _) in enumerate(base)])
        tgt = torch.cat([t["masks"].index_select(0, j.to(t["masks"].device)) for t, (_, j) in zip(targets, base)])
        return (ce, *self.crit._mask_losses(src, tgt, num_masks), comp)

    def __call__(self, out: Mask2FormerOutput, batch: dict) -> dict[str, Tensor]:
        crit, m = self.crit, self.crit.m
        k = crit.num_classes
        label, images = batch["label"], batch["image"]
        image_labels = batch.get("image_labels")
        if image_labels is None or tuple(image_labels.shape) != (label.shape[0], k):
            raise ValueError(f"a weak-shot batch carries image_labels of {label.shape[0]} x {k}")
        device = out.pred_masks.device
        h, w = out.image_size
        ph, pw = out.pred_masks.shape[-2] * 4 - h, out.pred_masks.shape[-1] * 4 - w
        if tuple(label.shape[-2:]) != (h, w):
            raise ValueError(f"labels are {tuple(label.shape[-2:])}, the input was {(h, w)}")
        lab = label.to(device).long()
        # The official rule, a target without pixels is novel, read from the host's table.
        ws = weak_shot_targets(lab, image_labels.to(device), self.novel)
        tgts = [{**t, "masks": F.pad(t["masks"], (0, pw, 0, ph))} for t in ws.targets]
        cols = column_targets(tgts, out.topk_index, out.valid if out.topk_index is not None else None, k)
        total_targets = sum(len(t["labels"]) for t in tgts)
        kept = sum(len(t["labels"]) for t in cols) / total_targets if total_targets else 1.0
        num_masks = crit._num_masks(sum(int(t["has"].sum()) for t in cols), device)
        # The loader marks the crop's padding; a batch built elsewhere gets it recovered from the image.
        pad = batch["pad"].to(device).bool() if "pad" in batch else loader_padding(images.to(device))
        # Not base: hidden novel and unlabelled pixels; the crop's and the model's padding are not.
        notbase = F.pad(((lab < 0) | (lab >= k)) & ~pad, (0, pw, 0, ph))

        steps = [(out.pred_logits, out.pred_masks)] + (out.aux[::-1] if m.deep_supervision else [])
        total = out.pred_logits.new_zeros((), dtype=torch.float32)
        parts: tuple[Tensor, Tensor, Tensor, Tensor] | None = None
        for logits, masks in steps:
            ce, mask, dice, comp = self._step(logits, masks, cols, num_masks, notbase)
            total = total + m.class_weight * ce + m.mask_weight * mask + m.dice_weight * dice + self.comp_weight * comp
            parts = parts or (ce, mask, dice, comp)
        assert parts is not None  # steps starts with the final prediction
        ml = total.new_zeros(())
        if out.ml_logits is not None:  # RankSeg: every class, novel ones included, from the image labels
            ml = crit.ml_loss(out.ml_logits, image_labels.to(out.ml_logits.device).float())
            total = total + crit.ml_weight * ml
        pair = distill = total.new_zeros(())
        if self.sim.pixel_pairs not in (None, "off"):
            if not isinstance(out, SimFormerOutput):
                raise ValueError("simformer.pixel_pairs needs the model built with it (a SimFormerModel)")
            small_lab = F.pad(lab, (0, pw, 0, ph), value=IGNORE)[:, ::4, ::4]  # nearest, as the official
            small_pad = F.pad(pad, (0, pw, 0, ph), value=True)[:, ::4, ::4]
            pair, distill = pixel_pair_losses(out, small_lab, small_pad, ws.base, ws.novel, self.novel_ids, self.sim)
            total = total + self.sim.pair_weight * pair + (self.sim.distill_weight or 0.0) * distill
        ce, mask, dice, comp = parts
        return {"loss": total, "ce": ce.detach(), "mask": mask.detach(), "dice": dice.detach(), "ml": ml.detach(),
                "kept": total.new_full((), kept), "comp": comp.detach(), "pair": pair.detach(),
                "distill": distill.detach()}
