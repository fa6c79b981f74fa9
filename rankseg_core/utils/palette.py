"""A deterministic colour palette that stays distinguishable for thousands of classes."""

from __future__ import annotations

import colorsys
import re

import numpy as np

_GOLDEN = 0.618033988749895


def make_palette(num_classes: int) -> np.ndarray:
    """K x 3 uint8 RGB colours.

    Hues walk the circle by the golden ratio so that neighbouring ids (often semantically
    close) get far-apart hues; saturation and value cycle through three levels each so that
    classes whose hues coincide after ~100 steps still differ in brightness.
    """
    ids = np.arange(num_classes)
    hue = (ids * _GOLDEN) % 1.0
    sat = np.array([0.9, 0.6, 0.75])[ids % 3]
    val = np.array([0.95, 0.7, 0.5])[(ids // 3) % 3]
    rgb = [colorsys.hsv_to_rgb(h, s, v) for h, s, v in zip(hue, sat, val)]
    return np.round(np.asarray(rgb, dtype=np.float64).reshape(-1, 3) * 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------
# Per-figure colours: a dataset palette gives K colours, and with K in the thousands some
# pairs are bound to look alike; what matters is that the classes shown together differ.

# Error maps draw correct pixels white and ignore pixels black: no class may look like them.
RESERVED_RGB = ((0, 0, 0), (255, 255, 255))
MIN_DELTA_E = 22.0  # CIE76 distance under which two swatches are hard to tell apart at a glance


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """N x 3 sRGB (0..255) -> N x 3 CIELAB (D65)."""
    c = np.asarray(rgb, np.float64).reshape(-1, 3) / 255.0
    c = np.where(c > 0.04045, ((c + 0.055) / 1.055) ** 2.4, c / 12.92)
    xyz = c @ np.array([[0.4124, 0.3576, 0.1805], [0.2126, 0.7152, 0.0722], [0.0193, 0.1192, 0.9505]]).T
    xyz /= np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > 0.008856, np.cbrt(xyz), 7.787 * xyz + 16 / 116)
    return np.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], axis=1)


def _candidates() -> np.ndarray:
    levels = np.array([0, 64, 128, 192, 255])
    grid = np.stack(np.meshgrid(levels, levels, levels, indexing="ij"), -1).reshape(-1, 3)
    return grid.astype(np.uint8)


_CANDIDATES = _candidates()
_CANDIDATES_LAB = rgb_to_lab(_CANDIDATES)


def min_colour_distance(rgb: np.ndarray) -> float:
    """Smallest CIE76 distance between two rows of N x 3 RGB (inf for fewer than two)."""
    lab = rgb_to_lab(rgb)
    if len(lab) < 2:
        return float("inf")
    d = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
    d[np.diag_indices(len(lab))] = np.inf
    return float(d.min())


def distinct_palette(palette: np.ndarray, ids, reserved=RESERVED_RGB, min_delta: float = MIN_DELTA_E) -> np.ndarray:
    """A copy of the K x 3 `palette` in which the classes `ids` (most important first) look
    different from each other and from `reserved`.

    A class keeps its dataset colour when it is at least `min_delta` from every colour taken
    before it, so most classes look as in every other figure; otherwise it takes the
    candidate colour farthest from all taken ones (deterministic for the same ids).
    """
    out = np.array(palette, np.uint8, copy=True)
    taken = [lab for lab in rgb_to_lab(np.asarray(reserved, np.uint8))] if len(reserved) else []
    for c in ids:
        c = int(c)
        lab = rgb_to_lab(out[c])[0]
        if taken and min(np.linalg.norm(lab - t) for t in taken) < min_delta:
            dist = np.min(np.linalg.norm(_CANDIDATES_LAB[:, None] - np.asarray(taken)[None], axis=-1), axis=1)
            best = int(np.argmax(dist))
            out[c], lab = _CANDIDATES[best], _CANDIDATES_LAB[best]
        taken.append(lab)
    return out


# ---------------------------------------------------------------------------------------
# Class names in figures: ADE20K-Full's WordNet names run to 113 characters ("computer,
# computing machine, computing device, ..."), LVIS's carry underscores and glosses.

NAME_CHARS = 24


def short_name(name: str, max_chars: int = NAME_CHARS) -> str:
    """A class name that fits a legend or tick label: the leading synonyms that fit within
    `max_chars`, underscores as spaces, an LVIS gloss "(...)" dropped when it does not fit,
    else the first synonym cut with an ellipsis."""
    parts = [p.strip().replace("_", " ") for p in str(name).split(",") if p.strip()] or [str(name)]
    text = parts[0]
    if len(text) > max_chars and "(" in text:
        text = " ".join(re.sub(r"\([^)]*\)", " ", text).split()) or text
    for p in parts[1:]:
        if len(text) + 2 + len(p) > max_chars:
            break
        text = f"{text}, {p}"
    return text if len(text) <= max_chars else text[:max_chars - 1].rstrip() + "…"
