"""SimFormer* pseudo labels (`rankseg pseudo-label`): a weak-shot run's predictions on its
training images, merged with the base ground truth into new shards to retrain on.

The official stage (bcmi/SimFormer-Weak-Shot-Semantic-Segmentation, `prop_former/
pseudo_labeling.py` `generate_pseudo_label`, run by `prop_former/evaluation.py` with the
`_1Prop_Cfgs/*/s*_seg_pseudo_label.yaml` configs on the TRAINING split) labels each pixel of a
training image, "existing" image type (the only one any shipped split uses):

- the GT class where the GT is a base class (written last, so it wins over everything);
- else the predicted class where the argmax prediction is a novel class that occurs in the
  image's ORIGINAL label (its image-level labels: `np.unique` of the whole GT map);
- else ignore (a hidden novel pixel predicted as a base class or as an absent novel class,
  an unlabelled pixel predicted as anything but a present novel class).

Then `s*_seg_retraining.yaml` trains the plain model on these maps with every class having
masks (`NOVEL_HAS_MASK: True`, `CompSupNovel: 0`, no pixel pairs): here `rankseg train --data
NEW_SHARDS` without `--weak-shot` (docs/weak-shot.md, "SimFormer*").

Predictions come from the engine's own inference, as `rankseg eval` makes them
(`evaluate.EvalData`'s test transform, the size groups of a batch, `batch_selection`,
`Family.predict` at the label's size); the default protocol is the official one, a whole-image
pass at the test size (one scale, no flip); `run_protocol` takes the run's `eval.*` instead.

The new shards go through the shard writer (`shards/write.py`): `claim_output` (never over a
directory this command did not make, or one made with other inputs), `pending_shards` /
`write_pending` (atomic, checksummed shards: an interrupted call leaves only complete shards,
a re-run predicts only what is missing) and `assemble` (dataset.json last). Images are the
source's bytes; every other split is copied sample by sample, labels and all, unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rankseg_core.config.train import TrainConfig
from rankseg_core.data.augment import build_test_transform
from rankseg_core.data.loading import worker_init
from rankseg_core.data.weak_shot import novel_table
from rankseg_core.engine.evaluate import EvalData, EvalOptions, same_size_groups
from rankseg_core.engine.runs import find_weights, load_config, load_run
from rankseg_core.errors import UserError
from rankseg_core.families import family_of
from rankseg_core.families.base import Family, InferenceProtocol
from rankseg_core.model.selection import SelectionOptions, batch_selection
from rankseg_core.shards.codec import IGNORE
from rankseg_core.shards.read import ShardDataset, ShardIndex
from rankseg_core.shards.write import (
    MARKER,
    DatasetHeader,
    EncodedSample,
    assemble,
    claim_output,
    encode_sample,
    pending_shards,
    release_output,
    write_pending,
)
from rankseg_core.utils import distributed as D
from rankseg_core.utils import integrity, jsonio
from rankseg_core.utils.lock import is_lock_file

# What `rankseg pseudo-label` records under dataset.json "options": a directory whose marker
# lacks it was made by another command and is never written into.
OPTIONS_KEY = "pseudo_label"
RULE = ("SimFormer generate_pseudo_label ('existing' images): base GT where the GT is base; else the "
        "predicted class where it is a novel class of the original label; else ignore")


def pseudo_label(gt: np.ndarray, pred: np.ndarray, novel: np.ndarray) -> np.ndarray:
    """SimFormer's pseudo label of one image.

    gt: H x W train ids of the ORIGINAL label (IGNORE, or any value >= K, = unlabelled);
    pred: H x W predicted class ids; novel: K booleans (`novel_table`). Returns H x W uint16:
    gt where gt is a base class; else pred where pred is a novel class present in gt; else
    IGNORE.
    """
    if gt.shape != pred.shape:
        raise ValueError(f"label {gt.shape} and prediction {pred.shape} differ in size")
    k = novel.size
    g = gt.astype(np.int64)
    labelled = (g >= 0) & (g < k)
    g_novel = labelled & novel[np.where(labelled, g, 0)]
    present = np.zeros(k, bool)
    present[np.unique(g[g_novel])] = True  # the image-level novel labels
    p = pred.astype(np.int64)
    keep = (p >= 0) & (p < k)
    keep &= present[np.where(keep, p, 0)]
    out = np.full(gt.shape, IGNORE, np.uint16)
    out[keep] = p[keep]
    base = labelled & ~g_novel
    out[base] = g[base]  # last, as the official loop: a base GT pixel is never relabelled
    return out


@dataclass
class PseudoLabelOptions:
    """What `rankseg pseudo-label` can change."""

    split: str | None = None  # None: the run's training split (data.train_split)
    weights: str = "auto"  # auto | final | best | last | a file (runs.find_weights)
    device: str = "auto"
    # The test protocol: the official whole-image pass at the test size unless run_protocol
    # (the run's eval.mode / scales / flip); mode / scales / flip override either.
    run_protocol: bool = False
    mode: str | None = None
    scales: list[float] | None = None
    flip: bool | None = None
    samples_per_shard: int = 1000


@dataclass
class PseudoLabelSummary:
    """What one call did: per split the samples in NEW_SHARDS and how many this call wrote
    (fewer on a resume), and novel pixels of the pseudo-labelled split (pseudo vs GT)."""

    out: Path
    split: str
    weights: Path
    protocol: InferenceProtocol
    samples: dict[str, int] = field(default_factory=dict)
    written: dict[str, int] = field(default_factory=dict)
    novel_pixels: int = 0  # pixels labelled with a novel class in the pseudo labels
    novel_gt_pixels: int = 0  # novel pixels of the original labels of that split


def inference_protocol(cfg: TrainConfig, opts: PseudoLabelOptions) -> InferenceProtocol:
    """The official protocol (whole image, scale 1, no flip) or the run's `eval.*`, with the
    options' mode / scales / flip over it; checked as `rankseg eval` checks them."""
    base = EvalOptions() if opts.run_protocol else EvalOptions(mode="whole", scales=[1.0], flip=False)
    chosen = EvalOptions(mode=opts.mode or base.mode, scales=opts.scales or base.scales,
                         flip=base.flip if opts.flip is None else opts.flip)
    chosen.check()
    return chosen.protocol(cfg)


def make_pseudo_labels(run_dir: str | Path, out: str | Path, data: str | Path | None = None,
                       opts: PseudoLabelOptions | None = None) -> PseudoLabelSummary:
    """Predict `opts.split` of `data` (default: the run's shards) with the weak-shot run
    `run_dir`, write NEW shards `out` with its pseudo labels (`pseudo_label`) and every other
    split copied, and return what was done. Resumable: re-run the same call after an
    interruption; a different run, weights, source, split or protocol is refused."""
    opts = opts or PseudoLabelOptions()
    if opts.samples_per_shard < 1:
        raise UserError(f"--samples-per-shard {opts.samples_per_shard}: must be >= 1")
    if D.current().enabled:
        raise UserError("rankseg pseudo-label writes one shard directory: run it in one process (not under torchrun)")
    cfg = load_config(run_dir)
    family = _check_run(run_dir, cfg)
    assert cfg.data.novel_classes is not None  # _check_run
    source = Path(data or cfg.data.root)
    index = ShardIndex(source)
    _check_source(index, cfg)
    split = opts.split or cfg.data.train_split or "train"
    if split not in index.splits:
        raise UserError(f"--split {split}: {source} has no such split (available: {', '.join(index.splits)})")
    out = Path(out)
    _check_out(out, source)
    protocol = inference_protocol(cfg, opts)
    weights = find_weights(run_dir, opts.weights)
    device = D.resolve_device(opts.device)
    model, cfg = load_run(run_dir, device, str(weights))
    header = _header(index, cfg, run_dir, weights, model, split, protocol, opts.samples_per_shard)
    _check_same_inputs(out, header)
    summary = PseudoLabelSummary(out, split, weights, protocol)
    claim_output(out, header)  # the writer lock; checks the directory again under it
    try:
        # The pseudo-labelled split first: its DataLoader workers fork before this process
        # opens any shard for the copies (an HDF5 handle must not cross a fork).
        for name in [split, *(s for s in index.splits if s != split)]:
            ds = ShardDataset(source, name)
            keys = list(ds.arrays.keys)
            if name == split and not keys:
                raise UserError(f"--split {split}: {source} holds no samples in this split")
            todo = pending_shards(out, name, keys, samples_per_shard=opts.samples_per_shard)
            todo_keys = [k for shard in todo for k in shard.keys]
            if name == split:
                stream = _pseudo_samples(model, cfg, family, ds, todo_keys, protocol, device)
            else:
                stream = _copied_samples(ds, todo_keys)
            if todo:
                write_pending(todo, stream, header, desc=f"{'pseudo-label' if name == split else 'copy'} {name}")
            summary.written[name] = len(todo_keys)
        meta = assemble(out, header, index.splits)
    finally:
        release_output(out)
    novel = np.asarray(cfg.data.novel_classes, np.int64)
    summary.samples = {s: int(v["num_samples"]) for s, v in meta["splits"].items()}
    summary.novel_pixels = int(np.asarray(meta["splits"][split]["class_pixels"])[novel].sum())
    summary.novel_gt_pixels = int(np.asarray(index.split_meta(split)["class_pixels"])[novel].sum())
    return summary


# ---------------------------------------------------------------------------------------
# Checks (each a one-line UserError, before anything is written)


def _check_run(run_dir: str | Path, cfg: TrainConfig) -> Family:
    family = family_of(cfg.model.model)
    if cfg.data.novel_classes is None:
        raise UserError(f"{run_dir} is not a weak-shot run (its config.yaml has no data.novel_classes): pseudo "
                        "labels complete the novel classes of a run trained with --weak-shot SPLIT")
    if not family.segments:
        raise UserError(f"{cfg.model.model} does not segment: pseudo labels need a segmentation run")
    if cfg.model.oracle:
        raise UserError(f"{run_dir} is a GT (train + eval) oracle model: it needs the ground-truth classes to predict")
    if cfg.model.clip_len != 1:
        raise UserError(f"{run_dir} is a video model (clip_len {cfg.model.clip_len}); weak-shot pseudo labels are "
                        "defined for single images")
    return family


def _check_source(index: ShardIndex, cfg: TrainConfig) -> None:
    if index.num_classes != cfg.model.num_classes:
        raise UserError(f"--data {index.root}: K={index.num_classes} but the run was trained with "
                        f"K={cfg.model.num_classes}; give the shards of the run's dataset")
    if cfg.data.class_names and index.class_names != list(cfg.data.class_names):
        first = next(i for i, (a, b) in enumerate(zip(index.class_names, cfg.data.class_names)) if a != b)
        raise UserError(f"--data {index.root}: class {first} is {index.class_names[first]!r} there but "
                        f"{cfg.data.class_names[first]!r} in the run: give the shards of the run's class table")
    if index.is_panoptic:
        raise UserError(f"--data {index.root} is a panoptic shard set, whose segments would no longer match the "
                        "new labels; give semantic shards of the dataset (rankseg prepare without panoptic)")


def _check_out(out: Path, source: Path) -> None:
    """--out must be a new place: not the source shards, not inside them, not holding them, and
    not a non-empty directory that another command made."""
    dst, src = out.resolve(), source.resolve()
    if dst.is_relative_to(src) or src.is_relative_to(dst):
        raise UserError(f"--out {out}: must be outside the source shards --data {source} and not contain them; "
                        "choose a new directory")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory: choose another --out")
    if not out.is_dir() or not any(not is_lock_file(p.name) for p in out.iterdir()):
        return
    options = _marker_options(out)
    if options is None or OPTIONS_KEY not in options:
        raise UserError(f"--out {out} is not empty and was not made by `rankseg pseudo-label`: choose an empty or "
                        "new --out")


def _marker_options(out: Path) -> dict | None:
    """The options recorded in `out`'s shard marker, or None (no marker, or not readable)."""
    try:
        have = jsonio.loads((out / MARKER).read_bytes())
    except (OSError, ValueError):
        return None
    options = have.get("options") if isinstance(have, dict) else None
    return options if isinstance(options, dict) else None


def _check_same_inputs(out: Path, header: DatasetHeader) -> None:
    """A partly written --out is resumed only by the same command: name what differs."""
    options = _marker_options(out)
    if options is None:
        return
    have, want = options.get(OPTIONS_KEY) or {}, header.options[OPTIONS_KEY]
    changed = [k for k in want if have.get(k) != want[k]]
    if options.get("samples_per_shard") != header.options["samples_per_shard"]:
        changed.append("samples_per_shard")
    if changed:
        raise UserError(f"--out {out} holds pseudo labels made with other inputs ({', '.join(changed)} differ): "
                        "re-run the command that made it to resume, or choose a new --out")


def _header(index: ShardIndex, cfg: TrainConfig, run_dir: str | Path, weights: Path, model: nn.Module, split: str,
            protocol: InferenceProtocol, samples_per_shard: int) -> DatasetHeader:
    """The new shards' header: the source's name, classes and options (recipes and readers key
    on them) plus what made the pseudo labels, which a resume must match exactly."""
    made = {
        "rule": RULE,
        "source": str(index.root.resolve()),
        # The source's dataset.json holds every shard's SHA-256: this pins the source content.
        "source_sha256": hashlib.sha256((index.root / "dataset.json").read_bytes()).hexdigest(),
        "run": str(Path(run_dir).resolve()),
        "weights": str(weights.resolve()),
        # Of the tensors as loaded (what predicted), not of the file bytes: for model.safetensors
        # it equals the digest in the file's header (runs.save_weights).
        "weights_sha256": integrity.content_digest(model.state_dict()),
        "split": split,
        "weak_shot": cfg.data.weak_shot,
        "weak_shot_sha256": cfg.data.weak_shot_sha256,
        "novel_classes": list(cfg.data.novel_classes or []),
        "protocol": {"mode": protocol.mode, "scales": list(protocol.scales), "flip": bool(protocol.flip),
                     "short_side": cfg.eval.short_side, "max_long": cfg.eval.max_long, "crop": cfg.eval.crop,
                     "stride": cfg.eval.stride, "kappa": cfg.model.effective_kappa},
    }
    options: dict[str, Any] = {**index.meta.get("options", {}), "samples_per_shard": samples_per_shard,
                               OPTIONS_KEY: made}
    return DatasetHeader(index.name, index.class_names, options, index.meta.get("class_source", ""))


# ---------------------------------------------------------------------------------------
# Samples


def _orig_sizes(ds: ShardDataset) -> tuple[np.ndarray, np.ndarray]:
    """The split's `orig_height` / `orig_width` columns (not in SplitArrays), read and closed
    again before any DataLoader worker forks."""
    heights, widths = [], []
    for position, path in enumerate(ds.paths):
        with ds.index.open_checked(ds.split, position) as f:
            try:
                heights.append(f["orig_height"][:])
                widths.append(f["orig_width"][:])
            except (KeyError, OSError, ValueError) as exc:
                raise UserError(f"{path}: shard is damaged ({exc}); run `rankseg verify`") from None
    return np.concatenate(heights), np.concatenate(widths)


class _Samples(EvalData):
    """`rankseg eval`'s items (test-size image, original label) plus the stored image bytes
    and instances JSON the new shard keeps."""

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = super().__getitem__(i)
        j = self.items[i][0][0]
        item["stored_image"] = self.ds.raw(j)[0]
        item["instances"] = self.ds.instances_json(j)
        return item


@torch.no_grad()
def _pseudo_samples(model: nn.Module, cfg: TrainConfig, family: Family, ds: ShardDataset, keys: list[str],
                    protocol: InferenceProtocol, device: torch.device) -> Iterator[EncodedSample]:
    """One EncodedSample per key, in order: the stored image and the pseudo label of the
    prediction `rankseg eval` would make of it under `protocol`."""
    if not keys:
        return
    where = ds.key_to_index()
    index = [where[k] for k in keys]
    a = ds.arrays
    orig_h, orig_w = _orig_sizes(ds)
    dc = family.data_config(model)
    data = _Samples(ds, [([i], [True]) for i in index], build_test_transform(cfg, dc["mean"], dc["std"]))
    workers = cfg.eval.num_workers if len(index) > 8 else 0  # as `rankseg eval`: start-up costs more on tiny sets
    loader = torch.utils.data.DataLoader(data, batch_size=cfg.eval.batch_size, num_workers=workers,
                                         collate_fn=list, worker_init_fn=worker_init)
    novel = novel_table(cfg.data.novel_classes or [], cfg.model.num_classes)
    no_options = SelectionOptions()  # the selection as trained (a weak-shot run is never an oracle)
    for batch in loader:
        preds: dict[str, np.ndarray] = {}
        for frames in same_size_groups(batch):  # may reorder a batch's items: keyed below
            sel = batch_selection(no_options, cfg.model, frames.classes, device, frames.keys)
            res = family.predict(model, cfg, frames.images.to(device), frames.sizes, protocol, sel)
            assert res.semantic is not None  # a segmenting family (_check_run)
            for j, key in enumerate(frames.keys):
                preds[key] = res.semantic[j].cpu().numpy()
        for item in batch:
            key, gt = item["keys"][0], item["labels"][0]
            i = where[key]
            yield encode_sample(key, item["stored_image"], pseudo_label(gt, preds[key], novel), cfg.model.num_classes,
                                orig_size=(int(orig_h[i]), int(orig_w[i])), video=a.video[i], frame=int(a.frame[i]),
                                instances=item["instances"])


def _copied_samples(ds: ShardDataset, keys: list[str]) -> Iterator[EncodedSample]:
    """One EncodedSample per key, in order: the stored sample unchanged (image and label bytes,
    sizes, class lists, video fields)."""
    if not keys:
        return
    where = ds.key_to_index()
    a = ds.arrays
    orig_h, orig_w = _orig_sizes(ds)
    for key in keys:
        i = where[key]
        image, label = ds.raw(i)
        yield EncodedSample(key, image, label, int(a.height[i]), int(a.width[i]), int(orig_h[i]), int(orig_w[i]),
                            a.classes_of(i).astype(np.uint16), a.pixels_of(i).astype(np.int64), a.video[i],
                            int(a.frame[i]), ds.instances_json(i))
