"""Start a run from another run's weights (`init_from`, what mmseg calls `load_from`).

Source: a run directory (its model.safetensors, else checkpoints/best.pt, else last.pt), a
`.safetensors` file, a rankseg checkpoint `.pt` (both checksum-verified through runs.py) or a
plain state dict (`.pt` / `.pth` / `.bin`, optionally under "model" / "state_dict" /
"module"). Every tensor whose name and shape match the model is copied; the rest is reported:
missing (the model's, not in the source), unexpected (the source's, not in the model) and
shape mismatches (skipped, e.g. a K=200 head into a K=300 model). Position embeddings of
another grid are resampled (timm's bicubic resampling, as `--backbone-weights`), so a
classifier pre-trained at one crop initialises a segmenter at another. Only a fresh run
applies it; `--resume` continues from its checkpoint.

Both model families name their ViT `backbone.vit.*`, so a classifier run's backbone lands in
a segmenter's backbone and nothing else of it matches.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from rankseg_core.config.train import TrainConfig
from rankseg_core.engine import runs
from rankseg_core.errors import UserError
from rankseg_core.families.base import ForeignReader
from rankseg_core.utils import integrity
from rankseg_core.utils.fsio import open_regular, os_error, read_regular

WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
# Largest weights file read (whole, into memory): 64 GiB, well above any ViT checkpoint; a
# bound on memory should the file not be what it seems.
MAX_WEIGHTS_BYTES = 1 << 36
_NOT_A_FILE = "; give a run directory or a weights file (.safetensors / .pt / .pth)"
SHOWN = 3  # names listed per kind in the report


@dataclass
class WarmStartReport:
    """What `warm_start` did: names of the model's tensors by outcome."""

    source: Path
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # model tensors the source lacks
    unexpected: list[str] = field(default_factory=list)  # source tensors the model lacks
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)  # (name, source, model)
    resampled: list[str] = field(default_factory=list)  # position embeddings resampled to the model's grid

    def lines(self) -> list[str]:
        """The report printed at the start of training: counts and the first few names."""
        def names(items: list[str]) -> str:
            more = f", ... (+{len(items) - SHOWN})" if len(items) > SHOWN else ""
            return f": {', '.join(items[:SHOWN])}{more}" if items else ""

        total = len(self.loaded) + len(self.missing) + len(self.mismatched)
        out = [f"init from {self.source}: loaded {len(self.loaded)} of the model's {total} tensors"
               + (f" ({len(self.resampled)} position embedding(s) resampled to this grid)" if self.resampled else ""),
               f"  missing (kept as initialised) {len(self.missing)}{names(self.missing)}",
               f"  unexpected (not in this model, ignored) {len(self.unexpected)}{names(self.unexpected)}"]
        shapes = [f"{n} {list(a)} -> {list(b)}" for n, a, b in self.mismatched]
        out.append(f"  shape mismatch (skipped) {len(self.mismatched)}{names(shapes)}")
        return out


# ---------------------------------------------------------------------------------------
# Reading a source


def _plain_state(path: Path) -> dict[str, Tensor]:
    """A .pt / .pth / .bin file: a sealed rankseg checkpoint (verified by runs.model_state) or
    a plain state dict, possibly wrapped in "model" / "state_dict" / "module"."""
    try:
        data = read_regular(path, "--init-from weights file", MAX_WEIGHTS_BYTES, _init_from_error)
    except OSError as exc:
        raise os_error(path, exc, "cannot read") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - truncated / foreign / pickled code: torch raises several types
        raise UserError(f"--init-from {path} is corrupt or not a weights file ({exc.__class__.__name__}); give a run "
                        "directory, a .safetensors file or a state dict saved with torch.save") from None
    if isinstance(obj, dict) and integrity.KEY in obj:
        return runs.model_state(path)  # a rankseg checkpoint: its checksum is verified
    for key in ("model", "state_dict", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise UserError(f"--init-from {path} holds no state dict (a dictionary of tensors); save one with "
                        "torch.save(model.state_dict()) or give a run directory")
    return obj


def _init_from_error(message: str) -> UserError:
    return UserError(f"--init-from {message}")


def read_source(source: str | Path) -> tuple[Path, dict[str, Tensor]]:
    """(the weights file read, its tensors) for a run directory or a weights file."""
    path = Path(source).expanduser()
    if path.is_dir():
        if not runs.run_paths(path).config.is_file():
            raise UserError(f"--init-from {path} is a directory but not a rankseg run (no config.yaml); give a run "
                            "directory or a weights file (.safetensors / .pt / .pth)")
        path = runs.find_weights(path, "auto")
    elif not path.exists():
        raise UserError(f"--init-from {path}: no such file or run directory")
    if path.suffix not in WEIGHT_SUFFIXES:
        raise UserError(f"--init-from {path}: unknown weights format {path.suffix!r}; use a run directory or one of "
                        f"{', '.join(WEIGHT_SUFFIXES)}")
    try:  # a FIFO or a link to a device would block or never end: refused before any read
        open_regular(path, "--init-from weights file", _init_from_error).close()
    except OSError as exc:
        raise os_error(path, exc, "cannot read") from None
    state = runs.load_weights(path) if path.suffix == ".safetensors" else _plain_state(path)
    return path, state


# ---------------------------------------------------------------------------------------
# Loading


def _resample_pos_embed(model: nn.Module, name: str, src: Tensor, dst: Tensor) -> Tensor | None:
    """`src` position embeddings (1 x (prefix + g*g) x D) resampled to `dst`'s square grid, if
    `name` is a timm ViT's pos_embed; None when it is not resampleable."""
    if not name.endswith("pos_embed") or src.ndim != 3 or dst.ndim != 3 or src.shape[-1] != dst.shape[-1]:
        return None
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    prefix = 0 if getattr(owner, "no_embed_class", False) else int(getattr(owner, "num_prefix_tokens", 0))
    old, new = src.shape[1] - prefix, dst.shape[1] - prefix
    g_old, g_new = math.isqrt(max(old, 0)), math.isqrt(max(new, 0))
    if g_old * g_old != old or g_new * g_new != new or not g_old:
        return None
    from timm.layers import resample_abs_pos_embed

    return resample_abs_pos_embed(src.float(), (g_new, g_new), (g_old, g_old), num_prefix_tokens=prefix)


@torch.no_grad()
def warm_start(model: nn.Module, source: str | Path, foreign: ForeignReader | None = None) -> WarmStartReport:
    """Copy every tensor of `source` whose name (after a DDP "module." prefix) and shape match
    `model`'s state dict into the model, in place. UserError when nothing matches. `foreign`:
    the family's reader of foreign layouts, asked first (its renamed tensors then go through
    the same shape checks and report)."""
    converted = foreign(model, Path(source).expanduser()) if foreign is not None else None
    if converted is None:
        path, state = read_source(source)
        unread: list[str] = []
    else:
        path, (state, unread) = Path(source).expanduser(), converted
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    rep = WarmStartReport(path, unexpected=list(unread))
    take: dict[str, Tensor] = {}
    for name, value in state.items():
        if name not in own:
            rep.unexpected.append(name)
        elif tuple(value.shape) == tuple(own[name].shape):
            take[name] = value
        elif (resampled := _resample_pos_embed(model, name, value, own[name])) is not None:
            take[name] = resampled
            rep.resampled.append(name)
        else:
            rep.mismatched.append((name, tuple(value.shape), tuple(own[name].shape)))
    if not take:
        timm_like = any(k.startswith(("blocks.", "patch_embed.", "pos_embed")) for k in state)
        hint = ("it looks like a timm ViT checkpoint: pass it as --backbone-weights" if timm_like else
                f"its tensors are named like '{next(iter(state), '')}', this model's like '{next(iter(own), '')}'")
        raise UserError(f"--init-from {path}: no tensor fits this model (0 of {len(state)} match by name and shape); "
                        f"{hint}")
    for name, value in take.items():
        own[name].copy_(value)  # state_dict() tensors share storage with the model's
    rep.loaded = list(take)
    mismatched = {n for n, _, _ in rep.mismatched}
    rep.missing = [k for k in own if k not in take and k not in mismatched]
    return rep


def check_init_from(cfg: TrainConfig, resume: bool) -> None:
    """Before anything is written: a fresh run's `init_from` exists (its path made absolute,
    so config.yaml names it whatever the working directory). A resume does not read it."""
    if not cfg.init_from:
        return
    path = Path(cfg.init_from).expanduser()
    if not resume and not path.exists():
        raise UserError(f"--init-from {path}: no such file or run directory")
    cfg.init_from = str(path.resolve())


def init_model(model: nn.Module, cfg: TrainConfig, resume: bool, report: bool = True,
               foreign: ForeignReader | None = None) -> WarmStartReport | None:
    """`train`'s hook: apply `cfg.init_from` to a fresh run's model and print the report
    (report=False on the other DDP ranks); nothing on a resume or without init_from.
    `foreign`: the family's reader of foreign checkpoint layouts (`warm_start`)."""
    if resume or not cfg.init_from:
        return None
    rep = warm_start(model, cfg.init_from, foreign)
    if report:
        from rankseg_core.utils.progress import console

        for line in rep.lines():
            console.print(line, highlight=False, markup=False, soft_wrap=True)
    return rep
