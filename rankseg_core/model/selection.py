"""Which classes a RankSeg head classifies pixels / regions over: the one selection of every head.

A head ranks the K classes by its multi-label logits and keeps the top kappa, in rank order
(docs/method.md sec. 3). The options below replace or change that choice at a forward; the
Segmenter head (heads.py) and Mask2Former (mask2former/model.py) both call `select`, so every
option means the same in both families.

`SelectionOptions` is what a user chooses once for a whole evaluation or prediction (the CLI's
--kappa, --dynamic-kappa, --oracle, --oracle-fill); `batch_selection` turns it into the
`Selection` of one forward (`model(images, selection)`), with that batch's GT classes.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from rankseg_core.config.model import ModelConfig
from rankseg_core.errors import UserError
from rankseg_core.utils.transfer import host_to

ORACLE_FILLS = ("ranked", "random")


@dataclass(frozen=True)
class SelectionOptions:
    """How an evaluation or prediction selects classes (None / False = as the model was trained).

    kappa: classes selected per image at test time (may differ from training; with
        --oracle --oracle-fill, the size the GT classes are filled up to).
    dynamic_kappa: select the classes whose sigmoid score exceeds this threshold.
    oracle: GT (eval): select exactly each image's GT classes.
    oracle_fill: with oracle, fill the GT classes up to kappa with the model's highest-ranked
        other classes ("ranked") or with uniformly drawn ones ("random", seeded by the image key).
    """

    kappa: int | None = None
    dynamic_kappa: float | None = None
    oracle: bool = False
    oracle_fill: str | None = None

    def check(self) -> None:
        """UserError naming the option for a value no model can use."""
        if self.kappa is not None and self.kappa < 1:
            raise UserError(f"--kappa {self.kappa}: must be at least 1 (classes selected per image)")
        if self.dynamic_kappa is not None and not 0 < self.dynamic_kappa < 1:
            raise UserError(f"--dynamic-kappa {self.dynamic_kappa}: a sigmoid threshold in (0, 1), e.g. 0.05")
        if self.oracle_fill is not None:
            if self.oracle_fill not in ORACLE_FILLS:
                raise UserError(f"--oracle-fill {self.oracle_fill!r}: use {' or '.join(ORACLE_FILLS)}")
            if not self.oracle:
                raise UserError("--oracle-fill fills the GT (eval) selection: add --oracle")

    @property
    def is_default(self) -> bool:
        return self == SelectionOptions()


@dataclass(frozen=True)
class Selection:
    """Selection options of one forward (None everywhere = the trained behaviour).

    kappa: classes kept per image (default: the trained kappa; more than trained repeats the
        last rank's gamma / beta, more than K keeps all K).
    dynamic_threshold: keep the classes whose sigmoid score exceeds it (1..K per image, padded).
    override: per-image (or per-frame: merged per clip) class ids replacing the ranking's
        choice (the GT (eval) oracle); ordered by the ranking's score when there is one.
    fill: with `override`, extend each list with the ranking's highest other classes until it
        holds `fill` classes (GT (eval) + the ranking's own false positives).
    gt_classes: per-image GT class ids; required by, and only used by, a GT (train + eval)
        oracle model, which always selects them.
    """

    kappa: int | None = None
    dynamic_threshold: float | None = None
    override: list[Tensor] | None = None
    fill: int | None = None
    gt_classes: list[Tensor] | None = None


NO_SELECTION = Selection()


def in_range(c: Tensor, num_classes: int, device: torch.device) -> Tensor:
    """Unique class ids (sorted), without ignore values / out-of-range ids a caller may pass."""
    c = torch.as_tensor(c, dtype=torch.long, device=device).flatten()
    return torch.unique(c[(c >= 0) & (c < num_classes)])


def per_clip(classes: list[Tensor], b: int, clip_len: int) -> list[Tensor]:
    """Class lists given per frame (B*T) are merged per clip; lists given per clip pass through."""
    if len(classes) == b:
        return list(classes)
    if len(classes) == b * clip_len:
        frames = [classes[i * clip_len:(i + 1) * clip_len] for i in range(b)]
        return [torch.unique(torch.cat([torch.as_tensor(c).flatten() for c in clip])) for clip in frames]
    raise ValueError(f"got {len(classes)} class lists for {b} clips of {clip_len} frames")


def pad_class_lists(classes: list[Tensor], max_len: int | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """Per-image class-id lists -> index B x C (padding 0) and valid B x C.

    Lists are truncated to `max_len`; an empty list selects class 0 so that every image keeps
    one channel (the official oracle does the same).
    """
    rows = []
    for c in classes:
        c = torch.as_tensor(c, dtype=torch.long, device=device).flatten()
        rows.append((c[:max_len] if max_len else c) if c.numel() else c.new_zeros(1))
    index = nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1)
    valid = index >= 0
    return index.clamp_min(0), valid


def fill_from_ranking(classes: list[Tensor], ml_logits: Tensor, total: int) -> list[Tensor]:
    """Extend each image's class list with the highest-ranked classes it lacks until it holds
    `total` classes (longer lists are kept whole). classes: B lists of ids; ml_logits: B x K.

    This is the GT (eval) oracle with the ranking's own false positives: recall 100 % and the
    same competing classes as the learned top-kappa, which tells classes the ranking misses
    from classes it wrongly keeps (docs/replication.md, "Why the selection does not help here").
    """
    out = []
    ranking = ml_logits.detach().argsort(dim=1, descending=True, stable=True)
    for c, r in zip(classes, ranking, strict=True):
        c = in_range(c, ml_logits.shape[1], r.device)
        out.append(torch.cat([c, r[~torch.isin(r, c)][: max(0, total - c.numel())]]))
    return out


def resolve_override(sel: Selection, oracle: bool, ml_logits: Tensor | None, b: int,
                     clip_len: int = 1) -> list[Tensor] | None:
    """The per-clip class lists that replace the ranking at this forward, or None.

    An oracle model takes `gt_classes` when nothing else is given (ValueError without them);
    `fill` extends the lists from the ranking (ValueError for a model without one).
    """
    override = sel.override
    if oracle and override is None:
        if sel.gt_classes is None:
            raise ValueError("oracle model needs gt_classes (per image class ids) at every forward")
        override = sel.gt_classes
    if override is None:
        return None
    lists = per_clip(list(override), b, clip_len)
    if sel.fill is not None and sel.override is not None:
        if ml_logits is None:
            raise ValueError("select_fill fills from the model's class ranking; this model has none")
        lists = fill_from_ranking(lists, ml_logits, sel.fill)
    return lists


def select(ml_logits: Tensor | None, num_classes: int, kappa: int, device: torch.device, *,
           dynamic_threshold: float | None = None, override: list[Tensor] | None = None,
           by_id: bool = False) -> tuple[Tensor, Tensor | None]:
    """Classes kept per image -> index B x C (class ids) and valid B x C (None = all valid).

    Default: the kappa highest ml logits (B x K), in rank order (no gradient through the sort).
    dynamic_threshold: the classes whose sigmoid exceeds it (1..K per image; padded).
    override: per-image class ids (GT oracle, stored predictions); out-of-range ids such as
        the ignore value are dropped, duplicates merged; ordered by ml score when ml_logits
        is given (per-rank gamma keeps its meaning), else by id; truncated to kappa if by_id.
    """
    if override is not None:
        # The lists decide the shapes: host work (the GT oracle's come from one host table,
        # stored predictions from files), then one non-blocking copy of the padded table.
        host = torch.device("cpu")
        lists = [in_range(c, num_classes, host) for c in override]
        index, valid = pad_class_lists(lists, kappa if by_id else None, host)
        all_valid = bool(valid.all())
        index, valid = host_to(index, device), host_to(valid, device)
        if ml_logits is not None:
            score = ml_logits.detach().gather(1, index).masked_fill(~valid, float("-inf"))
            order = score.argsort(dim=1, descending=True, stable=True)
            index, valid = index.gather(1, order), valid.gather(1, order)
        return index, (None if all_valid else valid)
    if ml_logits is None:
        raise ValueError("selecting classes needs ml logits or an explicit class list")
    ranking = ml_logits.detach().argsort(dim=1, descending=True, stable=True)
    if dynamic_threshold is not None:
        n = (ml_logits.detach().sigmoid() > dynamic_threshold).sum(1).clamp(1, num_classes)
        c = int(n.max())
        valid = torch.arange(c, device=ml_logits.device)[None, :] < n[:, None]
        return ranking[:, :c], (None if bool(valid.all()) else valid)
    return ranking[:, : max(1, min(kappa, num_classes))], None


def select_for(sel: Selection, ml_logits: Tensor | None, num_classes: int, trained_kappa: int, device: torch.device,
               override: list[Tensor] | None, by_id: bool = False) -> tuple[Tensor, Tensor | None]:
    """`select` with one forward's options: its kappa (else the trained one) and dynamic threshold;
    `override` is what `resolve_override` returned for that forward. -> index B x C, valid B x C | None."""
    kappa = sel.kappa if sel.kappa is not None else trained_kappa
    return select(ml_logits, num_classes, kappa, device, dynamic_threshold=sel.dynamic_threshold, override=override,
                  by_id=by_id)


def allowed_classes(lists: list[Tensor], num_classes: int, device: torch.device) -> Tensor:
    """B x K bool: the classes of each list (a class-ordered model restricted to a GT (eval) selection)."""
    idx, ok = pad_class_lists(lists, None, device)
    idx = idx.masked_fill(~ok | (idx >= num_classes) | (idx < 0), num_classes)
    valid = torch.zeros(idx.shape[0], num_classes + 1, dtype=torch.bool, device=device)
    valid.scatter_(1, idx, True)
    return valid[:, :num_classes]


def random_fill(classes: np.ndarray, num_classes: int, total: int, key: str) -> Tensor:
    """The image's GT class ids (ignore dropped) plus classes drawn uniformly from the others
    until there are `total`; the draw depends only on the sample key (batching, workers and
    DDP ranks do not change it)."""
    c = np.unique(np.asarray(classes, np.int64))
    c = c[(c >= 0) & (c < num_classes)]
    others = np.setdiff1d(np.arange(num_classes), c)
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    extra = rng.choice(others, size=min(len(others), max(0, total - len(c))), replace=False)
    return torch.as_tensor(np.concatenate([c, extra]), dtype=torch.long)


def batch_selection(opts: SelectionOptions, m: ModelConfig, classes: list[np.ndarray], device: torch.device,
                    keys: list[str] | None = None) -> Selection:
    """The Selection of one batch: `classes` are its images' GT class ids, `keys` their sample
    keys (they seed the "random" oracle fill). A GT (train + eval) oracle model always gets
    the GT classes."""
    gt = [torch.as_tensor(c, dtype=torch.long, device=device) for c in classes]
    if m.oracle:
        return Selection(kappa=opts.kappa, dynamic_threshold=opts.dynamic_kappa, gt_classes=gt)
    override, fill = None, None
    if opts.oracle:
        total = opts.kappa if opts.kappa is not None else m.kappa
        if opts.oracle_fill == "ranked":
            fill = total
        elif opts.oracle_fill == "random":
            if keys is None or len(keys) != len(classes):
                raise ValueError("the random oracle fill needs one sample key per image")
            gt = [random_fill(c, m.num_classes, total, key).to(device) for c, key in zip(classes, keys)]
        override = gt
    return Selection(kappa=opts.kappa, dynamic_threshold=opts.dynamic_kappa, override=override, fill=fill)
