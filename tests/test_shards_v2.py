"""Shard format v2 (panoptic): hand-built segment maps round-trip, verify catches each mismatch."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.convert.common import ConvertOptions, run_conversion
from rankseg_core.errors import SampleError, UserError
from rankseg_core.shards.codec import IGNORE, encode_jpeg, encode_label
from rankseg_core.shards.read import ShardDataset, ShardIndex
from rankseg_core.shards.verify import verify_shards
from rankseg_core.shards.write import DatasetHeader, encode_sample, sha256_file

K = 5
THINGS = [3, 1]  # given unsorted: stored sorted


def _panoptic(key: str) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """A 6 x 8 scene: stuff 'c0' on top, two 'c1' things (one crowd), a void corner.

    Built by hand so every count below can be read off the drawing.
    """
    seg = np.zeros((6, 8), np.uint16)
    seg[:2, :] = 1  # stuff, 16 px
    seg[2:5, 0:3] = 2  # thing, 9 px
    seg[2:6, 4:8] = 3  # crowd thing, 16 px
    shift = int(key[-1])  # samples differ: the thing moves right
    if shift:
        seg[2:5, 0:3] = 0
        seg[2:5, shift:shift + 3] = np.where(seg[2:5, shift:shift + 3] == 0, 2, seg[2:5, shift:shift + 3])
    records = [{"id": 7, "category": 0, "iscrowd": 0, "area": int((seg == 1).sum())},
               {"id": 1001, "category": 1, "iscrowd": 0, "area": int((seg == 2).sum())},
               {"id": 1002, "category": 1, "iscrowd": 1, "area": int((seg == 3).sum())}]
    label = np.full(seg.shape, IGNORE, np.uint16)
    for i, r in enumerate(records, 1):
        label[seg == i] = r["category"]
    return label, seg, records


def _maker(key: str):
    label, seg, records = _panoptic(key)
    image = encode_jpeg(np.full((6, 8, 3), 100, np.uint8))
    return encode_sample(key, image, label, K, segments=seg, segments_info=records)


def _header() -> DatasetHeader:
    return DatasetHeader("pan-unit", [f"c{i}" for i in range(K)], thing_classes=list(THINGS))


def _write(root: Path) -> Path:
    run_conversion(root, _header(), {"train": ["s0", "s1", "s2"], "val": ["v0"]}, _maker,
                   ConvertOptions(samples_per_shard=2))
    return root


def test_panoptic_round_trip(tmp_path: Path) -> None:
    root = _write(tmp_path / "d")
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["version"] == 2 and meta["panoptic"] is True and meta["thing_classes"] == [1, 3]
    idx = ShardIndex(root)
    assert idx.is_panoptic and idx.thing_classes == [1, 3]
    ds = ShardDataset(root, "train")
    assert len(ds) == 3
    for i, key in enumerate(ds.arrays.keys):
        label, seg, records = _panoptic(key)
        item = ds[i]
        assert np.array_equal(item["segments"], seg) and item["segments"].dtype == np.uint16
        assert item["segments_info"] == records
        assert np.array_equal(item["label"], label)
        assert item["classes"].tolist() == [0, 1]  # multi-label target = classes present
    with h5py.File(root / "train-00000-of-00002.h5") as f:
        assert f.attrs["version"] == 2
    assert list(verify_shards(root)) == []


def test_semantic_output_stays_v1(tmp_path: Path) -> None:
    def maker(key: str):
        label, _, _ = _panoptic(key)
        return encode_sample(key, encode_jpeg(np.zeros((6, 8, 3), np.uint8)), label, K)

    run_conversion(tmp_path / "d", DatasetHeader("sem", [f"c{i}" for i in range(K)]),
                   {"train": ["s0"]}, maker, ConvertOptions())
    meta = json.loads((tmp_path / "d" / "dataset.json").read_text())
    assert meta["version"] == 1 and "panoptic" not in meta and "thing_classes" not in meta
    with h5py.File(tmp_path / "d" / "train-00000-of-00001.h5") as f:
        assert f.attrs["version"] == 1 and "segments" not in f and "segments_info" not in f
    idx = ShardIndex(tmp_path / "d")
    assert not idx.is_panoptic and idx.thing_classes is None and idx.segment_counts("train") is None
    item = ShardDataset(tmp_path / "d", "train")[0]
    assert "segments" not in item and "segments_info" not in item


def _broken(change):
    label, seg, records = _panoptic("s0")
    change(label, seg, records)
    return label, seg, records


@pytest.mark.parametrize("change, message", [
    (lambda lab, seg, rec: rec[1].update(area=8), "area 8 but 9 pixels"),
    (lambda lab, seg, rec: seg.__setitem__((5, 0), 4), "segment index 4 in the map, only 3 records"),
    (lambda lab, seg, rec: lab.__setitem__((0, 0), 2), "label differs from the segments' categories"),
    (lambda lab, seg, rec: rec[0].update(category=K), "category 5 is not a train id < K=5"),
    (lambda lab, seg, rec: rec[2].update(iscrowd=2), "iscrowd must be 0 or 1"),
    (lambda lab, seg, rec: rec[2].update(id=7), "ids are not unique"),
    (lambda lab, seg, rec: rec[0].pop("area"), "must have keys"),
    (lambda lab, seg, rec: rec[0].update(area=16.0), "non-integer"),
])
def test_encode_sample_refuses_inconsistent_segments(change, message: str) -> None:
    label, seg, records = _broken(change)
    with pytest.raises(SampleError, match=message.replace("(", r"\(").replace(")", r"\)")):
        encode_sample("s0", b"", label, K, segments=seg, segments_info=records)


def test_encode_sample_refuses_wrong_shape_and_dtype() -> None:
    label, seg, records = _panoptic("s0")
    with pytest.raises(SampleError, match="segment map is 5x8, label is 6x8"):
        encode_sample("s0", b"", label, K, segments=seg[:5], segments_info=records)
    with pytest.raises(SampleError, match="2-D uint16"):
        encode_sample("s0", b"", label, K, segments=seg.astype(np.int32), segments_info=records)


def test_header_checks_thing_classes() -> None:
    with pytest.raises(UserError, match="thing_classes"):
        DatasetHeader("x", ["a", "b"], thing_classes=[2])
    with pytest.raises(UserError, match="thing_classes"):
        DatasetHeader("x", ["a", "b"], thing_classes=[1, 1])


def _tamper(root: Path, row: int, segments: np.ndarray | None = None, info: list | None = None) -> None:
    """Rewrite one sample's segments in place and re-seal the checksum, as a crafted shard would."""
    shard = root / "train-00000-of-00002.h5"
    with h5py.File(shard, "r+") as f:
        if segments is not None:
            f["segments"][row] = np.frombuffer(encode_label(segments), np.uint8)
        if info is not None:
            f["segments_info"][row] = json.dumps(info)
    meta = json.loads((root / "dataset.json").read_text())
    meta["splits"]["train"]["shards"][0].update(sha256=sha256_file(shard), bytes=shard.stat().st_size)
    (root / "dataset.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("what, message", [
    ("area", "area 10 but 9 pixels"),
    ("index", "segment index 4 in the map, only 3 records"),
    ("category", "label differs from the segments' categories"),
    ("category_k", "category 5 is not a train id < K=5"),
    ("size", "segment map is 6x7, label is 6x8"),
    ("json", "segments do not decode"),
])
def test_verify_catches_segment_problems(tmp_path: Path, what: str, message: str) -> None:
    root = _write(tmp_path / "d")
    label, seg, records = _panoptic("s0")
    if what == "area":
        records[1]["area"] = 10
        _tamper(root, 0, info=records)
    elif what == "index":
        seg[5, 0] = 4
        _tamper(root, 0, segments=seg)
    elif what == "category":
        records[1]["category"] = 2  # label still says 1 there
        _tamper(root, 0, info=records)
    elif what == "category_k":
        records[0]["category"] = K
        _tamper(root, 0, info=records)
    elif what == "size":
        _tamper(root, 0, segments=seg[:, :7])
    else:
        shard = root / "train-00000-of-00002.h5"
        with h5py.File(shard, "r+") as f:
            f["segments_info"][0] = "[{"
        _tamper(root, 0)
    problems = list(verify_shards(root))
    assert len(problems) == 1, problems
    assert "train-00000-of-00002.h5 sample 0 (s0)" in problems[0] and message in problems[0], problems


def test_inspect_jsonl_shows_segment_counts(tmp_path: Path) -> None:
    root = _write(tmp_path / "d")
    res = CliRunner().invoke(app, ["inspect", str(root), "--jsonl"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(x) for x in res.stdout.splitlines()]
    assert [r["segments"] for r in recs] == [3, 3, 3, 3]
    res = CliRunner().invoke(app, ["inspect", str(root)])
    assert res.exit_code == 0 and "format v2" in res.output and "2 thing / 3 stuff" in res.output


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(thing_classes=[3, 1]), "thing_classes must be sorted distinct train ids"),
    (lambda m: m.update(thing_classes=[1, 5]), "thing_classes must be sorted distinct train ids in 0..4"),
    (lambda m: m.pop("panoptic"), "version 2 index must say"),
    (lambda m: m.update(version=1), "panoptic / thing_classes need format version 2"),
])
def test_v2_index_fields_are_checked(tmp_path: Path, change, message: str) -> None:
    root = _write(tmp_path / "d")
    meta = json.loads((root / "dataset.json").read_text())
    change(meta)
    (root / "dataset.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match=message):
        ShardIndex(root)
    assert message in " ".join(list(verify_shards(root))[0].split())


def test_v2_shard_without_segments_is_refused(tmp_path: Path) -> None:
    root = _write(tmp_path / "d")
    with h5py.File(root / "train-00000-of-00002.h5", "r+") as f:
        del f["segments"]
    _tamper(root, 0)
    res = CliRunner().invoke(app, ["inspect", str(root), "--jsonl"])
    assert res.exit_code == 2 and "array 'segments' is missing" in " ".join(res.output.split())
    assert "array 'segments' is missing" in list(verify_shards(root))[0]
