"""The Python API (docs/api.md): load a trained run, segment images held in memory, read shards.

    from rankseg_core.api import load_run, open_shards
    run = load_run("runs/tiny")
    pred = run.predict(rgb)            # rgb: H x W x 3 uint8 RGB
    pred.label                         # H x W int64 train ids
    pred.top_classes, pred.top_scores  # the top-kappa classes and their probabilities

Nothing here predicts on its own: `Run.predict` is `rankseg predict`'s in-memory core
(`engine/predict.py` `ImagePredictor`: the same test transform, inference protocol and
selection), so a label map from the API equals the `<stem>.png` that `rankseg predict` writes
for the same image. Every mistake (a missing run, an image of the wrong dtype or shape) is a
one-line `UserError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from rankseg_core.config.train import TrainConfig
from rankseg_core.engine import runs
from rankseg_core.engine.predict import ImagePredictor, class_names_of, palette_of
from rankseg_core.errors import UserError
from rankseg_core.families import family_of
from rankseg_core.families.base import Family
from rankseg_core.shards.read import ShardDataset, ShardIndex
from rankseg_core.shards.splits import default_split
from rankseg_core.utils.distributed import resolve_device

__all__ = ["Prediction", "Run", "check_image", "load_run", "open_shards"]


@dataclass(frozen=True)
class Prediction:
    """One image's prediction.

    label: H x W int64 train ids at the image's own size (what `rankseg predict` writes as
        `<stem>.png`).
    top_classes: kappa int64 class ids, most probable first, or None where the model ranks no
        classes (a baseline head).
    top_scores: kappa float32 multi-label (sigmoid) probabilities of `top_classes`, or None.
    """

    label: np.ndarray
    top_classes: np.ndarray | None
    top_scores: np.ndarray | None


def check_image(image: object) -> np.ndarray:
    """The image if it is an H x W x 3 uint8 RGB array with H, W >= 1; else a one-line UserError
    saying how to convert it (files: `rankseg_core.engine.predict.read_image` converts grey,
    alpha and 16-bit images)."""
    if not isinstance(image, np.ndarray):
        raise UserError(f"image: a {type(image).__name__}, not a numpy array; give an H x W x 3 uint8 RGB array "
                        "(np.asarray(PIL.Image.open(f).convert('RGB')))")
    if image.dtype != np.uint8:
        raise UserError(f"image: dtype {image.dtype}, not uint8; give 0-255 RGB values as uint8 (a float image in "
                        "[0, 1]: (image * 255).round().astype(np.uint8))")
    if image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 1):
        raise UserError(f"image: a grey image of shape {image.shape}; give H x W x 3 RGB "
                        "(np.repeat(image.reshape(image.shape[0], image.shape[1], 1), 3, axis=2))")
    if image.ndim != 3 or image.shape[2] != 3:
        hint = " (RGBA: drop the alpha channel, image[..., :3])" if image.ndim == 3 and image.shape[2] == 4 else ""
        raise UserError(f"image: shape {image.shape}, not H x W x 3 RGB{hint}")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise UserError(f"image: shape {image.shape} holds no pixels")
    return image


@dataclass(frozen=True)
class Run:
    """A trained run, loaded: its model (eval mode, on `device`), its resolved config, its family
    and the class names (K) and palette (K x 3 uint8) of the shards it was trained on."""

    model: nn.Module
    config: TrainConfig
    family: Family
    class_names: list[str]
    palette: np.ndarray
    device: torch.device

    def predict(self, image: np.ndarray, *, kappa: int | None = None, mode: str | None = None) -> Prediction:
        """Segment one H x W x 3 uint8 RGB image (any size) as `rankseg predict` does.

        kappa: classes selected per image (None: as trained); mode: "whole" or "slide" (None:
        the run's eval.mode). Note RGB: `cv2.imread` gives BGR (`image[..., ::-1]`).
        """
        if self.family.instances(self.config.model):
            raise UserError(f"{self.config.model.model} (clip_len {self.config.model.clip_len}) is a video instance "
                            "run: it predicts tracks of whole videos; use `rankseg predict RUN FRAME_DIR --out DIR`")
        predictor = ImagePredictor(self.model, self.config, self.device, kappa, mode)
        label, ml = predictor(np.ascontiguousarray(check_image(image)))
        if ml is None:
            return Prediction(label, None, None)
        top = predictor.top_kappa(ml).astype(np.int64)
        return Prediction(label, top, ml[top].astype(np.float32))


def load_run(run_dir: str | Path, weights: str = "auto", device: str | torch.device = "cpu") -> Run:
    """Load a run directory written by `rankseg train` (`engine/runs.py` `load_run`).

    weights: "auto" (model.safetensors, else checkpoints/best.pt, else last.pt), "final",
    "best", "last" or a file; device: "cpu", "cuda", "cuda:N" or "auto".
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise UserError(f"{root}: no such run directory (create one with `rankseg train --out DIR`)")
    dev = resolve_device(device)
    model, cfg = runs.load_run(root, dev, weights)
    return Run(model=model, config=cfg, family=family_of(cfg.model.model), class_names=class_names_of(cfg),
               palette=palette_of(cfg), device=dev)


def open_shards(root: str | Path, split: str | None = None) -> ShardDataset:
    """One split of a shard directory (`rankseg prepare`'s output) as a `ShardDataset`: items
    are dicts with `image` H x W x 3 uint8 RGB, `label` H x W uint16 train ids (65535 =
    ignore), `key`, `classes` (sorted int64 train ids); `.index.class_names` names the K
    classes. split None: the validation split (val / validation / valid / test, the first
    present)."""
    if split is None:
        split = default_split(root, ShardIndex(root).splits, "val", "split=NAME")
    return ShardDataset(root, split)
