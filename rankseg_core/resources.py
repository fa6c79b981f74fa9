"""Data files shipped with rankseg (class tables under the repository's `datasets/`)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

# `datasets/` sits next to the packages in the source tree (editable installs, clones);
# it is deliberately not an importable package: `datasets` would shadow Hugging Face's.
DATASETS_DIR = Path(__file__).resolve().parents[1] / "datasets"


def dataset_file(name: str) -> Path:
    """Path of `datasets/<name>`; a UserError if the install lacks it."""
    path = DATASETS_DIR / name
    if not path.exists():
        raise UserError(f"{path} is missing from this install: reinstall rankseg from a full clone "
                        "(`pip install -e .`)")
    return path


def load_json(name: str) -> object:
    return json.loads(dataset_file(name).read_text())
