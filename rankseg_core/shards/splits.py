"""Which split of a shard directory is the training / validation split, when nobody said.

Converters keep each release's own split names (ADE20K: training / validation, COCO: train /
val, YouTube-VIS: train / valid), so a default such as "val" fits some shards and not others.
The rule, written once here and used by `train`, `eval`, `eval-predictions` and `viz`:

- a split the user named always wins (and must exist: `ShardIndex.split_meta` says so);
- otherwise the first of the role's names below that the shards hold;
- otherwise one line listing the shards' splits and the flag that picks one.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from rankseg_core.errors import UserError

# In order of preference; matched exactly (split names are case-sensitive in dataset.json).
TRAIN_NAMES = ("train", "training")
# "test" last: releases with only train / test (COCO-Stuff-10K) evaluate on test; a release with
# a val split keeps it.
VAL_NAMES = ("val", "validation", "valid", "test")
ROLE_NAMES = {"train": TRAIN_NAMES, "val": VAL_NAMES}


def find_split(splits: Iterable[str], role: str) -> str | None:
    """The shards' split for `role` ("train" or "val") by the names above, or None."""
    have = list(splits)
    return next((name for name in ROLE_NAMES[role] if name in have), None)


def default_split(root: str | Path, splits: Iterable[str], role: str, flag: str) -> str:
    """`find_split`, or a UserError naming the splits of `root` and `flag`, the option that
    picks a split (e.g. "--split NAME")."""
    have = list(splits)
    found = find_split(have, role)
    if found is None:
        what = "training" if role == "train" else "validation"
        looked = " / ".join(ROLE_NAMES[role])
        listed = "; ".join(have) or "none"
        raise UserError(f"{root}: no {what} split ({looked}) among its splits ({listed}): "
                        f"pass {flag} with one of them")
    return found
