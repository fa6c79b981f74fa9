"""A deterministic colour palette that stays distinguishable for thousands of classes."""

from __future__ import annotations

import colorsys

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
