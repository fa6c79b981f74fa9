"""Run directories: resolved config, metrics log, checkpoints, final weights.

Layout of a run directory RUN (see docs/training.md):

    RUN/config.yaml             resolved TrainConfig (K, class names, palette included)
    RUN/env.json                the environment that started the run (utils/environment.py);
                                each resume adds env-<n>.json
    RUN/metrics.jsonl           one JSON per logged step / evaluation
    RUN/train.log               what the console printed, one UTC-stamped line each (textlog.py)
    RUN/checkpoints/last.pt     model + optimizer + iteration + RNG + data-order state
    RUN/checkpoints/iter_<N>.pt the last `keep_last` periodic checkpoints (last.pt is the newest)
    RUN/checkpoints/best.pt     model + iteration + mIoU at the best validation mIoU (no resume state)
    RUN/model.safetensors       final weights (written when training finishes)
    RUN/eval/                   `rankseg eval` outputs (default location)
    RUN/viz/                    figures (`rankseg viz`)

Every file is written atomically (tmp + fsync + rename), so a crash or a reader never sees a
half-written config or checkpoint; metrics.jsonl is append-only, one flushed strict-JSON line
per record. Checkpoints and model.safetensors carry a checksum of their content
(integrity.py), verified on every read: a corrupt file is refused, never used.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from rankseg_core.config.train import TrainConfig, from_dict, to_yaml
from rankseg_core.errors import UserError
from rankseg_core.utils import integrity, jsonio
from rankseg_core.utils.distributed import is_main, resolve_device
from rankseg_core.utils.fsio import atomic_write_bytes, fsync_dir, os_error, read_regular, remove_quietly
from rankseg_core.utils.progress import console

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
LOG = "train.log"
ENV = "env.json"
CHECKPOINTS = "checkpoints"
LAST = "last.pt"
BEST = "best.pt"
WEIGHTS = "model.safetensors"


@dataclass(frozen=True)
class RunPaths:
    """The files of one run directory."""

    root: Path

    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def metrics(self) -> Path:
        return self.root / METRICS

    @property
    def log(self) -> Path:
        return self.root / LOG

    @property
    def env(self) -> Path:
        return self.root / ENV

    @property
    def checkpoints(self) -> Path:
        return self.root / CHECKPOINTS

    @property
    def last(self) -> Path:
        return self.root / CHECKPOINTS / LAST

    @property
    def best(self) -> Path:
        return self.root / CHECKPOINTS / BEST

    def periodic(self, iteration: int) -> Path:
        """The periodic checkpoint of `iteration` (kept by `keep_checkpoints`)."""
        return self.root / CHECKPOINTS / f"iter_{iteration}.pt"

    @property
    def weights(self) -> Path:
        return self.root / WEIGHTS

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def viz_dir(self) -> Path:
        return self.root / "viz"


def run_paths(run_dir: str | Path) -> RunPaths:
    return RunPaths(Path(run_dir))


# ---------------------------------------------------------------------------------------
# Config


def save_config(run_dir: str | Path, cfg: TrainConfig) -> Path:
    """Write RUN/config.yaml atomically (creating RUN)."""
    paths = run_paths(run_dir)
    paths.root.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(paths.config, to_yaml(cfg).encode())
    return paths.config


def load_config(run_dir: str | Path) -> TrainConfig:
    """Read RUN/config.yaml back into a TrainConfig (UserError if RUN is not a run)."""
    import yaml

    path = run_paths(run_dir).config
    if not path.is_file():
        raise UserError(f"{path} is missing: {run_dir} is not a rankseg run directory "
                        "(create one with `rankseg train --out DIR`)")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid YAML ({exc.__class__.__name__}); restore it or re-run training") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a rankseg config (expected sections model:, data:, ...)")
    return from_dict(data, f"{path}: ")


# ---------------------------------------------------------------------------------------
# Metrics


def append_metrics(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Append one strict JSON line (an undefined mean is null, never NaN) to RUN/metrics.jsonl
    and flush it to disk."""
    path = run_paths(run_dir).metrics
    with open(path, "a") as f:
        f.write(jsonio.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of RUN/metrics.jsonl; an undefined value is None (also the NaN that runs of
    older versions wrote). A torn last line from a crash is skipped."""
    path = run_paths(run_dir).metrics
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            rec = jsonio.strict(json.loads(line))
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def truncate_metrics(run_dir: str | Path, iteration: int) -> None:
    """Drop what was logged after the checkpoint of `iteration` that a resume starts from
    (records of later iterations, and the final evaluation, logged after the last checkpoint),
    so a resumed run's log reads like an uninterrupted one."""
    path = run_paths(run_dir).metrics
    if not path.exists():
        return
    kept = [r for r in read_metrics(run_dir)
            if isinstance(r.get("iter"), int) and r["iter"] <= iteration and not r.get("final")]
    atomic_write_bytes(path, "".join(jsonio.dumps(r) + "\n" for r in kept).encode())


# ---------------------------------------------------------------------------------------
# Checkpoints and weights (each carries a checksum of its content: integrity.py)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """torch.save into memory, then `atomic_write_bytes` (tmp, fsync, rename). `state` must
    hold only tensors, numbers, strings, lists and dicts, so that `torch.load(weights_only=True)`
    can read it back; its checksum is added under "sha256" (`integrity.seal`).

    Serialised in memory because torch.save into a file on a full disk raises a RuntimeError
    that names neither the file nor the reason; the atomic write reports the failure in one
    line naming the file, removes its temp file and leaves the previous checkpoint as it was.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save(integrity.seal(state), buf)
    atomic_write_bytes(path, buf.getvalue())
    return path


# ---------------------------------------------------------------------------------------
# Periodic checkpoints: the last `keep_last` of them (config `keep_last`)


_PERIODIC = re.compile(r"iter_(\d+)\.pt")


def periodic_checkpoints(paths: RunPaths) -> dict[int, Path]:
    """{iteration: checkpoints/iter_<iteration>.pt} of a run."""
    if not paths.checkpoints.is_dir():
        return {}
    found = {}
    for p in paths.checkpoints.iterdir():
        m = _PERIODIC.fullmatch(p.name)
        if m and p.is_file():
            found[int(m.group(1))] = p
    return found


def checkpoint_is_valid(path: Path) -> bool:
    """Whether `path` is a readable checkpoint whose checksum matches its content (one
    without a checksum cannot be vouched for: False). Memory-mapped, so verifying a
    multi-GB checkpoint does not hold a second copy of it in memory."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        _, sealed = integrity.unseal(state)
    except Exception:  # truncated / foreign / unsafe / tampered: all "not valid"
        return False
    return bool(sealed)


def _link_or_copy(src: Path, dst: Path) -> None:
    """`dst` becomes the same content as `src`, atomically: a hard link (no second copy on
    disk; safe because rankseg only ever replaces files by rename, never writes into one),
    else a copy (file systems without hard links)."""
    tmp = dst.with_name(dst.name + ".tmp")
    remove_quietly(tmp)
    try:
        try:
            os.link(src, tmp)
        except OSError:
            atomic_write_bytes(dst, _read(src, "checkpoint"))
            return
        os.replace(tmp, dst)
    except OSError as exc:
        remove_quietly(tmp)
        raise os_error(dst, exc) from None
    try:
        fsync_dir(dst.parent)  # the new name survives a power loss
    except OSError:
        pass


def keep_checkpoints(paths: RunPaths, iteration: int, keep_last: int) -> list[Path]:
    """After last.pt of `iteration` is in place: keep it as checkpoints/iter_<iteration>.pt
    and delete the periodic checkpoints beyond the `keep_last` newest (0 = keep all).
    Returns the deleted paths.

    Crash-safe: nothing is deleted before the new checkpoint is renamed into place, and never
    the newest checkpoint whose checksum verifies: when the newest is corrupt (a disk that
    damaged it), the newest valid older one is kept besides the `keep_last`. Files of later
    iterations (left by an abandoned attempt before a resume) are not this run's past and are
    left alone; the resumed run replaces them as it reaches them. best.pt is never touched.
    """
    _link_or_copy(paths.last, paths.periodic(iteration))
    if keep_last <= 0:
        return []
    found = periodic_checkpoints(paths)
    order = sorted((k for k in found if k <= iteration), reverse=True)
    if len(order) <= keep_last:
        return []
    keep = set(order[:keep_last])
    valid = next((k for k in order if checkpoint_is_valid(found[k])), None)
    if valid is None:
        return []  # none verifies: deleting could only lose the least damaged state
    keep.add(valid)
    deleted = []
    for k in order:
        if k not in keep:
            try:
                found[k].unlink()
            except FileNotFoundError:
                continue
            except OSError as exc:
                raise os_error(found[k], exc, "cannot delete") from None
            deleted.append(found[k])
    return deleted


def newest_valid_periodic(paths: RunPaths) -> tuple[int, Path] | None:
    """(iteration, path) of the newest periodic checkpoint whose checksum verifies."""
    found = periodic_checkpoints(paths)
    for k in sorted(found, reverse=True):
        if checkpoint_is_valid(found[k]):
            return k, found[k]
    return None


# Weights of the largest model here (Swin-L Mask2Former + optimizer state) are a few GB.
MAX_WEIGHTS_BYTES = 1 << 36


def _read(path: Path, what: str) -> bytes:
    """A run file's bytes; one line for a missing file, a FIFO or device in its place (which
    would block or never end), or one over MAX_WEIGHTS_BYTES."""
    try:
        return read_regular(path, what, MAX_WEIGHTS_BYTES)
    except FileNotFoundError:
        raise UserError(f"{path}: {what} not found") from None
    except OSError as exc:
        raise os_error(path, exc, "cannot read") from None


def other_weights(path: Path) -> str:
    """What to do instead of reading the corrupt `path`: the run's other weights, if any."""
    root = path.parent.parent if path.parent.name == CHECKPOINTS else path.parent
    paths = run_paths(root)
    others = [name for name, p in (("final", paths.weights), ("best", paths.best), ("last", paths.last))
              if p.is_file() and p != path]
    if others:
        return f"use the run's other weights (--weights {' or --weights '.join(others)}) or restore it from a backup"
    return "restore it from a backup or train again"


def _unverified(path: Path) -> None:
    if is_main():
        console.print(f"note: {path} carries no checksum (written before rankseg checked them); "
                      "it is used unverified", highlight=False, soft_wrap=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    fix: str | None = None) -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`: weights_only (no pickled code runs), and
    its checksum verified. A damaged or foreign file is a UserError saying it is corrupt and
    what to do (`fix`, default: the run's other weights). A checkpoint without a checksum (older
    rankseg) is used with a note."""
    path = Path(path)
    data = _read(path, "checkpoint")
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for truncated / foreign / unsafe files
        state, why = None, f"not a readable rankseg checkpoint: {exc.__class__.__name__}"
    else:
        try:
            state, sealed = integrity.unseal(state)
            why = ""
        except ValueError as exc:
            why = str(exc)
    if why:
        raise UserError(f"{path} is corrupt ({why}); {fix or other_weights(path)}")
    if not sealed:
        _unverified(path)
    return state


def save_weights(path: str | Path, model: torch.nn.Module) -> Path:
    """Model weights as safetensors (with their checksum in the header's metadata), written
    like every other run file (atomic_write_bytes).

    Serialised in memory rather than with `save_file`, which writes through a private 0600
    temp file (the weights then had other permissions than config.yaml) and reports a full
    disk as its own exception type instead of an OSError naming the file.
    """
    from safetensors.torch import save

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {"format": "pt", integrity.KEY: integrity.content_digest(state)}
    atomic_write_bytes(path, save(state, metadata=meta))
    return path


def load_weights(path: str | Path, fix: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file, checksum verified (UserError "corrupt" on a mismatch or
    a damaged file; a file without a checksum, e.g. from another tool, is used with a note)."""
    from safetensors.torch import load

    path = Path(path)
    data = _read(path, "weights file")
    try:
        meta = integrity.safetensors_metadata(data)
        state = load(data)
        if integrity.KEY in meta and integrity.content_digest(state) != meta[integrity.KEY]:
            raise ValueError("its SHA-256 does not match the content")
    except Exception as exc:  # safetensors raises its own error type for damaged files
        why = str(exc) if isinstance(exc, ValueError) else f"not a readable safetensors file: {exc.__class__.__name__}"
        raise UserError(f"{path} is corrupt ({why}); {fix or other_weights(path)}") from None
    if integrity.KEY not in meta:
        _unverified(path)
    return state


def find_weights(run_dir: str | Path, which: str = "auto") -> Path:
    """Resolve which weights to load.

    which: "auto" (model.safetensors, else checkpoints/best.pt, else last.pt), "final",
    "best", "last", or a file path.
    """
    paths = run_paths(run_dir)
    named = {"final": paths.weights, "best": paths.best, "last": paths.last}
    if which == "auto":
        for p in (paths.weights, paths.best, paths.last):
            if p.is_file():
                return p
        raise UserError(f"{paths.root}: no weights yet (no {WEIGHTS} and no checkpoints/*.pt); "
                        "train first or wait for the first checkpoint")
    path = named.get(which, Path(which))
    if not path.is_file():
        raise UserError(f"{path}: weights not found (use --weights auto|final|best|last or a file)")
    return path


def model_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The model state dict from a .safetensors file or a training checkpoint."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_weights(path)
    ckpt = load_checkpoint(path)
    model = ckpt.get("model")
    if not isinstance(model, dict) or not all(isinstance(v, torch.Tensor) for v in model.values()):
        raise UserError(f"{path}: not a rankseg checkpoint (no 'model' dictionary of tensors); "
                        f"{other_weights(path)}")
    return model


def load_run(run_dir: str | Path, device: str | torch.device = "cpu",
             weights: str = "auto") -> tuple[torch.nn.Module, TrainConfig]:
    """(model in eval mode on `device`, resolved TrainConfig) of a run directory.

    weights: see `find_weights`. The backbone_weights path of the config is not re-read:
    the run's own weights hold the whole model.
    """
    from rankseg_core.families import family_of

    cfg = load_config(run_dir)
    path = find_weights(run_dir, weights)
    model = family_of(cfg.model.model).build(replace(cfg.model, backbone_weights=None))
    state = model_state(path)
    # load_state_dict raises a RuntimeError (a traceback) for a tensor of another shape, even
    # with strict=False: a config.yaml edited after training (K, img_size, ...) is found here.
    own = model.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape)]
    if wrong:
        raise UserError(f"{path}: weights do not match {run_dir}/config.yaml ({len(wrong)} tensors of another "
                        f"shape, e.g. {wrong[0]}: {tuple(state[wrong[0]].shape)} in the weights, "
                        f"{tuple(own[wrong[0]].shape)} for config.yaml); was config.yaml edited?")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"{path}: weights do not match {run_dir}/config.yaml (missing {len(missing)}, "
                        f"unexpected {len(unexpected)} tensors, e.g. {(list(missing) + list(unexpected))[0]}); "
                        "was config.yaml edited?")
    model.to(resolve_device(device)).eval()
    return model, cfg
