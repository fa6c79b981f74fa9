"""mmseg's Swin as the UperNet backbone: features equal to mmseg's SwinTransformer, weights in
every layout.

The reference is written from mmsegmentation 0.x `SwinTransformer` (as in the RankSeg fork):
`PatchEmbed(pad_to_patch_size)` + LN; per block `ShiftWindowMSA` (pad to whole windows, roll,
-100 mask on the padded grid, `WindowMSA` with its `double_step_seq` relative index) and an FFN;
`norm<i>` on each stage output; `PatchMerging` by `nn.Unfold` (pad odd maps). It reads weights
in mmseg's names, produced here from our model the way mmseg's `swin2mmseg.py` converts an
original Swin release (downsample of stage i+1 -> stage i, unfold channel reorder, renames).
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from rankseg_core.errors import UserError
from rankseg_core.model.convseg.swin_pyramid import SwinPyramid, load_swin_pyramid_weights

SWIN_T = "swin_tiny_patch4_window7_224"  # depths 2-2-6-2, heads 3-6-12-24, window 7, embed 96
DEPTHS, HEADS, WINDOW = (2, 2, 6, 2), (3, 6, 12, 24), 7


def _randomise(m: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)


@pytest.fixture(scope="module")
def blank() -> SwinPyramid:
    return SwinPyramid(SWIN_T)


@pytest.fixture(scope="module")
def swin(blank: SwinPyramid) -> SwinPyramid:
    m = copy.deepcopy(blank).eval()
    _randomise(m, 0)  # LayerNorm weights and bias tables too: a permutation error must show
    return m


def to_mmseg(model: SwinPyramid) -> dict[str, torch.Tensor]:
    """Our state dict in mmseg's names: swin2mmseg.py's conversion of an original release."""
    out = {}
    for k, v in model.body.state_dict().items():
        if "relative_position_index" in k or "attn_mask" in k:
            continue
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        if m:  # timm: downsample at the start of stage i+1; original / mmseg: end of stage i
            k = f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}"
            if k.endswith("reduction.weight"):
                o, i = v.shape
                v = v.reshape(o, 4, i // 4)[:, [0, 2, 1, 3], :].transpose(1, 2).reshape(o, i)
            elif ".norm." in k:
                v = v.reshape(4, -1)[[0, 2, 1, 3], :].transpose(0, 1).reshape(-1)
        k = k.replace("attn.", "attn.w_msa.").replace("mlp.fc1.", "ffn.layers.0.0.").replace("mlp.fc2.", "ffn.layers.1.")
        k = k.replace("layers", "stages", 1).replace("patch_embed.proj.", "patch_embed.projection.")
        out[k] = v.clone()
    for i, n in enumerate(model.out_norms or []):
        out[f"norm{i}.weight"], out[f"norm{i}.bias"] = n.weight.detach().clone(), n.bias.detach().clone()
    return out


def _mmseg_rel_index(ws: int) -> torch.Tensor:
    """WindowMSA's index: double_step_seq(2*Ww-1, Wh, 1, Ww), plus its transpose, flipped."""
    seq = (torch.arange(0, (2 * ws - 1) * ws, 2 * ws - 1)[:, None] + torch.arange(ws)[None, :]).reshape(1, -1)
    return (seq + seq.T).flip(1)


def _windows(x: torch.Tensor, ws: int) -> torch.Tensor:
    b, h, w, c = x.shape
    return x.view(b, h // ws, ws, w // ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, ws * ws, c)


def _shift_mask(hp: int, wp: int, ws: int, s: int) -> torch.Tensor:
    img = torch.zeros(1, hp, wp, 1)
    cnt = 0
    for hs in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
        for wsl in (slice(0, -ws), slice(-ws, -s), slice(-s, None)):
            img[:, hs, wsl, :] = cnt
            cnt += 1
    mw = _windows(img, ws).squeeze(-1)
    d = mw.unsqueeze(1) - mw.unsqueeze(2)
    return d.masked_fill(d != 0, -100.0).masked_fill(d == 0, 0.0)


def _mmseg_block(sd: dict, p: str, x: torch.Tensor, hw: tuple[int, int], heads: int, shift: int) -> torch.Tensor:
    b, n, c = x.shape
    h, w = hw
    ws = WINDOW
    q = F.layer_norm(x, (c,), sd[p + "norm1.weight"], sd[p + "norm1.bias"]).view(b, h, w, c)
    q = F.pad(q, (0, 0, 0, -w % ws, 0, -h % ws))
    hp, wp = q.shape[1:3]
    mask = None
    if shift:
        q = torch.roll(q, (-shift, -shift), (1, 2))
        mask = _shift_mask(hp, wp, ws, shift)
    win = _windows(q, ws)
    bw, nn_, _ = win.shape
    qkv = F.linear(win, sd[p + "attn.w_msa.qkv.weight"], sd[p + "attn.w_msa.qkv.bias"])
    qkv = qkv.reshape(bw, nn_, 3, heads, c // heads).permute(2, 0, 3, 1, 4)
    attn = (qkv[0] * (c // heads) ** -0.5) @ qkv[1].transpose(-2, -1)
    table = sd[p + "attn.w_msa.relative_position_bias_table"]
    attn = attn + table[_mmseg_rel_index(ws).view(-1)].view(nn_, nn_, -1).permute(2, 0, 1).unsqueeze(0)
    if mask is not None:
        nw = mask.shape[0]
        attn = (attn.view(bw // nw, nw, heads, nn_, nn_) + mask.unsqueeze(1).unsqueeze(0)).view(-1, heads, nn_, nn_)
    y = (attn.softmax(-1) @ qkv[2]).transpose(1, 2).reshape(bw, nn_, c)
    y = F.linear(y, sd[p + "attn.w_msa.proj.weight"], sd[p + "attn.w_msa.proj.bias"])
    y = y.view(b, hp // ws, wp // ws, ws, ws, c).permute(0, 1, 3, 2, 4, 5).reshape(b, hp, wp, c)
    if shift:
        y = torch.roll(y, (shift, shift), (1, 2))
    x = x + y[:, :h, :w, :].reshape(b, n, c)
    z = F.layer_norm(x, (c,), sd[p + "norm2.weight"], sd[p + "norm2.bias"])
    z = F.linear(F.gelu(F.linear(z, sd[p + "ffn.layers.0.0.weight"], sd[p + "ffn.layers.0.0.bias"])),
                 sd[p + "ffn.layers.1.weight"], sd[p + "ffn.layers.1.bias"])
    return x + z


def _mmseg_swin(sd: dict, img: torch.Tensor) -> list[torch.Tensor]:
    img = F.pad(img, (0, -img.shape[-1] % 4, 0, -img.shape[-2] % 4))
    x = F.conv2d(img, sd["patch_embed.projection.weight"], sd["patch_embed.projection.bias"], stride=4)
    b, c, h, w = x.shape
    x = F.layer_norm(x.flatten(2).transpose(1, 2), (c,), sd["patch_embed.norm.weight"], sd["patch_embed.norm.bias"])
    outs = []
    for i, depth in enumerate(DEPTHS):
        for j in range(depth):
            x = _mmseg_block(sd, f"stages.{i}.blocks.{j}.", x, (h, w), HEADS[i], WINDOW // 2 if j % 2 else 0)
        o = F.layer_norm(x, (c,), sd[f"norm{i}.weight"], sd[f"norm{i}.bias"])
        outs.append(o.view(b, h, w, c).permute(0, 3, 1, 2))
        if i < len(DEPTHS) - 1:  # PatchMerging: nn.Unfold(2, stride 2) -> LN(4C) -> Linear(4C, 2C, no bias)
            m = F.pad(x.view(b, h, w, c).permute(0, 3, 1, 2), (0, w % 2, 0, h % 2))
            m = F.unfold(m, kernel_size=2, stride=2).transpose(1, 2)
            pre = f"stages.{i}.downsample."
            m = F.layer_norm(m, (4 * c,), sd[pre + "norm.weight"], sd[pre + "norm.bias"])
            x = F.linear(m, sd[pre + "reduction.weight"])
            h, w, c = (h + 1) // 2, (w + 1) // 2, 2 * c
    return outs


def test_relative_index_is_mmseg_s(blank: SwinPyramid) -> None:
    """timm's index buffer = mmseg's: bias tables move between the layouts unpermuted."""
    m = blank
    blk = m.body.layers[0].blocks[0]  # type: ignore[index]
    assert torch.equal(blk.attn.relative_position_index.view(WINDOW**2, WINDOW**2), _mmseg_rel_index(WINDOW))


@pytest.mark.parametrize("size", [(64, 64), (42, 61)])
def test_features_equal_mmseg_swin(swin: SwinPyramid, size: tuple[int, int]) -> None:
    """(42, 61): padded to 44 x 64, stages 11x16 / 6x8 / 3x4 / 2x2, none a multiple of the window."""
    img = torch.randn(2, 3, *size)
    with torch.no_grad():
        ours = swin(img)
        ref = _mmseg_swin(to_mmseg(swin), img)
    assert [tuple(f.shape[2:]) for f in ours] == [(-(-size[0] // s), -(-size[1] // s)) for s in swin.strides]
    assert [f.shape[1] for f in ours] == swin.channels == [96, 192, 384, 768]
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_defaults_are_mmseg_s(blank: SwinPyramid) -> None:
    m = blank
    assert m.strides == [4, 8, 16, 32]
    dpr = [getattr(b.drop_path1, "drop_prob", 0.0) for layer in m.body.layers for b in layer.blocks]  # type: ignore[union-attr]
    assert dpr[0] == 0.0 and dpr[-1] == pytest.approx(0.3)  # linear to drop_path_rate=0.3 over all blocks
    dc = m.data_config()
    assert dc["mean"] == pytest.approx([123.675, 116.28, 103.53]) and dc["std"] == pytest.approx([58.395, 57.12, 57.375])


def _fresh_equal(src: SwinPyramid, dst: SwinPyramid) -> None:
    a, b = src.state_dict(), dst.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_loads_whole_mmseg_upernet_checkpoint(swin: SwinPyramid, blank: SwinPyramid, tmp_path: Path) -> None:
    sd = {f"backbone.{k}": v for k, v in to_mmseg(swin).items()}
    sd["decode_head.conv_seg.weight"] = torch.zeros(3, 8, 1, 1)
    f = tmp_path / "upernet_swin.pth"
    torch.save({"state_dict": sd, "meta": {"mmseg_version": "0.17.0"}}, f)
    fresh = copy.deepcopy(blank)
    missing, unexpected = load_swin_pyramid_weights(fresh, f)
    assert missing == [] and unexpected == ["decode_head.conv_seg.weight"]
    _fresh_equal(swin, fresh)


def test_loads_timm_and_original_release_layouts(swin: SwinPyramid, blank: SwinPyramid, tmp_path: Path) -> None:
    f = tmp_path / "timm.safetensors"
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in swin.body.state_dict().items()}, str(f))
    fresh = copy.deepcopy(blank)
    with pytest.warns(UserWarning, match="output norms"):
        missing, unexpected = load_swin_pyramid_weights(fresh, f)
    assert missing == [f"out_norms.{i}.{p}" for i in range(4) for p in ("weight", "bias")] and unexpected == []
    for k, v in swin.body.state_dict().items():
        assert torch.equal(fresh.body.state_dict()[k], v), k
    # The original release: downsample at the end of a stage, a final norm and a classifier,
    # under "model" (what timm's swin checkpoint_filter_fn and mmseg's swin2mmseg.py read).
    orig = {}
    for k, v in swin.body.state_dict().items():
        m = re.match(r"layers\.(\d+)\.downsample\.(.*)", k)
        orig[f"layers.{int(m.group(1)) - 1}.downsample.{m.group(2)}" if m else k] = v
    orig |= {"norm.weight": torch.ones(768), "norm.bias": torch.zeros(768), "head.weight": torch.zeros(1000, 768)}
    torch.save({"model": orig}, tmp_path / "orig.pth")
    fresh = copy.deepcopy(blank)
    with pytest.warns(UserWarning):
        load_swin_pyramid_weights(fresh, tmp_path / "orig.pth")
    for k, v in swin.body.state_dict().items():
        assert torch.equal(fresh.body.state_dict()[k], v), k


def test_wrong_files_are_refused_in_one_line(swin: SwinPyramid, blank: SwinPyramid, tmp_path: Path) -> None:
    fresh = copy.deepcopy(blank)
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(96, 32), "cls_token": torch.zeros(1, 1, 32)}, tmp_path / "beit.pth")
    small = {k: v for k, v in to_mmseg(swin).items()}
    small["stages.0.blocks.0.attn.w_msa.qkv.weight"] = torch.zeros(3 * 64, 64)  # another width
    torch.save(small, tmp_path / "other_size.pth")
    (tmp_path / "w.npz").write_bytes(b"")
    for name, fragment in [("beit.pth", "no key"), ("other_size.pth", "shape mismatch"), ("w.npz", "suffix"),
                           ("absent.pth", "not found")]:
        with pytest.raises(UserError) as e:
            load_swin_pyramid_weights(fresh, tmp_path / name)
        assert fragment in str(e.value) and "\n" not in str(e.value) and "backbone_weights" in str(e.value)
