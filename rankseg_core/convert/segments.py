"""Panoptic samples from a per-pixel segment-id map and its records (shared by the panoptic converters).

The shard stores a segment-INDEX map (0 = none, i = the i-th record; SHARDS_V2 / docs/shards.md)
and a semantic label that equals the segment's category wherever a segment exists (crowd
included) and IGNORE elsewhere. Both come from the source's id map here, in one pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from rankseg_core.errors import SampleError
from rankseg_core.shards.codec import IGNORE
from rankseg_core.shards.write import EncodedSample, encode_sample


def segment_records(ids: np.ndarray, records: Sequence[tuple], where: str, *, drop_empty: bool = False,
                    json_areas: bool = False) -> tuple[np.ndarray, list[dict]]:
    """(H x W segment-index map: 0 = none, i = the i-th kept record; the kept records as dicts).

    A record is (id, train id, iscrowd) or (id, train id, iscrowd, declared area or None);
    records keep their order. An id in the map without a record raises SampleError (its
    pixels' class is unknown). By default a declared area must equal the pixel count, and a
    record without pixels is dropped when `drop_empty`, else a SampleError.

    `json_areas`: the declared areas are what the official panoptic JSON holds for segments
    that later ones were painted over (ADE20K panoptic). Every record is kept, with no pixels
    too, because the official evaluation counts such a record as a false negative; a declared
    area may exceed the pixel count (never fall short of it) and is stored as `json_area`
    where it differs, so the scorer can use the number panopticapi uses. `where` names the
    source file(s) in messages.
    """
    seg_ids = np.array([r[0] for r in records], np.int64)
    if len(set(seg_ids.tolist())) != len(seg_ids):
        raise SampleError(f"{where}: segment ids are not unique in the records")
    if (seg_ids == 0).any():
        raise SampleError(f"{where}: segment id 0 is reserved for void")
    present, inverse, counts = np.unique(ids, return_inverse=True, return_counts=True)
    position = {sid: i for i, sid in enumerate(seg_ids.tolist())}
    stray = [v for v in present.tolist() if v != 0 and v not in position]
    if stray:
        shown = ", ".join(map(str, stray[:5])) + (" ..." if len(stray) > 5 else "")
        raise SampleError(f"{where}: segment id(s) {shown} in the PNG have no record")
    area = np.zeros(len(records), np.int64)
    for v, c in zip(present.tolist(), counts.tolist()):
        if v:
            area[position[v]] = c
    keep = np.ones(len(records), bool) if json_areas else area > 0
    if not keep.all() and not drop_empty:
        sid = int(seg_ids[~keep][0])
        raise SampleError(f"{where}: segment {sid} has a record but no pixel in the PNG")
    declared = [r[3] if len(r) > 3 and r[3] is not None else int(a) for r, a in zip(records, area.tolist())]
    for r, d, a in zip(records, declared, area.tolist()):
        wrong = d < a if json_areas else d != a
        if wrong:
            raise SampleError(f"{where}: segment {r[0]} has area {d} in the JSON but {a} pixels in the PNG")
    # new index (1..n over kept records in order) of every record, 0 for dropped ones
    new_index = np.where(keep, np.cumsum(keep), 0)
    lut = np.array([new_index[position[v]] if v else 0 for v in present.tolist()], np.int64)
    index = lut[inverse].reshape(ids.shape)
    info = []
    for r, a, d, k in zip(records, area.tolist(), declared, keep.tolist()):
        if k:
            rec = {"id": int(r[0]), "category": int(r[1]), "iscrowd": int(r[2]), "area": int(a)}
            if d != a:
                rec["json_area"] = int(d)
            info.append(rec)
    return index, info


def panoptic_sample(key: str, image: bytes, ids: np.ndarray, records: Sequence[tuple],
                    num_classes: int, where: str, *, drop_empty: bool = False,
                    json_areas: bool = False) -> EncodedSample:
    """Encode a panoptic sample from H x W segment ids (0 = void) and its records
    (`segment_records` says what the records and the two switches mean)."""
    index, info = segment_records(ids, records, where, drop_empty=drop_empty, json_areas=json_areas)
    if len(info) > 65534:
        raise SampleError(f"{where}: {len(info)} segments, at most 65534 per image")
    cats = np.array([IGNORE] + [r["category"] for r in info], np.int64)
    label = cats[index].astype(np.uint16)
    return encode_sample(key, image, label, num_classes, segments=index.astype(np.uint16), segments_info=info)
