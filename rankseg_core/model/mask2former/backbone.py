"""timm ResNet-50 / Swin as a feature pyramid: strides 4, 8, 16, 32 as B x C_i x H/s x W/s.

Built with `pretrained=False` (weights only from a local file) and read through timm's
`forward_intermediates`, which returns NCHW for Swin too (timm's `features_only` Swin
returns NHWC) and keeps the parameter names of timm checkpoints, so a timm state dict loads
as it is. Swin uses `dynamic_img_size` + `always_partition`, and its blocks take
detectron2's D2SwinTransformer order (`swin.py`: pad to whole windows, then shift, mask on
the padded grid; timm shifts first, which differs wherever a stage is not a multiple of the
window, e.g. every official 512 / 640 px crop), so any size divisible by 32 works (the model
pads to that multiple). D2SwinTransformer also puts a LayerNorm on each output
(norm0..norm3) instead of the final norm; `out_norms` are those.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, cast

import timm
import torch
from timm.layers import freeze_batch_norm_2d
from torch import Tensor, nn

from rankseg_core.config.mask2former import Mask2FormerConfig
from rankseg_core.errors import UserError
from rankseg_core.model.backbone import load_timm_state, read_weights
from rankseg_core.model.mask2former.detectron2_weights import load_detectron2_backbone, looks_detectron2
from rankseg_core.model.mask2former.swin import use_detectron2_window_order

STRIDES = (4, 8, 16, 32)


class _TimmPyramid(Protocol):
    """The part of timm's feature-pyramid API this module uses (ResNet, Swin, ... share it); an
    nn.Module attribute lookup cannot know it, so the model is cast to this where it is used."""

    feature_info: list[dict[str, Any]]

    def prune_intermediate_layers(self, indices: int, prune_norm: bool, prune_head: bool) -> list[int]: ...

    def forward_intermediates(self, x: Tensor, indices: list[int], intermediates_only: bool) -> list[Tensor]: ...


class PyramidBackbone(nn.Module):
    """B x 3 x H x W (H, W multiples of 32) -> [res2, res3, res4, res5], B x C_i x H/s x W/s."""

    def __init__(self, timm_name: str, cfg: Mask2FormerConfig, in_chans: int = 3) -> None:
        super().__init__()
        self.is_swin = timm_name.startswith("swin")
        kw: dict[str, Any] = ({"dynamic_img_size": True, "always_partition": True,
                               "drop_path_rate": cfg.backbone_drop_path} if self.is_swin else {})
        self.body = timm.create_model(timm_name, pretrained=False, num_classes=0, in_chans=in_chans, **kw)
        if self.is_swin:
            use_detectron2_window_order(self.body)
        # Drop what the pyramid never uses (classifier, final norm) so parameter counts are honest.
        pyramid = cast(_TimmPyramid, self.body)
        self.indices = pyramid.prune_intermediate_layers(indices=4, prune_norm=True, prune_head=True)
        info = pyramid.feature_info[-4:]
        self.channels: list[int] = [int(f["num_chs"]) for f in info]
        if [int(f["reduction"]) for f in info] != list(STRIDES):
            raise ValueError(f"{timm_name}: expected strides {STRIDES}, got {[f['reduction'] for f in info]}")
        self.out_norms = nn.ModuleList([nn.LayerNorm(c) for c in self.channels]) if self.is_swin else None
        if not self.is_swin and cfg.freeze_bn:
            self.body = freeze_batch_norm_2d(self.body)

    def forward(self, images: Tensor) -> list[Tensor]:
        h, w = images.shape[-2:]
        if h % 32 or w % 32:
            raise ValueError(f"input size {h}x{w} is not a multiple of 32; pad it (Mask2FormerModel does)")
        feats = cast(_TimmPyramid, self.body).forward_intermediates(images, indices=self.indices,
                                                                    intermediates_only=True)
        if self.out_norms is not None:
            feats = [n(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for n, f in zip(self.out_norms, feats)]
        return list(feats)

    def data_config(self) -> dict:
        """mean/std on the 0..255 scale (ImageNet, as every official Mask2Former config)."""
        dc = timm.data.resolve_model_data_config(self.body)
        return {
            "mean": [float(m) * 255.0 for m in dc["mean"]],
            "std": [float(s) * 255.0 for s in dc["std"]],
            "interpolation": dc.get("interpolation", "bicubic"),
        }


def load_pyramid_weights(backbone: PyramidBackbone, path: str | Path) -> tuple[list[str], list[str]]:
    """Load a local timm checkpoint of the backbone's architecture (classifier dropped).

    Original Swin releases (`model` key, `relative_position_index` buffers, ...) go through
    timm's own `checkpoint_filter_fn`. detectron2 files (`.pkl`, or detectron2's names in a
    torch file) go to `detectron2_weights.load_detectron2_backbone`, whose names are relative
    to the backbone (`body.*`, `out_norms.*`). Returns (missing, unexpected) keys; raises
    `UserError` for a missing file, a wrong suffix, a shape mismatch or a file with no matching key.
    """
    if Path(path).suffix == ".pkl":
        return load_detectron2_backbone(backbone, path)
    path, sd = read_weights(path, "timm")
    if looks_detectron2(list(sd)):
        return load_detectron2_backbone(backbone, path, sd)
    body = backbone.body
    sd = {k.removeprefix("backbone.body.").removeprefix("backbone."): v for k, v in sd.items()}
    if backbone.is_swin:
        from timm.models.swin_transformer import checkpoint_filter_fn

        try:
            sd = checkpoint_filter_fn(sd, body)
        except Exception as exc:
            raise UserError(f"backbone_weights: {path} is not a Swin checkpoint timm can read "
                            f"({exc.__class__.__name__})") from exc
    own = body.state_dict()
    sd = {k: v for k, v in sd.items() if k in own or not k.startswith(("head.", "fc.", "norm."))}
    return load_timm_state(body, sd, path, "the timm backbone")


def pad_to_multiple(images: Tensor, multiple: int) -> Tensor:
    """Zero-pad B x C x H x W at the bottom / right to multiples of `multiple` (detectron2's ImageList)."""
    h, w = images.shape[-2:]
    ph, pw = -h % multiple, -w % multiple
    return torch.nn.functional.pad(images, (0, pw, 0, ph)) if ph or pw else images
