"""The dataset a recipe is for, from the name the shards give themselves (`dataset.json`).

Families keep their recipes keyed by these names (families/*.py `RECIPES`); the engine picks
the recipe of the shards a run trains on. A dataset this table does not know gets only the
recipes' "*" entry, i.e. the family's defaults, never another dataset's.
"""

from __future__ import annotations

import re

# Spellings converters and users use for the same datasets (lower case, separators dropped).
_ALIASES = {
    "ade20kfull": "ade20k-full", "ade847": "ade20k-full", "ade20k847": "ade20k-full", "adefull": "ade20k-full",
    "cocolvis": "coco-lvis", "lvis": "coco-lvis", "cocostufflvis": "coco-lvis",
    "ade20k": "ade20k", "ade150": "ade20k", "ade20k150": "ade20k",
    "cocostuff": "coco-stuff", "cocostuff164k": "coco-stuff", "cocostuff10k": "coco-stuff", "cocostuff171": "coco-stuff",
    "pascalcontext": "pascal-context", "pascalcontext59": "pascal-context", "pascalcontext60": "pascal-context",
    "pcontext": "pascal-context", "pc59": "pascal-context", "pc60": "pascal-context",
    "synthetic": "synthetic",
}

# What the data itself asks for, whatever the model family. Synthetic: colour is the class
# identity, so no photometric distortion (a hue shift would turn one class's look into another's).
DATA_DEFAULTS: dict[str, dict[str, object]] = {
    "synthetic": {"aug.photometric": False},
}

# SimFormer's complementary-loss weight (`LOSS.CompSupNovel` of every official `s*_seg.yaml`):
# 0.15 COCO-Stuff-10K, 0.2 ADE20K. Filled only in weak-shot runs (engine/configure.py
# `resolve`); a dataset without an official value gets ADE20K's.
WEAK_SHOT_COMP_WEIGHT = {"coco-stuff": 0.15, "ade20k": 0.2}


def weak_shot_comp_weight(name: str) -> float:
    """The official complementary-loss weight for a dataset name from dataset.json."""
    return WEAK_SHOT_COMP_WEIGHT.get(recipe_dataset(name) or "", WEAK_SHOT_COMP_WEIGHT["ade20k"])


def recipe_dataset(name: str) -> str | None:
    """The recipe key of a dataset name from dataset.json (None if unknown)."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    if key.startswith("ade20kfulltop"):  # ADE20K-x (ProtoSeg): the x most frequent Full classes
        return "ade20k-full"
    return _ALIASES.get(key)
