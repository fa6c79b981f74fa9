"""The ordered map every converter pass runs on: order, skips, and clean shutdown."""

from __future__ import annotations

import glob
import multiprocessing as mp
import os
import tempfile

import pytest

from rankseg_core.errors import SampleError
from rankseg_core.parallel import Skipped, ordered_map


def _square_or_fail(key: str) -> int:  # module-level so spawned workers can unpickle it
    if key.endswith("3"):
        raise SampleError(f"/data/{key}.png: corrupt")
    return int(key[1:]) ** 2


def _leftover_pickles() -> list[str]:
    return glob.glob(os.path.join(tempfile.gettempdir(), "rankseg-worker-*.pkl"))


@pytest.mark.parametrize("workers", [0, 2])
def test_results_come_in_key_order_with_skips(workers: int) -> None:
    keys = [f"k{i}" for i in range(25)]
    before = set(_leftover_pickles())
    with ordered_map(_square_or_fail, keys, workers, chunksize=3) as results:
        got = list(results)
    want = [Skipped(k, f"/data/{k}.png: corrupt") if k.endswith("3") else int(k[1:]) ** 2 for k in keys]
    assert got == want
    assert set(_leftover_pickles()) == before


def test_leaving_early_stops_the_workers_and_removes_the_pickle() -> None:
    before = set(_leftover_pickles())
    with pytest.raises(RuntimeError):
        with ordered_map(_square_or_fail, [f"k{i}" for i in range(100)], 2) as results:
            next(results)
            raise RuntimeError("a failed sample stops the conversion")
    assert not mp.active_children()
    assert set(_leftover_pickles()) == before
