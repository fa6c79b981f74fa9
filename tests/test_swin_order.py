"""Swin window order: our pyramid must compute detectron2's D2SwinTransformer (pad, then shift).

The reference below is written from Mask2Former's `mask2former/modeling/backbone/swin.py`
definition (BasicLayer builds the mask on the padded Hp x Wp grid; each block pads H, W to
multiples of the window, rolls, attends per window, unrolls, crops), with its own window
partition, relative-position index and patch merging, and reads the weights of a timm Swin.
"""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.swin_transformer import SwinTransformer

from rankseg_core.config.mask2former import Mask2FormerConfig
from rankseg_core.model.mask2former.backbone import PyramidBackbone
from rankseg_core.model.mask2former.swin import Detectron2OrderSwinBlock, use_detectron2_window_order


def _partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """B x Hp x Wp x C -> (B * nW) x ws*ws x C, windows in row-major order."""
    b, hp, wp, c = x.shape
    x = x.reshape(b, hp // ws, ws, wp // ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(-1, ws * ws, c)


def _merge(win: torch.Tensor, ws: int, b: int, hp: int, wp: int) -> torch.Tensor:
    c = win.shape[-1]
    x = win.reshape(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, hp, wp, c)


def _rel_index(ws: int) -> torch.Tensor:
    """(ws*ws) x (ws*ws) index into the (2ws-1)^2 bias table: (dy + ws-1) * (2ws-1) + dx + ws-1."""
    yy, xx = torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")
    y, x = yy.flatten(), xx.flatten()
    return (y[:, None] - y[None, :] + ws - 1) * (2 * ws - 1) + (x[:, None] - x[None, :] + ws - 1)


def _d2_mask(hp: int, wp: int, ws: int, s: int) -> torch.Tensor:
    img = torch.zeros(1, hp, wp, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
        for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    mw = _partition(img, ws).squeeze(-1)
    d = mw[:, None, :] - mw[:, :, None]
    return torch.where(d != 0, torch.tensor(-100.0), torch.tensor(0.0))


def _d2_block(blk: torch.nn.Module, x: torch.Tensor, ws: int, shift: int, mask: torch.Tensor) -> torch.Tensor:
    """One D2 SwinTransformerBlock on B x H x W x C with `blk`'s weights (eval: no dropout)."""
    b, h, w, c = x.shape
    heads = blk.attn.num_heads
    y = F.layer_norm(x, (c,), blk.norm1.weight, blk.norm1.bias, blk.norm1.eps)
    y = F.pad(y, (0, 0, 0, (ws - w % ws) % ws, 0, (ws - h % ws) % ws))
    hp, wp = y.shape[1:3]
    if shift:
        y = torch.roll(y, (-shift, -shift), (1, 2))
    win = _partition(y, ws)
    n = ws * ws
    qkv = F.linear(win, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(-1, n, 3, heads, c // heads)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)
    attn = (q * (c // heads) ** -0.5) @ k.transpose(-2, -1)
    bias = blk.attn.relative_position_bias_table[_rel_index(ws).flatten()].reshape(n, n, heads)
    attn = attn + bias.permute(2, 0, 1)[None]
    if shift:
        nw = mask.shape[0]
        attn = (attn.reshape(-1, nw, heads, n, n) + mask[None, :, None]).reshape(-1, heads, n, n)
    out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(-1, n, c)
    out = F.linear(out, blk.attn.proj.weight, blk.attn.proj.bias)
    y = _merge(out, ws, b, hp, wp)
    if shift:
        y = torch.roll(y, (shift, shift), (1, 2))
    x = x + y[:, :h, :w, :]
    z = F.layer_norm(x, (c,), blk.norm2.weight, blk.norm2.bias, blk.norm2.eps)
    z = F.linear(F.gelu(F.linear(z, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
    return x + z


@torch.no_grad()
def d2_swin_features(body: SwinTransformer, images: torch.Tensor, ws: int) -> list[torch.Tensor]:
    """D2SwinTransformer's four stage outputs (before its norm_i), B x C_i x H_i x W_i."""
    pe = body.patch_embed
    x = F.conv2d(images, pe.proj.weight, pe.proj.bias, stride=pe.proj.stride).permute(0, 2, 3, 1)
    x = F.layer_norm(x, (x.shape[-1],), pe.norm.weight, pe.norm.bias, pe.norm.eps)
    feats = []
    for i, stage in enumerate(body.layers):
        if i > 0:  # D2 merges at the end of stage i-1: x0 (even, even), x1 (odd row), x2 (odd col), x3
            x = F.pad(x, (0, 0, 0, x.shape[2] % 2, 0, x.shape[1] % 2))
            x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], -1)
            ds = stage.downsample
            x = F.linear(F.layer_norm(x, (x.shape[-1],), ds.norm.weight, ds.norm.bias, ds.norm.eps),
                         ds.reduction.weight)
        h, w = x.shape[1:3]
        hp, wp = -(-h // ws) * ws, -(-w // ws) * ws
        mask = _d2_mask(hp, wp, ws, ws // 2)
        for j, blk in enumerate(stage.blocks):
            x = _d2_block(blk, x, ws, (ws // 2) if j % 2 else 0, mask)
        feats.append(x.permute(0, 3, 1, 2))
    return feats


def tiny_swin() -> SwinTransformer:
    torch.manual_seed(0)
    body = SwinTransformer(img_size=224, embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4),
                           window_size=7, num_classes=0, dynamic_img_size=True, always_partition=True,
                           drop_path_rate=0.0)
    # timm's init (std 0.02, zero bias tables) leaves attention near uniform and the residual
    # dominant; unit-scale weights and bias tables make a wrong window, mask or offset show.
    for m in body.modules():
        if isinstance(m, torch.nn.Linear):
            m.weight.data.normal_(0, m.in_features ** -0.5)
        if hasattr(m, "relative_position_bias_table"):
            m.relative_position_bias_table.data.normal_(0, 1.0)
    return body.eval()


def _timm_features(body: SwinTransformer, images: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        return list(body.forward_intermediates(images, indices=4, intermediates_only=True))


def test_pad_then_shift_matches_detectron2_where_stages_are_not_window_multiples() -> None:
    timm_body = tiny_swin()
    ours = copy.deepcopy(timm_body)
    assert use_detectron2_window_order(ours) == 8
    images = torch.randn(2, 3, 288, 160)  # stages 72x40, 36x20, 18x10, 9x5 against window 7
    ref = d2_swin_features(timm_body, images, ws=7)
    got = _timm_features(ours, images)
    for r, g in zip(ref, got):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
    # timm's own order (shift, then pad) is a different function there: the old code fails this test.
    old = _timm_features(timm_body, images)
    assert all((o - r).abs().max().item() > 0.5 for o, r in zip(old, ref))


def test_window_multiples_still_equal_timm_and_detectron2() -> None:
    timm_body = tiny_swin()
    ours = copy.deepcopy(timm_body)
    use_detectron2_window_order(ours)
    images = torch.randn(1, 3, 224, 224)  # stages 56, 28, 14, 7: whole windows, no padding
    ref = d2_swin_features(timm_body, images, ws=7)
    for a, b, r in zip(_timm_features(ours, images), _timm_features(timm_body, images), ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, r, atol=1e-4, rtol=1e-4)


def test_swap_keeps_the_state_dict_and_gradients() -> None:
    body = tiny_swin()
    before = {k: v.clone() for k, v in body.state_dict().items()}
    use_detectron2_window_order(body)
    after = body.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    body.train()
    out = body.forward_intermediates(torch.randn(1, 3, 96, 64), indices=4, intermediates_only=True)
    sum(o.sum() for o in out).backward()
    # the final norm only follows the last stage in forward_features; the pyramid prunes it
    assert all(p.grad is not None for n, p in body.named_parameters() if not n.startswith("norm."))


def test_refuses_a_swin_that_shrinks_its_window() -> None:
    body = SwinTransformer(img_size=64, embed_dim=8, depths=(2, 2), num_heads=(1, 1), window_size=7,
                           num_classes=0, always_partition=False)
    with pytest.raises(ValueError, match="always_partition"):
        use_detectron2_window_order(body)


def test_pyramid_backbone_computes_detectron2_order() -> None:
    torch.manual_seed(0)
    bb = PyramidBackbone("swin_tiny_patch4_window7_224", Mask2FormerConfig()).eval()
    blocks = [m for m in bb.body.modules() if isinstance(m, timm.models.swin_transformer.SwinTransformerBlock)]
    assert blocks and all(type(m) is Detectron2OrderSwinBlock for m in blocks)
    images = torch.randn(1, 3, 96, 128)  # stages 24x32, 12x16, 6x8, 3x4 against window 7
    ref = d2_swin_features(bb.body, images, ws=7)
    with torch.no_grad():
        got = bb(images)
    for r, g, n in zip(ref, got, bb.out_norms):
        r = F.layer_norm(r.permute(0, 2, 3, 1), (r.shape[1],), n.weight, n.bias, n.eps).permute(0, 3, 1, 2)
        torch.testing.assert_close(g, r, atol=1e-4, rtol=1e-4)
