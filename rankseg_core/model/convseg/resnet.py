"""mmseg's dilated ResNetV1c (DeepLabv3's backbone) from timm, as a 4-map feature pyramid.

mmseg's `ResNetV1c` is a ResNet with the "deep" stem (three 3x3 convs 3->32->32->64, each
with BN + ReLU) and strided 1x1 downsampling convs; DeepLabv3 runs it with strides (1, 2, 1, 1)
and dilations (1, 1, 2, 4), i.e. output stride 8, and `contract_dilation=True` (the first block
of a dilated stage uses half the dilation). timm builds the same network as `resnet50c` /
`resnet101c` (stem_type="deep", stem_width=32, no avg-down) with `output_stride=8`, whose first
block of a dilated stage also takes the previous stage's dilation: the layer shapes and the
parameter count (42,519,392 for ResNet-101) equal mmseg's. ResNet-18 (no `c` variant in timm)
gets the same stem through timm's keyword arguments; mmseg's BasicBlock dilates only its first
3x3 conv, timm's both, so the second is reset to mmseg's (dilation 1).

Weights: a local timm checkpoint (`conv1.0.weight`, ...) or an mmseg one (`backbone.stem.0.weight`,
or `stem.0.weight` in the ImageNet `resnet101_v1c` files), never downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Protocol, cast

import timm
from timm.models.resnet import BasicBlock
from torch import Tensor, nn

from rankseg_core.model.backbone import load_timm_state, read_weights

OUTPUT_STRIDE = 8
# mmseg ResNetV1c stem (nn.Sequential conv, bn, relu, conv, bn, relu, conv, bn, relu) -> timm's
# deep stem (conv1 = conv, bn, act, conv, bn, act, conv; then bn1).
_MMSEG_STEM = {"0": "conv1.0", "1": "conv1.1", "3": "conv1.3", "4": "conv1.4", "6": "conv1.6", "7": "bn1"}


class _TimmPyramid(Protocol):
    """The part of timm's feature API used here (attribute lookups on nn.Module cannot know it)."""

    feature_info: list[dict[str, Any]]

    def prune_intermediate_layers(self, indices: int, prune_norm: bool, prune_head: bool) -> list[int]: ...

    def forward_intermediates(self, x: Tensor, indices: list[int], intermediates_only: bool) -> list[Tensor]: ...


class ResNetPyramid(nn.Module):
    """B x 3 x H x W (any size) -> [layer1, layer2, layer3, layer4] maps at strides 4, 8, 8, 8.

    channels: the maps' widths (256, 512, 1024, 2048 for ResNet-50/101; 64 ... 512 for 18).
    size_divisor: 1, any input size works (the dilated convs keep every map's size).
    """

    def __init__(self, arch: str, in_chans: int = 3) -> None:
        super().__init__()
        self.body = timm.create_model(arch, pretrained=False, num_classes=0, in_chans=in_chans,
                                      output_stride=OUTPUT_STRIDE, stem_type="deep", stem_width=32, avg_down=False)
        for m in self.body.modules():
            if isinstance(m, BasicBlock) and m.conv2.dilation != (1, 1):
                m.conv2.dilation, m.conv2.padding = (1, 1), (1, 1)  # mmseg: only conv1 is dilated
        pyramid = cast(_TimmPyramid, self.body)
        self.indices = pyramid.prune_intermediate_layers(indices=4, prune_norm=True, prune_head=True)
        info = pyramid.feature_info[-4:]
        self.channels: list[int] = [int(f["num_chs"]) for f in info]
        self.strides: list[int] = [int(f["reduction"]) for f in info]
        self.size_divisor = 1

    def forward(self, images: Tensor) -> list[Tensor]:
        return list(cast(_TimmPyramid, self.body).forward_intermediates(images, indices=self.indices,
                                                                        intermediates_only=True))

    def data_config(self) -> dict:
        """ImageNet mean/std on the 0..255 scale (mmseg's img_norm_cfg of every DeepLabv3 config)."""
        dc = timm.data.resolve_model_data_config(self.body)
        return {"mean": [float(m) * 255.0 for m in dc["mean"]], "std": [float(s) * 255.0 for s in dc["std"]],
                "interpolation": dc.get("interpolation", "bilinear")}


def mmseg_to_timm(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """An mmseg ResNetV1c state dict (whole-model keys `backbone.*`, or backbone-only keys as
    in open-mmlab's `resnet101_v1c` ImageNet files) in timm's names. Keys outside the backbone
    (`decode_head.*`, `auxiliary_head.*`, `fc.*`) keep their names and so stay unexpected."""
    if any(k.startswith("backbone.") for k in sd):
        sd = {k.removeprefix("backbone."): v for k, v in sd.items()}
    out = {}
    for key, value in sd.items():
        m = re.fullmatch(r"stem\.(\d+)\.(.+)", key)
        if m and m.group(1) in _MMSEG_STEM:
            key = f"{_MMSEG_STEM[m.group(1)]}.{m.group(2)}"
        out[key] = value
    return out


def is_mmseg_layout(sd: dict[str, Tensor]) -> bool:
    """mmseg ResNetV1c keys have a `stem.` Sequential where timm has `conv1.` / `bn1.`."""
    return any(k.removeprefix("backbone.").startswith("stem.") for k in sd)


def load_resnet_weights(backbone: ResNetPyramid, path: str | Path) -> tuple[list[str], list[str]]:
    """Load a local timm or mmseg ResNet checkpoint into `backbone` (the layout is detected).

    Returns (missing, unexpected) keys; UserError for a missing file, a wrong suffix, a shape
    mismatch (another depth) or a file none of whose keys is a ResNet parameter.
    """
    path, sd = read_weights(path, "timm / mmseg ResNet")
    if is_mmseg_layout(sd):
        sd = mmseg_to_timm(sd)
    else:
        sd = {k.removeprefix("backbone.body."): v for k, v in sd.items()}
    # The ImageNet classifier belongs to the pretraining task, not to the pyramid.
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    return load_timm_state(backbone.body, sd, path, "a ResNet (timm or mmseg layout)")
