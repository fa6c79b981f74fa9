"""Model configuration: one dataclass for every family (`model.*`), validated in `build_*`.

Which names `model.model` takes, and what each family allows of the rest, is the families'
knowledge (rankseg_core/families/).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from rankseg_core.config.convseg import ConvSegConfig
from rankseg_core.config.mask2former import Mask2FormerConfig
from rankseg_core.errors import UserError

# Every head any family builds; which family builds which is the family's `heads`
# ("encnet" / "essnet": the supplement's Table 1 comparisons, on the Segmenter decoder only).
HEADS = ("segmenter", "rankseg", "encnet", "essnet", "protoseg", "rankproto")
# Heads with RankSeg's multi-label branch and top-kappa selection ("rankproto": RankSeg + ProtoSeg's prototypes).
RANKING_HEADS = ("rankseg", "rankproto")
PROTO_UPDATES = ("argmax", "gumbel")
ESS_LOGITS = ("distance", "layernorm")
ESS_CANDIDATES = ("distinct", "official")
TAUS = ("rank", "shared")
ML_HEADS = ("tranenc", "trandec", "gap")
PATCH_SIZE = 16


@dataclass
class SelectorConfig:
    """The frozen classifier run whose top-kappa select a segmenter's classes (independent
    scheme, docs/method.md sec. 6). The user sets `run`; `rankseg_core.engine.selector.resolve_selector`
    fills the rest from that run when training starts, so config.yaml says exactly which
    weights were used and a changed selector is refused (on resume, eval, predict)."""

    run: str | None = None  # classifier run directory (absolute once resolved); None = no selector
    weights: str = "final"  # final | best | last | a file; resolved to the absolute file
    sha256: str | None = None  # content digest of those weights (integrity.content_digest)
    model: str | None = None  # the classifier's model.model, e.g. classifier-vitb
    img_size: int | None = None  # its training crop (the size of its stored position embeddings)
    in_chans: int | None = None


@dataclass
class EncNetConfig:
    """EncNet on Segmenter (`model.head=encnet`, supplement Table 1; docs/architectures.md)."""

    codewords: int = 64  # visual code-words; the supplement tuned 64 (mmseg's EncHead default is 32)
    se_weight: float = 0.2  # SE-loss weight, mmseg's loss_se_decode (image-level presence BCE)

    def validate(self) -> None:
        if self.codewords < 1:
            raise UserError(f"model.encnet.codewords={self.codewords} must be >= 1 (the supplement uses 64)")
        if self.se_weight < 0:
            raise UserError(f"model.encnet.se_weight={self.se_weight} must be >= 0 (mmseg uses 0.2)")


@dataclass
class EssNetConfig:
    """ESSNet on Segmenter (`model.head=essnet`, supplement Table 1, 3, 4; docs/architectures.md)."""

    dim: int = 64  # semantic-space dimension d (Table 4 sweeps 16..128)
    k: int | None = None  # nearest class embeddings per pixel in the loss; None = model.kappa (k = kappa)
    temperature: float = 20.0  # T in the logits -T * distance (ESSNet's --temp)
    margin: float = 0.2  # hinge on each class's nearest other class embedding; 0 = no regulariser
    logits: str = "distance"  # distance: -T * ||p - c|| (ESSNet); layernorm: LayerNorm(K) of cosines (RankSeg fork)
    candidates: str = "distinct"  # distinct: target + k nearest others; official: a neighbour equal to the target -> target - 1

    def validate(self) -> None:
        if self.dim < 1:
            raise UserError(f"model.essnet.dim={self.dim} must be >= 1 (the supplement uses 64)")
        if self.k is not None and self.k < 1:
            raise UserError(f"model.essnet.k={self.k} must be >= 1, or null to use model.kappa")
        if not self.temperature > 0:
            raise UserError(f"model.essnet.temperature={self.temperature} must be > 0 (ESSNet uses 20)")
        if self.margin < 0:
            raise UserError(f"model.essnet.margin={self.margin} must be >= 0 (ESSNet uses 0.2; 0 = off)")
        if self.logits not in ESS_LOGITS:
            raise UserError(f"model.essnet.logits={self.logits!r} is unknown; use one of {', '.join(ESS_LOGITS)}")
        if self.candidates not in ESS_CANDIDATES:
            raise UserError(f"model.essnet.candidates={self.candidates!r} is unknown; use one of "
                            f"{', '.join(ESS_CANDIDATES)}")


@dataclass
class ProtoSegConfig:
    """ProtoSeg's prototypes on Segmenter (`model.head=protoseg` / `rankproto`, issue 20; model/protoseg.py)."""

    prototypes: int = 10  # M non-learnable prototypes per class (ProtoSeg's num_prototype)
    sinkhorn_eps: float = 0.05  # kappa of Algorithm 1: the entropy weight, exp(cos / kappa)
    sinkhorn_iters: int = 3  # Sinkhorn-Knopp iterations of Algorithm 1
    momentum: float = 0.999  # gamma: prototype <- gamma * prototype + (1 - gamma) * new mean
    ppc_weight: float = 0.01  # lambda1, pixel-prototype contrast (paper and released config)
    ppd_weight: float = 0.01  # lambda2, pixel-prototype distance (paper 0.01; released config 0.001)
    update: str = "argmax"  # argmax: the loss's assignment; gumbel: the released code's hard Gumbel draw

    def validate(self) -> None:
        if self.prototypes < 1:
            raise UserError(f"model.protoseg.prototypes={self.prototypes} must be >= 1 (ProtoSeg uses 10)")
        if not self.sinkhorn_eps > 0:
            raise UserError(f"model.protoseg.sinkhorn_eps={self.sinkhorn_eps} must be > 0 (ProtoSeg uses 0.05)")
        if self.sinkhorn_iters < 1:
            raise UserError(f"model.protoseg.sinkhorn_iters={self.sinkhorn_iters} must be >= 1 (ProtoSeg uses 3)")
        if not 0.0 <= self.momentum <= 1.0:
            raise UserError(f"model.protoseg.momentum={self.momentum} must be in [0, 1] (ProtoSeg uses 0.999)")
        if self.ppc_weight < 0 or self.ppd_weight < 0:
            raise UserError("model.protoseg.ppc_weight and model.protoseg.ppd_weight must be >= 0 (ProtoSeg: 0.01)")
        if self.update not in PROTO_UPDATES:
            raise UserError(f"model.protoseg.update={self.update!r} is unknown; use one of {', '.join(PROTO_UPDATES)}")


@dataclass
class ModelConfig:
    """Segmenter / RankSeg model options (docs/method.md sections 1-3, 7)."""

    model: str = "segmenter-vitt"  # segmenter-vit{t,s,b,l}; ViT-B is the paper's main model
    num_classes: int = 150  # K, the complete label set
    img_size: int = 512  # training crop; the pos-embed is built for this grid
    head: str = "rankseg"  # "segmenter" = baseline over all K; "rankseg" = ml branch + top-kappa
    kappa: int = 100  # selected classes; clamped to num_classes (kappa = K: sort only)
    select: bool = True  # False = "+MT" ablation: ml loss only, pixels over all K in class order
    tau: str = "rank"  # "rank": per-rank gamma/beta (RA); "shared": one scalar gamma/beta (+MT+LS)
    ml_head: str = "tranenc"  # multi-label head xi (Table 6); tranenc is the paper's default
    oracle: bool = False  # GT (train+eval): select the image's GT classes, no ml branch
    clip_len: int = 1  # video: T consecutive frames share one ml prediction and top-kappa
    drop_path: float = 0.1  # backbone stochastic depth (the decoder uses none, as in mmseg)
    dropout: float = 0.1  # decoder attention / MLP dropout
    decoder_depth: int = 2  # Segmenter decoder blocks; the tranenc ml block comes on top
    backbone_weights: str | None = None  # local .pth/.bin/.npz/.safetensors (detectron2: .pkl); never downloaded
    in_chans: int = 3
    # Mask2Former family only (head / kappa / select / tau / oracle keep their meaning there).
    mask2former: Mask2FormerConfig = field(default_factory=Mask2FormerConfig)
    # DeepLabv3 / UperNet families only (families/convseg.py).
    convseg: ConvSegConfig = field(default_factory=ConvSegConfig)
    # Segmenter family: selection by a frozen classifier run instead of an own ml branch.
    selector: SelectorConfig = field(default_factory=SelectorConfig)
    # Segmenter family, the supplement's comparison heads (head=encnet / essnet).
    encnet: EncNetConfig = field(default_factory=EncNetConfig)
    essnet: EssNetConfig = field(default_factory=EssNetConfig)
    protoseg: ProtoSegConfig = field(default_factory=ProtoSegConfig)  # head=protoseg / rankproto (issue 20)

    @property
    def has_selector(self) -> bool:
        """A segmenter whose top-kappa come from a frozen classifier run (no ml branch)."""
        return bool(self.selector.run)

    @property
    def effective_kappa(self) -> int:
        """kappa clamped to K (the size of the rank-adaptive LayerNorm when selecting)."""
        return max(1, min(self.kappa, self.num_classes))

    def validate(self) -> None:
        """Raise `UserError` naming the first bad option and how to fix it."""
        if self.head not in HEADS:
            raise UserError(f"model.head={self.head!r} is unknown; use one of {', '.join(HEADS)}")
        if self.tau not in TAUS:
            raise UserError(f"model.tau={self.tau!r} is unknown; use one of {', '.join(TAUS)}")
        if self.ml_head not in ML_HEADS:
            raise UserError(f"model.ml_head={self.ml_head!r} is unknown; use one of {', '.join(ML_HEADS)}")
        if self.num_classes < 1:
            raise UserError(f"model.num_classes={self.num_classes} must be >= 1")
        if self.kappa < 1:
            raise UserError(f"model.kappa={self.kappa} must be >= 1 (it is clamped to num_classes)")
        if self.img_size < PATCH_SIZE or self.img_size % PATCH_SIZE:
            raise UserError(f"model.img_size={self.img_size} must be a positive multiple of {PATCH_SIZE}")
        if self.clip_len < 1:
            raise UserError(f"model.clip_len={self.clip_len} must be >= 1")
        if self.decoder_depth < 1:
            raise UserError(f"model.decoder_depth={self.decoder_depth} must be >= 1")
        if not 0.0 <= self.drop_path < 1.0 or not 0.0 <= self.dropout < 1.0:
            raise UserError("model.drop_path and model.dropout must be in [0, 1)")
        if self.in_chans < 1:
            raise UserError(f"model.in_chans={self.in_chans} must be >= 1")
        if self.has_selector and self.selector.img_size is not None and (
                self.selector.img_size < PATCH_SIZE or self.selector.img_size % PATCH_SIZE):
            raise UserError(f"model.selector.img_size={self.selector.img_size} must be a positive multiple of "
                            f"{PATCH_SIZE}")
        self.encnet.validate()
        self.essnet.validate()
        self.protoseg.validate()
