"""geometry.py: the checks that keep malformed COCO geometry away from pycocotools' C code.

References are independent: counts are recomputed from masks decoded by pycocotools, crafted
strings come from a re-implementation of pycocotools' encoder (rleToString) written here.
"""

from __future__ import annotations

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from rankseg_core.convert.geometry import (
    BOUNDARY_FACTOR,
    GeometryError,
    check_counts_list,
    check_image_size,
    check_polygons,
    check_rle_dict,
    compressed_rle,
    decode_counts,
    polygon_lists,
    polygon_problems,
    rle_string_problems,
)
from rankseg_core.shards.codec import MAX_PIXELS


def runs_of(mask: np.ndarray) -> list[int]:
    """Column-major run lengths starting with a (possibly empty) run of zeros."""
    flat = mask.ravel(order="F").astype(np.int64)
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    return ([0] + runs) if flat[0] else runs


def encode_counts(counts: list[int]) -> bytes:
    """COCO's compressed string for arbitrary (even invalid) counts, written from its description:
    values from the 4th on are stored as the difference to the count two places before, 5 bits
    per character (low first), 0x20 = more characters follow, 0x10 of the last = sign, + 48."""
    out = bytearray()
    for i, c in enumerate(counts):
        x = c - counts[i - 2] if i > 2 else c
        while True:
            ch = x & 0x1F
            x >>= 5
            more = not ((x == 0 and not ch & 0x10) or (x == -1 and ch & 0x10))
            out.append((ch | (0x20 if more else 0)) + 48)
            if not more:
                break
    return bytes(out)


def test_decode_counts_matches_pycocotools() -> None:
    rng = np.random.default_rng(0)
    strings, expect, sizes = [], [], []
    for i in range(40):
        h, w = int(rng.integers(1, 60)), int(rng.integers(1, 60))
        mask = rng.random((h, w)) < rng.uniform(0.02, 0.98)
        if i % 5 == 0:
            mask[:] = i % 2 == 0  # all ones / all zeros
        s = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"]
        assert s == encode_counts(runs_of(mask))  # the crafting encoder agrees with pycocotools
        strings.append(s)
        expect.append(runs_of(mask))
        sizes.append((h, w))
    ends = np.cumsum([len(s) for s in strings])
    counts, sid, malformed = decode_counts(np.frombuffer(b"".join(strings), np.uint8), ends)
    assert not malformed.any()
    for i, e in enumerate(expect):
        assert counts[sid == i].tolist() == e, i
    h, w = np.array(sizes).T
    assert rle_string_problems(np.frombuffer(b"".join(strings), np.uint8), ends, h, w) == {}
    # big counts (a 4000 x 4000 image of two halves) need 5-6 characters per value
    big = encode_counts([8_000_000, 8_000_000])
    assert rle_string_problems(np.frombuffer(big, np.uint8), np.array([len(big)]), [4000], [4000]) == {}


@pytest.mark.parametrize("data, reason", [
    (b"", "decodes to 0 pixels"),
    (b"1~", "not a valid COCO compressed string"),  # byte outside '0'..'o'
    (b"1 2", "not a valid COCO compressed string"),
    (b"1\x002", "not a valid COCO compressed string"),
    (b"11P", "not a valid COCO compressed string"),  # last value unterminated ('P' = more follows)
    (b"PPPPPP1", "not a valid COCO compressed string"),  # a 7-character value
    (encode_counts([3, 13, -1, 1]), "negative"),
    (encode_counts([3, 5, 4]), "decodes to 12 pixels"),
    (encode_counts([3, 5, 4, 4, 1]), "decodes to 17 pixels"),
])
def test_bad_rle_strings(data: bytes, reason: str) -> None:
    problems = rle_string_problems(np.frombuffer(data, np.uint8), np.array([len(data)]), [4], [4])
    assert reason in problems[0]
    ok = encode_counts([3, 5, 4, 4])  # the same kind of string with the right total (16 = 4 x 4)
    assert rle_string_problems(np.frombuffer(ok, np.uint8), np.array([len(ok)]), [4], [4]) == {}


def test_bad_string_between_good_ones_is_pinned_to_it() -> None:
    good = encode_counts([10, 6])
    strings = [good, b"1P", good, encode_counts([10, 7]), good]  # unterminated, then wrong total
    ends = np.cumsum([len(s) for s in strings])
    problems = rle_string_problems(np.frombuffer(b"".join(strings), np.uint8), ends, [4] * 5, [4] * 5)
    assert sorted(problems) == [1, 3]


def test_polygon_structure() -> None:
    assert polygon_lists([[0, 0, 1, 0, 1, 1.5]]) == [[0, 0, 1, 0, 1, 1.5]]
    for seg, reason in [([], "empty list"), ([[0, 0, 1, 1]], "4 numbers"), ([[0, 0, 1, 1, 2]], "5 numbers"),
                        ([[0, 0, 1, 1, 2, 2, 3]], "7 numbers"), ([[]], "0 numbers"),
                        ([[0, 0, 1, "1", 2, 2]], "'1'"), ([[0, 0, 1, None, 2, 2]], "None"),
                        ([[0, 0, 1, True, 2, 2]], "True"), ([[0, 0, [1], 1, 2, 2]], "[1]"),
                        ([{"x": 1}], "dict")]:
        with pytest.raises(GeometryError, match=reason.replace("[", r"\[").replace("]", r"\]")):
            polygon_lists(seg)


def test_polygon_values() -> None:
    polys = [[0, 0, 24, 0, 24, 20],            # the image's corners: fine
             [-3, -2, 30, 0, 10, 25],           # slightly outside: pycocotools clips it
             [0, 0, 1e30, 0, 1e30, 1e30],       # the segfault case
             [0, 0, float("nan"), 0, 1, 1],
             [0, 0, float("inf"), 0, 1, 1],
             [-24, -20, 48, 40, 0, 0],          # exactly one image size outside: allowed
             [-24.5, 0, 1, 1, 2, 2],
             [0, 0, 24, 20] * 200 + [0, 0],     # 401 points zig-zagging over the image
             ]
    ends = np.cumsum([len(p) for p in polys])
    xy = np.concatenate([np.asarray(p, np.float64) for p in polys])
    n = len(polys)
    problems = polygon_problems(xy, ends, np.full(n, 20), np.full(n, 24))
    assert sorted(problems) == [2, 3, 4, 6, 7]
    assert "outside" in problems[2] and "outside" in problems[6]
    assert "non-finite" in problems[3] and "non-finite" in problems[4]
    assert f"over {BOUNDARY_FACTOR} x (H + W)" in problems[7]
    # a slightly-outside polygon rasterises to the polygon clipped to the image (pycocotools)
    m = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(check_polygons([polys[1]], 20, 24), 20, 24)))
    assert m.shape == (20, 24) and 0 < m.sum() < 20 * 24


def test_rle_dicts_and_counts_lists() -> None:
    mask = np.zeros((4, 5), bool)
    mask[1:3, 1:4] = True
    runs = runs_of(mask)
    assert np.array_equal(mask_utils.decode(compressed_rle({"size": [4, 5], "counts": runs}, 4, 5)), mask)
    s = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))["counts"].decode()
    assert np.array_equal(mask_utils.decode(compressed_rle({"size": [4, 5], "counts": s}, 4, 5)), mask)
    poly = compressed_rle([[1, 1, 4, 1, 4, 3]], 4, 5)
    assert poly["size"] == [4, 5]
    for seg, reason in [({"size": [4, 6], "counts": runs}, "differs from the image size"),
                        ({"size": [4.0, 5.0], "counts": runs}, "two integers"),
                        ({"size": "4x5", "counts": runs}, "two integers"),
                        ({"size": [4, 5], "counts": 7}, "neither a string nor a list"),
                        ({"counts": runs}, "neither polygons"), ("polygon", "neither polygons"),
                        (None, "neither polygons")]:
        with pytest.raises(GeometryError, match=reason):
            compressed_rle(seg, 4, 5)
        if isinstance(seg, dict) and "size" in seg:
            with pytest.raises(GeometryError, match=reason):
                check_rle_dict(seg, 4, 5)
    for counts, reason in [([5, 15, 1], "sum to 21"), ([25], "sum to 25"), ([-1, 21], "negative"),
                           ([1 << 40, 0], "too large"), ([5.0, 15], "not integers"), (["5", 15], "not integers"),
                           ([True, 19], "not integers"), ([], "sum to 0")]:
        with pytest.raises(GeometryError, match=reason):
            check_counts_list(counts, 4, 5)


def test_image_sizes() -> None:
    assert check_image_size(480, 640) == (480, 640)
    for h, w in [(0, 640), (480, -1), (480.0, 640), ("480", 640), (True, 640), (70000, 10),
                 (MAX_PIXELS // 60000 + 1, 60000)]:
        with pytest.raises(GeometryError):
            check_image_size(h, w)


def test_boundary_length_against_a_plain_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    from rankseg_core.convert import geometry

    rng = np.random.default_rng(1)
    polys = [rng.uniform(0, 40, 2 * int(rng.integers(3, 30))) for _ in range(60)]
    ends = np.cumsum([len(p) for p in polys])
    monkeypatch.setattr(geometry, "BOUNDARY_FACTOR", 2.0)  # budget 2 * (30 + 40) = 140 px
    problems = polygon_problems(np.concatenate(polys), ends, np.full(60, 30), np.full(60, 40))
    flagged = 0
    for i, p in enumerate(polys):
        pts = p.reshape(-1, 2)
        nxt = np.roll(pts, -1, 0)
        length = np.maximum(abs(nxt[:, 0] - pts[:, 0]), abs(nxt[:, 1] - pts[:, 1])).sum()
        assert (i in problems) == (length > 140), i
        if i in problems:
            assert f"is {length:,.0f} pixels long" in problems[i]
            flagged += 1
    assert 5 < flagged < 55  # both outcomes exercised
