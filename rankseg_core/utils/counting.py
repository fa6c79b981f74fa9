"""Counting the values of a label-like map, fast where its values come in runs.

Why: segmentation maps are regions, so along a row the same value repeats for tens to hundreds
of pixels (and a nearest upsampling repeats it more). A histogram (np.bincount, OpenCV's
calcHist) increments the same bin pixel after pixel, each increment waiting for the one
before it: on such maps it ran at ~1.5-2 ns a pixel on this project's CPUs, against ~0.3-0.5
on noise. Counting the runs instead touches the map twice in vectorised passes (compare
neighbours, find the changes) and histograms only the run starts, weighted by the run
lengths (the crop check at crop 512: ~5x faster; a 683 x 512 confusion update: ~1.7x).
Noise-like maps, where runs are short, keep the plain histogram.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

# More than one change of value in this many pixels: runs too short to pay for themselves.
RUN_SPAN = 8


def run_starts(flat: np.ndarray) -> np.ndarray | None:
    """Where each run of equal values begins in the 1-D `flat` (index 0 first), or None when
    runs are short (more than one change in RUN_SPAN pixels: a histogram is cheaper there)."""
    change = np.flatnonzero(flat[1:] != flat[:-1])
    if change.size * RUN_SPAN > flat.size:
        return None
    starts = np.empty(change.size + 1, np.intp)
    starts[0], starts[1:] = 0, change + 1
    return starts


def value_counts(x: np.ndarray, minlength: int, dense: Callable[[np.ndarray], np.ndarray] | None = None
                 ) -> np.ndarray:
    """np.bincount(x.ravel(), minlength=minlength) as int64, exactly.

    x: any shape of non-negative integers (read in C order: a run may continue from one row
    into the next, which counts the same). `dense`: the histogram used for noise-like maps
    instead of np.bincount (e.g. OpenCV's for 8 / 16-bit maps); it must return the same counts
    (its own dtype is returned as it is)."""
    flat = x.ravel()
    starts = run_starts(flat) if flat.size else None
    if starts is None:
        return np.bincount(flat, minlength=minlength) if dense is None else dense(x)
    values = flat[starts]
    if values.min() < 0:
        raise ValueError("value_counts: the values must be non-negative")
    counts = np.zeros(max(minlength, int(values.max()) + 1), np.int64)
    # (np.add.at into int64: exact, and no float64 array of every bin as bincount's weights make)
    np.add.at(counts, values, np.diff(starts, append=flat.size))
    return counts
