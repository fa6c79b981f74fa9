"""mmsegmentation's Swin Transformer as a pyramid: a thin adapter over Mask2Former's `PyramidBackbone`.

mmseg 0.x `SwinTransformer` (the UperNet Swin-B backbone, also RankSeg's fork) computes what
`model/mask2former/backbone.py` `PyramidBackbone` computes for Swin: timm blocks in the
pad-to-window-then-shift order (`mask2former/swin.py`; mmseg's `ShiftWindowMSA` pads, rolls
and masks with -100 on the padded grid exactly like detectron2), the window never shrunk on
small stages, a patch-norm, a LayerNorm on each of the 4 outputs (mmseg `norm0..norm3` =
`out_norms`), no absolute position embedding, the stochastic-depth rule linear over all
blocks. So this module reuses that class and changes only what differs:

- any input size: mmseg pads the image to a multiple of the patch (4) at the bottom / right
  and each patch merging pads odd maps to even, so outputs are ceil(H/s) x ceil(W/s); the
  Mask2Former class insists on multiples of 32 because its model pads first;
- drop_path 0.3 (every mmseg / RankSeg UperNet Swin config);
- weights in mmseg's layout (`stages.<i>.blocks.<j>.attn.w_msa.qkv.weight`, ...,
  `norm0..3`), besides timm's and the original Swin release's.

mmseg's patch merging gathers the 2x2 neighbours with `nn.Unfold` (channel index
c*4 + dy*2 + dx); timm and the original release concatenate them as (dx, dy, c). mmseg's
converter `swin2mmseg.py` permutes `downsample.reduction.weight` / `downsample.norm.*` for
that; `mmseg_to_original` undoes the permutation, so the features are the same.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import cast

import torch.nn.functional as F
from torch import Tensor, nn

from rankseg_core.config.mask2former import Mask2FormerConfig
from rankseg_core.errors import UserError
from rankseg_core.model.backbone import load_timm_state, read_weights
from rankseg_core.model.mask2former.backbone import STRIDES, PyramidBackbone, _TimmPyramid

SWIN_B = "swin_base_patch4_window12_384"  # mmseg's UperNet Swin-B: embed 128, depths 2-2-18-2, window 12
PATCH = 4


class SwinPyramid(PyramidBackbone):
    """B x 3 x H x W (any H, W) -> 4 maps B x C_i x ceil(H/s) x ceil(W/s), s = 4, 8, 16, 32."""

    def __init__(self, timm_name: str = SWIN_B, drop_path: float = 0.3, in_chans: int = 3) -> None:
        if not timm_name.startswith("swin"):
            raise ValueError(f"SwinPyramid builds timm Swin models, got {timm_name!r}")
        super().__init__(timm_name, Mask2FormerConfig(backbone_drop_path=drop_path), in_chans)
        self.strides: list[int] = list(STRIDES)

    def forward(self, images: Tensor) -> list[Tensor]:
        h, w = images.shape[-2:]
        ph, pw = -h % PATCH, -w % PATCH
        if ph or pw:  # mmseg PatchEmbed(pad_to_patch_size=True): zeros at the bottom / right
            images = F.pad(images, (0, pw, 0, ph))
        feats = cast(_TimmPyramid, self.body).forward_intermediates(images, indices=self.indices,
                                                                    intermediates_only=True)
        assert self.out_norms is not None  # always a Swin here
        return [n(f.permute(0, 2, 3, 1)).permute(0, 3, 1, 2) for n, f in zip(self.out_norms, feats)]


def _unfold_to_concat_reduction(w: Tensor) -> Tensor:
    """mmseg reduction weight (out x 4C, input index c*4 + dy*2 + dx) -> original Swin's
    (out x 4C, input index (dx*2 + dy)*C + c): the inverse of swin2mmseg's reorder."""
    out, four_c = w.shape
    w = w.reshape(out, four_c // 4, 4).transpose(1, 2)  # out x (dy*2+dx) x C
    return w[:, [0, 2, 1, 3], :].reshape(out, four_c)  # (dy, dx) order -> (dx, dy) order


def _unfold_to_concat_norm(v: Tensor) -> Tensor:
    """The same reorder for the 4C-long LayerNorm weight / bias of a patch merging."""
    four_c = v.shape[0]
    return v.reshape(four_c // 4, 4).t()[[0, 2, 1, 3], :].reshape(four_c)


def mmseg_to_original(sd: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict[str, Tensor], dict[str, Tensor]]:
    """Split an mmseg Swin state dict (`backbone.` already stripped) into (original-release
    Swin keys, {`<i>.weight|bias`: the output norm i}, everything else)."""
    body: dict[str, Tensor] = {}
    norms: dict[str, Tensor] = {}
    rest: dict[str, Tensor] = {}
    for k, v in sd.items():
        m = re.fullmatch(r"norm(\d+)\.(weight|bias)", k)
        if m:
            norms[f"{m.group(1)}.{m.group(2)}"] = v
        elif k.startswith("stages."):
            k = "layers." + k.removeprefix("stages.")
            k = k.replace(".attn.w_msa.", ".attn.").replace(".ffn.layers.0.0.", ".mlp.fc1.")
            k = k.replace(".ffn.layers.1.", ".mlp.fc2.")
            if k.endswith("downsample.reduction.weight"):
                v = _unfold_to_concat_reduction(v)
            elif ".downsample.norm." in k:
                v = _unfold_to_concat_norm(v)
            body[k] = v
        elif k.startswith("patch_embed."):
            body[k.replace("patch_embed.projection.", "patch_embed.proj.")] = v
        else:
            rest[k] = v
    return body, norms, rest


def _arch(body: nn.Module) -> str:
    """The timm architecture name of `body` (timm sets `default_cfg` on every model it builds)."""
    return str(getattr(body, "default_cfg", {}).get("architecture", body.__class__.__name__))


def load_swin_pyramid_weights(backbone: SwinPyramid, path: str | Path) -> tuple[list[str], list[str]]:
    """Load a local Swin checkpoint into `backbone`: timm's layout, the original release's
    (`model` key, downsample at the end of a stage) or mmseg's (`stages.*`, `norm0..3`, also a
    whole mmseg UperNet checkpoint whose `backbone.*` part is taken).

    Returns (missing, unexpected) keys in `backbone`'s names (`body.*`, `out_norms.*`) and the
    file's names. Raises `UserError` for a missing file, a wrong suffix, a file that is not a
    Swin checkpoint of this size, or one where nothing matches.
    """
    path, sd = read_weights(path, "timm / mmseg Swin")
    if any(k.startswith("backbone.") for k in sd):  # a whole segmentor: its backbone part
        sd = {(k.removeprefix("backbone.") if k.startswith("backbone.") else k): v for k, v in sd.items()}
    sd = {k.removeprefix("body."): v for k, v in sd.items()}  # a SwinPyramid's own state dict
    if any(k.startswith("stages.") for k in sd):
        body_sd, norm_sd, rest = mmseg_to_original(sd)
        # swin2mmseg.py keeps the release's final norm / classifier; a pyramid has neither
        rest = {k: v for k, v in rest.items() if not k.startswith(("head.", "norm."))}
        norm_name = "norm{}"
    else:
        norm_sd = {k.removeprefix("out_norms."): v for k, v in sd.items() if k.startswith("out_norms.")}
        body_sd = {k: v for k, v in sd.items() if not k.startswith("out_norms.")}
        rest, norm_name = {}, "out_norms.{}"
    from timm.models.swin_transformer import checkpoint_filter_fn

    body = backbone.body
    try:  # drops index / mask buffers, moves original-layout downsamples, resizes bias tables
        body_sd = checkpoint_filter_fn(body_sd, body)
    except Exception as exc:
        raise UserError(f"backbone_weights: {path} is not a checkpoint of {_arch(body)} timm can read "
                        f"({exc.__class__.__name__}); pick the matching Swin size") from exc
    own = body.state_dict()
    # The pretraining classifier and final norm have no place in a pyramid (PyramidBackbone prunes them).
    body_sd = {k: v for k, v in body_sd.items() if k in own or not k.startswith(("head.", "fc.", "norm."))}
    missing, unexpected = load_timm_state(body, body_sd, path, "a Swin backbone")
    missing = [f"body.{k}" for k in missing]
    assert backbone.out_norms is not None
    own_norms = backbone.out_norms.state_dict()
    bad = [k for k, v in norm_sd.items() if k in own_norms and own_norms[k].shape != v.shape]
    if bad:
        raise UserError(f"backbone_weights: {path} does not fit this Swin: output norm {bad[0]} has another width; "
                        "pick the matching Swin size")
    res = backbone.out_norms.load_state_dict(norm_sd, strict=False)
    if res.missing_keys:
        warnings.warn(f"backbone weights {path.name}: output norms {res.missing_keys[:2]}... not in the file "
                      "(a classification checkpoint has none); they keep their initial values", stacklevel=2)
    missing += [f"out_norms.{k}" for k in res.missing_keys]
    unexpected += [norm_name.format(k) for k in res.unexpected_keys] + list(rest)
    return missing, unexpected
