"""Prediction on the user's own images (`rankseg predict`): label PNGs, overlays, class lists;
for a video instance run, the tracks of folders of frames as YouTube-VIS results.json."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from rankseg_core.config.train import TrainConfig
from rankseg_core.data.augment import build_test_transform
from rankseg_core.engine.evaluate import check_selection, write_label_png
from rankseg_core.errors import UserError
from rankseg_core.evaluation.video_instances import release_video_ids, results_entries, write_results
from rankseg_core.families import family_of
from rankseg_core.families.base import InferenceProtocol
from rankseg_core.inference.video_instances import TOP_K
from rankseg_core.model.selection import Selection, SelectionOptions
from rankseg_core.shards.codec import MAX_FILE_BYTES, decode_image
from rankseg_core.utils import distributed as D
from rankseg_core.utils import fsio, lock
from rankseg_core.utils.fsio import OUTPUTS_MARKER, atomic_write_bytes, atomic_write_json, read_regular
from rankseg_core.utils.palette import distinct_palette, short_name
from rankseg_core.utils.progress import Progress

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# Written first into every --out directory: marks its PNGs as predictions (never inputs) and
# lets a later `predict` write there again (`eval --save-predictions` writes it too).
MARKER = OUTPUTS_MARKER


def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given; directories expand to their image files (sorted, not recursive).

    Refuses inputs inside a directory `predict` wrote (it holds MARKER): its PNGs are label
    maps and overlays, which would be segmented as if they were photos."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        folder = p if p.is_dir() else p.parent
        if (folder / MARKER).is_file():
            raise UserError(f"{p}: {folder} holds `rankseg predict` outputs ({MARKER}), whose PNGs are predictions, "
                            "not images; give the original images")
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise UserError(f"{p}: no images ({', '.join(IMAGE_SUFFIXES)}) in this directory")
            out += files
        elif p.exists():  # not a regular file (a FIFO, a device): `read_image` says so in one line
            out.append(p)
        else:
            raise UserError(f"{p}: no such file or directory")
    return out


def plan_outputs(files: list[Path], out: Path) -> list[tuple[Path, Path, Path]]:
    """(label PNG, overlay PNG, JSON) per input: `<stem>.png`, `<stem>_overlay.png`,
    `<stem>.json`, with `-1`, `-2`... added to a stem until none of its three names is taken by
    another input's outputs (inputs `a/x.png`, `b/x.png`, `x-1.png`, `x_overlay.png` all keep
    their results)."""
    taken: set[str] = set()
    plan = []
    for path in files:
        stem, n = path.stem, 0
        while True:
            names = (f"{stem}.png", f"{stem}_overlay.png", f"{stem}.json")
            if not taken.intersection(names):
                break
            n += 1
            stem = f"{path.stem}-{n}"
        taken.update(names)
        plan.append((out / names[0], out / names[1], out / names[2]))
    return plan


def _file_id(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_no_overwrite(inputs: Sequence[str | Path], files: list[Path], plan: list[tuple[Path, Path, Path]],
                       out: Path) -> None:
    """Refuse an --out that is an input directory, and any output that is an input file
    (same file: symlinks and hard links included), before anything is written."""
    out_id = _file_id(out)
    for item in inputs:
        if Path(item).is_dir() and out_id is not None and _file_id(Path(item)) == out_id:
            raise UserError(f"--out {out} is also an input directory: the predictions would be written among (and over) "
                            "your images; choose another --out")
    ids = {_file_id(f): f for f in files}
    for outputs in plan:
        for target in outputs:
            source = ids.get(_file_id(target)) if target.exists() else None
            if source is not None:
                raise UserError(f"{target} would overwrite the input {source}; choose another --out")


def claim_out_dir(out: Path) -> None:
    """Make --out ours: refuse a directory holding other files (they could be overwritten),
    unless an earlier `predict` wrote it (MARKER); then write MARKER. Call with out locked."""
    fsio.claim_out_dir(out, "rankseg predict", "--out", lock.is_lock_file)


def read_image(path: Path) -> np.ndarray:
    """Any image file -> H x W x 3 uint8 RGB (grey / alpha / 16-bit converted); UserError if unreadable."""
    try:
        # Not a FIFO or a device, and bounded: either would block or grow memory without end.
        data = read_regular(path, "image", MAX_FILE_BYTES)
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        return decode_image(data)
    except ValueError as exc:
        raise UserError(f"{path}: cannot decode image ({exc}); supported: JPEG, PNG, BMP, WebP, TIFF") from None


# The legend's text is this fraction of the image height (~28 px on a 1650 px photo), never
# smaller than cv2's smallest readable size: a fixed size is a speck on a large photo.
LEGEND_TEXT_FRACTION = 0.017
LEGEND_MIN_TEXT_PX = 9


def legend_metrics(height: int, lines: int) -> tuple[float, int, int]:
    """(cv2 font scale, text height px, row height px) of an overlay legend of `lines`
    entries beside an image `height` pixels tall: the text scales with the image, shrinking
    (to the minimum) only where the rows would not fit the image height."""
    text_px = max(LEGEND_MIN_TEXT_PX, round(height * LEGEND_TEXT_FRACTION))
    fit = int((height - 8) / max(lines, 1) / 1.6)
    text_px = max(LEGEND_MIN_TEXT_PX, min(text_px, fit))
    (_, unit), _ = cv2.getTextSize("Ag", cv2.FONT_HERSHEY_SIMPLEX, 1.0, 1)
    return text_px / unit, text_px, round(text_px * 1.6)


def overlay(image: np.ndarray, pred: np.ndarray, palette: np.ndarray, names: list[str],
            alpha: float = 0.5, max_legend: int = 20) -> np.ndarray:
    """Blend the coloured prediction over the image and add a legend panel on the right
    (classes by area, at most `max_legend`, names shortened, text scaled with the image,
    colours made distinct among the classes shown). H x W x 3 RGB uint8 -> H x (W + legend) x 3."""
    ids, counts = np.unique(pred, return_counts=True)
    order = ids[np.argsort(-counts, kind="stable")]
    palette = distinct_palette(palette, order, reserved=())
    colour = palette[pred]
    blended = (image.astype(np.float32) * (1 - alpha) + colour.astype(np.float32) * alpha).astype(np.uint8)
    shown = order[:max_legend]
    labels = [short_name(names[i]) for i in shown]
    if len(order) > len(shown):
        labels.append(f"... {len(order) - len(shown)} more")
    h = blended.shape[0]
    scale, text_px, row = legend_metrics(h, len(labels))
    thick = max(1, round(text_px / 14))
    margin = max(4, row // 3)
    widths = [cv2.getTextSize(t, cv2.FONT_HERSHEY_SIMPLEX, scale, thick)[0][0] for t in labels]
    panel_h = max(h, row * len(labels) + 2 * margin)
    width = margin + row + margin + max(widths, default=0) + 2 * margin
    panel = np.full((panel_h, width, 3), 255, np.uint8)
    for r, text in enumerate(labels):
        y = margin + r * row
        swatch = row - max(2, row // 5)
        if r < len(shown):
            panel[y:y + swatch, margin:margin + swatch] = palette[shown[r]]
            ink = (0, 0, 0)
        else:
            ink = (80, 80, 80)
        baseline = y + (swatch + text_px) // 2
        cv2.putText(panel, text, (margin + row + margin, baseline), cv2.FONT_HERSHEY_SIMPLEX, scale, ink, thick,
                    cv2.LINE_AA)
    canvas = np.full((panel_h, blended.shape[1] + width, 3), 255, np.uint8)
    canvas[:h, :blended.shape[1]] = blended
    canvas[:, blended.shape[1]:] = panel
    return canvas


def class_names_of(cfg: TrainConfig) -> list[str]:
    """The run's K class names (its shards'), else "0" .. "K-1"."""
    return cfg.data.class_names or [str(i) for i in range(cfg.model.num_classes)]


def palette_of(cfg: TrainConfig) -> np.ndarray:
    """K x 3 uint8: the run's shard palette, else a generated one."""
    if len(cfg.data.palette) == cfg.model.num_classes:
        return np.asarray(cfg.data.palette, np.uint8)
    from rankseg_core.utils.palette import make_palette

    return make_palette(cfg.model.num_classes)


@dataclass
class Prediction:
    image: Path
    label_png: Path
    overlay_png: Path
    json_path: Path
    classes: list[dict] = field(default_factory=list)


@torch.no_grad()
def predict_files(model: nn.Module, cfg: TrainConfig, inputs: Sequence[str | Path], out_dir: str | Path,
                  device: torch.device, kappa: int | None = None, mode: str | None = None,
                  progress: bool = True) -> list[Prediction]:
    """Segment user images of any size. Per image `<stem>.png` (16-bit train ids),
    `<stem>_overlay.png` (with a legend) and `<stem>.json` (classes found, top-kappa ml
    probabilities); see `plan_outputs`. Stops at the first unreadable image, naming it.

    Never overwrites an input or a file it did not write (`check_no_overwrite`,
    `claim_out_dir`), and holds a lock on `out_dir` while it writes."""
    predictor = ImagePredictor(model, cfg, device, kappa, mode)
    files = list_images(inputs)
    out = Path(out_dir)
    plan = plan_outputs(files, out)
    check_no_overwrite(inputs, files, plan, out)
    out.mkdir(parents=True, exist_ok=True)
    with lock.dir_lock(out, "predict"):
        claim_out_dir(out)
        return _predict(predictor, cfg, files, plan, progress)


class ImagePredictor:
    """One run's in-memory prediction of single images, exactly as `rankseg predict` makes it
    (the API's `Run.predict` and `predict_files` both call it): the run's test transform, its
    eval protocol (mode, scales, flip; `mode` overrides the mode) and `kappa` selected classes
    (None: as trained). Refuses, in one line and before any image, a run that cannot segment
    unlabelled images (a GT oracle, a classifier) and selection options it cannot honour."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, device: torch.device, kappa: int | None = None,
                 mode: str | None = None) -> None:
        if cfg.model.oracle:
            raise UserError("this run is a GT (train + eval) oracle model: it needs ground-truth classes and cannot "
                            "predict on unlabelled images")
        family = family_of(cfg.model.model)
        check_selection(family, cfg.model, SelectionOptions(kappa=kappa))
        if not family.segments:
            raise UserError(f"{cfg.model.model} is a multi-label classifier: it lists classes but does not segment; "
                            "predict with a segmentation run")
        if mode is not None and mode not in ("whole", "slide"):
            raise UserError(f"mode {mode!r}: use whole or slide (None: the run's eval.mode)")
        dc = family.data_config(model)
        self.model, self.cfg, self.family, self.device = model, cfg, family, device
        self.transform = build_test_transform(cfg, dc["mean"], dc["std"])
        self.protocol = InferenceProtocol(mode or cfg.eval.mode, tuple(cfg.eval.scales), cfg.eval.flip)
        self.selection = Selection(kappa=kappa)
        self.kappa = kappa or cfg.model.effective_kappa

    @torch.no_grad()
    def __call__(self, rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """H x W x 3 uint8 RGB -> (H x W int64 train ids, K multi-label probabilities or None
        where the model ranks no classes)."""
        cfg = self.cfg
        x = torch.from_numpy(self.transform(rgb))[None].to(self.device)
        if cfg.model.clip_len > 1:  # a video model on a still image: the image is a clip of T copies
            x = x.repeat(cfg.model.clip_len, 1, 1, 1)
        res = self.family.predict(self.model, cfg, x, [rgb.shape[:2]] * len(x), self.protocol, self.selection)
        assert res.semantic is not None  # a segmenting family (checked in __init__)
        ml = None if res.ml is None else res.ml[0].float().cpu().numpy()
        return res.semantic[0].cpu().numpy().astype(np.int64), ml

    def top_kappa(self, ml: np.ndarray) -> np.ndarray:
        """K probabilities -> the ids of the `kappa` most probable classes, most probable first
        (ties in id order)."""
        return np.argsort(-ml, kind="stable")[:self.kappa]


def _predict(predictor: ImagePredictor, cfg: TrainConfig, files: list[Path], plan: list[tuple[Path, Path, Path]],
             progress: bool) -> list[Prediction]:
    names = class_names_of(cfg)
    pal = palette_of(cfg)
    kappa_eff = predictor.kappa
    results = []
    with Progress(len(files), "predict", unit="img", enabled=progress) as bar:
        for path, (label_png, overlay_png, json_path) in zip(files, plan):
            rgb = read_image(path)
            label, p = predictor(rgb)
            pred = label.astype(np.uint16)
            write_label_png(label_png, pred)
            ok, buf = cv2.imencode(".png", cv2.cvtColor(overlay(rgb, pred, pal, names), cv2.COLOR_RGB2BGR))
            atomic_write_bytes(overlay_png, buf.tobytes())
            ids, counts = np.unique(pred, return_counts=True)
            found = [{"id": int(i), "name": names[i], "fraction": float(c / pred.size)}
                     for i, c in sorted(zip(ids, counts), key=lambda t: -t[1])]
            top = []
            if p is not None:
                for i in predictor.top_kappa(p):
                    top.append({"id": int(i), "name": names[i], "probability": float(p[i])})
            atomic_write_json(json_path, {"image": str(path), "height": int(rgb.shape[0]), "width": int(rgb.shape[1]),
                                          "kappa": kappa_eff, "classes": found, "top_kappa": top})
            results.append(Prediction(path, label_png, overlay_png, json_path, found))
            bar.advance(1)
    return results


@dataclass
class VideoPrediction:
    """One predicted video of `rankseg predict` on folders of frames."""

    folder: Path
    video_id: int
    frames: int
    tracks: int


@torch.no_grad()
def predict_video_folders(model: nn.Module, cfg: TrainConfig, inputs: Sequence[str | Path], out_dir: str | Path,
                          videos_json: str | Path | None = None, top_k: int = TOP_K,
                          progress: bool = True) -> list[VideoPrediction]:
    """`rankseg predict` of a video instance run: each input is a directory holding ONE video's
    frames (image files in name order, as the YouTube-VIS release's JPEGImages/<video>/); writes
    OUT/results.json (submission format) and OUT/videos.json ({id, name, folder, frames} per
    video, so ids can be traced). Video ids: the release JSON's (`videos_json`, by folder name),
    else 1..N in the order given. Frames of one video must share one size. Nothing is written
    over an input, and --out is claimed as `rankseg predict` claims it.
    """
    family = family_of(cfg.model.model)
    predict_tracks = family.track_predictor(cfg.model)
    if top_k < 1:
        raise UserError(f"--top-k {top_k}: keep at least 1 track per video")
    folders = [Path(p) for p in inputs]
    for f in folders:
        if not f.is_dir():
            raise UserError(f"{f}: a video instance run predicts videos: give one directory of frames per video "
                            "(e.g. valid/JPEGImages/<video>/)")
    names = [f.resolve().name for f in folders]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise UserError(f"two inputs are videos named {dup!r}: give each video once")
    ids = release_video_ids(videos_json, names, "the inputs") if videos_json else \
        {n: i + 1 for i, n in enumerate(names)}
    frame_lists = [list_images([f]) for f in folders]
    out = Path(out_dir)
    targets = [out / "results.json", out / "videos.json"]
    for f, files in zip(folders, frame_lists):
        if out.exists() and os.path.samefile(out, f):
            raise UserError(f"--out {out} is also an input directory; choose another --out")
        for t in targets:
            frame = next((x for x in files if t.exists() and os.path.samefile(t, x)), None)
            if frame is not None:
                raise UserError(f"{t} would overwrite the input frame {frame}; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    dc = family.data_config(model)
    tf = build_test_transform(cfg, dc["mean"], dc["std"])
    device = next(model.parameters()).device
    entries: list[dict[str, Any]] = []
    done: list[VideoPrediction] = []
    with lock.dir_lock(out, "predict"):
        claim_out_dir(out)
        with Progress(len(folders), "predict", unit="video", enabled=progress) as bar:
            for folder, name, files in zip(folders, names, frame_lists):
                frames = [read_image(p) for p in files]
                sizes = {f.shape[:2] for f in frames}
                if len(sizes) > 1:
                    raise UserError(f"{folder}: the frames of one video differ in size {sorted(sizes)}; resize them "
                                    "to one size")
                size = (int(frames[0].shape[0]), int(frames[0].shape[1]))
                images = torch.from_numpy(np.stack([tf(f) for f in frames])).to(device)
                del frames
                tracks = predict_tracks(model, cfg, images, size, top_k)
                entries.extend(results_entries(ids[name], tracks))
                done.append(VideoPrediction(folder, ids[name], len(files), len(tracks)))
                bar.advance()
        # Written only once every video is predicted: a half-written results.json is never left.
        write_results(targets[0], entries)
        atomic_write_json(targets[1], [{"id": v.video_id, "name": n, "folder": str(v.folder), "frames": v.frames}
                                       for v, n in zip(done, names)])
    return done


def run_prediction(run_dir: str | Path, inputs: Sequence[str | Path], out_dir: str | Path, device: str = "auto",
                   weights: str = "auto", kappa: int | None = None, progress: bool = True,
                   videos_json: str | Path | None = None,
                   top_k: int = TOP_K) -> list[Prediction] | list[VideoPrediction]:
    """`rankseg predict`: images -> label maps (`predict_files`); for a video instance run,
    folders of frames -> results.json (`predict_video_folders`; kappa does not apply there,
    videos_json / top_k only there)."""
    from rankseg_core.engine.runs import load_run

    SelectionOptions(kappa=kappa).check()  # before loading the model
    dev = D.resolve_device(device)
    model, cfg = load_run(run_dir, dev, weights)
    if family_of(cfg.model.model).instances(cfg.model):
        if kappa is not None:
            raise UserError("--kappa: a video instance run keeps its trained selection; use --top-k for the number "
                            "of tracks per video")
        return predict_video_folders(model, cfg, inputs, out_dir, videos_json, top_k, progress)
    if videos_json is not None:
        raise UserError("--videos-json: only a video instance run writes YouTube-VIS results (this run segments "
                        "images)")
    return predict_files(model, cfg, inputs, out_dir, dev, kappa=kappa, progress=progress)
