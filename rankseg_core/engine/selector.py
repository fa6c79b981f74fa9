"""The independent scheme's selector: resolve `model.selector.run` (a trained classifier run)
into the exact weights a segmenter will use, recorded in its config.yaml.

`resolve_selector` runs when training starts (fresh or resumed, before anything of the run is
written) and fills `model.selector.{weights, sha256, model, img_size, in_chans}` from the
classifier run. A config that already records them (a resume, or a config.yaml copied from a
run) must match the selector as it is now: a classifier retrained, replaced or edited since is
refused, so a segmenter never trains on with another ranking than it started with. The model
(model/classifier.py `load_selector`) checks the same digest whenever it is built (eval,
predict), so a run's numbers always come from the selector config.yaml names.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

from rankseg_core.config.train import TrainConfig
from rankseg_core.engine import runs
from rankseg_core.engine.configure import check_model
from rankseg_core.errors import UserError
from rankseg_core.families import family_of
from rankseg_core.utils.integrity import content_digest

if TYPE_CHECKING:
    from timm.models import PretrainedCfg


def normalisation(cfg: TrainConfig) -> tuple[list[float], list[float]]:
    """A run's input mean / std on the 0..255 scale: aug.mean / aug.std, else its backbone's
    timm data config (as augment.py builds the transforms; read without building the model)."""
    from timm.models import get_pretrained_cfg

    # timm has a pretrained cfg for every architecture of the families (None only for unknown names).
    dc = cast("PretrainedCfg", get_pretrained_cfg(family_of(cfg.model.model).arch(cfg.model.model)))
    mean = cfg.aug.mean or [float(v) * 255.0 for v in dc.mean]
    std = cfg.aug.std or [float(v) * 255.0 for v in dc.std]
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def resolve_selector(cfg: TrainConfig, run_dir: str | Path | None = None) -> None:
    """Fill / verify `cfg.model.selector` in place (no-op without a selector); UserError in one
    line for a run that cannot select for this segmenter or that changed since it was recorded.

    run_dir: the run being trained (a segmenter cannot select with itself)."""
    m = cfg.model
    sel = m.selector
    if not sel.run:
        return
    where = f"--selector {sel.run}"
    root = Path(sel.run).expanduser().resolve()
    if run_dir is not None and root == Path(run_dir).resolve():
        raise UserError(f"{where}: that is the run being trained; give a trained classifier run (rankseg train "
                        "--model classifier-vitb ...)")
    if not root.is_dir():
        raise UserError(f"{where}: no such run directory; train the classifier first (rankseg train --model "
                        "classifier-vitb ... --out DIR) and pass DIR")
    scfg = runs.load_config(root)
    sfam = family_of(scfg.model.model)
    if sfam.segments or not sfam.ranks(scfg.model):  # a selector ranks the classes and segments nothing
        raise UserError(f"{where}: that run is a {scfg.model.model}, not a multi-label classifier; train one with "
                        "--model classifier-vit{t,s,b,l}")
    if scfg.model.num_classes != m.num_classes or (scfg.data.class_names and m.num_classes and cfg.data.class_names
                                                   and scfg.data.class_names != cfg.data.class_names):
        raise UserError(f"{where}: the classifier was trained on {scfg.data.name or '?'} with K={scfg.model.num_classes} "
                        f"classes, this segmenter trains on {cfg.data.name or '?'} with K={m.num_classes} (or other "
                        "class names); a selector must rank the same label set")
    if scfg.model.clip_len != m.clip_len:
        raise UserError(f"{where}: the classifier takes clips of {scfg.model.clip_len} frame(s), this segmenter "
                        f"{m.clip_len}; train both with the same --clip-len")
    if normalisation(scfg) != normalisation(cfg):
        raise UserError(f"{where}: the classifier normalises its input otherwise (aug.mean / aug.std / backbone "
                        "data config) than this segmenter; both see the same normalised image, so set the same "
                        "aug.mean and aug.std")
    path = runs.find_weights(root, sel.weights).resolve()
    digest = content_digest(runs.model_state(path))  # checksum of the file verified on the way
    found = {"weights": str(path), "sha256": digest, "model": scfg.model.model, "img_size": scfg.model.img_size,
             "in_chans": scfg.model.in_chans}
    recorded = {k: getattr(sel, k) for k in found if getattr(sel, k) is not None}
    if sel.sha256 is not None:  # recorded before: the selector must be exactly that one
        changed = [k for k, v in recorded.items() if k != "weights" and v != found[k]]
        if changed:
            raise UserError(f"{where}: the classifier changed since this segmenter recorded it ({', '.join(changed)} "
                            f"differ: weights {path} now have SHA-256 {digest[:12]}..., config.yaml says "
                            f"{str(sel.sha256)[:12]}...); a run keeps its selector: restore it or train a new --out")
    sel.run = str(root)
    for key, value in found.items():
        setattr(sel, key, value)
    check_model(cfg)
