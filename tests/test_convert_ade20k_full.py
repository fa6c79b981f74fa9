"""ADE20K-Full converter: real release files vs. their JSON, generated trees vs. independent numpy."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from convert_trees import ade_full_tree, ade_seg_rgb, decode_rgb, random_label, read_shards, write_ade_full
from PIL import Image
from typer.testing import CliRunner

import rankseg_cli.prepare_images  # noqa: F401  (registers the commands on `prepare`)
from rankseg_cli.app import app
from rankseg_core.convert.ade20k_full import (
    FREQUENCY_CACHE,
    find_images,
    prepare_ade20k_full,
    split_of,
    top_classes_by_frequency,
)
from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.resize import short_side_size
from rankseg_core.errors import UserError
from rankseg_core.shards.codec import IGNORE
from rankseg_core.shards.verify import verify_shards

REAL = Path("ade20k_full") / "ADE20K_2021_17_01"
SHIPPED = Path(__file__).resolve().parents[1] / "datasets" / "ade20k_full" / "classes.json"
runner = CliRunner()


def table(path: Path = SHIPPED) -> dict[int, int]:
    """class value -> train id, read straight from a table file."""
    data = json.loads(path.read_text())
    rows = data["classes"] if isinstance(data, dict) else data
    return {r["id"]: r.get("train_id", r.get("trainId")) for r in rows}


def expected_label(values: np.ndarray, id_to_train: dict[int, int]) -> np.ndarray:
    """Reference remap (one mask per present value, as MaskFormer's script does)."""
    out = np.full(values.shape, IGNORE, np.uint16)
    for v in np.unique(values):
        if int(v) in id_to_train:
            out[values == v] = id_to_train[int(v)]
    return out


def present(label: np.ndarray) -> list[int]:
    return sorted(set(np.unique(label).tolist()) - {IGNORE})


def opts(**kw) -> ConvertOptions:
    return ConvertOptions(**{"samples_per_shard": 1000, **kw})


def assert_verified(out: Path) -> None:
    assert list(verify_shards(out, decode_images=True)) == []


# --- the real release files -------------------------------------------------------------

@pytest.fixture(scope="module")
def real_root(shared_fixtures: Path) -> Path:
    root = shared_fixtures / REAL
    if not root.is_dir():
        pytest.skip("ADE20K-Full fixture files are absent")
    return root


def test_shipped_table_is_the_847_table(shared_fixtures: Path) -> None:
    ref = shared_fixtures / "tables" / "ade20k_full_847.json"
    if not ref.exists():
        pytest.skip("fixture table absent")
    want = json.loads(ref.read_text())
    got = json.loads(SHIPPED.read_text())
    assert got["source"] and got["num_classes"] == 847
    assert [(c["name"], c["id"], c["train_id"]) for c in got["classes"]] == \
        [(c["name"], c["id"], c["trainId"]) for c in want]


def test_real_full_resolution_matches_json_and_pil(real_root: Path, shared_fixtures: Path, tmp_path: Path) -> None:
    """Targets equal the JSON's whole objects (name_ndx) in the table; labels equal a PIL recompute."""
    id_to_train = table(shared_fixtures / "tables" / "ade20k_full_847.json")
    out = tmp_path / "full"
    prepare_ade20k_full(real_root, out, split="training", max_short_side=0, opts=opts())
    stored = read_shards(out)
    jpgs = sorted(real_root.rglob("ADE_*.jpg"))
    assert sorted(stored) == [p.stem for p in jpgs] and len(jpgs) == 3
    for jpg in jpgs:
        s = stored[jpg.stem]
        rgb = np.asarray(Image.open(jpg.with_name(jpg.stem + "_seg.png")).convert("RGB"))
        values = (rgb[..., 0] / 10).astype(np.int64) * 256 + rgb[..., 1].astype(np.int64)
        assert np.array_equal(s["label"], expected_label(values, id_to_train))

        ann = json.loads(jpg.with_suffix(".json").read_text(encoding="utf-8"))["annotation"]
        whole = {o["name_ndx"] for o in ann["object"] if o["parts"]["part_level"] == 0}
        in_mask = set(np.unique(values).tolist()) - {0}
        # In these three images the JSON's whole objects and the mask's classes agree exactly
        # (no fully occluded object); the target compares against the JSON classes with pixels.
        assert whole == in_mask
        assert s["classes"] == sorted(id_to_train[v] for v in whole & in_mask if v in id_to_train)
        assert s["image"] == jpg.read_bytes()  # no resize: original JPEG bytes
        h, w = rgb.shape[:2]
        assert s["size"] == s["orig_size"] == (h, w)
    assert_verified(out)


def test_real_default_protocol_is_maskformer(real_root: Path, tmp_path: Path) -> None:
    """Default 512 protocol == MaskFormer's script (cv2 bilinear image, cv2 nearest label)."""
    id_to_train = table()
    out = tmp_path / "p512"
    prepare_ade20k_full(real_root, out, split="training", opts=opts())
    stored = read_shards(out)
    for jpg in sorted(real_root.rglob("ADE_*.jpg")):
        s = stored[jpg.stem]
        rgb = np.asarray(Image.open(jpg.with_name(jpg.stem + "_seg.png")).convert("RGB"))
        values = (rgb[..., 0] / 10).astype(np.int32) * 256 + rgb[..., 1].astype(np.int32)
        h, w = values.shape
        nh, nw = (512, round(w / h * 512)) if w >= h else (round(h / w * 512), 512)
        ref = expected_label(cv2.resize(values, (nw, nh), interpolation=cv2.INTER_NEAREST), id_to_train)
        assert s["size"] == (nh, nw) and s["orig_size"] == (h, w)
        assert np.array_equal(s["label"], ref)
        img = np.asarray(Image.open(jpg).convert("RGB"))
        want = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR).astype(float)
        got = decode_rgb(s["image"]).astype(float)
        psnr = 10 * np.log10(255 ** 2 / np.mean((got - want) ** 2))
        assert psnr > 33, psnr  # one JPEG re-encode at quality 95
    assert {s["size"] for s in stored.values()} == {(512, 683), (512, 768)}
    assert_verified(out)


# --- generated trees --------------------------------------------------------------------

def test_short_side_size_rule() -> None:
    assert short_side_size(1536, 2048, 512) == (512, 683)
    assert short_side_size(2200, 1467, 512) == (768, 512)
    assert short_side_size(513, 513, 512) == (512, 512)
    assert short_side_size(512, 4000, 512) == (512, 4000)  # not exceeded: unchanged
    assert short_side_size(1536, 2048, 0) == (1536, 2048)
    assert short_side_size(1024, 1025, 512) == (512, 512)  # 512.5: Python's round, as MaskFormer


def test_walk_and_split_names(tmp_path: Path) -> None:
    tree = ade_full_tree(tmp_path, n_train=3, n_val=2)
    splits, files = find_images(tmp_path)
    assert sorted(splits["training"]) == sorted(k for k, s in tree.items() if s.split == "training")
    assert sorted(splits["validation"]) == sorted(k for k, s in tree.items() if s.split == "validation")
    assert all(not f.endswith("_seg.png") and "instance" not in f for f in files.values())
    assert split_of("ADE_val_00000001.jpg") == "validation"
    assert split_of("ADE_frame_00000001.jpg") == "training"  # MaskFormer's rule: only "val" is val


def test_generated_labels_unlabeled_and_out_of_table(tmp_path: Path) -> None:
    id_to_train = table()
    assert 5 not in id_to_train and 3200 not in id_to_train  # the tree's out-of-table values
    tree = ade_full_tree(tmp_path / "root", n_train=4, n_val=2)
    out = tmp_path / "out"
    index = prepare_ade20k_full(tmp_path / "root", out, opts=opts())
    assert index["num_classes"] == 847 and index["name"] == "ade20k-full"
    assert index["splits"]["training"]["num_samples"] == 4
    assert index["splits"]["validation"]["num_samples"] == 2
    stored = read_shards(out)
    for key, sample in tree.items():
        want = expected_label(sample.values, id_to_train)
        assert (want == IGNORE).any()  # 0 / 5 / 3200 pixels are ignore
        assert np.array_equal(stored[key]["label"], want)
        assert stored[key]["classes"] == present(want)
        assert stored[key]["image"] == sample.image_path.read_bytes()
        assert stored[key]["split"] == sample.split
    assert_verified(out)


def test_resize_sizes_and_nearest_values(tmp_path: Path) -> None:
    id_to_train = table()
    rng = np.random.default_rng(3)
    root = tmp_path / "root"
    ids = list(id_to_train)[:40] + [0, 7]
    wide = write_ade_full(root, "ADE_train_00000001", random_label(rng, 600, 900, ids, cell=1), rng=rng)
    tall = write_ade_full(root, "ADE_train_00000002", random_label(rng, 700, 520, ids, cell=1), rng=rng)
    small = write_ade_full(root, "ADE_val_00000003", random_label(rng, 40, 60, ids, cell=2), rng=rng)
    out = tmp_path / "out"
    prepare_ade20k_full(root, out, opts=opts())
    stored = read_shards(out)
    for sample, (nh, nw) in ((wide, (512, 768)), (tall, (689, 512))):
        s = stored[sample.key]
        h, w = sample.values.shape
        assert s["size"] == (nh, nw) and s["orig_size"] == (h, w)
        # OpenCV nearest: destination pixel i takes source pixel floor(i * src / dst).
        rows = np.minimum((np.arange(nh) * h / nh).astype(int), h - 1)
        cols = np.minimum((np.arange(nw) * w / nw).astype(int), w - 1)
        want = expected_label(sample.values[rows][:, cols], id_to_train)
        assert np.array_equal(s["label"], want)
        assert s["classes"] == present(want)
        assert decode_rgb(s["image"]).shape == (nh, nw, 3)
    assert stored[small.key]["size"] == (40, 60)
    assert stored[small.key]["image"] == small.image_path.read_bytes()
    assert_verified(out)


def _bad_tree(root: Path) -> dict:
    tree = ade_full_tree(root, n_train=4, n_val=1)
    keys = sorted(k for k in tree if tree[k].split == "training")
    tree[keys[1]].image_path.write_bytes(b"")  # 0-byte JPEG
    seg = tree[keys[2]].mask_path  # mask of another size than its image
    Image.fromarray(ade_seg_rgb(np.full((20, 20), 312)), "RGB").save(seg)
    return {"empty": tree[keys[1]], "size": tree[keys[2]], "tree": tree}


def test_bad_samples_skip(tmp_path: Path) -> None:
    bad = _bad_tree(tmp_path / "root")
    out = tmp_path / "out"
    index = prepare_ade20k_full(tmp_path / "root", out, opts=opts(on_error="skip"))
    assert index["splits"]["training"]["num_samples"] == 2
    assert index["splits"]["training"]["num_skipped"] == 2
    skipped = {json.loads(x)["key"]: json.loads(x)["reason"]
               for x in (out / "skipped.jsonl").read_text().splitlines()}
    assert set(skipped) == {bad["empty"].key, bad["size"].key}
    assert str(bad["empty"].image_path) in skipped[bad["empty"].key] and "0 bytes" in skipped[bad["empty"].key]
    assert str(bad["size"].mask_path) in skipped[bad["size"].key] and "20x20" in skipped[bad["size"].key]
    assert_verified(out)


def test_bad_samples_fail_cli(tmp_path: Path) -> None:
    bad = _bad_tree(tmp_path / "root")
    res = runner.invoke(app, ["prepare", "ade20k-full", "--root", str(tmp_path / "root"),
                              "--out", str(tmp_path / "out"), "--workers", "0"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if "error:" in line]
    assert len(errors) == 1
    text = " ".join(res.output.split())
    assert bad["empty"].key in text and "--on-error skip" in text


def test_r_channel_not_multiple_of_ten(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    s = write_ade_full(tmp_path / "root", "ADE_train_00000001",
                       random_label(rng, 16, 16, [312, 2978]), rng=rng)
    rgb = np.asarray(Image.open(s.mask_path)).copy()
    rgb[0, 0, 0] = 13  # R = 13: not a genuine _seg.png (e.g. re-saved lossily)
    Image.fromarray(rgb, "RGB").save(s.mask_path)
    with pytest.raises(UserError, match=r"R=13") as exc:
        prepare_ade20k_full(tmp_path / "root", tmp_path / "out", split="training", opts=opts())
    assert str(s.mask_path) in str(exc.value)


def _presence_tree(root: Path) -> None:
    """Train images with known class presence: A in 4, B in 3, C in 2, D in 1 (ids from the table)."""
    rng = np.random.default_rng(1)
    a, b, c, d = 2978, 312, 2420, 2855  # train ids 0..3 in the table
    sets = [[d, c, b, a], [c, b, a], [b, a, 0], [a, 0]]
    for i, vals in enumerate(sets):
        write_ade_full(root, f"ADE_train_{i:08d}", random_label(rng, 24, 32, vals), rng=rng)
    write_ade_full(root, "ADE_val_00000009", random_label(rng, 24, 32, [a, d, c]), rng=rng)


def test_top_classes_remap_and_cache(tmp_path: Path) -> None:
    root, out = tmp_path / "root", tmp_path / "out"
    _presence_tree(root)
    # Five more images of D only: D (train id 3) becomes the most frequent, so the top-X order
    # differs from the table's train-id order.
    rng = np.random.default_rng(2)
    for i in range(4, 9):
        write_ade_full(root, f"ADE_train_{i:08d}", random_label(rng, 24, 32, [2855]), rng=rng)
    index = prepare_ade20k_full(root, out, top_classes=2, opts=opts())
    names = json.loads(SHIPPED.read_text())["classes"]
    # D (train id 3) is in 6 images, A (0) in 4: top-2 = [D, A].
    assert index["class_names"] == [names[3]["name"], names[0]["name"]]
    assert index["num_classes"] == 2 and index["name"] == "ade20k-full-top2"
    cache = json.loads((out / FREQUENCY_CACHE).read_text())
    assert cache["class_images"][:5] == [4, 3, 2, 6, 0] and cache["num_images"] == 9
    stored = read_shards(out)
    remap = {2855: 0, 2978: 1}
    val = stored["ADE_val_00000009"]
    seg = np.asarray(Image.open(root / "images/ADE/validation/urban/street/ADE_val_00000009_seg.png"))
    values = (seg[..., 0] // 10).astype(np.int64) * 256 + seg[..., 1]
    assert np.array_equal(val["label"], expected_label(values, remap))
    assert val["classes"] == [0, 1]
    assert_verified(out)

    # A resumed run reads the cached table instead of recounting: tamper it and start over.
    cache["class_images"][:5] = [0, 0, 9, 0, 0]  # now C is the most frequent, then A (tie order)
    (out / FREQUENCY_CACHE).write_text(json.dumps(cache))
    for p in out.glob("*.h5*"):
        p.unlink()
    (out / "dataset.json").unlink()
    index = prepare_ade20k_full(root, out, top_classes=2, opts=opts())
    assert index["class_names"] == [names[2]["name"], names[0]["name"]]
    assert_verified(out)


def test_top_classes_ties_and_bounds(tmp_path: Path) -> None:
    assert top_classes_by_frequency(np.array([1, 5, 5, 0, 7]), 3).tolist() == [4, 1, 2]
    _presence_tree(tmp_path / "root")
    with pytest.raises(UserError, match="--top-classes"):
        prepare_ade20k_full(tmp_path / "root", tmp_path / "o", top_classes=848, opts=opts())


def _dataset_json(out: Path) -> dict:
    return json.loads((out / "dataset.json").read_text())


def test_parts_then_assemble_equals_one_shot(tmp_path: Path) -> None:
    root = tmp_path / "root"
    ade_full_tree(root, n_train=5, n_val=3)
    one = tmp_path / "one"
    prepare_ade20k_full(root, one, top_classes=6, opts=opts(samples_per_shard=2))
    parts = tmp_path / "parts"
    for i in range(2):
        assert prepare_ade20k_full(root, parts, top_classes=6,
                                   opts=opts(samples_per_shard=2, num_shards=2, shard_index=i)) is None
        assert not (parts / "dataset.json").exists()
    written = sorted(p.name for p in parts.glob("*.h5"))
    assert len(written) == 5  # 3 training + 2 validation shards, split between the two parts
    prepare_ade20k_full(root, parts, top_classes=6, opts=opts(samples_per_shard=2, num_shards=2))
    assert _dataset_json(parts) == _dataset_json(one)
    assert_verified(parts)


def test_resume_after_interrupted_run(tmp_path: Path) -> None:
    root = tmp_path / "root"
    tree = ade_full_tree(root, n_train=5, n_val=1)
    one = tmp_path / "one"
    prepare_ade20k_full(root, one, opts=opts(samples_per_shard=2))
    last = tree[sorted(k for k in tree if tree[k].split == "training")[-1]]  # in the last shard
    good = last.image_path.read_bytes()
    last.image_path.write_bytes(b"")
    out = tmp_path / "out"
    with pytest.raises(UserError, match="0 bytes"):
        prepare_ade20k_full(root, out, opts=opts(samples_per_shard=2))
    done = {p.name: p.stat().st_mtime_ns for p in out.glob("training-*.h5")}
    assert len(done) == 2 and not (out / "dataset.json").exists()
    last.image_path.write_bytes(good)
    prepare_ade20k_full(root, out, opts=opts(samples_per_shard=2))
    assert {p: (out / p).stat().st_mtime_ns for p in done} == done  # finished shards kept
    assert _dataset_json(out) == _dataset_json(one)
    assert_verified(out)
    # Different options into the same directory are refused, not mixed.
    with pytest.raises(UserError, match="different options"):
        prepare_ade20k_full(root, out, max_short_side=0, opts=opts(samples_per_shard=2))


def test_cli_runs_and_reports(tmp_path: Path) -> None:
    ade_full_tree(tmp_path / "root", n_train=2, n_val=1)
    out = tmp_path / "out"
    res = runner.invoke(app, ["prepare", "ade20k-full", "--root", str(tmp_path / "root"), "--out", str(out),
                              "--workers", "0", "--split", "validation", "--max-short-side", "0"])
    assert res.exit_code == 0, res.output
    assert "K=847" in res.output and list(_dataset_json(out)["splits"]) == ["validation"]
    assert runner.invoke(app, ["verify", str(out)]).exit_code == 0
    res = runner.invoke(app, ["prepare", "ade20k-full", "--help"])
    assert res.exit_code == 0 and "Example" in res.output


@pytest.mark.parametrize("args, fragment", [
    (["--root", "{tmp}/nope"], "images/ADE"),
    (["--root", "{tmp}/root", "--split", "test"], "--split"),
    (["--root", "{tmp}/root", "--max-short-side", "-1"], "--max-short-side"),
    (["--root", "{tmp}/root", "--on-error", "maybe"], "--on-error"),
])
def test_cli_user_errors(tmp_path: Path, args: list[str], fragment: str) -> None:
    ade_full_tree(tmp_path / "root", n_train=1, n_val=0)
    args = [a.format(tmp=tmp_path) for a in args]
    res = runner.invoke(app, ["prepare", "ade20k-full", *args, "--out", str(tmp_path / "out"), "--workers", "0"])
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "error:" in res.output
    assert fragment in " ".join(res.output.split())


def test_validation_only_tree_needs_training_for_top_classes(tmp_path: Path) -> None:
    ade_full_tree(tmp_path / "root", n_train=0, n_val=2)
    with pytest.raises(UserError, match="no training images"):
        prepare_ade20k_full(tmp_path / "root", tmp_path / "o", opts=opts())
    with pytest.raises(UserError, match="--top-classes needs the training split"):
        prepare_ade20k_full(tmp_path / "root", tmp_path / "o2", split="validation", top_classes=3, opts=opts())


def test_maker_pickles(tmp_path: Path) -> None:
    """Workers are spawned: the maker must pickle (and stay small: paths are relative)."""
    import functools

    from rankseg_core.convert import ade20k_full as m

    ade_full_tree(tmp_path, n_train=2, n_val=1)
    _, files = find_images(tmp_path)
    maker = functools.partial(m.make_ade20k_full_sample, root=str(tmp_path), files=files,
                              lut=m.seg_lut(m.value_lut(m.load_table()[0])), num_classes=847,
                              max_short_side=512)
    again = pickle.loads(pickle.dumps(maker))
    key = sorted(files)[0]
    assert again(key).label == maker(key).label


@pytest.mark.slow
def test_spawned_workers_match_in_process(tmp_path: Path) -> None:
    root = tmp_path / "root"
    ade_full_tree(root, n_train=6, n_val=2)
    prepare_ade20k_full(root, tmp_path / "a", top_classes=5, opts=opts(samples_per_shard=3))
    prepare_ade20k_full(root, tmp_path / "b", top_classes=5, opts=opts(samples_per_shard=3, workers=2))
    assert _dataset_json(tmp_path / "a") == _dataset_json(tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    assert os.path.exists(tmp_path / "b" / FREQUENCY_CACHE)
