"""Shard format v1: round trip, atomic resume, determinism, verification."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from conftest import make_synthetic

from rankseg_core.convert.common import ConvertOptions, run_conversion
from rankseg_core.errors import SampleError, UserError
from rankseg_core.shards.codec import IGNORE, class_counts, decode_label, encode_jpeg, encode_label
from rankseg_core.shards.read import ShardDataset, ShardIndex
from rankseg_core.shards.verify import verify_shards
from rankseg_core.shards.write import DatasetHeader, encode_sample, plan_shards

K = 300  # > 255: 255 must be an ordinary class


def _random_sample(key: str) -> "EncodedSample":  # noqa: F821 - module-level so it pickles
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    h, w = rng.integers(20, 40, 2)
    label = rng.choice(np.array([0, 7, 255, 299, IGNORE], np.uint16), (h, w))
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    return encode_sample(key, encode_jpeg(image), label, K, video="v1" if key < "k05" else "",
                         frame=int(key[1:]) if key < "k05" else -1)


def _header() -> DatasetHeader:
    return DatasetHeader(name="unit", class_names=[f"c{i}" for i in range(K)])


def test_round_trip_bytes_and_labels(tmp_path: Path) -> None:
    keys = [f"k{i:02d}" for i in range(10)]
    index = run_conversion(tmp_path / "d", _header(), {"train": keys}, _random_sample,
                           ConvertOptions(samples_per_shard=4))
    assert index["splits"]["train"]["num_samples"] == 10
    assert len(index["splits"]["train"]["shards"]) == 3
    ds = ShardDataset(tmp_path / "d", "train")
    for i, key in enumerate(ds.arrays.keys):
        want = _random_sample(key)
        img_b, lab_b = ds.raw(i)
        assert img_b == want.image  # JPEG kept byte for byte
        item = ds[i]
        assert np.array_equal(item["label"], decode_label(want.label))
        assert item["label"].dtype == np.uint16
        present, pixels = class_counts(item["label"], K)
        assert item["classes"].tolist() == present.tolist()
        assert ds.arrays.pixels_of(i).tolist() == pixels.tolist()
        assert 255 in present or 255 not in item["label"]
    # Video targets are the union over the video's frames.
    videos = index["splits"]["train"]["videos"]
    union = sorted(set().union(*(ds.arrays.classes_of(i).tolist() for i in range(10)
                                 if ds.arrays.video[i] == "v1")))
    assert videos["v1"] == {"frames": 5, "classes": union}
    assert not verify_shards_list(tmp_path / "d")


def verify_shards_list(root: Path) -> list[str]:
    return list(verify_shards(root, decode_images=True))


def test_plan_is_deterministic_and_balanced() -> None:
    plan = plan_shards([f"k{i}" for i in range(10)][::-1], 4)
    assert [len(p) for p in plan] == [4, 4, 2]
    assert sum(plan, []) == sorted(f"k{i}" for i in range(10))
    with pytest.raises(UserError):
        plan_shards(["a", "a"], 4)


class _Boom(Exception):
    pass


def _exploding(limit: int):
    calls = {"n": 0}

    def maker(key: str):
        calls["n"] += 1
        if calls["n"] > limit:
            raise _Boom("simulated crash")
        return _random_sample(key)
    return maker


def test_resume_after_interruption_is_byte_identical(tmp_path: Path) -> None:
    keys = [f"k{i:02d}" for i in range(10)]
    opts = ConvertOptions(samples_per_shard=4)
    run_conversion(tmp_path / "ref", _header(), {"train": keys}, _random_sample, opts)
    with pytest.raises(_Boom):  # dies inside the second shard
        run_conversion(tmp_path / "int", _header(), {"train": keys}, _exploding(6), opts)
    done = sorted(p.name for p in (tmp_path / "int").glob("*.h5"))
    assert done == ["train-00000-of-00003.h5"]  # no partial shard under a final name
    assert not (tmp_path / "int" / "dataset.json").exists()
    with pytest.raises(UserError, match="missing"):
        ShardIndex(tmp_path / "int")
    run_conversion(tmp_path / "int", _header(), {"train": keys}, _random_sample, opts)
    for p in sorted((tmp_path / "ref").glob("*.h5")):
        assert p.read_bytes() == (tmp_path / "int" / p.name).read_bytes(), p.name
    ref = json.loads((tmp_path / "ref" / "dataset.json").read_text())
    got = json.loads((tmp_path / "int" / "dataset.json").read_text())
    assert ref == got


def test_parts_then_assemble_equals_one_shot(tmp_path: Path) -> None:
    keys = [f"k{i:02d}" for i in range(10)]
    run_conversion(tmp_path / "one", _header(), {"train": keys}, _random_sample,
                   ConvertOptions(samples_per_shard=3))
    for part in (1, 0):
        assert run_conversion(tmp_path / "parts", _header(), {"train": keys}, _random_sample,
                              ConvertOptions(samples_per_shard=3, num_shards=2, shard_index=part)) is None
    run_conversion(tmp_path / "parts", _header(), {"train": keys}, _random_sample,
                   ConvertOptions(samples_per_shard=3))
    assert (json.loads((tmp_path / "one" / "dataset.json").read_text())
            == json.loads((tmp_path / "parts" / "dataset.json").read_text()))


def test_options_mismatch_and_foreign_directory(tmp_path: Path) -> None:
    make_synthetic(tmp_path / "a", images=4, seed=0)
    with pytest.raises(UserError, match="different options"):
        make_synthetic(tmp_path / "a", images=4, seed=1)
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not made by rankseg"):
        make_synthetic(tmp_path / "foreign", images=4)


def _bad_label(key: str):
    if key == "k01":
        raise SampleError(f"/data/{key}_seg.png: label value 900 not in the class table")
    return _random_sample(key)


@pytest.mark.parametrize("workers, per_shard", [(0, 1000), (2, 2)])
def test_on_error_fail_and_skip(tmp_path: Path, workers: int, per_shard: int) -> None:
    keys = ["k00", "k01", "k02"]
    opts = dict(workers=workers, samples_per_shard=per_shard)
    with pytest.raises(UserError, match="k01_seg.png.*--on-error skip"):
        run_conversion(tmp_path / "f", _header(), {"train": keys}, _bad_label, ConvertOptions(**opts))
    assert not list((tmp_path / "f").glob("*.h5"))
    index = run_conversion(tmp_path / "s", _header(), {"train": keys}, _bad_label,
                           ConvertOptions(on_error="skip", **opts))
    assert index["splits"]["train"]["num_samples"] == 2
    assert index["splits"]["train"]["num_skipped"] == 1
    skipped = [json.loads(x) for x in (tmp_path / "s" / "skipped.jsonl").read_text().splitlines()]
    assert skipped == [{"key": "k01", "reason": "/data/k01_seg.png: label value 900 not in the class table",
                        "split": "train"}]


def test_label_values_out_of_range_are_rejected() -> None:
    label = np.array([[0, 5], [IGNORE, 10]], np.uint16)
    with pytest.raises(SampleError, match="10 is >= K=10"):
        encode_sample("x", b"", label, 10)


@pytest.mark.parametrize("seed_b, same", [(0, True), (1, False)])
def test_synthetic_is_deterministic(tmp_path: Path, seed_b: int, same: bool) -> None:
    a = make_synthetic(tmp_path / "a", images=6, seed=0)
    b = make_synthetic(tmp_path / "b", images=6, seed=seed_b)
    files = sorted(p.name for p in a.glob("*.h5"))
    identical = all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    assert identical == same


@pytest.mark.parametrize("per_shard", [500, 2])  # 2: one result stream cut into several shards
def test_synthetic_workers_match_in_process(tmp_path: Path, per_shard: int) -> None:
    from rankseg_core.convert.synthetic import prepare_synthetic

    make_synthetic(tmp_path / "a", images=6, per_shard=per_shard)
    prepare_synthetic(tmp_path / "b", num_classes=60, images=6, size=32,
                      opts=ConvertOptions(workers=2, samples_per_shard=per_shard))
    for p in sorted((tmp_path / "a").glob("*.h5")):
        assert p.read_bytes() == (tmp_path / "b" / p.name).read_bytes()


def test_synthetic_has_the_properties_rankseg_needs(tmp_path: Path) -> None:
    """Few classes per image out of many, and appearances shared across classes."""
    from rankseg_core.convert.synthetic import NUM_APPEARANCES, make_world

    root = make_synthetic(tmp_path / "d", images=40, num_classes=400, size=48)
    n = ShardIndex(root).class_counts_only("train")
    assert n.max() <= 10 and n.min() >= 2
    world = make_world(400, 0)
    apps = world.appearance[world.appearance >= 0]
    assert np.bincount(apps).min() >= 400 // NUM_APPEARANCES - 2  # each look shared by many classes
    for objs in world.scenes_objects:  # ...but unique within a scene, so context disambiguates
        assert len(set(world.appearance[objs])) == len(objs)


def test_verify_catches_flipped_byte_and_truncation(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "d", images=8, per_shard=4)
    assert verify_shards_list(root) == []
    shard = sorted(root.glob("train-*.h5"))[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    problems = verify_shards_list(root)
    assert len(problems) == 1 and shard.name in problems[0] and "sha256" in problems[0]
    other = sorted(root.glob("train-*.h5"))[1]
    other.write_bytes(other.read_bytes()[:1000])
    assert len(verify_shards_list(root)) == 2


def test_verify_catches_inconsistent_classes(tmp_path: Path) -> None:
    """A shard whose stored class list disagrees with its label (checksum re-sealed)."""
    from rankseg_core.shards.write import sha256_file

    root = make_synthetic(tmp_path / "d", images=4, per_shard=4)
    shard = root / "train-00000-of-00001.h5"
    with h5py.File(shard, "r+") as f:
        f["pixels"][0] += 1
    meta = json.loads((root / "dataset.json").read_text())
    meta["splits"]["train"]["shards"][0]["sha256"] = sha256_file(shard)
    (root / "dataset.json").write_text(json.dumps(meta))
    problems = verify_shards_list(root)
    assert len(problems) == 1 and "sample 0" in problems[0] and "do not match" in problems[0]


def test_dataset_reopens_lazily_per_process(synth: Path) -> None:
    import pickle

    ds = ShardDataset(synth, "train")
    _ = ds[0]
    assert ds._files  # handle kept open in this process
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker receives
    assert clone._files == {}
    assert np.array_equal(clone[3]["label"], ds[3]["label"])


def _constant_sample(key: str):
    return encode_sample(key, b"\xff\xd8same", np.zeros((4, 4), np.uint16), K)


@pytest.mark.parametrize("n", [1, 3])
def test_equal_length_blobs_round_trip(tmp_path: Path, n: int) -> None:
    """h5py refuses object arrays of equal-length arrays; the writer must not rely on them."""
    keys = [f"k{i}" for i in range(n)]
    run_conversion(tmp_path / "d", _header(), {"train": keys}, _constant_sample, ConvertOptions())
    ds = ShardDataset(tmp_path / "d", "train")
    assert [ds.raw(i)[0] for i in range(n)] == [b"\xff\xd8same"] * n


def test_class_count_limits() -> None:
    """K is 1..65535: train ids must fit uint16 below the ignore value 65535."""
    assert DatasetHeader("k", ["c"] * 65535).num_classes == 65535
    for k in (0, 65536):
        with pytest.raises(UserError, match="K must be 1..65535"):
            DatasetHeader("k", ["c"] * k)


def test_idle_shard_index_part_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A SLURM array task whose part has no shard: a one-line note, no error, nothing written."""
    keys = [f"k{i:02d}" for i in range(10)]  # 3 shards of 4
    opts = ConvertOptions(samples_per_shard=4, num_shards=8, shard_index=7)
    assert run_conversion(tmp_path / "d", _header(), {"train": keys}, _random_sample, opts) is None
    err = " ".join(capsys.readouterr().err.split())
    assert "--shard-index 7 has nothing to write" in err and "only parts 0..2 of --num-shards 8" in err
    assert not list((tmp_path / "d").glob("*.h5*"))
    # Parts 0..2 then the assembly give the whole dataset.
    for part in range(3):
        run_conversion(tmp_path / "d", _header(), {"train": keys}, _random_sample,
                       ConvertOptions(samples_per_shard=4, num_shards=8, shard_index=part))
    index = run_conversion(tmp_path / "d", _header(), {"train": keys}, _random_sample,
                           ConvertOptions(samples_per_shard=4, num_shards=8))
    assert index["splits"]["train"]["num_samples"] == 10


def test_damaged_sidecar_is_one_line(tmp_path: Path) -> None:
    keys = [f"k{i:02d}" for i in range(4)]
    for part in (0, 1):
        run_conversion(tmp_path / "d", _header(), {"train": keys}, _random_sample,
                       ConvertOptions(samples_per_shard=2, num_shards=2, shard_index=part))
    side = tmp_path / "d" / "train-00001-of-00002.h5.json"
    side.write_text('{"file": "train-00001-of-00002.h5", "bytes": NaN}')
    # The damaged shard counts as unfinished: it is converted again and the sidecar rewritten.
    index = run_conversion(tmp_path / "d", _header(), {"train": keys}, _random_sample,
                           ConvertOptions(samples_per_shard=2))
    assert index["splits"]["train"]["num_samples"] == 4
    assert not verify_shards_list(tmp_path / "d")


def test_damaged_marker_is_one_line(tmp_path: Path) -> None:
    make_synthetic(tmp_path / "a", images=4)
    (tmp_path / "a" / ".rankseg-shards.json").write_text("{")
    with pytest.raises(UserError, match="rankseg-shards.json is damaged"):
        make_synthetic(tmp_path / "a", images=4)


@pytest.mark.skipif(not hasattr(cv2, "IMWRITE_PNG_FILTER"), reason="OpenCV < 4.10 keeps libpng's filter choice")
def test_label_png_rows_use_the_up_filter_and_decode_to_the_same_values() -> None:
    """Every scanline of an encoded label carries filter type 2 ("up", PNG spec 9.2), read
    here from the inflated IDAT stream, and the values come back unchanged."""
    rng = np.random.default_rng(0)
    label = np.repeat(np.repeat(rng.integers(0, 900, (9, 13)), 7, 0), 5, 1).astype(np.uint16)
    label[:3, :4] = IGNORE
    png = encode_label(label)
    assert np.array_equal(decode_label(png), label)
    pos, idat = 8, b""
    while pos < len(png):
        (length,), kind = struct.unpack(">I", png[pos:pos + 4]), png[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += png[pos + 8:pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    h, w = label.shape
    stride = 1 + 2 * w  # filter byte + 16-bit grey samples
    assert len(raw) == h * stride
    assert {raw[r * stride] for r in range(h)} == {2}
