"""Class-count CDF (Fig. 2) against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from rankseg_core.shards.stats import class_cdf, dataset_class_cdf


def test_cdf_hand_computed() -> None:
    counts = np.array([1, 2, 2, 3, 5, 30])
    cdf = class_cdf(counts, 5)
    assert cdf.tolist() == pytest.approx([1 / 6, 3 / 6, 4 / 6, 4 / 6, 5 / 6])


def test_cdf_empty_and_beyond_max() -> None:
    assert class_cdf(np.zeros(0, np.int64), 3).tolist() == [0, 0, 0]
    assert class_cdf(np.array([50, 60]), 3).tolist() == [0, 0, 0]


def test_dataset_cdf_matches_stored_class_lists(synth) -> None:
    from rankseg_core.shards.read import ShardIndex

    res = dataset_class_cdf(synth, max_classes=12)
    idx = ShardIndex(synth)
    n = np.array([len(idx.arrays(s).classes_of(i)) for s in idx.splits
                  for i in range(len(idx.arrays(s).keys))])
    assert res.num_images == n.size
    assert res.cdf == pytest.approx([(n <= k).mean() for k in range(1, 13)])
    assert res.share_below_25 == 1.0
