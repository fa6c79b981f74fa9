"""ViT backbone from timm (never downloaded) and local weight loading."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, cast

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from rankseg_core.config.model import PATCH_SIZE, ModelConfig
from rankseg_core.errors import UserError

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".npz", ".safetensors")


class ViTBackbone(nn.Module):
    """timm ViT/16 whose patch tokens are returned as a feature map.

    `dynamic_img_size=True` lets timm resample the position embeddings on the fly, so any
    input whose sides are multiples of 16 works (sliding windows, multi-scale, test images).
    """

    def __init__(self, cfg: ModelConfig, arch: str) -> None:
        super().__init__()
        # Every architecture of VIT_SIZES (vit_*_patch16_384) is a timm VisionTransformer.
        self.vit = cast(VisionTransformer, timm.create_model(
            arch,
            pretrained=False,
            img_size=cfg.img_size,
            drop_path_rate=cfg.drop_path,
            num_classes=0,
            in_chans=cfg.in_chans,
            dynamic_img_size=True,
        ))
        self.patch_size = PATCH_SIZE
        self.embed_dim: int = self.vit.embed_dim

    def forward(self, images: Tensor) -> Tensor:
        """B x C x H x W (H, W multiples of 16) -> B x D x H/16 x W/16 (final norm applied)."""
        b, _, h, w = images.shape
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"input size {h}x{w} is not a multiple of the patch size {self.patch_size}; pad it")
        tokens = self.vit.forward_features(images)
        tokens = tokens[:, self.vit.num_prefix_tokens :]
        return tokens.transpose(1, 2).reshape(b, self.embed_dim, h // self.patch_size, w // self.patch_size)

    def data_config(self) -> dict:
        """Input normalisation on the 0..255 scale (timm reports 0..1)."""
        dc = timm.data.resolve_model_data_config(self.vit)
        return {
            "mean": [float(m) * 255.0 for m in dc["mean"]],
            "std": [float(s) * 255.0 for s in dc["std"]],
            "interpolation": dc.get("interpolation", "bicubic"),
        }


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device="cpu")
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors carry long tracebacks; the user needs one line
        raise UserError(f"backbone_weights: cannot read {path} as a torch state dict ({exc.__class__.__name__}); "
                        "save it with torch.save(model.state_dict()) or convert it to .safetensors") from exc
    if not isinstance(sd, dict):
        raise UserError(f"backbone_weights: {path} does not hold a state dict")
    for key in ("model", "state_dict", "module"):
        if key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    return sd


def read_weights(path: str | Path, what: str) -> tuple[Path, dict[str, Tensor]]:
    """(the expanded path, its state dict without DataParallel's "module." prefix) of a local
    torch (.pth / .pt / .bin, read with weights_only) or .safetensors checkpoint of `what`
    (e.g. "timm / mmseg Swin"). UserError naming the fix for a missing file, another suffix
    (.npz: only ViTs load Google's layout) or a file that holds no state dict."""
    path = Path(path).expanduser()
    loadable = [s for s in WEIGHT_SUFFIXES if s != ".npz"]
    if not path.is_file():
        raise UserError(f"backbone_weights: file {path} not found; give a local {what} checkpoint "
                        f"({'/'.join(loadable)}), weights are never downloaded")
    if path.suffix not in loadable:
        raise UserError(f"backbone_weights: {path} has suffix {path.suffix!r}; {what} backbones load "
                        f"{', '.join(loadable)}")
    return path, {k.removeprefix("module."): v for k, v in _read_state_dict(path).items()}


def load_backbone_weights(backbone: ViTBackbone, path: str | Path) -> tuple[list[str], list[str]]:
    """Load a local timm-ViT checkpoint into `backbone`, resampling the pos-embed to its grid.

    `.npz` (Google / big_vision layout) goes through timm's own loader; `.pth/.pt/.bin` are read
    with `torch.load(weights_only=True)`, `.safetensors` with safetensors. Returns (missing,
    unexpected) keys; raises `UserError` if the file is absent or nothing matches.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"backbone_weights: file {path} not found; give a local timm ViT checkpoint "
                        f"({'/'.join(WEIGHT_SUFFIXES)}), weights are never downloaded")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise UserError(f"backbone_weights: {path} has suffix {path.suffix!r}; expected one of {WEIGHT_SUFFIXES}")
    vit = backbone.vit
    if path.suffix == ".npz":
        try:
            vit.load_pretrained(str(path))
        except KeyError as exc:
            raise UserError(f"backbone_weights: {path} is not a ViT .npz checkpoint (missing {exc})") from exc
        return [], []

    from timm.models.vision_transformer import checkpoint_filter_fn

    sd = _read_state_dict(path)
    sd = {k.removeprefix("module.").removeprefix("backbone.vit.").removeprefix("backbone."): v for k, v in sd.items()}
    sd = checkpoint_filter_fn(sd, vit)  # resamples pos_embed (bicubic) to the model's grid
    # The classifier belongs to the pretraining task; the segmentation model has none.
    sd = {k: v for k, v in sd.items() if not k.startswith(("head.", "fc_norm.", "pre_logits."))}
    return load_timm_state(vit, sd, path, "a timm ViT")


def _default_cfg(body: nn.Module) -> dict[str, Any]:
    """The `default_cfg` dict timm sets on every model it builds (a plain attribute)."""
    return cast(dict[str, Any], body.default_cfg)


def load_timm_state(body: nn.Module, sd: dict[str, Tensor], path: Path, what: str) -> tuple[list[str], list[str]]:
    """Load a (filtered) state dict into a timm backbone: UserError on shape mismatches or when
    nothing matches, a warning for missing keys. Returns (missing, unexpected)."""
    own = body.state_dict()
    mismatch = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if mismatch:
        raise UserError(f"backbone_weights: {path} does not fit {_default_cfg(body).get('architecture', '')}: "
                        f"shape mismatch for {mismatch[:3]}; pick the matching model.model size")
    result = body.load_state_dict(sd, strict=False)
    if len(result.missing_keys) == len(own):
        raise UserError(f"backbone_weights: no key of {path} matches {what}; is it a timm checkpoint?")
    if result.missing_keys:
        warnings.warn(f"backbone weights {path.name}: {len(result.missing_keys)} missing keys, "
                      f"e.g. {result.missing_keys[:3]}", stacklevel=2)
    return list(result.missing_keys), list(result.unexpected_keys)
