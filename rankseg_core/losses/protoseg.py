"""ProtoSeg's training step: online clustering, prototype momentum update, CE + PPC + PPD.

Per crop (ProtoSeg supplement Algorithm 1; released `HRNet_W48_Proto.prototype_learning` and
`loss_proto.py`), on the patch grid (labels resized there by nearest neighbour):
- for each class k present, Sinkhorn-Knopp (kappa = 0.05, 3 iterations) over the cosines of
  k's pixels to k's M prototypes gives every pixel of k one prototype m (argmax of the final Q);
- PPC = cross-entropy over all K*M raw cosines (unscaled, as the released code) with target
  k*M + m; PPD = mean over labelled pixels of (1 - cosine to the assigned prototype)^2; both
  computed in checkpointed chunks of pixels, so the B*p x K*M cosines never exist at once;
- RankSeg + prototypes (head rankproto): the bank is each image's top-kappa classes, PPC's target
  is rank(k)*M + m and pixels of unselected classes are left out of PPC / PPD; every present
  class is still clustered, and moves only from correctly predicted pixels;
- each prototype of k with at least one CORRECTLY predicted pixel of k assigned to it moves to
  gamma * old + (1 - gamma) * normalise(sum of those pixels' embeddings), then is re-normalised;
  under DDP the prototypes are then averaged over processes (and re-normalised).
loss = CE + ppc_weight * PPC + ppd_weight * PPD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from rankseg_core.config.model import PROTO_UPDATES
from rankseg_core.errors import UserError
from rankseg_core.losses.rankseg import (
    SEG_NORMS,
    RankSegCriterion,
    class_targets,
    rank_targets,
    seg_loss,
    selection_stats,
)
from rankseg_core.model.protoseg import ProtoSegOutput, bank_rows, chunk_pixels, cosines
from rankseg_core.utils.distributed import all_reduce_mean

# The released code's hard Gumbel draw (F.gumbel_softmax tau) for update="gumbel".
GUMBEL_TAU = 0.5


def sinkhorn(cos: Tensor, eps: float = 0.05, iters: int = 3) -> Tensor:
    """Algorithm 1 on N pixels and M prototypes: cos N x M -> Q N x M, each pixel's row sums to 1
    (the paper's K x N L with columns summing to 1, transposed); prototypes get ~N/M mass each.
    One class's form (`assign_per_class`); `assign_all_classes` runs it for every class at once."""
    n, m = cos.shape
    with torch.autocast(cos.device.type, enabled=False):
        # exp(c/eps) reaches e^20 at eps = 0.05: shifting by the max is a global factor that the
        # first normalisation (L /= sum L) removes exactly, and keeps float32 finite.
        x = cos.float() / eps
        q = torch.exp(x - x.max())
        q = q / q.sum()
        for _ in range(iters):
            q = q / q.sum(dim=0, keepdim=True) / m  # each prototype (the paper's rows) gets 1/M
            q = q / q.sum(dim=1, keepdim=True) / n  # each pixel (the paper's columns) gets 1/N
        return q * n


def momentum_update(protos: Tensor, emb: Tensor, onehot: Tensor, correct: Tensor, gamma: float) -> Tensor:
    """One class's update. protos M x D (unit), emb N x D, onehot N x M assignment, correct N bool
    -> M x D unit: prototypes with a correct pixel move to gamma * old + (1 - gamma) * normalised
    sum of their correct pixels; the others are kept. One class's form (`assign_per_class`);
    `assign_all_classes` makes it for every class at once."""
    q = onehot * correct[:, None].to(onehot.dtype)
    mean = F.normalize(q.t() @ emb.to(q.dtype), dim=-1)  # M x D
    moved = (q.sum(0) > 0)[:, None]
    new = torch.where(moved, gamma * protos + (1.0 - gamma) * mean.to(protos.dtype), protos)
    return F.normalize(new, dim=-1)


def _clustered(out: ProtoSegOutput) -> tuple[Tensor, Tensor, Tensor]:
    """What the clustering reads: the prototype buffer K x M x D, the embeddings B*p x D
    (detached) and each pixel's predicted class B*p (a selecting head's channel mapped to its
    class)."""
    assert out.embeddings is not None and out.prototypes is not None
    pred = out.mask_logits.detach().argmax(1).flatten(1)  # B x p channels
    if out.topk_index is not None:
        pred = out.topk_index.gather(1, pred)
    return out.prototypes, out.embeddings.detach().reshape(-1, out.prototypes.shape[-1]), pred.flatten()


@torch.no_grad()
def assign_per_class(out: ProtoSegOutput, targets: Tensor, ignore_index: int, eps: float, iters: int, gamma: float,
                     update: str = "argmax") -> Tensor:
    """`assign_and_update` as the released code's loop over the present classes (`sinkhorn` and
    `momentum_update` per class): what training runs on the CPU, and the reference that
    tests/test_protoseg.py checks `assign_all_classes` against. On an accelerator it would wait
    for the device a few times per class."""
    protos, emb, pred = _clustered(out)
    m = protos.shape[1]
    assigned = torch.full_like(targets, ignore_index)
    new = protos.clone()
    for k in torch.unique(targets[targets != ignore_index]).tolist():
        sel = targets == k
        q = sinkhorn(emb[sel] @ protos[k].t().to(emb.dtype), eps, iters)
        index = q.argmax(1)
        assigned[sel] = index
        onehot = F.one_hot(index, m).to(q.dtype) if update == "argmax" else F.gumbel_softmax(q, GUMBEL_TAU, hard=True)
        new[k] = momentum_update(protos[k], emb[sel], onehot, pred[sel] == k, gamma)
    protos.copy_(F.normalize(all_reduce_mean(new), dim=-1))
    return assigned


# Values (pixels x M x D) per chunk when gathering each pixel's own class's M prototypes.
OWN_PROTOTYPES_CHUNK = 1 << 22


def _own_cosines(emb: Tensor, protos: Tensor, cls: Tensor) -> Tensor:
    """emb N x D, protos K x M x D, cls N in [0, K) -> N x M: each pixel's cosines to its own
    class's prototypes, in chunks of pixels (the N x M x D gather never exists whole)."""
    m, d = protos.shape[1], protos.shape[2]
    if emb.shape[0] == 0:
        return emb.new_zeros(0, m)
    step = max(1, OWN_PROTOTYPES_CHUNK // (m * d))
    return torch.cat([torch.bmm(protos[c].to(e.dtype), e[:, :, None])[:, :, 0]
                      for e, c in zip(emb.split(step), cls.split(step), strict=True)])


@torch.no_grad()
def assign_and_update(out: ProtoSegOutput, targets: Tensor, ignore_index: int, eps: float, iters: int, gamma: float,
                      update: str = "argmax") -> Tensor:
    """Cluster each present class's pixels to its prototypes and update the prototype buffer in place.

    targets: B*p patch labels in [0, K) or ignore_index (row-major as the embeddings)
    -> B*p long: the prototype m in [0, M) each labelled pixel is assigned to, ignore_index elsewhere.
    A pixel is correct when the head's prediction (its class for a selecting head) is its label.

    On an accelerator every class at once (`assign_all_classes`: nothing read on the host); on
    the CPU, where a host read costs nothing, the loop over the present classes
    (`assign_per_class`), which touches only their prototypes: up to 3x faster there at D = 768
    (docs/benchmarks.md "Prototype heads"). The two give the same result (to float rounding).
    """
    assert out.embeddings is not None
    fn = assign_per_class if out.embeddings.device.type == "cpu" else assign_all_classes
    return fn(out, targets, ignore_index, eps, iters, gamma, update)


@torch.no_grad()
def assign_all_classes(out: ProtoSegOutput, targets: Tensor, ignore_index: int, eps: float, iters: int,
                       gamma: float, update: str = "argmax") -> Tensor:
    """`assign_and_update` for every class at once: `sinkhorn` on each class's own pixels, with
    its sums over a class's pixels made as sums per class (index_add over the class of each
    pixel; ignored pixels go to a spare class K), and the momentum update of every (class,
    prototype) from sums likewise. A fixed number of device operations and nothing read on the
    host, where the loop over the classes waits for the device a few times per class and step;
    the same assignment and prototypes as `assign_per_class` (tests/test_protoseg.py)."""
    protos, emb, pred = _clustered(out)
    num, m, d = protos.shape
    labelled = targets != ignore_index
    slot = torch.where(labelled, targets, num)  # the class of each pixel; ignored: the spare K
    with torch.autocast(emb.device.type, enabled=False):
        # Only each pixel's own class's cosines: never the B*p x K*M matrix.
        x = _own_cosines(emb, protos, torch.where(labelled, targets, 0)).float() / eps
        x = x.masked_fill(~labelled[:, None], 0.0)  # (finite in the spare class)

        def per_class(v: Tensor) -> Tensor:  # sums over each class's pixels: (K+1) x v.shape[1:]
            return v.new_zeros(num + 1, *v.shape[1:]).index_add_(0, slot, v)

        # sinkhorn per class: its max shift (a per-class factor that the first normalisation
        # removes) and its sums are per-class sums here.
        shift = x.new_full((num + 1,), float("-inf")).scatter_reduce(0, slot, x.amax(1), "amax")
        q = torch.exp(x - shift[slot, None])
        q = q / per_class(q.sum(1))[slot, None]
        n = per_class(torch.ones_like(x[:, 0]))[slot, None]  # N_k of each pixel's class
        for _ in range(iters):
            q = q / per_class(q)[slot] / m  # each prototype of a class gets 1/M
            q = q / q.sum(dim=1, keepdim=True) / n  # each pixel gets 1/N_k
        q = q * n
    index = q.argmax(1)
    assigned = torch.where(labelled, index, torch.full_like(targets, ignore_index))
    # The released code moves prototypes by a hard Gumbel draw from Q, which may disagree with
    # the argmax that the loss uses; "argmax" (our default) keeps loss and update consistent.
    chosen = index if update == "argmax" else F.gumbel_softmax(q, GUMBEL_TAU, hard=True).argmax(1)
    # momentum_update of every (class, prototype) at once, from its correctly predicted pixels
    # (float32 sums, as the per-class product with the float32 assignment).
    correct = (labelled & (pred == targets)).float()
    rows = slot * m + chosen
    sums = q.new_zeros((num + 1) * m, d).index_add_(0, rows, emb.float() * correct[:, None])[: num * m]
    hits = q.new_zeros((num + 1) * m).index_add_(0, rows, correct)[: num * m]
    mean = F.normalize(sums.view(num, m, d), dim=-1).to(protos.dtype)
    moved = (hits.view(num, m) > 0)[..., None]
    new = F.normalize(torch.where(moved, gamma * protos + (1.0 - gamma) * mean, protos), dim=-1)
    # Under DDP every process updated from its own crops: the mean keeps the replicas identical.
    protos.copy_(F.normalize(all_reduce_mean(new), dim=-1))
    return assigned


def _ppc_sum(emb: Tensor, bank: Tensor, target: Tensor) -> Tensor:
    logits = cosines(emb, bank).float()  # B x n x C*M, unscaled (the released PPC)
    return F.cross_entropy(logits.flatten(0, 1), target.flatten(), ignore_index=-1, reduction="sum")


def ppc_loss(emb: Tensor, bank: Tensor, target: Tensor) -> Tensor:
    """Pixel-prototype contrast: emb B x p x D, bank 1|B x C x M x D, target B x p in [0, C*M) or -1
    -> mean cross-entropy over the labelled pixels of their C*M raw cosines (0 without any).
    Chunked and checkpointed like `max_cosine`: memory stays at one chunk's cosines. Every chunk
    is computed (one without labelled pixels adds 0): skipping it would read the targets on the
    host, a wait for the device every step."""
    n = chunk_pixels(emb.shape[0], bank.shape[1], bank.shape[2], emb.shape[1])
    total = emb.new_zeros((), dtype=torch.float32)
    for e, t in zip(emb.split(n, dim=1), target.split(n, dim=1), strict=True):
        total = total + (checkpoint(_ppc_sum, e, bank, t, use_reentrant=False) if e.requires_grad
                         else _ppc_sum(e, bank, t))
    return total / (target >= 0).sum().clamp_min(1)


def ppd_loss(emb: Tensor, bank: Tensor, target: Tensor) -> Tensor:
    """Pixel-prototype distance: mean over labelled pixels of (1 - cos to the assigned prototype)^2
    (0 without any). emb B x p x D, bank 1|B x C x M x D, target B x p in [0, C*M) or -1."""
    b, p, d = emb.shape
    flat = bank_rows(bank).expand(b, -1, -1)
    labelled = (target >= 0).float()
    # Every pixel's assigned prototype (unlabelled pixels: row 0, weighted 0): no selection of the
    # labelled pixels, whose count the host would have to wait for.
    rows = flat.gather(1, target.clamp_min(0)[..., None].expand(-1, -1, d))
    cos = (emb * rows.to(emb.dtype)).sum(-1).float()
    return ((1.0 - cos).pow(2) * labelled).sum() / labelled.sum().clamp_min(1)


def prototype_targets(out: ProtoSegOutput, labels: Tensor, num_classes: int, ignore_index: int, eps: float,
                      iters: int, gamma: float, update: str) -> Tensor:
    """The prototype each patch must score highest (B x p, in the output bank's C*M columns, -1 =
    none), after clustering and updating the prototypes. Labels (B x H x W) are resized to the
    patch grid by nearest neighbour, as the released code. A selecting head's pixels of classes
    outside the image's selection get -1: PPC contrasts only the selected classes' prototypes."""
    b, _, h, w = out.mask_logits.shape
    targets = class_targets(labels, num_classes, ignore_index)
    grid = F.interpolate(targets[:, None].float(), size=(h, w), mode="nearest").long().reshape(b, h * w)
    assigned = assign_and_update(out, grid.flatten(), ignore_index, eps, iters, gamma, update).reshape(b, h * w)
    m = out.prototypes.shape[1] if out.prototypes is not None else 1
    column = grid if out.topk_index is None else rank_targets(grid, out.topk_index, num_classes, ignore_index,
                                                              out.valid)
    ok = (column != ignore_index) & (assigned != ignore_index)
    return torch.where(ok, column * m + assigned, torch.full_like(column, -1))


@dataclass
class ProtoSegCriterion:
    """CE + ppc_weight * PPC + ppd_weight * PPD, logged as "seg" and "ml" (the prototype terms).

    With `ranking` (head rankproto), the CE and the multi-label loss are RankSeg's (`RankSegCriterion`
    over the selected classes in rank order; logged "seg" and "ml") and the prototype terms are
    added to "loss" only. Calling it updates the head's prototypes (the output's buffer) in place.
    """

    num_classes: int
    ignore_index: int
    ppc_weight: float = 0.01
    ppd_weight: float = 0.01
    sinkhorn_eps: float = 0.05
    sinkhorn_iters: int = 3
    momentum: float = 0.999
    update: str = "argmax"
    seg_loss_norm: str = "official"
    ranking: RankSegCriterion | None = None

    def __post_init__(self) -> None:
        if self.seg_loss_norm not in SEG_NORMS:
            raise UserError(f"loss.seg_loss_norm={self.seg_loss_norm!r} is unknown; use one of {', '.join(SEG_NORMS)}")
        if self.update not in PROTO_UPDATES:
            raise UserError(f"model.protoseg.update={self.update!r} is unknown; use one of {', '.join(PROTO_UPDATES)}")

    def prototype_loss(self, out: ProtoSegOutput, labels: Tensor) -> Tensor:
        """ppc_weight * PPC + ppd_weight * PPD (clusters and updates the prototypes first)."""
        if out.embeddings is None or out.bank is None:
            raise ValueError("ProtoSegCriterion needs the prototype head's output (embeddings and prototype bank)")
        target = prototype_targets(out, labels, self.num_classes, self.ignore_index, self.sinkhorn_eps,
                                   self.sinkhorn_iters, self.momentum, self.update)
        ppc = ppc_loss(out.embeddings, out.bank, target)
        ppd = ppd_loss(out.embeddings, out.bank, target)
        return self.ppc_weight * ppc + self.ppd_weight * ppd

    def __call__(self, out: ProtoSegOutput, labels: Tensor) -> dict[str, Tensor]:
        """out: the prototype head's output; labels B x H x W."""
        proto = self.prototype_loss(out, labels)
        if self.ranking is not None:
            losses = self.ranking(out, labels)
            return {**losses, "loss": losses["loss"] + proto}
        if out.topk_index is not None:
            raise ValueError("a selecting prototype head needs ProtoSegCriterion(ranking=RankSegCriterion(...))")
        targets = class_targets(labels, self.num_classes, self.ignore_index)
        logits = F.interpolate(out.mask_logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        seg = seg_loss(logits, targets, self.ignore_index, self.seg_loss_norm, out.valid)
        stats = selection_stats(labels, None, self.num_classes, self.ignore_index)
        return {"loss": seg + proto, "seg": seg.detach(), "ml": proto.detach(), **stats}
