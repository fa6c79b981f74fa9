"""COCO-Stuff-10K from the release's annotations/*.mat (v1.1: MATLAB v5, S = COCO-Stuff id;
v1.0: MATLAB v7.3 / HDF5, S = 2 + train id), on small release trees written here."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipy.io
from conftest import assert_one_line_error
from convert_trees import random_image, read_shards, write_jpeg
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.convert.coco_stuff_10k import prepare_coco_stuff_10k
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.data.weak_shot import load_split
from rankseg_core.errors import UserError

IGNORE = 65535
TABLE = json.loads((Path(__file__).resolve().parents[1] / "datasets/coco_stuff/classes.json").read_text())
OPTS = ConvertOptions(samples_per_shard=2)
SKIP = ConvertOptions(samples_per_shard=2, on_error="skip")


def v11_S(train_ids: np.ndarray) -> np.ndarray:
    """v1.1 `S` of a train-id map (IGNORE = unlabelled 0): the COCO-Stuff id of each class."""
    ids = np.array([c["id"] for c in TABLE["classes"]])
    return np.where(train_ids == IGNORE, 0, ids[np.minimum(train_ids, 170)]).astype(np.uint8)


def v10_S(train_ids: np.ndarray) -> np.ndarray:
    """v1.0 `S`: 1 = unlabelled, 2..172 = the 171 classes in id order."""
    return np.where(train_ids == IGNORE, 1, train_ids + 2).astype(np.uint8)


def write_v5(path: Path, S: np.ndarray, n_names: int = 182) -> None:
    names = np.empty((n_names, 1), dtype=object)
    names[:, 0] = [f"name{i}" for i in range(n_names)]
    scipy.io.savemat(path, {"S": S, "names": names, "captions": np.array(["a caption"], dtype=object)},
                     do_compression=True)


def write_v73(path: Path, S: np.ndarray | None, n_names: int = 172, shape: tuple[int, int] | None = None) -> None:
    """A MATLAB v7.3 file: a 512-byte text header (the HDF5 user block), then HDF5 holding
    MATLAB's column-major arrays transposed; `names` a 1 x n cell (object references)."""
    with h5py.File(path, "w", userblock_size=512) as f:
        if shape is not None:  # stated, never written: a huge map costs nothing on disk
            f.create_dataset("S", shape=shape, dtype=np.uint8, chunks=(64, 64))
        elif S is not None:
            f.create_dataset("S", data=np.ascontiguousarray(S.T))
        f.create_dataset("names", shape=(1, n_names), dtype=h5py.ref_dtype)
    with open(path, "r+b") as fh:
        fh.write(b"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: Mon Jan  1 00:00:00 2018 HDF5 schema 1.00 .")


def release_tree(root: Path, release: str, n_train: int = 3, n_test: int = 2, size: tuple[int, int] = (24, 30),
                 seed: int = 0) -> dict[str, np.ndarray]:
    """images/, annotations/, imageLists/ of `release`; returns key -> train-id map (IGNORE)."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "imageLists").mkdir(parents=True, exist_ok=True)
    out, lists = {}, {"train": [], "test": []}
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        key = f"COCO_train2014_{i:012d}"
        ids = rng.choice([IGNORE, 0, 11, 79, 80, 91, 170, *rng.integers(0, 171, 3)], size)
        ids[0, 0], ids[0, 1] = IGNORE, 170  # unlabelled and the last class (wood) in every map
        write_jpeg(root / "images" / f"{key}.jpg", random_image(rng, *size))
        mat = root / "annotations" / f"{key}.mat"
        if release == "1.1":
            write_v5(mat, v11_S(ids))
        else:
            write_v73(mat, v10_S(ids))
        lists[split].append(key)
        out[key] = ids.astype(np.int64)
    for split, keys in lists.items():
        (root / "imageLists" / f"{split}.txt").write_text("".join(k + "\n" for k in keys))
    return out


@pytest.mark.parametrize("release", ["1.1", "1.0"])
def test_both_releases_give_the_171_train_ids(tmp_path: Path, release: str) -> None:
    src = release_tree(tmp_path / "cs10k", release)
    index = prepare_coco_stuff_10k(tmp_path / "cs10k", tmp_path / "out", release, OPTS)
    assert index["name"] == "coco-stuff-10k" and index["num_classes"] == 171
    assert index["class_names"] == [c["name"] for c in TABLE["classes"]]
    assert {s: m["num_samples"] for s, m in index["splits"].items()} == {"train": 3, "test": 2}
    # The official weak-shot splits fit these shards (names, K and dataset checked).
    assert len(load_split("coco-stuff-10k/split1", index["class_names"], index["name"]).novel) == 43
    got = read_shards(tmp_path / "out")
    for key, ids in src.items():
        mat = tmp_path / "cs10k" / "annotations" / f"{key}.mat"
        if release == "1.0":  # MaskFormer's prepare_coco_stuff_10k_v1.0_sem_seg.py: uint8 S - 2, 255 ignored
            with h5py.File(mat, "r") as f:
                want = (np.transpose(np.array(f["S"])).astype(np.uint8) - 2).astype(np.int64)
            want[want == 255] = IGNORE
        else:  # mmsegmentation's coco_stuff10k.py: clsID_to_trID over loadmat's S, 0 -> 255 ignored
            lut = {c["id"]: c["train_id"] for c in TABLE["classes"]}
            S = scipy.io.loadmat(mat)["S"]
            want = np.vectorize(lambda v: lut.get(int(v), IGNORE))(S).astype(np.int64)
        assert np.array_equal(got[key]["label"], want) and np.array_equal(want, ids), key
        assert got[key]["classes"] == sorted(set(ids[ids != IGNORE].tolist()))
        assert got[key]["image"] == (tmp_path / "cs10k" / "images" / f"{key}.jpg").read_bytes()


def test_wrong_release_and_bad_values_are_sample_errors(tmp_path: Path) -> None:
    root = tmp_path / "cs10k"
    src = release_tree(root, "1.1", n_train=4, n_test=1)
    keys = sorted(src)
    ann = root / "annotations"
    write_v73(ann / f"{keys[0]}.mat", v10_S(src[keys[0]]))  # a v1.0 file in a v1.1 conversion
    bad = v11_S(src[keys[1]])
    bad[2, 2] = 12  # COCO id 12 (street sign) has no masks: never in the release
    write_v5(ann / f"{keys[1]}.mat", bad)
    scipy.io.savemat(ann / f"{keys[2]}.mat", {"LabelMap": np.zeros((24, 30), np.uint8)})
    write_v5(ann / f"{keys[3]}.mat", v11_S(src[keys[3]])[:, :-2])  # not the image's size
    index = prepare_coco_stuff_10k(root, tmp_path / "o", "1.1", SKIP)
    reasons = sorted(json.loads(x)["reason"] for x in (tmp_path / "o" / "skipped.jsonl").read_text().splitlines())
    assert index["splits"]["train"]["num_samples"] == 0 and len(reasons) == 4
    assert any("172 names, as the v1.0 release: convert with --release 1.0" in r for r in reasons)
    assert any("label value(s) 12 are not used" in r for r in reasons)
    assert any("no 2-D label map 'S'" in r for r in reasons)
    assert any("mask is 28x24 but its image is 30x24" in r for r in reasons)
    # The other way round: v1.1 files (182 names) in a v1.0 conversion.
    with pytest.raises(UserError, match=r"182 names, as the v1\.1 release: convert with --release 1\.1"):
        prepare_coco_stuff_10k(root, tmp_path / "p", "1.0", OPTS)


def test_damaged_missing_and_oversized_annotations(tmp_path: Path) -> None:
    root = tmp_path / "cs10k"
    src = release_tree(root, "1.0", n_train=3, n_test=1)
    keys = sorted(src)
    ann = root / "annotations"
    (ann / f"{keys[0]}.mat").unlink()
    (ann / f"{keys[1]}.mat").write_bytes(b"MATLAB 5.0 MAT-file, truncated")
    write_v73(ann / f"{keys[2]}.mat", None, shape=(20000, 20000))  # 4e8 pixels stated
    index = prepare_coco_stuff_10k(root, tmp_path / "o", "1.0", SKIP)
    reasons = [json.loads(x)["reason"] for x in (tmp_path / "o" / "skipped.jsonl").read_text().splitlines()]
    assert index["splits"]["train"]["num_samples"] == 0 and index["splits"]["test"]["num_samples"] == 1
    assert any("annotation is missing (" in r and "train.txt lists it" in r for r in reasons)
    assert any("not a readable .mat file" in r for r in reasons)
    assert any("over rankseg's limit" in r for r in reasons)


def test_layout_and_list_errors_in_one_line(tmp_path: Path) -> None:
    root = tmp_path / "cs10k"
    release_tree(root, "1.1", n_train=2, n_test=1)
    run = CliRunner().invoke
    base = ["prepare", "coco-stuff-10k", "--root", str(root), "--workers", "0"]
    res = run(app, [*base, "--out", str(tmp_path / "ok")])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "ok" / "dataset.json").read_text())["options"]["release"] == "1.1"
    assert_one_line_error(run(app, [*base, "--release", "2.0", "--out", str(tmp_path / "a")]), "--release '2.0'")
    assert_one_line_error(run(app, ["prepare", "coco-stuff-10k", "--root", str(tmp_path / "none"), "--out",
                                    str(tmp_path / "b")]), "no such directory")
    lst = root / "imageLists" / "test.txt"
    lst.write_text("../../etc/passwd\n")
    assert_one_line_error(run(app, [*base, "--out", str(tmp_path / "c")]), "image name '../../etc/passwd'")
    train = (root / "imageLists" / "train.txt").read_text()
    lst.write_text(train.splitlines()[0] + "\n")
    assert_one_line_error(run(app, [*base, "--out", str(tmp_path / "d")]), "listed twice")
    lst.write_text("\n")
    assert_one_line_error(run(app, [*base, "--out", str(tmp_path / "e")]), "test.txt: the list is empty")
    lst.unlink()
    assert_one_line_error(run(app, [*base, "--out", str(tmp_path / "f")]), "test.txt: missing image list")
