"""Prediction on the user's own images (`rankseg predict`): label PNGs, overlays, class lists."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from rankseg_core import distributed as D
from rankseg_core.augment import build_test_transform
from rankseg_core.codec import decode_image
from rankseg_core.config import TrainConfig
from rankseg_core.errors import UserError
from rankseg_core.evaluate import write_label_png
from rankseg_core.families import family_of
from rankseg_core.progress import Progress
from rankseg_core.shards import atomic_write_bytes, atomic_write_json

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def list_images(inputs: list[str | Path]) -> list[Path]:
    """Files as given; directories expand to their image files (sorted, not recursive)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UserError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)}) in this directory")
            out += files
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"{p}: no such file or directory")
    return out


def read_image(path: Path) -> np.ndarray:
    """Any image file -> H x W x 3 uint8 RGB (grey / alpha / 16-bit converted); UserError if unreadable."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return decode_image(data)
    except ValueError as exc:
        raise UserError(f"{path}: cannot decode image ({exc}); supported: JPEG, PNG, BMP, WebP, TIFF") from None


def overlay(image: np.ndarray, pred: np.ndarray, palette: np.ndarray, names: list[str],
            alpha: float = 0.5, max_legend: int = 20) -> np.ndarray:
    """Blend the coloured prediction over the image and add a legend panel on the right
    (classes by area, at most `max_legend`). H x W x 3 RGB uint8 -> H x (W + legend) x 3."""
    colour = palette[pred]
    blended = (image.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha).astype(np.uint8)
    ids, counts = np.unique(pred, return_counts=True)
    order = ids[np.argsort(-counts, kind="stable")]
    shown = order[:max_legend]
    h = blended.shape[0]
    row = 18
    lines = len(shown) + (1 if len(order) > len(shown) else 0)
    panel_h = max(h, row * lines + 8)
    width = 12 + 20 + max((len(names[i]) for i in shown), default=4) * 8 + 10
    panel = np.full((panel_h, width, 3), 255, np.uint8)
    for r, cid in enumerate(shown):
        y = 4 + r * row
        panel[y:y + 14, 8:22] = palette[cid]
        cv2.putText(panel, names[cid], (28, y + 12), cv2.FONT_HERSHEY_SIMPLEX, 0.4, (0, 0, 0), 1, cv2.LINE_AA)
    if len(order) > len(shown):
        cv2.putText(panel, f"... {len(order) - len(shown)} more", (8, 4 + len(shown) * row + 12),
                    cv2.FONT_HERSHEY_SIMPLEX, 0.4, (80, 80, 80), 1, cv2.LINE_AA)
    canvas = np.full((panel_h, blended.shape[1] + width, 3), 255, np.uint8)
    canvas[:h, :blended.shape[1]] = blended
    canvas[:, blended.shape[1]:] = panel
    return canvas


def _palette(cfg: TrainConfig) -> np.ndarray:
    if len(cfg.data.palette) == cfg.model.num_classes:
        return np.asarray(cfg.data.palette, np.uint8)
    from rankseg_core.palette import make_palette

    return make_palette(cfg.model.num_classes)


@dataclass
class Prediction:
    image: Path
    label_png: Path
    overlay_png: Path
    json_path: Path
    classes: list[dict] = field(default_factory=list)


@torch.no_grad()
def predict_files(model: nn.Module, cfg: TrainConfig, inputs: list[str | Path], out_dir: str | Path,
                  device: torch.device, kappa: int | None = None, mode: str | None = None,
                  progress: bool = True) -> list[Prediction]:
    """Segment user images of any size. Per image `<stem>.png` (16-bit train ids),
    `<stem>_overlay.png` (with a legend) and `<stem>.json` (classes found, top-kappa ml
    probabilities). Stops at the first unreadable image, naming it."""
    if cfg.model.oracle:
        raise UserError("this run is a GT (train + eval) oracle model: it needs ground-truth classes and cannot "
                        "predict on unlabelled images")
    family = family_of(cfg.model.model)
    files = list_images(inputs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    dc = model.data_config()
    tf = build_test_transform(cfg, dc["mean"], dc["std"])
    names = cfg.data.class_names or [str(i) for i in range(cfg.model.num_classes)]
    pal = _palette(cfg)
    kappa_eff = kappa or cfg.model.effective_kappa
    mode = mode or cfg.eval.mode
    stems: dict[str, int] = {}
    results = []
    with Progress(len(files), "predict", unit="img", enabled=progress) as bar:
        for path in files:
            rgb = read_image(path)
            x = torch.from_numpy(tf(rgb))[None].to(device)
            frames = cfg.model.clip_len
            if frames > 1:  # a video model on a still image: the image is a clip of T copies
                x = x.repeat(frames, 1, 1, 1)
            kw = {"kappa": kappa} if kappa is not None else {}
            res = family.predict(model, cfg, x, [rgb.shape[:2]] * len(x), mode, cfg.eval.scales, cfg.eval.flip, **kw)
            if res.semantic is None:
                raise UserError(f"{cfg.model.model} is a multi-label classifier: it lists classes but does not "
                                "segment; predict with a segmentation run")
            pred, ml = res.semantic[0].cpu().numpy().astype(np.uint16), res.ml
            stem = path.stem if path.stem not in stems else f"{path.stem}-{stems[path.stem]}"
            stems[path.stem] = stems.get(path.stem, 0) + 1
            label_png, overlay_png, json_path = out / f"{stem}.png", out / f"{stem}_overlay.png", out / f"{stem}.json"
            write_label_png(label_png, pred)
            ok, buf = cv2.imencode(".png", cv2.cvtColor(overlay(rgb, pred, pal, names), cv2.COLOR_RGB2BGR))
            atomic_write_bytes(overlay_png, buf.tobytes())
            ids, counts = np.unique(pred, return_counts=True)
            found = [{"id": int(i), "name": names[i], "fraction": float(c / pred.size)}
                     for i, c in sorted(zip(ids, counts), key=lambda t: -t[1])]
            top = []
            if ml is not None:
                p = ml[0].cpu().numpy()
                for i in np.argsort(-p, kind="stable")[:kappa_eff]:
                    top.append({"id": int(i), "name": names[i], "probability": float(p[i])})
            atomic_write_json(json_path, {"image": str(path), "height": int(rgb.shape[0]), "width": int(rgb.shape[1]),
                                          "kappa": kappa_eff, "classes": found, "top_kappa": top})
            results.append(Prediction(path, label_png, overlay_png, json_path, found))
            bar.advance(1)
    return results



def run_prediction(run_dir: str | Path, inputs: list[str | Path], out_dir: str | Path, device: str = "auto",
                   weights: str = "auto", kappa: int | None = None, progress: bool = True) -> list[Prediction]:
    from rankseg_core.runs import load_run

    dev = D.resolve_device(device)
    model, cfg = load_run(run_dir, dev, weights)
    return predict_files(model, cfg, inputs, out_dir, dev, kappa=kappa, progress=progress)
