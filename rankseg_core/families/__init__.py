"""Model families (Segmenter, ...) behind one training loop and one evaluation path."""

from __future__ import annotations

from rankseg_core.errors import UserError
from rankseg_core.families.base import Criterion, Family, Predictions
from rankseg_core.families.classifier import CLASSIFIER
from rankseg_core.families.mask2former import MASK2FORMER
from rankseg_core.families.segmenter import SEGMENTER

FAMILIES: dict[str, Family] = {f.name: f for f in (SEGMENTER, MASK2FORMER, CLASSIFIER)}


def family_of(model_name: str) -> Family:
    """The family of a `model.model` name: its prefix before the first '-'."""
    prefix = model_name.split("-", 1)[0]
    if prefix not in FAMILIES:
        raise UserError(f"model.model={model_name!r}: unknown model family '{prefix}'; "
                        f"use one of {', '.join(FAMILIES)} (e.g. segmenter-vitb)")
    return FAMILIES[prefix]


__all__ = ["Criterion", "FAMILIES", "Family", "Predictions", "family_of"]
