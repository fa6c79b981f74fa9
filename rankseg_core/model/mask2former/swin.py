"""detectron2's window order for timm's Swin blocks: pad to whole windows, then shift.

timm's `SwinTransformerBlock._attn` rolls the unpadded map and pads afterwards;
Mask2Former's D2SwinTransformer (the backbone of every official Swin checkpoint) pads H, W
to multiples of the window first, rolls the padded map and builds the shifted-window mask on
the padded Hp x Wp grid. The two agree only where every stage is a multiple of the window
(224 / 384 px); at the official 512 / 640 px crops they give different features, so a block
must follow detectron2's order for official checkpoints to reproduce their features.

`use_detectron2_window_order` swaps the class of each timm Swin block in place: same
parameters, same names, same state dict; only the order of pad and roll (and so the mask)
changes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformerBlock, window_partition, window_reverse
from torch import Tensor, nn


def shifted_window_mask(hp: int, wp: int, window: tuple[int, int], shift: tuple[int, int],
                        device: torch.device, dtype: torch.dtype) -> Tensor:
    """0 / -100 mask of the padded, rolled Hp x Wp grid: nW x (wh*ww) x (wh*ww), nW = (Hp/wh)(Wp/ww).

    Tokens of one window attend only to tokens that were neighbours before the roll: the three
    row bands (0, Hp-wh), (Hp-wh, Hp-sh), (Hp-sh, Hp) times the three column bands label nine
    regions, and a pair from different regions gets -100 (detectron2's value, not -inf, so a
    window never softmaxes over an empty row).
    """
    regions = torch.zeros(1, hp, wp, 1, device=device, dtype=dtype)
    label = 0
    for r0, r1 in ((0, hp - window[0]), (hp - window[0], hp - shift[0]), (hp - shift[0], hp)):
        for c0, c1 in ((0, wp - window[1]), (wp - window[1], wp - shift[1]), (wp - shift[1], wp)):
            regions[:, r0:r1, c0:c1, :] = label
            label += 1
    win = window_partition(regions, window).reshape(-1, window[0] * window[1])
    diff = win.unsqueeze(1) - win.unsqueeze(2)
    return torch.zeros_like(diff).masked_fill(diff != 0, -100.0)


class Detectron2OrderSwinBlock(SwinTransformerBlock):
    """timm's Swin block with D2SwinTransformer's attention step (pad, roll, mask on Hp x Wp).

    Never constructed: `use_detectron2_window_order` sets it as the class of existing timm
    blocks, so every parameter and buffer stays as timm made it.
    """

    def _attn(self, x: Tensor) -> Tensor:
        """B x H x W x C (after norm1) -> B x H x W x C, the windowed attention branch."""
        _, h, w, c = x.shape
        wh, ww = self.window_size
        sh, sw = self.shift_size
        ph, pw = -h % wh, -w % ww
        if ph or pw:
            x = F.pad(x, (0, 0, 0, pw, 0, ph))
        hp, wp = h + ph, w + pw
        shifted = bool(sh or sw)
        if shifted:
            x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
            mask: Tensor | None = shifted_window_mask(hp, wp, (wh, ww), (sh, sw), x.device, x.dtype)
        else:
            mask = None
        windows = window_partition(x, (wh, ww)).reshape(-1, wh * ww, c)
        windows = self.attn(windows, mask=mask).reshape(-1, wh, ww, c)
        x = window_reverse(windows, (wh, ww), hp, wp)
        if shifted:
            x = torch.roll(x, shifts=(sh, sw), dims=(1, 2))
        return x[:, :h, :w, :].contiguous() if ph or pw else x


def use_detectron2_window_order(model: nn.Module) -> int:
    """Give every timm `SwinTransformerBlock` in `model` detectron2's pad-then-shift order.

    Needs blocks built with `always_partition=True` (detectron2 never shrinks the window to a
    small stage); raises `ValueError` otherwise. Returns the number of blocks changed.
    """
    n = 0
    for m in model.modules():
        if type(m) is SwinTransformerBlock:
            if not m.always_partition:
                raise ValueError("detectron2's window order needs a Swin built with always_partition=True")
            m.__class__ = Detectron2OrderSwinBlock
            n += 1
    return n
