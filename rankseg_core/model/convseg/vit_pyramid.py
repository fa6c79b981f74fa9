"""BEiT as a 4-level pyramid for UperNet (mmsegmentation 0.x `BEiT` + `Feature2Pyramid`).

The transformer is timm's `Beit` (`beit_large_patch16_224` family, built with
`pretrained=False`): per-block relative position bias with the three cls entries, q/v biases
(no k bias), layer scale `gamma_1/2`, no absolute position embedding, LayerNorm eps 1e-6 - the
model mmseg's `BEiT` and the official RankSeg fork (unilm's BEiT code) define. Blocks
`out_indices` (7, 11, 15, 23 for L; 3, 5, 7, 11 for B) are tapped with no final norm, the cls
token dropped, and mmseg's `Feature2Pyramid` neck turns the four stride-16 maps into strides
4 / 8 / 16 / 32: two 2x2 stride-2 transposed convs with BN + GELU between (4x up), one
transposed conv (2x up), identity, 2x2 max-pool.

Input size. The relative position bias is a table over the img_size/16 grid; neither mmseg's
BEiT nor timm's (no `dynamic_img_size` for Beit) resizes it on the fly, so the model takes
exactly `img_size` inputs (640 for the ADE20K recipe: training crops are padded to it and
testing slides 640 windows). Checkpoints of another grid (a 224 px ImageNet checkpoint) are
resized once when loaded, by timm's `resize_rel_pos_bias_table`: unilm's / mmseg's
geometric-sequence resampling of the table, interpolated linearly where theirs uses scipy's
cubic `interp2d` (removed from scipy 1.14).

`layer_decay_multipliers` is mmseg's `LayerDecayOptimizerConstructor` (unilm's original) for
this module's parameter names.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, cast

import timm
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch import Tensor, nn

from rankseg_core.errors import UserError
from rankseg_core.model.backbone import load_timm_state, read_weights

BEIT_L = "beit_large_patch16_224"
PATCH = 16
STRIDES = (4, 8, 16, 32)
# mmseg configs/beit/upernet_beit-{base,large}*_640x640_160k_ade20k.py (and RankSeg's fork), by depth:
# (out_indices, drop_path_rate, init_values). init_values only matters without pretrained weights.
MMSEG_RECIPES: dict[int, tuple[tuple[int, ...], float, float]] = {
    12: ((3, 5, 7, 11), 0.1, 0.1),
    24: ((7, 11, 15, 23), 0.2, 1e-6),
}


class _TimmBeit(Protocol):
    """The part of timm's `Beit` API used here (an nn.Module attribute lookup cannot know it)."""

    embed_dim: int
    blocks: nn.ModuleList

    def prune_intermediate_layers(self, indices: list[int], prune_norm: bool, prune_head: bool) -> list[int]: ...

    def forward_intermediates(self, x: Tensor, indices: list[int], norm: bool, intermediates_only: bool
                              ) -> list[Tensor]: ...


class Feature2Pyramid(nn.Module):
    """mmseg's `Feature2Pyramid` with rescales [4, 2, 1, 0.5]: 4 maps B x D x h x w (stride 16)
    -> B x D x 4h x 4w, B x D x 2h x 2w, B x D x h x w, B x D x h/2 x w/2 (floor)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        d = embed_dim
        self.upsample_4x = nn.Sequential(nn.ConvTranspose2d(d, d, kernel_size=2, stride=2), nn.BatchNorm2d(d),
                                         nn.GELU(), nn.ConvTranspose2d(d, d, kernel_size=2, stride=2))
        self.upsample_2x = nn.Sequential(nn.ConvTranspose2d(d, d, kernel_size=2, stride=2))
        self.identity = nn.Identity()
        self.downsample_2x = nn.MaxPool2d(kernel_size=2, stride=2)

    def forward(self, feats: Sequence[Tensor]) -> list[Tensor]:
        if len(feats) != 4:
            raise ValueError(f"Feature2Pyramid takes 4 maps, got {len(feats)}")
        ops = (self.upsample_4x, self.upsample_2x, self.identity, self.downsample_2x)
        return [op(f) for op, f in zip(ops, feats)]


class BeitPyramid(nn.Module):
    """B x 3 x S x S (S = img_size) -> 4 maps B x D x S/s x S/s, s = 4, 8, 16, 32.

    `embed_dim`, `depth`, `num_heads` override the timm architecture (tiny test models);
    `out_indices`, `drop_path`, `init_values` default to mmseg's recipe for the depth.
    """

    def __init__(self, timm_name: str = BEIT_L, img_size: int = 640, out_indices: Sequence[int] | None = None,
                 drop_path: float | None = None, init_values: float | None = None, in_chans: int = 3,
                 embed_dim: int | None = None, depth: int | None = None, num_heads: int | None = None) -> None:
        super().__init__()
        if not timm_name.startswith("beit"):
            raise ValueError(f"BeitPyramid builds timm BEiT models, got {timm_name!r}")
        if img_size % PATCH:
            raise ValueError(f"img_size {img_size} is not a multiple of the patch size {PATCH}")
        arch: dict[str, Any] = {k: v for k, v in (("embed_dim", embed_dim), ("depth", depth),
                                                   ("num_heads", num_heads)) if v is not None}
        n_blocks = depth if depth is not None else (24 if "large" in timm_name else 12)
        recipe = MMSEG_RECIPES.get(n_blocks)
        if recipe is None and (out_indices is None or drop_path is None):
            raise ValueError(f"no mmseg recipe for a {n_blocks}-block BEiT: give out_indices and drop_path")
        if recipe is not None:
            out_indices = recipe[0] if out_indices is None else out_indices
            drop_path = recipe[1] if drop_path is None else drop_path
            init_values = recipe[2] if init_values is None else init_values
        assert out_indices is not None and drop_path is not None
        if len(out_indices) != 4:
            raise ValueError(f"out_indices must name 4 blocks, got {list(out_indices)}")
        kw: dict[str, Any] = {"init_values": init_values} if init_values is not None else {}
        self.body = timm.create_model(timm_name, pretrained=False, num_classes=0, img_size=img_size,
                                      in_chans=in_chans, drop_path_rate=drop_path, **kw, **arch)
        # Drop the classifier and the final norms (mmseg's BEiT has final_norm=False).
        self.indices = self._timm.prune_intermediate_layers(indices=list(out_indices), prune_norm=True,
                                                            prune_head=True)
        self.img_size = img_size
        self.embed_dim = int(self._timm.embed_dim)
        self.num_layers = len(self._timm.blocks)
        self.neck = Feature2Pyramid(self.embed_dim)
        self.channels: list[int] = [self.embed_dim] * 4
        self.strides: list[int] = list(STRIDES)

    @property
    def _timm(self) -> _TimmBeit:
        return cast(_TimmBeit, self.body)

    def forward(self, images: Tensor) -> list[Tensor]:
        h, w = images.shape[-2:]
        if h != self.img_size or w != self.img_size:
            raise ValueError(f"BEiT takes {self.img_size}x{self.img_size} inputs (its relative position bias is "
                             f"built for that grid), got {h}x{w}; pad crops to it / use slide inference")
        feats = self._timm.forward_intermediates(images, indices=self.indices, norm=False, intermediates_only=True)
        return self.neck(feats)

    def data_config(self) -> dict:
        """ImageNet mean/std on the 0..255 scale: what mmseg's and RankSeg's BEiT ADE20K configs
        normalise with (timm's BEiT default config says 0.5 / 0.5)."""
        return {"mean": [m * 255.0 for m in IMAGENET_DEFAULT_MEAN], "std": [s * 255.0 for s in IMAGENET_DEFAULT_STD]}


def layer_decay_multipliers(model: nn.Module, decay_rate: float, num_layers: int,
                            prefix: str = "backbone.") -> dict[str, tuple[float, float]]:
    """{parameter name: (lr_mult, decay_mult)} for every trainable parameter of `model`, whose
    `BeitPyramid` sits at `prefix`, by mmseg's `LayerDecayOptimizerConstructor`:

    - layer id 0: `cls_token`, `pos_embed`, `mask_token`, `patch_embed.*`; block i: i + 1;
      everything else (the neck, the heads): num_layers + 1;
    - lr_mult = decay_rate ** (num_layers + 1 - layer id), so heads train at the base lr;
    - decay_mult 0 for 1-D parameters and names ending in `.bias`, else 1. mmseg also exempts
      names equal to 'pos_embed' / 'cls_token', but it compares the full dotted name
      ('backbone.cls_token'), so the cls token and the relative position tables keep their
      weight decay there; so they do here.
    """
    if not 0.0 < decay_rate <= 1.0:
        raise UserError(f"layer_decay_rate {decay_rate} is outside (0, 1]; mmseg's BEiT recipes use 0.9 (B) / 0.95 (L)")
    out: dict[str, tuple[float, float]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        layer = _layer_id(name.removeprefix(prefix) if name.startswith(prefix) else None, num_layers)
        decay = 0.0 if p.ndim == 1 or name.endswith(".bias") or name in ("pos_embed", "cls_token") else 1.0
        out[name] = (decay_rate ** (num_layers + 1 - layer), decay)
    return out


def _layer_id(rel: str | None, num_layers: int) -> int:
    """mmseg's `get_num_layer_for_vit` on a name inside the BeitPyramid (None: outside it)."""
    if rel is None:
        return num_layers + 1
    if rel in ("body.cls_token", "body.mask_token", "body.pos_embed") or rel.startswith("body.patch_embed."):
        return 0
    m = re.match(r"body\.blocks\.(\d+)\.", rel)
    if m is None:
        return num_layers + 1
    block = int(m.group(1))
    if block >= num_layers:
        raise ValueError(f"layer decay over {num_layers} layers, but the model has block {block}; "
                         "pass the backbone's depth")
    return block + 1


# mmseg BEiT block names -> timm's (the inverse of mmseg's tools/model_converters/beit2mmseg.py).
_MMSEG_BLOCK_RENAMES = ((".ln1.", ".norm1."), (".ln2.", ".norm2."), (".ffn.layers.0.0.", ".mlp.fc1."),
                        (".ffn.layers.1.", ".mlp.fc2."))
# unilm's BEiT (the RankSeg fork) keeps the neck inside the backbone as fpn1..fpn4.
_UNILM_NECK = {"fpn1.": "upsample_4x.", "fpn2.": "upsample_2x."}
_TIMM_BEIT_KEYS = ("cls_token", "pos_embed", "patch_embed.", "blocks.", "rel_pos_bias.", "norm.", "fc_norm.", "head.")


def split_beit_state(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """A BEiT state dict in timm's, unilm's or mmseg's names (`backbone.` already stripped) ->
    (timm `Beit` keys, `Feature2Pyramid` keys, everything else)."""
    body: dict[str, Tensor] = {}
    neck: dict[str, Tensor] = {}
    rest: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith("layers."):  # mmseg
            k = "blocks." + k.removeprefix("layers.")
            for old, new in _MMSEG_BLOCK_RENAMES:
                k = k.replace(old, new)
            body[k] = v
        elif k.startswith("patch_embed.projection."):
            body[k.replace("patch_embed.projection.", "patch_embed.proj.")] = v
        elif k.startswith("neck."):
            neck[k.removeprefix("neck.")] = v
        elif k.startswith(tuple(_UNILM_NECK)):
            neck[_UNILM_NECK[k[:5]] + k[5:]] = v
        elif k.startswith(_TIMM_BEIT_KEYS):
            body[k] = v
        else:
            rest[k] = v
    return body, neck, rest


def load_beit_pyramid_weights(backbone: BeitPyramid, path: str | Path) -> tuple[list[str], list[str]]:
    """Load a local BEiT checkpoint into `backbone`: timm's / unilm's layout (`blocks.*`, a
    RankSeg-fork segmentor's `backbone.fpn1.*` neck), or mmseg's (`layers.<i>.ln1`,
    `ffn.layers.0.0`, `patch_embed.projection`, a whole UperNet's `neck.*`).

    A pretraining checkpoint's shared `rel_pos_bias` table is copied into every block (as
    unilm's loader does); tables of another grid are resized to this model's. Returns
    (missing, unexpected): missing in this module's names (`body.*`, `neck.*`), unexpected in
    the file's. Raises `UserError` for a missing file, a wrong suffix, a shape mismatch or a
    file with no BEiT key.
    """
    path, sd = read_weights(path, "timm / mmseg BEiT")
    if any(k.startswith("backbone.") for k in sd):  # a whole segmentor: its backbone (+ neck)
        sd = {(k.removeprefix("backbone.") if k.startswith("backbone.") else k): v for k, v in sd.items()}
    sd = {k.removeprefix("body."): v for k, v in sd.items()}  # a BeitPyramid's own state dict
    body_sd, neck_sd, rest = split_beit_state(sd)

    body = backbone.body
    own = body.state_dict()
    shared = body_sd.pop("rel_pos_bias.relative_position_bias_table", None)
    body_sd.pop("rel_pos_bias.relative_position_index", None)
    if shared is not None:  # unilm's load_checkpoint: the shared table replaces every block's
        for i in range(backbone.num_layers):
            body_sd[f"blocks.{i}.attn.relative_position_bias_table"] = shared
    unexpected = list(rest)
    fit: dict[str, Tensor] = {}
    for k, v in body_sd.items():
        if k in own:
            fit[k] = v
        elif not (k.endswith("relative_position_index") or k.startswith(("head.", "fc_norm.", "norm."))):
            unexpected.append(k)  # e.g. an absolute pos_embed this BEiT does not have
    from timm.models.beit import checkpoint_filter_fn

    fit = checkpoint_filter_fn(fit, body)  # resizes relative position tables / patch embedding to this model
    missing, unexpected_body = load_timm_state(body, fit, path, "a BEiT backbone")
    missing = [f"body.{k}" for k in missing]
    unexpected += unexpected_body

    own_neck = backbone.neck.state_dict()
    bad = [k for k, v in neck_sd.items() if k in own_neck and own_neck[k].shape != v.shape]
    if bad:
        raise UserError(f"backbone_weights: {path} does not fit this BEiT: neck {bad[0]} has shape "
                        f"{tuple(neck_sd[bad[0]].shape)}, expected {tuple(own_neck[bad[0]].shape)}; pick the matching size")
    res = backbone.neck.load_state_dict(neck_sd, strict=False)
    if res.missing_keys and neck_sd:
        warnings.warn(f"backbone weights {path.name}: {len(res.missing_keys)} neck keys missing, "
                      f"e.g. {res.missing_keys[:3]}", stacklevel=2)
    missing += [f"neck.{k}" for k in res.missing_keys]
    unexpected += [f"neck.{k}" for k in res.unexpected_keys]
    return missing, unexpected
