"""Data files shipped with rankseg: the class tables of the repository's `datasets/` folder.

`datasets/` is deliberately not an importable package (`datasets` would shadow Hugging Face's).
An installed wheel carries it as `rankseg_core/_tables/` (see setup.py); a clone or an
editable install reads `datasets/` next to the packages. The packaged copy is looked at first:
next to an installed `rankseg_core` sits site-packages, whose `datasets/` is someone else's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rankseg_core.errors import UserError

_PACKAGE = Path(__file__).resolve().parents[1]  # rankseg_core/
TABLE_DIRS = (_PACKAGE / "_tables", _PACKAGE.parent / "datasets")


def dataset_file(name: str) -> Path:
    """Path of the table `name` (e.g. "ade20k_full/classes.json"); a UserError if the install lacks it."""
    for root in TABLE_DIRS:
        path = root / name
        if path.is_file():
            return path
    raise UserError(f"class table datasets/{name} is missing from this install ({_PACKAGE}): reinstall "
                    "rankseg (`pip install rankseg-toolkit`, or `pip install -e .` in a clone)")


def load_json(name: str) -> Any:
    return json.loads(dataset_file(name).read_text(encoding="utf-8"))
