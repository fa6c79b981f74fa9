"""mmcv's `ConvModule` as the conv decoders use it: conv (no bias) -> BatchNorm -> ReLU.

The submodule names (`conv`, `bn`) are mmcv's, so a decode head's parameters read as in an
mmsegmentation checkpoint (`decode_head.bottleneck.conv.weight`, `...bn.running_mean`).
mmseg trains with SyncBN; `sync_batch_norm` converts every BatchNorm of a model when it runs on
several CUDA processes (the state dict keys do not change).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class ConvModule(nn.Module):
    """k x k conv without bias (a BatchNorm follows), BatchNorm2d, ReLU: B x C_in x H x W ->
    B x C_out x H' x W'. `padding` defaults to mmcv's `dilation * (k // 2)` ("same" size)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1,
                 padding: int | None = None) -> None:
        super().__init__()
        pad = dilation * (kernel_size // 2) if padding is None else padding
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=pad, dilation=dilation, bias=False)
        self.bn = nn.BatchNorm2d(out_channels)
        self.activate = nn.ReLU(inplace=True)
        # mmcv's ConvModule init: Kaiming normal (fan_out, ReLU) for the conv, unit BatchNorm.
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        return self.activate(self.bn(self.conv(x)))


def sync_batch_norm(model: nn.Module) -> nn.Module:
    """`model` with SyncBatchNorm in place of BatchNorm when it trains on several CUDA
    processes (mmseg's SyncBN: statistics over the global batch); unchanged otherwise (CPU,
    one process), where plain BatchNorm is the same thing."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and torch.cuda.is_available():
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return model
