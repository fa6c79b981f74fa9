"""ESSNet's semantic-space head on the Segmenter decoder (supplement Table 1, 3, 4, `model.head=essnet`).

ESSNet (Jain et al., ICCV 2021, shipra25jain/ESSNet) classifies a pixel by its nearest class
embedding in a d-dim semantic space. On Segmenter, as the RankSeg fork's
`MaskTransformerNNCEESSNetHead` builds it, the decoder is the baseline's and only the two final
projections change: `proj_patch` / `proj_classes` map D -> d (64) instead of D -> D, so the
pixel embeddings (B x p x d) and the K class embeddings (B x K x d, refined per image by the
decoder's attention) live in the d-dim space, both L2-normalised.

Logits (`model.essnet.logits`):
- "distance" (default, ESSNet's): -T * ||p - c|| for every class (T = 20); no LayerNorm(K).
  Their argmax is the 1-NN class; training ranks the same logits for the k nearest.
- "layernorm" (the fork's head): LayerNorm(K) over the cosines p . c, as the Segmenter baseline.

Every forward returns all K classes in class order (`topk_index` None), so the engine's dense
inference and the GT (eval) oracle work unchanged; the k-nearest-neighbour selection exists
only in the training loss (losses/essnet.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rankseg_core.config.model import ModelConfig
from rankseg_core.model.heads import FILL_LOGIT, MaskTransformerHead, SegOutput
from rankseg_core.model.selection import NO_SELECTION, Selection, allowed_classes, resolve_override

# Floor of a squared distance before the square root: the root's gradient is unbounded at 0,
# and the clamp gives coinciding embeddings ESSNet's torch.norm subgradient (0) instead.
MIN_SQUARED_DISTANCE = 1e-12


@dataclass
class EssNetOutput(SegOutput):
    """`SegOutput` plus class_emb: B x K x d L2-normalised class embeddings of each image (the
    margin regulariser's input); None only for outputs built elsewhere."""

    class_emb: Tensor | None = None


def pairwise_distance(a: Tensor, b: Tensor) -> Tensor:
    """Euclidean distances B x N x M between the rows of a (B x N x d) and b (B x M x d).

    ||a - b||^2 = ||a||^2 + ||b||^2 - 2 a.b: one matmul, no B x N x M x d difference tensor
    (at K = 1,284 classes the output is the only K-sized tensor). Computed in float32 (or
    wider) even under autocast: in half precision the cancellation leaves errors of ~0.1 near 0.
    """
    with torch.autocast(a.device.type, enabled=False):
        dtype = torch.promote_types(a.dtype, torch.float32)
        a, b = a.to(dtype), b.to(dtype)
        sq = (a * a).sum(-1)[:, :, None] + (b * b).sum(-1)[:, None, :] - 2.0 * a @ b.transpose(1, 2)
        return sq.clamp_min(MIN_SQUARED_DISTANCE).sqrt()


class EssNetHead(MaskTransformerHead):
    """Segmenter decoder -> d-dim pixel and class embeddings -> logits over all K classes."""

    def __init__(self, cfg: ModelConfig, embed_dim: int) -> None:
        super().__init__(cfg, embed_dim)  # head "essnet" builds the baseline decoder (no ml branch)
        d, e = embed_dim, cfg.essnet.dim
        # The fork's D x d projections (no bias), at the baseline's init scale D^-0.5.
        self.proj_patch = nn.Parameter(d**-0.5 * torch.randn(d, e))
        self.proj_classes = nn.Parameter(d**-0.5 * torch.randn(d, e))
        self.logits_mode = cfg.essnet.logits
        self.temperature = cfg.essnet.temperature
        if self.logits_mode == "distance":
            del self.mask_norm  # -T * distance has no LayerNorm(K): no parameter may sit unused

    def embed(self, feats: Tensor) -> tuple[Tensor, Tensor]:
        """feats B x D x h x w -> (pixel embeddings B x p x d, class embeddings B x K x d), unit rows."""
        patches = self.proj_dec(feats.flatten(2).transpose(1, 2))  # B x p x D
        x_pix, x_cls = self.decoder_tokens(patches, self.cls_emb.expand(feats.shape[0], -1, -1))
        return F.normalize(x_pix @ self.proj_patch, dim=-1), F.normalize(x_cls @ self.proj_classes, dim=-1)

    def forward(self, feats: Tensor, selection: Selection = NO_SELECTION, *, clip_len: int = 1,
                selector_logits: Tensor | None = None) -> EssNetOutput:
        """feats B x D x h x w -> EssNetOutput: mask_logits B x K x h x w in class order, class_emb.

        selection: only `override` (GT eval) is honoured: classes outside it get FILL_LOGIT.
        """
        if clip_len != 1 or selector_logits is not None:
            raise ValueError("the ESSNet head segments single images and takes no selector")
        b, _, h, w = feats.shape
        pix, cls = self.embed(feats)
        if self.logits_mode == "distance":
            logits = -self.temperature * pairwise_distance(pix, cls)  # B x p x K
        else:
            logits = self.mask_norm(pix @ cls.transpose(1, 2))
        valid = None
        override = resolve_override(selection, False, None, b)
        if override is not None:  # GT (eval): restrict the argmax, as the class-ordered baseline does
            valid = allowed_classes(override, self.num_classes, feats.device)
            logits = logits.masked_fill(~valid[:, None, :], FILL_LOGIT)
        mask_logits = logits.transpose(1, 2).reshape(b, self.num_classes, h, w).contiguous()
        return EssNetOutput(mask_logits=mask_logits, valid=valid, class_emb=cls)
