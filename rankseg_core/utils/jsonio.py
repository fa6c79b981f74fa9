"""Strict JSON: what rankseg writes never holds NaN or Infinity, and what it reads may not either.

Python's `json` writes `NaN` / `Infinity` by default, which most other JSON parsers (jq, JS,
Go, Rust's serde) refuse. Every file rankseg writes goes through `dumps`, which turns a
non-finite float into `null` (a metric that could not be computed, e.g. IoU of a class that
never appears) and then refuses anything else that is not plain JSON.
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np


def strict(obj: Any) -> Any:
    """`obj` with every non-finite float replaced by None and numpy scalars made Python scalars.

    Dicts, lists and tuples are walked (tuples become lists, as `json` writes them anyway);
    anything else is returned as is (so `json` still refuses what it cannot write).
    """
    if isinstance(obj, dict):
        return {k: strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def dumps(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text of `obj` (non-finite floats as null; see `strict`)."""
    return json.dumps(strict(obj), indent=indent, allow_nan=False)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (strict JSON has no NaN or Infinity)")


def loads(text: str | bytes) -> Any:
    """Parse strict JSON: `NaN`, `Infinity` and `-Infinity` raise ValueError like any syntax error."""
    return json.loads(text, parse_constant=_refuse_constant)
