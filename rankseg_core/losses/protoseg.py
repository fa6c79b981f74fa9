"""ProtoSeg's training step: online clustering, prototype momentum update, CE + PPC + PPD.

Per crop (ProtoSeg supplement Algorithm 1; released `HRNet_W48_Proto.prototype_learning` and
`loss_proto.py`), on the patch grid (labels resized there by nearest neighbour):
- for each class k present, Sinkhorn-Knopp (kappa = 0.05, 3 iterations) over the cosines of
  k's pixels to k's M prototypes gives every pixel of k one prototype m (argmax of the final Q);
- PPC = cross-entropy over all K*M raw cosines (unscaled, as the released code) with target
  k*M + m; PPD = mean over labelled pixels of (1 - cosine to the assigned prototype)^2;
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

from rankseg_core.config.model import PROTO_UPDATES
from rankseg_core.errors import UserError
from rankseg_core.losses.rankseg import SEG_NORMS, class_targets, seg_loss, selection_stats
from rankseg_core.model.protoseg import ProtoSegOutput
from rankseg_core.utils.distributed import all_reduce_mean

# The released code's hard Gumbel draw (F.gumbel_softmax tau) for update="gumbel".
GUMBEL_TAU = 0.5


def sinkhorn(cos: Tensor, eps: float = 0.05, iters: int = 3) -> Tensor:
    """Algorithm 1 on N pixels and M prototypes: cos N x M -> Q N x M, each pixel's row sums to 1
    (the paper's K x N L with columns summing to 1, transposed); prototypes get ~N/M mass each."""
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
    sum of their correct pixels; the others are kept."""
    q = onehot * correct[:, None].to(onehot.dtype)
    mean = F.normalize(q.t() @ emb.to(q.dtype), dim=-1)  # M x D
    moved = (q.sum(0) > 0)[:, None]
    new = torch.where(moved, gamma * protos + (1.0 - gamma) * mean.to(protos.dtype), protos)
    return F.normalize(new, dim=-1)


@torch.no_grad()
def assign_and_update(out: ProtoSegOutput, targets: Tensor, ignore_index: int, eps: float, iters: int, gamma: float,
                      update: str = "argmax") -> Tensor:
    """Cluster each present class's pixels to its prototypes and update the prototype buffer in place.

    targets: B*p patch labels in [0, K) or ignore_index (row-major as the embeddings)
    -> PPC targets B*p long: k*M + m, ignore_index where unlabelled.
    """
    assert out.embeddings is not None and out.proto_cos is not None and out.prototypes is not None
    protos = out.prototypes
    num, m, d = protos.shape
    emb = out.embeddings.detach().reshape(-1, d)
    cos = out.proto_cos.detach().reshape(emb.shape[0], num, m)
    pred = out.mask_logits.detach().argmax(1).flatten()
    ppc_target = torch.full_like(targets, ignore_index)
    new = protos.clone()
    for k in torch.unique(targets[targets != ignore_index]).tolist():
        sel = targets == k
        q = sinkhorn(cos[sel, k], eps, iters)
        index = q.argmax(1)
        ppc_target[sel] = index + k * m
        # The released code moves prototypes by a hard Gumbel draw from Q, which may disagree with
        # the argmax that the loss uses; "argmax" (our default) keeps loss and update consistent.
        onehot = F.one_hot(index, m).to(q.dtype) if update == "argmax" else F.gumbel_softmax(q, GUMBEL_TAU, hard=True)
        new[k] = momentum_update(protos[k], emb[sel], onehot, pred[sel] == k, gamma)
    # Under DDP every process updated from its own crops: the mean keeps the replicas identical.
    protos.copy_(F.normalize(all_reduce_mean(new), dim=-1))
    return ppc_target


@dataclass
class ProtoSegCriterion:
    """CE + ppc_weight * PPC + ppd_weight * PPD, logged as "seg" and "ml" (the prototype terms).

    Calling it in training mode updates the head's prototypes (the output's buffer) in place.
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

    def __post_init__(self) -> None:
        if self.seg_loss_norm not in SEG_NORMS:
            raise UserError(f"loss.seg_loss_norm={self.seg_loss_norm!r} is unknown; use one of {', '.join(SEG_NORMS)}")
        if self.update not in PROTO_UPDATES:
            raise UserError(f"model.protoseg.update={self.update!r} is unknown; use one of {', '.join(PROTO_UPDATES)}")

    def __call__(self, out: ProtoSegOutput, labels: Tensor) -> dict[str, Tensor]:
        """out: the ProtoSeg head's output (all K classes, class order); labels B x H x W."""
        if out.proto_cos is None or out.topk_index is not None:
            raise ValueError("ProtoSegCriterion needs the protoseg head's class-ordered output with prototype cosines")
        targets = class_targets(labels, self.num_classes, self.ignore_index)
        logits = F.interpolate(out.mask_logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        seg = seg_loss(logits, targets, self.ignore_index, self.seg_loss_norm, out.valid)
        # The released code resizes the labels to the feature grid by nearest neighbour.
        grid = F.interpolate(targets[:, None].float(), size=out.mask_logits.shape[-2:], mode="nearest")
        patch_targets = grid.long().flatten()
        ppc_target = assign_and_update(out, patch_targets, self.ignore_index, self.sinkhorn_eps, self.sinkhorn_iters,
                                       self.momentum, self.update)
        cos = out.proto_cos.reshape(patch_targets.shape[0], -1).float()  # B*p x K*M
        labelled = ppc_target != self.ignore_index
        if labelled.any():
            ppc = F.cross_entropy(cos[labelled], ppc_target[labelled])
            ppd = (1.0 - cos[labelled].gather(1, ppc_target[labelled, None])).pow(2).mean()
        else:  # no labelled patch: zero, still in the graph
            ppc = ppd = cos.sum() * 0.0
        proto = self.ppc_weight * ppc + self.ppd_weight * ppd
        stats = selection_stats(labels, None, self.num_classes, self.ignore_index)
        return {"loss": seg + proto, "seg": seg.detach(), "ml": proto.detach(), **stats}
