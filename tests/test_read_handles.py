"""Shard reading on the training path (shards/read.py, shards/codec.py): the cached per-shard
blob readers return exactly what h5py's `dataset[row]` returns, handles never cross a pickle
or a fork, at most `max_open` files stay open (least recently read closed first), and
decoding straight to RGB equals OpenCV's BGR decode followed by a channel swap."""

from __future__ import annotations

import io
import multiprocessing as mp
import pickle
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
from conftest import make_synthetic
from PIL import Image

from rankseg_core.errors import UserError
from rankseg_core.shards import read
from rankseg_core.shards.codec import decode_image
from rankseg_core.shards.read import ShardDataset


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 samples in 4 shards of 3 (synthetic, panoptic: segment maps too)."""
    return make_synthetic(tmp_path_factory.mktemp("h") / "d", images=12, num_classes=40, size=32, per_shard=3,
                          val_images=1, panoptic=True)


def test_blobs_equal_h5py_rows(shards: Path) -> None:
    """Every sample's image, label and segment blobs against h5py's high-level reads."""
    ds = ShardDataset(shards, "train")
    assert len(ds.paths) == 4
    for i in [*range(len(ds)), 5, 0, 11]:  # every row, then back to earlier shards
        a = ds.arrays
        with h5py.File(ds.paths[a.shard[i]], "r") as f:
            r = int(a.row[i])
            want = f["image"][r], f["label"][r], f["segments"][r]
        img, lab = ds.blobs(i)
        assert img.dtype == lab.dtype == np.uint8 and img.ndim == lab.ndim == 1
        assert np.array_equal(img, want[0]) and np.array_equal(lab, want[1])
        assert ds.raw(i) == (want[0].tobytes(), want[1].tobytes())
        seg = ds._open(int(a.shard[i])).blob("segments", r)
        assert np.array_equal(seg, want[2])


def test_blob_reader_other_layouts_and_bad_rows(tmp_path: Path) -> None:
    """A dataset that is not 1-D vlen uint8 goes through h5py's own indexing; a row outside
    the dataset is a ValueError (which `ShardDataset.blobs` turns into a UserError)."""
    path = tmp_path / "x.h5"
    vlen = h5py.vlen_dtype(np.uint8)
    with h5py.File(path, "w") as f:
        d = f.create_dataset("v", (3,), dtype=vlen)
        for i, n in enumerate((0, 5, 70000)):  # an empty blob and one over 64 kB
            d[i] = np.arange(n, dtype=np.int64).astype(np.uint8)
        f.create_dataset("fixed", data=np.arange(12, dtype=np.uint8).reshape(3, 4))
    with h5py.File(path, "r") as f:
        fast, fixed = read._BlobReader(f["v"]), read._BlobReader(f["fixed"])
        assert fast._fast and not fixed._fast
        for r in range(3):
            assert np.array_equal(fast(r), f["v"][r]) and fast(r).dtype == np.uint8
            assert np.array_equal(fixed(r), np.arange(4 * r, 4 * r + 4))
        for r in (-1, 3):
            with pytest.raises(ValueError, match="outside"):
                fast(r)


def test_damaged_shard_is_a_user_error(tmp_path: Path) -> None:
    root = make_synthetic(tmp_path / "d", images=4, num_classes=40, size=32, per_shard=4, val_images=1)
    ds = ShardDataset(root, "train")
    with h5py.File(ds.paths[0], "r+") as f:  # after the index was read: a damaged file
        del f["label"]
    with pytest.raises(UserError, match="cannot read sample .*run `rankseg verify`"):
        ds.blobs(1)


def test_handles_are_capped_least_recently_read_first(shards: Path) -> None:
    ds = ShardDataset(shards, "train", max_open=2)
    want = [ShardDataset(shards, "train").load(i)["label"] for i in range(len(ds))]
    shard_of = [int(s) for s in ds.arrays.shard]
    first = {s: shard_of.index(s) for s in range(4)}  # one sample of each shard

    def touch(s: int) -> None:
        assert np.array_equal(ds.load(first[s])["label"], want[first[s]])

    touch(0)
    touch(1)
    f0, f1 = ds._files[0].file, ds._files[1].file
    touch(0)  # 0 is now the most recently read
    touch(2)  # evicts 1, the least recently read, not 0
    assert list(ds._files) == [0, 2]
    assert not f1.id.valid and f0.id.valid  # the evicted file is closed, not just dropped
    touch(3)
    assert list(ds._files) == [2, 3] and not f0.id.valid
    for i in range(len(ds)):  # a full pass through a cache smaller than the split
        assert np.array_equal(ds.load(i)["label"], want[i])
        assert len(ds._files) <= 2
    with pytest.raises(ValueError, match="max_open"):
        ShardDataset(shards, "train", max_open=0)


def test_handles_never_cross_a_pickle(shards: Path) -> None:
    ds = ShardDataset(shards, "train", max_open=3)
    ds.load(4)
    assert ds._files
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker receives
    assert clone._files == {} and clone._pid is None and clone.max_open == 3
    assert np.array_equal(clone.load(4)["image"], ds.load(4)["image"])


def _child(ds: ShardDataset, conn) -> None:  # noqa: ANN001 - a multiprocessing Connection
    import os

    opened: list[Path] = []
    real = read.open_shard

    def counting(path: Path) -> h5py.File:
        opened.append(path)
        return real(path)

    read.open_shard = counting  # this forked process only
    inherited = list(ds._files)
    labels = [ds.load(i)["label"] for i in (0, 1, 10)]
    conn.send((inherited, [p.name for p in opened], ds._pid == os.getpid(), labels))
    conn.close()


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs fork")
def test_forked_child_reopens_its_own_handles(shards: Path) -> None:
    """A DataLoader worker forked after the parent read (e.g. a validation pass first) must
    not use the parent's HDF5 handles: it opens the shards again."""
    ds = ShardDataset(shards, "train")
    want = [ds.load(i)["label"] for i in (0, 1, 10)]
    assert set(ds._files) == {0, 3}
    parent, child = mp.get_context("fork").Pipe()
    proc = mp.get_context("fork").Process(target=_child, args=(ds, child))
    proc.start()
    inherited, opened, own_pid, labels = parent.recv()
    proc.join(30)
    assert proc.exitcode == 0
    assert inherited == [0, 3]  # the parent's handles were there in the child's memory ...
    assert opened == [ds.paths[0].name, ds.paths[3].name]  # ... and were opened anew, once each
    assert own_pid and all(np.array_equal(a, b) for a, b in zip(labels, want))
    assert set(ds._files) == {0, 3} and all(h.file.id.valid for h in ds._files.values())  # parent untouched


def _encode(fmt: str, image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format=fmt)
    return buf.getvalue()


def test_decode_to_rgb_equals_bgr_then_swap() -> None:
    """OpenCV's direct RGB decode against IMREAD_COLOR + cvtColor (the previous path), on the
    formats shards hold (JPEG, PNG) and others a converter may pass through."""
    rng = np.random.default_rng(0)
    rgb = cv2.GaussianBlur(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8), (5, 5), 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90": ignored, masks are drawn on the stored grid
    rotated = io.BytesIO()
    Image.fromarray(rgb).save(rotated, format="JPEG", exif=exif)
    blobs = {"jpeg": _encode("JPEG", rgb), "jpeg-gray": _encode("JPEG", rgb[..., 0]), "jpeg-exif": rotated.getvalue(),
             "png": _encode("PNG", rgb), "png-rgba": _encode("PNG", np.dstack([rgb, rgb[..., :1]])),
             "png-16bit": cv2.imencode(".png", (rgb[..., 0].astype(np.uint16) * 257))[1].tobytes(),
             "bmp": _encode("BMP", rgb), "webp": _encode("WEBP", rgb), "tiff": _encode("TIFF", rgb)}
    for name, b in blobs.items():
        arr = np.frombuffer(b, np.uint8)
        bgr = cv2.imdecode(arr, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
        got = decode_image(b)
        assert got.dtype == np.uint8 and got.shape == (37, 53, 3), name
        assert np.array_equal(got, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)), name
        assert np.array_equal(decode_image(arr), got), name  # bytes or a uint8 array alike
