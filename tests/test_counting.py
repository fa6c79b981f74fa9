"""utils/counting.py `value_counts` (runs counted where values repeat, a histogram for noise)
against np.bincount, on region maps, noise, and the edges."""

from __future__ import annotations

import numpy as np
import pytest

from rankseg_core.utils.counting import RUN_SPAN, run_starts, value_counts


def regions(rng: np.random.Generator, h: int, w: int, k: int) -> np.ndarray:
    """A Voronoi map of k random classes (each region a run of pixels along its rows)."""
    pts = rng.integers(0, [h, w], (12, 2))
    yy, xx = np.mgrid[:h, :w]
    nearest = ((yy[..., None] - pts[:, 0]) ** 2 + (xx[..., None] - pts[:, 1]) ** 2).argmin(-1)
    return rng.integers(0, k, 12)[nearest]


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.int64, np.intp])
@pytest.mark.parametrize("kind", ["regions", "noise", "constant", "one", "empty", "strided", "threshold"])
def test_value_counts_are_bincount(dtype: type, kind: str) -> None:
    rng = np.random.default_rng(len(kind) + np.dtype(dtype).itemsize)
    k = 200
    if kind == "regions":
        x = regions(rng, 40, 57, k)
    elif kind == "noise":
        x = rng.integers(0, k, (30, 31))
    elif kind == "constant":
        x = np.full((7, 9), k - 1)
    elif kind == "one":
        x = np.array([3])
    elif kind == "empty":
        x = np.zeros((0, 5), np.int64)
    elif kind == "strided":
        x = regions(rng, 40, 57, k)[::2, 1::3]
    else:  # exactly one change in RUN_SPAN pixels: the runs path's edge
        x = np.repeat(rng.integers(0, k, 64), RUN_SPAN)
        assert np.count_nonzero(x[1:] != x[:-1]) * RUN_SPAN <= x.size
    x = x.astype(dtype)
    if kind in ("regions", "constant", "threshold"):
        assert run_starts(x.ravel()) is not None  # the runs path is the one tested here
    elif kind == "noise":
        assert run_starts(x.ravel()) is None
    got = value_counts(x, k + 5)
    assert got.dtype == np.int64
    assert np.array_equal(got, np.bincount(x.ravel(), minlength=k + 5))


def test_the_dense_histogram_is_used_for_noise_only() -> None:
    calls = []

    def dense(x: np.ndarray) -> np.ndarray:
        calls.append(x.size)
        return np.bincount(x.ravel(), minlength=10)

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 10, 500)
    assert np.array_equal(value_counts(noise, 10, dense), np.bincount(noise, minlength=10)) and calls == [500]
    runs = np.repeat(rng.integers(0, 10, 20), 25)
    assert np.array_equal(value_counts(runs, 10, dense), np.bincount(runs, minlength=10)) and calls == [500]


def test_negative_values_are_refused_as_bincount_refuses_them() -> None:
    with pytest.raises(ValueError):
        value_counts(np.array([1, 1, -1, -1]), 4)
