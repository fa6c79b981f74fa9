"""Strict JSON: what rankseg writes never holds NaN or Infinity, and what it reads may not either.

Python's `json` writes `NaN` / `Infinity` by default, which most other JSON parsers (jq, JS,
Go, Rust's serde) refuse. Every file rankseg writes goes through `dumps`, which turns a
non-finite float into `null` (a metric that could not be computed, e.g. IoU of a class that
never appears) and then refuses anything else that is not plain JSON.

`loads` is the reader for files that may have been tampered with: besides NaN / Infinity it
refuses numbers beyond a double's range (`1e400`, which `json` turns into inf) and nesting
deeper than MAX_DEPTH, so that a crafted record is a ValueError at parse time rather than a
RecursionError in whatever walks it later (`json` itself recurses once per level).
"""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np

# rankseg's own files nest 6 levels at most (dataset.json, COCO / LVIS annotations); far below
# the interpreter's recursion limit, so code that walks a parsed document never hits it.
MAX_DEPTH = 64


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


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is beyond the range of a double")
    return value


def depth(obj: Any) -> int:
    """Nesting depth of a parsed document (a scalar: 0, `[]`: 1), without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict):
            node = list(node.values())
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, level)
        stack.extend((child, level + 1) for child in node if isinstance(child, (dict, list)))
    return deepest


def loads(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Parse strict JSON; ValueError (like any syntax error) for `NaN`, `Infinity`, `-Infinity`,
    a number beyond a double's range, an integer of more than 4300 digits, or nesting deeper
    than `max_depth`."""
    try:
        obj = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError(f"nested deeper than {max_depth} levels") from None
    if depth(obj) > max_depth:
        raise ValueError(f"nested deeper than {max_depth} levels")
    return obj
