"""Model families (Segmenter, Mask2Former / MaskFormer / ViT-Adapter, the multi-label classifier,
DeepLabv3 / UperNet) behind one engine.

Each family is a `Family` (base.py) in its own module, holding everything that differs between
families: model names, recipes, parameter groups, capabilities, training loss and inference.
"""

from __future__ import annotations

from rankseg_core.config.model import ModelConfig
from rankseg_core.errors import UserError
from rankseg_core.families.base import Family
from rankseg_core.families.classifier import CLASSIFIER
from rankseg_core.families.convseg import CONVSEG
from rankseg_core.families.mask2former import MASK2FORMER, MASK2FORMER_VITADAPTER
from rankseg_core.families.segmenter import SEGMENTER

FAMILIES: tuple[Family, ...] = (SEGMENTER, MASK2FORMER, CLASSIFIER, *CONVSEG, MASK2FORMER_VITADAPTER)


def family_of(model_name: str) -> Family:
    """The family whose `models` name `model_name` (UserError listing every known name)."""
    families = FAMILIES  # read at call time: a new family is one more entry in FAMILIES
    for family in families:
        if model_name in family.models:
            return family
    names = ", ".join(name for family in families for name in family.models)
    raise UserError(f"model.model={model_name!r} is unknown; use one of {names}")


def check_head(m: ModelConfig) -> None:
    """UserError for a `model.head` the model's family does not build (`Family.heads`), naming
    the families that do."""
    family = family_of(m.model)
    if m.head not in family.heads:
        takers = ", ".join(f.name for f in FAMILIES if m.head in f.heads) or "none"
        raise UserError(f"model.head={m.head}: a {family.name} model ({m.model}) takes --head "
                        f"{' / '.join(family.heads)}; {m.head} is a head of: {takers}")
