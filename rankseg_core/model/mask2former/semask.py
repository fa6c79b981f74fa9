"""SeMask Swin (semantic attention after every Swin stage) as a Mask2Former backbone.

Source: Picsart-AI-Research/SeMask-Segmentation, `SeMask-Mask2Former/mask2former/modeling/
backbone/semask_swin.py` (`SeMaskSwinTransformer`, `BasicLayer`, `SWSeMaskBlock`, `SeMaskBlock`,
`SemanticAttention`) and `modeling/meta_arch/branch_mask_former_head.py` (`SemanticHead`).

Each stage i runs its Swin blocks, then one semantic layer (`SemanticLayer`): a LayerNorm and
`num_sem_blocks` semantic attentions, each inside non-overlapping windows of `sem_window`
tokens (no shift) or over the whole map. A semantic attention maps the tokens to K class
logits twice (`mlp_cls_q`, `mlp_cls_k`), lets the class logits attend to each other (softmax
over the tokens, no 1/sqrt(d) scale), reads `mlp_v` values and adds them back through
`mlp_res` times a learned scalar `gamma`. The layer's output is the next stage's input and
(after the D2 output norm) the pyramid level; its first class logits (`mlp_cls_q`) are the
stage's class map. `semantic_prior` sums the four maps (SemanticHead) into the "semantic
prior" that the SeMask loss supervises with the labels (losses/semask.py); inference never
reads it.

The Swin itself is the timm Swin of `PyramidBackbone` (pretrained=False, `dynamic_img_size`,
`always_partition`, detectron2's pad-then-shift window order, D2's output norms), run stage
by stage here because the semantic layer sits between a stage's blocks and the next stage's
patch merging. Official quirks kept (docs/architectures.md, "SeMask"):
- the last stage's semantic layer attends over the whole map instead of windows iff K = 150
  (`BasicLayer`: `index_list = [0, 1, 2] if n_cls == 150`), see `windowed_stages`;
- windows are zero-padded AFTER the LayerNorm and the padding tokens take part in the
  softmax (no mask), as SWSeMaskBlock does;
- the residual adds to the normalised tokens (the layer has no outer skip connection);
- init: kaiming-normal class / value projections, zero `mlp_res` and zero `gamma`.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, cast

import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch import Tensor, nn

from rankseg_core.config.mask2former import Mask2FormerConfig
from rankseg_core.errors import UserError
from rankseg_core.model.backbone import read_weights
from rankseg_core.model.mask2former.backbone import STRIDES, _TimmPyramid
from rankseg_core.model.mask2former.swin import use_detectron2_window_order

ADE20K_CLASSES = 150  # the K at which the official code switches its last semantic layer to global


class SemanticAttention(nn.Module):
    """SeMask's semantic attention over groups of N tokens (a window or a whole map).

    forward(x: B' x N x C) -> (class logits B' x N x K, features B' x N x C).
    """

    def __init__(self, dim: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        # Official attribute names, so a SeMask checkpoint maps by prefix only.
        self.mlp_cls_q = nn.Linear(dim, num_classes)
        self.mlp_cls_k = nn.Linear(dim, num_classes)
        self.mlp_v = nn.Linear(dim, dim)
        self.mlp_res = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        self.gamma = nn.Parameter(torch.zeros(1))
        for lin in (self.mlp_cls_q, self.mlp_cls_k, self.mlp_v):
            nn.init.kaiming_normal_(lin.weight)
            nn.init.zeros_(lin.bias)
        # Zero residual projection and gamma (official init_weight): the layer starts as identity
        # on its normalised input. Each is the other's only gradient path, so from this init both
        # stay zero (docs/architectures.md, "SeMask"); pretrained SeMask weights set them.
        nn.init.zeros_(self.mlp_res.weight)
        nn.init.zeros_(self.mlp_res.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        seg = self.mlp_cls_q(x)
        # Token-to-token attention in class space: softmax over the group's tokens, scale 1 (official).
        attn = F.scaled_dot_product_attention(seg, self.mlp_cls_k(x), self.mlp_v(x), scale=1.0)
        return seg, x + self.gamma * self.proj_drop(self.mlp_res(attn))


class SemanticLayer(nn.Module):
    """The SeMask layer after one Swin stage (official SWSeMaskBlock, or SeMaskBlock when
    `window` is None): LayerNorm, then `num_blocks` semantic attentions.

    forward(x: B x H x W x C) -> (features B x H x W x C, class logits B x H x W x K of the
    last attention).
    """

    def __init__(self, dim: int, num_classes: int, window: int | None, num_blocks: int = 1) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks}: a SeMask layer needs at least one semantic attention")
        self.window = window
        self.num_classes = num_classes
        self.norm1 = nn.LayerNorm(dim)
        self.class_injection = nn.ModuleList([SemanticAttention(dim, num_classes) for _ in range(num_blocks)])

    def _attend(self, tokens: Tensor) -> tuple[Tensor, Tensor]:
        seg = tokens  # replaced by the first block (num_blocks >= 1)
        for blk in self.class_injection:
            seg, tokens = blk(tokens)
        return seg, tokens

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        b, h, w, c = x.shape
        x = self.norm1(x)
        if self.window is None:
            seg, out = self._attend(x.reshape(b, h * w, c))
            return out.reshape(b, h, w, c), seg.reshape(b, h, w, self.num_classes)
        ws = self.window
        ph, pw = -h % ws, -w % ws
        if ph or pw:  # zeros after the norm; they join each window's softmax (official, no mask)
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        windows = window_partition(x, (ws, ws)).reshape(-1, ws * ws, c)
        seg, out = self._attend(windows)
        x = window_reverse(out.reshape(-1, ws, ws, c), (ws, ws), hp, wp)[:, :h, :w]
        seg_map = window_reverse(seg.reshape(-1, ws, ws, self.num_classes), (ws, ws), hp, wp)[:, :h, :w]
        return x.contiguous(), seg_map.contiguous()


def _swin_window(body: nn.Module) -> int:
    """The window of a timm Swin's blocks (every official stage shares it)."""
    for m in body.modules():
        if isinstance(m, SwinTransformerBlock):
            return int(m.window_size[0])
    raise ValueError("the model has no Swin block")


def windowed_stages(num_classes: int, num_stages: int = 4) -> list[bool]:
    """Whether each stage's semantic layer attends inside windows: the official BasicLayer
    makes the last one global exactly when K = 150 (its ADE20K setting), windowed otherwise."""
    return [not (i == num_stages - 1 and num_classes == ADE20K_CLASSES) for i in range(num_stages)]


class SeMaskSwin(nn.Module):
    """B x 3 x H x W (H, W multiples of 32) -> ([res2, res3, res4, res5], B x C_i x H/s x W/s;
    each stage's class logits, B x K x H/s x W/s). Unlike the other pyramids it returns the
    class maps as a second output (called as a module, so hooks and FLOP counters see it).

    timm_name: a timm Swin (`swin_large_patch4_window12_384` for SeMask-L); `swin_kwargs`
    override its sizes (embed_dim, depths, num_heads, window_size) for small models.
    sem_window: the semantic layers' window (SEM_WINDOW_SIZE; None = the Swin's window, as
    every official config). num_sem_blocks: semantic attentions per layer (NUM_SEM_BLOCKS).
    """

    def __init__(self, timm_name: str, num_classes: int, cfg: Mask2FormerConfig, in_chans: int = 3,
                 sem_window: int | None = None, num_sem_blocks: int = 1, **swin_kwargs: Any) -> None:
        super().__init__()
        if not timm_name.startswith("swin"):
            raise ValueError(f"SeMask is built on a timm Swin, got {timm_name!r}")
        self.is_swin = True
        self.num_classes = num_classes
        self.body = timm.create_model(timm_name, pretrained=False, num_classes=0, in_chans=in_chans,
                                      dynamic_img_size=True, always_partition=True,
                                      drop_path_rate=cfg.backbone_drop_path, **swin_kwargs)
        use_detectron2_window_order(self.body)
        pyramid = cast(_TimmPyramid, self.body)
        # The pyramid never uses the classifier or the final norm: drop them (honest counts).
        pyramid.prune_intermediate_layers(indices=4, prune_norm=True, prune_head=True)
        info = pyramid.feature_info[-4:]
        self.channels: list[int] = [int(f["num_chs"]) for f in info]
        if [int(f["reduction"]) for f in info] != list(STRIDES):
            raise ValueError(f"{timm_name}: expected strides {STRIDES}, got {[f['reduction'] for f in info]}")
        window = sem_window or _swin_window(self.body)
        self.semantic_layers = nn.ModuleList([
            SemanticLayer(c, num_classes, window if windowed else None, num_sem_blocks)
            for c, windowed in zip(self.channels, windowed_stages(num_classes))])
        self.out_norms = nn.ModuleList([nn.LayerNorm(c) for c in self.channels])  # D2's norm0..norm3

    def forward(self, images: Tensor) -> tuple[list[Tensor], list[Tensor]]:
        """-> (pyramid [B x C_i x H/s x W/s], class logits [B x K x H/s x W/s]), s = 4 .. 32."""
        h, w = images.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"input size {h}x{w} is not a multiple of 32; pad it (Mask2FormerModel does)")
        x = cast(nn.Module, self.body.patch_embed)(images)  # B x H/4 x W/4 x C, NHWC as timm's stages take it
        feats, classes = [], []
        for stage, sem, norm in zip(cast(nn.ModuleList, self.body.layers), self.semantic_layers, self.out_norms):
            # timm's stage = (patch merging of the previous output) + blocks; the official stage
            # = blocks + semantic layer + patch merging: the same chain.
            x, seg = sem(stage(x))
            feats.append(norm(x).permute(0, 3, 1, 2))
            classes.append(seg.permute(0, 3, 1, 2))
        return feats, classes

    def data_config(self) -> dict:
        """mean/std on the 0..255 scale (ImageNet, as the official SeMask config)."""
        dc = timm.data.resolve_model_data_config(self.body)
        return {"mean": [float(m) * 255.0 for m in dc["mean"]], "std": [float(s) * 255.0 for s in dc["std"]],
                "interpolation": dc.get("interpolation", "bicubic")}


def semantic_prior(class_maps: list[Tensor]) -> Tensor:
    """The official SemanticHead: [B x K x h_i x w_i] (stride 4, 8, 16, 32) -> B x K x 4h_0 x 4w_0.

    Map i is upsampled i times by 2 (bilinear, align_corners=True: the official chain of
    nn.Upsample, not one x2^i step), the four are summed and the sum is upsampled x4 to the
    (padded) input size, again with align_corners=True.
    """
    out = class_maps[0]
    for i, m in enumerate(class_maps[1:], start=1):
        for _ in range(i):
            m = F.interpolate(m, size=(2 * m.shape[-2], 2 * m.shape[-1]), mode="bilinear", align_corners=True)
        if m.shape[-2:] != out.shape[-2:]:  # only for inputs that are not multiples of 32
            m = F.interpolate(m, size=out.shape[-2:], mode="bilinear", align_corners=True)
        out = out + m
    return F.interpolate(out, size=(4 * out.shape[-2], 4 * out.shape[-1]), mode="bilinear", align_corners=True)


# ---------------------------------------------------------------------------------------
# Weights

_OFFICIAL_SEMANTIC = re.compile(r"layers\.(\d+)\.semantic_layer\.(.+)")
_OFFICIAL_OUT_NORM = re.compile(r"norm(\d+)\.(weight|bias)")
_OURS = ("body.", "semantic_layers.", "out_norms.")


def official_to_ours(sd: dict[str, Tensor], backbone: SeMaskSwin) -> tuple[dict[str, Tensor], list[str]]:
    """(our state dict keys -> tensors, keys that are not the backbone's) from an official SeMask
    checkpoint (`backbone.layers.<i>.blocks...`, `backbone.layers.<i>.semantic_layer...`,
    `backbone.norm<i>`, `sem_seg_head...`), an original Swin release (`layers...`, `norm`,
    `head`) or our own layout (`body...`, `semantic_layers...`, `out_norms...`)."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    if any(k.startswith("backbone.") for k in sd):
        others = [k for k in sd if not k.startswith("backbone.")]
        sd = {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}
    else:
        others = []
    ours: dict[str, Tensor] = {}
    swin: dict[str, Tensor] = {}
    for k, v in sd.items():
        if k.startswith(_OURS):
            ours[k] = v
        elif m := _OFFICIAL_SEMANTIC.fullmatch(k):
            ours[f"semantic_layers.{m[1]}.{m[2]}"] = v
        elif m := _OFFICIAL_OUT_NORM.fullmatch(k):
            ours[f"out_norms.{m[1]}.{m[2]}"] = v
        elif not k.startswith(("head.", "norm.")):  # a classification release's head / final norm
            swin[k] = v
    if swin:
        # timm's own converter: the original downsample-at-the-end indices, skipped index
        # buffers, relative tables of another window resized.
        try:
            swin = checkpoint_filter_fn(swin, backbone.body)
        except Exception as exc:
            raise UserError(f"backbone_weights: the Swin part is not a checkpoint timm can read "
                            f"({exc.__class__.__name__}); pass an official SeMask / Swin checkpoint") from exc
        ours.update({f"body.{k}": v for k, v in swin.items() if not k.startswith("head.")})
    return ours, others


def load_semask_weights(backbone: SeMaskSwin, path: str | Path) -> tuple[list[str], list[str]]:
    """Load a local SeMask checkpoint (official D2 layout, an original Swin release, or ours)
    into `backbone`. Returns (missing, unexpected) keys (a warning names missing ones);
    UserError for a missing / unreadable file, a shape mismatch or a file with no matching key."""
    path, sd = read_weights(path, "SeMask Swin")
    ours, unexpected = official_to_ours(sd, backbone)
    own = backbone.state_dict()
    mismatch = [k for k, v in ours.items() if k in own and own[k].shape != v.shape]
    if mismatch:
        raise UserError(f"backbone_weights: {path} does not fit this SeMask Swin (K = {backbone.num_classes}): "
                        f"shape mismatch for {mismatch[:3]}; pick the matching model.model size and num_classes")
    unexpected += [k for k in ours if k not in own]
    result = backbone.load_state_dict({k: v for k, v in ours.items() if k in own}, strict=False)
    if len(result.missing_keys) == len(own):
        raise UserError(f"backbone_weights: no key of {path} matches a SeMask Swin; is it a SeMask or Swin checkpoint?")
    if result.missing_keys:
        warnings.warn(f"backbone weights {path.name}: {len(result.missing_keys)} missing keys, "
                      f"e.g. {result.missing_keys[:3]}", stacklevel=2)
    return list(result.missing_keys), unexpected
