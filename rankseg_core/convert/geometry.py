"""Checks on COCO-style geometry (image sizes, polygons, RLE) before pycocotools' C code sees it.

pycocotools trusts its input: a polygon coordinate of 1e30 overflows an int and crashes the
process (rleFrPoly allocates one point per 1/5 pixel of boundary), RLE counts that sum to less
than h * w leave part of the decoded mask uninitialised, and a malformed compressed string is
read past its end. Every converter that calls `mask_utils.frPyObjects / decode / merge`
validates with this module first; a failure is a GeometryError (a ValueError) with the reason,
which the converters turn into a per-sample error naming the JSON, the image and the annotation.

The bounds (docs/datasets.md, "Malformed annotations"):
- image sizes in a JSON: integers, 1..MAX_SIDE per side, at most codec.MAX_PIXELS pixels;
- polygons: lists of at least 6 numbers (3 points), even length, finite, every point within one
  image width / height of the image ([-W, 2W] x [-H, 2H]); pycocotools clips the rest of a
  polygon that sticks out, so such legitimate points keep their meaning; and a rasterised
  boundary of at most BOUNDARY_FACTOR * (H + W) pixels per polygon, which bounds the memory
  pycocotools allocates;
- RLE: `size` = [H, W] as integers equal to the image's; counts either a list of integers in
  0..2^32-1 summing to H * W, or a COCO compressed string (characters '0'..'o', 6 characters
  at most per value, every value terminated) whose decoded counts are non-negative and sum to
  H * W.

The checks over many polygons or strings are vectorised (numpy), so validating all of LVIS
costs seconds, not minutes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeGuard

import numpy as np

from rankseg_core.shards.codec import MAX_PIXELS

MAX_SIDE = 65535  # JPEG's own limit: an annotation of a larger image cannot match its JPEG
BOUNDARY_FACTOR = 64  # rasterised polygon boundary <= 64 * (H + W) pixels
_NUMBERS = {int, float}


class GeometryError(ValueError):
    """A malformed or out-of-bounds segmentation (or image size) in an annotation file."""


def _is_int(x: object) -> TypeGuard[int]:
    return type(x) is int  # noqa: E721 - bool (a subclass of int) is not a size


def check_image_size(h: object, w: object) -> tuple[int, int]:
    """(h, w) as ints, or GeometryError when they are not integers in 1..MAX_SIDE within MAX_PIXELS."""
    if not (_is_int(h) and _is_int(w)):
        raise GeometryError(f"image height/width {h!r}/{w!r} are not integers")
    if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE) or h * w > MAX_PIXELS:
        raise GeometryError(f"image size {w}x{h} (W x H) is outside 1..{MAX_SIDE} per side or over "
                            f"{MAX_PIXELS:,} pixels")
    return h, w


# --------------------------------------------------------------------------- polygons

def polygon_lists(seg: list) -> list[list]:
    """The polygons of a segmentation given as a list, after the structural checks
    (each a list of >= 6 numbers of even length, at least one). Values are checked later."""
    if not seg:
        raise GeometryError("segmentation is an empty list (no polygon)")
    for poly in seg:
        if not isinstance(poly, list):
            raise GeometryError(f"polygon is a {type(poly).__name__}, not a list of numbers")
        if not set(map(type, poly)) <= _NUMBERS:
            bad = next(x for x in poly if type(x) not in _NUMBERS)
            raise GeometryError(f"polygon holds {bad!r}, not a number")
        if len(poly) < 6 or len(poly) % 2:
            raise GeometryError(f"polygon has {len(poly)} numbers: needs an even count of at least 6 "
                                "(3 points)")
    return seg


def polygon_problems(xy: np.ndarray, ends: np.ndarray, h: np.ndarray, w: np.ndarray) -> dict[int, str]:
    """Polygon index -> reason, for the polygons whose values are out of bounds.

    xy: float64 coordinates of n polygons back to back (x0, y0, x1, y1, ...); ends: n end
    offsets into xy (each polygon already structurally valid); h, w: n image sizes.
    """
    n = len(ends)
    if n == 0:
        return {}
    ends = np.asarray(ends, np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    x, y = xy[0::2], xy[1::2]
    ps, pe = starts // 2, ends // 2  # per polygon: its points ps..pe-1
    h = np.asarray(h, np.float64)
    w = np.asarray(w, np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        # NaN propagates through min / max and fails every comparison: no separate finiteness pass
        lo_x, hi_x = np.minimum.reduceat(x, ps), np.maximum.reduceat(x, ps)
        lo_y, hi_y = np.minimum.reduceat(y, ps), np.maximum.reduceat(y, ps)
        inside = (lo_x >= -w) & (hi_x <= 2 * w) & (lo_y >= -h) & (hi_y <= 2 * h)
        # boundary length in pixels: per edge max(|dx|, |dy|), the last point joined to the first
        edge = np.empty(len(x))
        np.maximum(np.abs(np.diff(x)), np.abs(np.diff(y)), out=edge[:-1])
        edge[pe - 1] = np.maximum(np.abs(x[pe - 1] - x[ps]), np.abs(y[pe - 1] - y[ps]))
        boundary = np.add.reduceat(edge, ps)
    budget = BOUNDARY_FACTOR * (h + w)
    out = {}
    for i in np.flatnonzero(~inside | (boundary > budget)).tolist():
        if not np.isfinite(xy[starts[i]:ends[i]]).all():
            out[i] = "polygon has a non-finite coordinate (NaN or infinity)"
        elif not inside[i]:
            out[i] = (f"polygon coordinates span x {lo_x[i]:g}..{hi_x[i]:g}, y {lo_y[i]:g}..{hi_y[i]:g}: "
                      f"more than one image size outside the {int(w[i])}x{int(h[i])} (W x H) image")
        else:
            out[i] = (f"polygon boundary is {boundary[i]:,.0f} pixels long, over {BOUNDARY_FACTOR} x "
                      f"(H + W) = {budget[i]:,.0f}")
    return out


def check_polygons(seg: list, h: int, w: int) -> list[list]:
    """All checks on one segmentation given as polygons; returns them for pycocotools."""
    polys = polygon_lists(seg)
    ends = np.cumsum([len(p) for p in polys])
    xy = np.fromiter((v for p in polys for v in p), np.float64, count=int(ends[-1]))
    problems = polygon_problems(xy, ends, np.full(len(polys), h), np.full(len(polys), w))
    if problems:
        raise GeometryError(problems[min(problems)])
    return polys


# --------------------------------------------------------------------------- RLE

def check_rle_dict(seg: object, h: int, w: int) -> str | list:
    """The `counts` of an RLE dict after checking its `size` against the image's [h, w]."""
    if not (isinstance(seg, dict) and "counts" in seg and "size" in seg):
        raise GeometryError("segmentation is neither polygons (a list) nor RLE {counts, size}")
    size = seg["size"]
    if not (isinstance(size, list) and len(size) == 2 and all(map(_is_int, size))):
        raise GeometryError(f"RLE size {size!r} is not [height, width] as two integers")
    if size != [h, w]:
        raise GeometryError(f"RLE size {size} differs from the image size {[h, w]}")
    counts = seg["counts"]
    if not isinstance(counts, (str, list)):
        raise GeometryError(f"RLE counts is a {type(counts).__name__}, neither a string nor a list")
    return counts


def check_counts_list(counts: list, h: int, w: int) -> None:
    """Uncompressed RLE counts: integers in 0..2^32-1 summing to h * w."""
    if not all(map(_is_int, counts)):
        raise GeometryError("RLE counts list holds values that are not integers")
    if counts and (min(counts) < 0 or max(counts) >= 1 << 32):
        raise GeometryError("RLE counts list holds a negative or too large count")
    if sum(counts) != h * w:
        raise GeometryError(f"RLE counts sum to {sum(counts)}, not {h}*{w} = {h * w}")


def decode_counts(data: np.ndarray, ends: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Decode COCO compressed RLE strings (pycocotools' rleFrString) without native code.

    data: uint8 bytes of n strings back to back; ends: their n end offsets.
    Returns (counts int64, string index of each count, per-string "malformed" flags): a string
    is malformed when it has a byte outside '0'..'o', a value longer than 6 characters, or an
    unterminated last value. Counts of malformed strings are meaningless.
    Each value is 5 bits per character, low bits first, bit 0x20 = "more characters follow",
    bit 0x10 of the last character = negative; values from the 4th on are deltas to the count
    two places before.
    """
    ends = np.asarray(ends, np.int64)
    n = len(ends)
    starts = np.concatenate([[0], ends[:-1]])
    malformed = np.zeros(n, bool)
    if data.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), malformed
    c = data - np.uint8(48)  # uint8: bytes below '0' wrap to > 63
    bad = np.flatnonzero(c > 63)
    if bad.size:
        malformed[np.searchsorted(ends, bad, side="right")] = True
        c = np.where(c > 63, np.uint8(0), c)
    term = (c & 0x20) == 0
    nonempty = ends > starts
    last = ends[nonempty] - 1
    malformed[np.flatnonzero(nonempty)[~term[last]]] = True  # unterminated last value
    term[last] = True  # so that values never run into the next string
    tpos = np.flatnonzero(term)  # each value ends at its terminating character
    gstart = np.concatenate([[0], tpos[:-1] + 1])
    glen = tpos - gstart + 1
    c5 = (c & 0x1F).astype(np.int64)
    vals = c5[gstart]
    for j in range(1, 6):  # most values have 1-2 characters: only the longer ones are visited
        longer = np.flatnonzero(glen > j)
        if longer.size == 0:
            break
        vals[longer] += c5[gstart[longer] + j] << (5 * j)
    gsid = np.searchsorted(ends, tpos, side="right")  # string of each value
    malformed[gsid[glen > 6]] = True
    neg = (c[tpos] & 0x10) != 0
    vals[neg] -= np.int64(1) << (5 * np.minimum(glen[neg], 6))
    first = np.searchsorted(tpos, starts)  # index of each string's first value
    vi = np.arange(tpos.size) - first[gsid]  # index of the value within its string
    out = vals.copy()
    for chain in (vi % 2 == 1, (vi % 2 == 0) & (vi >= 2)):  # deltas run along odd / even places
        s = np.concatenate([[0], np.cumsum(np.where(chain, vals, 0))])
        out[chain] = (s[1:] - s[first[gsid]])[chain]
    return out, gsid, malformed


def rle_string_problems(data: np.ndarray, ends: np.ndarray, h: np.ndarray | Sequence[int],
                        w: np.ndarray | Sequence[int]) -> dict[int, str]:
    """String index -> reason, for compressed RLE strings that pycocotools must not decode."""
    n = len(ends)
    if n == 0:
        return {}
    counts, gsid, malformed = decode_counts(data, ends)
    negative = np.bincount(gsid, (counts < 0) | (counts >= 1 << 32), minlength=n) > 0
    totals = np.bincount(gsid, np.where(counts > 0, counts, 0).astype(np.float64), minlength=n)
    expect = np.asarray(h, np.float64) * np.asarray(w, np.float64)
    out = {}
    for i in np.flatnonzero(malformed | negative | (totals != expect)).tolist():
        if malformed[i]:
            out[i] = "RLE counts is not a valid COCO compressed string"
        elif negative[i]:
            out[i] = "RLE counts string decodes to a negative or too large count"
        else:
            out[i] = f"RLE counts string decodes to {int(totals[i])} pixels, not H*W = {int(expect[i])}"
    return out


def check_counts_string(counts: bytes, h: int, w: int) -> None:
    problems = rle_string_problems(np.frombuffer(counts, np.uint8), np.array([len(counts)]), [h], [w])
    if problems:
        raise GeometryError(problems[0])


def compressed_rle(seg: object, h: int, w: int) -> dict:
    """Any COCO segmentation (polygons, uncompressed or compressed RLE), checked, as compressed
    RLE {size: [h, w], counts: bytes} for pycocotools."""
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(check_polygons(seg, h, w), h, w))
    counts = check_rle_dict(seg, h, w)
    if isinstance(counts, list):
        check_counts_list(counts, h, w)
        return mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    data = counts.encode()
    check_counts_string(data, h, w)
    return {"size": [h, w], "counts": data}
