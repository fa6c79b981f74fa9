"""Dense conv-decoder segmentation models: backbone -> decode head -> pixel classifier.

DeepLabv3 (dilated ResNetV1c + ASPP) and UperNet (Swin / BEiT pyramid + UperHead), each with
mmseg's baseline classifier (Dropout2d + 1x1 conv over K) or RankSeg's (classifier.py), and
mmseg's auxiliary FCNHead on the stage-3 map for training; or ProtoSeg's prototype classifier
(`protoseg`, `rankproto`: prototypes.py). `forward(images, selection)` returns a
`ConvSegOutput` (`ConvProtoSegOutput` for the prototype heads): the classifier's logits at the decoder's resolution (1/8 for DeepLabv3,
1/4 for UperNet), which the RankSeg criterion and `inference.predict_probs` read like any
`SegOutput`, plus the auxiliary logits in training mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch.nn.functional as F
from torch import Tensor, nn

from rankseg_core.config.convseg import ConvSegConfig
from rankseg_core.config.model import ModelConfig
from rankseg_core.model.convseg.aspp import ASPPHead
from rankseg_core.model.convseg.classifier import LinearClassifier, MultiLabelEncoder, RankSegClassifier
from rankseg_core.model.convseg.fcn_aux import FCNHead
from rankseg_core.model.convseg.prototypes import PrototypeClassifier
from rankseg_core.model.convseg.resnet import ResNetPyramid, load_resnet_weights
from rankseg_core.model.convseg.swin_pyramid import SwinPyramid, load_swin_pyramid_weights
from rankseg_core.model.convseg.upernet import UperHead
from rankseg_core.model.convseg.vit_pyramid import BeitPyramid, load_beit_pyramid_weights
from rankseg_core.model.heads import SegOutput
from rankseg_core.model.protoseg import PROTOTYPE_HEADS, ProtoSegOutput
from rankseg_core.model.selection import NO_SELECTION, Selection

DECODERS = ("aspp", "upernet")
AUX_INDEX = 2  # mmseg's auxiliary_head in_index: the stage-3 map


@dataclass
class ConvSegOutput(SegOutput):
    """A `SegOutput` (mask_logits B x C x h x w at the decoder's resolution, topk_index,
    ml_logits, valid) plus the auxiliary head's K logits B x K x h3 x w3 at the stage-3 map's
    resolution (1/8 in the dilated ResNet, 1/16 in Swin / BEiT; training only)."""

    aux_logits: Tensor | None = None


@dataclass
class ConvProtoSegOutput(ConvSegOutput, ProtoSegOutput):
    """The prototype heads' output (model/convseg/prototypes.py): a `ProtoSegOutput` (embeddings
    B x hw x C at the decoder's resolution, bank, prototypes) with the auxiliary logits."""


class Pyramid(Protocol):
    """What a backbone of this model provides (resnet.py, and the Swin / BEiT pyramids)."""

    channels: list[int]
    strides: list[int]

    def __call__(self, images: Tensor) -> list[Tensor]: ...

    def data_config(self) -> dict: ...


@dataclass(frozen=True)
class ConvSegSpec:
    """The architecture of a model name: the kind of its backbone ("resnet", "swin", "beit"),
    the timm architecture `arch` (built with `backbone_kwargs` on top) and its decode head
    ("aspp" or "upernet")."""

    backbone: str
    arch: str
    decoder: str
    backbone_kwargs: tuple[tuple[str, Any], ...] = ()


def _resolved(c: ConvSegConfig) -> dict[str, Any]:
    """The options the model needs, which must hold values (the family fills the Nones)."""
    need = ("channels", "aux_channels", "ml_dim", "ml_pool", "ml_own_embedding", "backbone_drop_path")
    missing = [n for n in need if getattr(c, n) is None]
    if missing:
        raise ValueError(f"model.convseg.{missing[0]} is None: resolve the official values first (the family does)")
    return {n: getattr(c, n) for n in need}


def build_backbone(spec: ConvSegSpec, cfg: ModelConfig) -> nn.Module:
    """The feature pyramid of `spec` (pretrained=False; weights come later from a local file)."""
    kw = dict(spec.backbone_kwargs)
    drop_path = float(cast(float, cfg.convseg.backbone_drop_path))
    if spec.backbone == "resnet":
        return ResNetPyramid(spec.arch, cfg.in_chans)
    if spec.backbone == "swin":
        return SwinPyramid(spec.arch, drop_path=drop_path, in_chans=cfg.in_chans)
    if spec.backbone == "beit":
        # A BEiT's relative position tables are built for one grid: the training crop's.
        return BeitPyramid(spec.arch, img_size=cfg.img_size, drop_path=drop_path, in_chans=cfg.in_chans, **kw)
    raise ValueError(f"unknown backbone kind {spec.backbone!r}")


def load_backbone(backbone: nn.Module, path: str) -> tuple[list[str], list[str]]:
    """Local weights (timm or mmseg layout) into a pyramid of this module -> (missing, unexpected)."""
    if isinstance(backbone, ResNetPyramid):
        return load_resnet_weights(backbone, path)
    if isinstance(backbone, SwinPyramid):
        return load_swin_pyramid_weights(backbone, path)
    if isinstance(backbone, BeitPyramid):
        return load_beit_pyramid_weights(backbone, path)
    raise ValueError(f"no weight loader for {type(backbone).__name__}")


def build_decoder(spec: ConvSegSpec, cfg: ConvSegConfig, channels: list[int]) -> nn.Module:
    """The decode head: pixel embeddings B x cfg.channels x h x w from the pyramid."""
    width = int(cast(int, cfg.channels))
    if spec.decoder == "aspp":
        return ASPPHead(channels[-1], width, tuple(cfg.aspp_dilations))
    if spec.decoder == "upernet":
        return UperHead(channels, width, tuple(cfg.pool_scales))
    raise ValueError(f"unknown decoder {spec.decoder!r}; use one of {', '.join(DECODERS)}")


class ConvSegModel(nn.Module):
    """`forward_features` (backbone pyramid) -> `forward_head` (decoder, classifier, aux), as timm.

    Submodules: `backbone`, `decode_head`, `classifier` (`conv_seg` for the baseline; for
    RankSeg `ml_head`, `cls_emb`, `cls_bias`, `norm`), `auxiliary_head` (None with aux_weight 0).
    """

    def __init__(self, cfg: ModelConfig, spec: ConvSegSpec) -> None:
        super().__init__()
        c = cfg.convseg
        r = _resolved(c)
        self.cfg, self.spec = cfg, spec
        self.backbone = build_backbone(spec, cfg)
        chans = cast(Pyramid, self.backbone).channels
        self.decode_head = build_decoder(spec, c, chans)
        k = cfg.num_classes
        self.classifier: LinearClassifier | RankSegClassifier | PrototypeClassifier
        if cfg.head == "segmenter":
            self.classifier = LinearClassifier(r["channels"], k, c.dropout)
        elif cfg.head in PROTOTYPE_HEADS:
            # rankproto's ml branch has class tokens of its own: prototypes are no class embeddings to share.
            ml = MultiLabelEncoder(chans[-1], r["ml_dim"], k, cfg.dropout, pool=r["ml_pool"], own_embedding=True,
                                   cls_proj=c.ml_cls_proj) if cfg.head == "rankproto" else None
            self.classifier = PrototypeClassifier(r["channels"], k, cfg.protoseg.prototypes, cfg.effective_kappa,
                                                  c.dropout, ml, ml is not None and cfg.select,
                                                  tau_shared=cfg.tau == "shared")
        else:
            ml = None if cfg.oracle else MultiLabelEncoder(
                chans[-1], r["ml_dim"], k, cfg.dropout, pool=r["ml_pool"], own_embedding=r["ml_own_embedding"],
                cls_proj=c.ml_cls_proj)
            self.classifier = RankSegClassifier(r["channels"], k, cfg.effective_kappa, c.dropout, ml, cfg.select,
                                                oracle=cfg.oracle, tau_shared=cfg.tau == "shared", cosine=c.cosine)
        self.auxiliary_head = FCNHead(chans[AUX_INDEX], r["aux_channels"], k, c.dropout) if c.aux_weight > 0 else None
        # A BEiT takes exactly its img_size (smaller inputs are zero-padded to it, bottom /
        # right, as mmseg pads crops); ResNet and Swin take any size.
        self.fixed_size: int | None = self.backbone.img_size if isinstance(self.backbone, BeitPyramid) else None

    def padded_size(self, h: int, w: int) -> tuple[int, int]:
        """The size an h x w input is padded to before the backbone."""
        if self.fixed_size is None:
            return h, w
        if h > self.fixed_size or w > self.fixed_size:
            raise ValueError(f"{self.cfg.model} takes inputs up to its img_size {self.fixed_size} (BEiT's relative "
                             f"position bias is built for that grid), got {h}x{w}; use slide inference")
        return self.fixed_size, self.fixed_size

    def forward_features(self, images: Tensor) -> list[Tensor]:
        """B x 3 x H x W -> the backbone's 4 maps (inputs padded to `padded_size` first)."""
        h, w = images.shape[-2:]
        ph, pw = self.padded_size(h, w)
        if (ph, pw) != (h, w):
            images = F.pad(images, (0, pw - w, 0, ph - h))
        return cast(Pyramid, self.backbone)(images)

    def forward_head(self, feats: list[Tensor], selection: Selection = NO_SELECTION,
                     image_size: tuple[int, int] | None = None) -> ConvSegOutput:
        """4 maps -> ConvSegOutput. image_size: the unpadded (H, W); the logits are cropped to
        the decoder cells that cover it (what a model that pads inside its layers returns)."""
        pixels = self.decode_head(feats)
        out = self.classifier(pixels, feats[-1], selection)
        logits = out.mask_logits
        emb = out.embeddings if isinstance(out, ProtoSegOutput) else None
        aux = self.auxiliary_head(feats[AUX_INDEX]) if self.training and self.auxiliary_head is not None else None
        if image_size is not None and self.padded_size(*image_size) != image_size:
            padded = self.padded_size(*image_size)
            h, w = logits.shape[-2:]
            logits = _crop(logits, image_size, padded)
            aux = _crop(aux, image_size, padded) if aux is not None else None
            if emb is not None:  # the same cells of the row-major pixel embeddings
                emb = emb.unflatten(1, (h, w))[:, :logits.shape[-2], :logits.shape[-1]].flatten(1, 2)
        fields = {"mask_logits": logits, "topk_index": out.topk_index, "ml_logits": out.ml_logits, "valid": out.valid,
                  "aux_logits": aux}
        if isinstance(out, ProtoSegOutput):
            return ConvProtoSegOutput(**fields, embeddings=emb, bank=out.bank, prototypes=out.prototypes)
        return ConvSegOutput(**fields)

    def forward(self, images: Tensor, selection: Selection = NO_SELECTION) -> ConvSegOutput:
        h, w = images.shape[-2:]
        return self.forward_head(self.forward_features(images), selection, (h, w))

    def data_config(self) -> dict:
        """mean/std on the 0..255 scale for input normalisation (the backbone's)."""
        return cast(Pyramid, self.backbone).data_config()


def _crop(x: Tensor, size: tuple[int, int], padded: tuple[int, int]) -> Tensor:
    """The cells of a map of the `padded` input that cover its top-left `size` (ceil)."""
    (h, w), (ph, pw) = size, padded
    rows, cols = -(-h * x.shape[-2] // ph), -(-w * x.shape[-1] // pw)
    return x[..., :rows, :cols]


def build_convseg(cfg: ModelConfig, spec: ConvSegSpec) -> ConvSegModel:
    """The model of `spec` with `cfg`'s options (validated, convseg values resolved) and the
    local backbone weights, if given."""
    cfg.validate()
    cfg.convseg.validate()
    model = ConvSegModel(cfg, spec)
    if cfg.backbone_weights:
        load_backbone(model.backbone, cfg.backbone_weights)
    return model
