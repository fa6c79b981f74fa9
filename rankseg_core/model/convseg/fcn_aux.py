"""The auxiliary FCNHead of mmseg's DeepLabv3 / UperNet configs (training only).

mmseg 0.x `FCNHead(num_convs=1, concat_input=False, kernel_size=3)` on the stage-3 map
(in_index 2, stride 16 in the dilated ResNet, 1/16 in Swin / BEiT): one 3x3 ConvModule, then
BaseDecodeHead's Dropout2d(0.1) and 1x1 `conv_seg` to K logits. Its cross-entropy (weight 0.4)
is added to the loss; inference never runs it (mmseg's `encode_decode` does not either), but its
parameters count, as mmseg's get_flops counts every parameter of the model.
"""

from __future__ import annotations

from typing import cast

from torch import Tensor, nn

from rankseg_core.model.convseg.layers import ConvModule


def conv_seg(channels: int, num_classes: int) -> nn.Conv2d:
    """BaseDecodeHead's 1x1 classifier with its init (normal std 0.01, zero bias)."""
    conv = nn.Conv2d(channels, num_classes, kernel_size=1)
    nn.init.normal_(conv.weight, std=0.01)
    nn.init.zeros_(cast(Tensor, conv.bias))  # bias=True above
    return conv


class FCNHead(nn.Module):
    """B x C_in x h x w -> K logits B x K x h x w."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float = 0.1) -> None:
        super().__init__()
        self.convs = nn.Sequential(ConvModule(in_channels, channels, 3))
        self.dropout = nn.Dropout2d(dropout)
        self.conv_seg = conv_seg(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv_seg(self.dropout(self.convs(x)))
