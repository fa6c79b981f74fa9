"""Names and data from files that were tampered with (issue 17, items 12 and 15).

Every name read from a file is checked (`shards.check.name_problem`) before it becomes a path;
records, JSON and weights that do not fit are refused in one line, never a traceback or a
write outside the chosen folder.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, make_synthetic, tiny_run
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.convert.coco_panoptic import pack_records, prepare_coco_panoptic
from rankseg_core.convert.coco_panoptic_format import categories_of, image_id_of
from rankseg_core.convert.detectron2 import prepare_detectron2_layout
from rankseg_core.convert.export import MARKER, export_shards
from rankseg_core.errors import SampleError, UserError
from rankseg_core.shards.check import name_problem
from rankseg_core.shards.read import ShardDataset, ShardIndex
from rankseg_core.shards.verify import verify_shards
from rankseg_core.shards.write import sha256_file
from rankseg_core.utils import jsonio
from rankseg_core.utils.lock import acquire

runner = CliRunner()
SHARD = "train-00000-of-00003.h5"  # make_synthetic: 24 train images, 8 per shard
DEEP = "[" * 5000 + "]" * 5000  # past the interpreter's recursion limit when parsed by `json`


def cli(*args: object):
    return runner.invoke(app, [os.fspath(a) if isinstance(a, Path) else str(a) for a in args])


@pytest.fixture
def data(synth: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(synth, tmp_path / "d"))


@pytest.fixture(scope="module")
def panoptic_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("pan") / "data", num_classes=40, panoptic=True)


@pytest.fixture
def panoptic(panoptic_src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(panoptic_src, tmp_path / "p"))


def _meta(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text())


def _save(root: Path, meta: dict) -> None:
    (root / "dataset.json").write_text(json.dumps(meta))


def _edit_meta(root: Path, fn) -> None:
    meta = _meta(root)
    fn(meta)
    _save(root, meta)


def _edit_shard(root: Path, name: str, values: list[str]) -> None:
    """Replace string array `name` of the first train shard and re-seal sizes and hashes, as a
    crafted directory would."""
    with h5py.File(root / SHARD, "r+") as f:
        del f[name]
        f.create_dataset(name, data=np.array(values, dtype=object), dtype=h5py.string_dtype())
    meta = _meta(root)
    for split in meta["splits"].values():
        for sh in split["shards"]:
            path = root / sh["file"]
            sh.update(bytes=path.stat().st_size, sha256=sha256_file(path))
    _save(root, meta)


def _strings(root: Path, name: str) -> list[str]:
    with h5py.File(root / SHARD, "r") as f:
        return list(f[name].asstr()[:])


def _files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


# --- the one name check -------------------------------------------------------------------

@pytest.mark.parametrize("name", ["", "..", ".", "a/b", "../x", "/abs", "a\\b", "nul\0", ".hidden", "x" * 256])
def test_name_problem_refuses_what_could_leave_a_directory(name: str) -> None:
    assert name_problem(name)


@pytest.mark.parametrize("name", ["train", "ADE_train_00000001", "video__0001.png", "é" * 100])
def test_name_problem_accepts_plain_names(name: str) -> None:
    assert name_problem(name) == ""


def test_shard_file_names_still_need_h5() -> None:
    assert "must end in .h5" in name_problem("x.txt", ".h5")


# --- item 12: export and prepare detectron2 stay inside their folders ---------------------

@pytest.mark.parametrize("bad", ["../escaped", "/ABS"])
def test_export_refuses_a_dataset_name_that_is_a_path(data: Path, tmp_path: Path, bad: str) -> None:
    target = tmp_path / "abs" if bad == "/ABS" else tmp_path / "escaped"
    name = str(target) if bad == "/ABS" else bad
    _edit_meta(data, lambda m: m.update(name=name))
    out = tmp_path / "out" / "x"
    with pytest.raises(UserError, match="dataset name") as exc:
        export_shards(data, out, progress=False)
    assert "dataset.json" in str(exc.value)
    assert not target.exists() and not (out.parent / "escaped").exists() and not out.exists()


def test_export_refuses_a_split_name_that_is_a_path(data: Path, tmp_path: Path) -> None:
    _edit_meta(data, lambda m: m["splits"].update({"../../up": m["splits"].pop("val")}))
    res = cli("export", data, "--out", tmp_path / "out")
    assert_one_line_error(res, "split name", "../../up")
    assert not (tmp_path / "out").exists()


def test_export_refuses_a_sample_key_that_is_no_file_name(data: Path, tmp_path: Path) -> None:
    keys = _strings(data, "key")
    _edit_shard(data, "key", [".."] + keys[1:])
    out = tmp_path / "out"
    with pytest.raises(UserError, match="file name"):
        export_shards(data, out, progress=False)
    written = [p for p in _files_under(out) if p.is_file() and p.name != MARKER]
    assert written == []


def test_prepare_detectron2_refuses_a_dataset_name_that_leaves_root(tmp_path: Path) -> None:
    root = tmp_path / "export"
    root.mkdir()
    outside = tmp_path / "elsewhere" / "images" / "train"  # what "../elsewhere" would read
    outside.mkdir(parents=True)
    (root / "rankseg_export.json").write_text(json.dumps({"dataset": "../elsewhere", "class_names": ["a", "b"]}))
    with pytest.raises(UserError, match="dataset name") as exc:
        prepare_detectron2_layout(root, tmp_path / "shards")
    assert "rankseg_export.json" in str(exc.value)


def test_prepare_detectron2_summary_with_deep_json_is_one_line(tmp_path: Path) -> None:
    root = tmp_path / "export"
    root.mkdir()
    (root / "rankseg_export.json").write_text('{"dataset": "x", "class_names": ' + DEEP + "}")
    with pytest.raises(UserError, match="is damaged"):
        prepare_detectron2_layout(root, tmp_path / "shards")


# --- two exports into one folder ----------------------------------------------------------

def test_second_export_into_a_folder_being_written_is_refused(synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    held = acquire(out, "export")  # another export holding the folder
    try:
        with pytest.raises(UserError, match="being written by another rankseg process"):
            export_shards(synth, out, progress=False)
        assert not (out / MARKER).exists()
    finally:
        held.release()
    res = export_shards(synth, out, splits=["val"], progress=False)  # free again: it runs
    assert res.written > 0 and not any(p.name.startswith(".rankseg.lock") for p in out.iterdir())


def test_export_does_not_write_a_lock_into_a_foreign_folder(synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "mine.txt").write_text("x")
    with pytest.raises(UserError, match="not made by `rankseg export`"):
        export_shards(synth, out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]


def test_export_marker_that_is_not_an_object_is_damaged(synth: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / MARKER).write_text("[1, 2]")
    with pytest.raises(UserError, match="is damaged"):
        export_shards(synth, out, progress=False)


# --- strict, bounded JSON -------------------------------------------------------------------

@pytest.mark.parametrize("text", [DEEP, "[" * 65 + "]" * 65, "1e400", "[-1e999]", '{"a": NaN}', "1" + "0" * 5000])
def test_jsonio_loads_refuses_with_value_error(text: str) -> None:
    with pytest.raises(ValueError):
        jsonio.loads(text)


def test_jsonio_loads_keeps_plain_json() -> None:
    assert jsonio.loads('{"a": [1, 2.5, {"b": [[]]}]}') == {"a": [1, 2.5, {"b": [[]]}]}
    assert jsonio.depth({"a": [1, {"b": [[]]}]}) == 5 and jsonio.depth(3) == 0


def test_deep_dataset_json_is_a_finding_not_a_traceback(data: Path) -> None:
    text = (data / "dataset.json").read_text()
    (data / "dataset.json").write_text(text.replace('"options": {', '"options": {"deep": ' + DEEP + ", ", 1))
    assert any("not valid JSON" in p for p in verify_shards(data))
    assert_one_line_error(cli("inspect", data), "dataset.json")


# --- item 15: panoptic records read by train / eval / inspect / verify ---------------------

def _set_record(root: Path, fn) -> None:
    infos = _strings(root, "segments_info")
    infos[0] = fn(json.loads(infos[0]))
    _edit_shard(root, "segments_info", infos)


@pytest.mark.parametrize("damage, fragment", [
    (lambda recs: json.dumps([{k: v for k, v in r.items() if k != "category"} for r in recs]), "must have keys"),
    (lambda recs: json.dumps([dict(r, category=10 ** 6) for r in recs]), "not a train id < K=40"),
    (lambda recs: json.dumps([dict(r, category=-1) for r in recs]), "not a train id < K=40"),
    (lambda recs: json.dumps(recs[:0]), "only 0 records"),
    (lambda recs: json.dumps([dict(r, iscrowd=7) for r in recs]), "iscrowd must be 0 or 1"),
    (lambda recs: json.dumps([dict(r, id=1) for r in recs]), "not unique"),
    (lambda recs: DEEP, "nested deeper"),
    (lambda recs: json.dumps([{"id": 1, "category": 0, "iscrowd": 0, "area": 1, "x": json.loads("[" * 100 + "]" * 100)}]),
     "nested deeper"),
])
def test_bad_panoptic_records_are_one_line_for_train_and_eval(panoptic: Path, damage, fragment: str) -> None:
    recs = json.loads(_strings(panoptic, "segments_info")[0])
    if fragment == "not unique" and len(recs) < 2:
        pytest.skip("sample 0 has one segment")
    _set_record(panoptic, damage)
    ds = ShardDataset(panoptic, "train")
    with pytest.raises(UserError, match=fragment) as exc:
        ds.load(0)
    assert SHARD in str(exc.value) and "\n" not in str(exc.value)
    assert ds.load(1)["segments_info"]  # the others still read
    assert any(SHARD in p for p in verify_shards(panoptic))


def test_deep_records_are_one_line_in_inspect(panoptic: Path) -> None:
    _set_record(panoptic, lambda recs: DEEP)
    with pytest.raises(UserError, match="nested deeper"):
        ShardIndex(panoptic).segment_counts("train")
    assert_one_line_error(cli("inspect", panoptic, "--jsonl"), SHARD)


# --- verify: one key, one sample ------------------------------------------------------------

def test_verify_reports_duplicate_keys(data: Path) -> None:
    keys = _strings(data, "key")
    _edit_shard(data, "key", [keys[0], keys[0]] + keys[2:])
    problems = list(verify_shards(data))
    assert len(problems) == 1 and f"key '{keys[0]}' is also" in problems[0] and "sample 1" in problems[0]
    assert cli("verify", data).exit_code == 1


def test_verify_reports_keys_repeated_across_shards(data: Path) -> None:
    meta = _meta(data)
    second = data / meta["splits"]["train"]["shards"][1]["file"]
    with h5py.File(second, "r") as f:
        other = f["key"].asstr()[0]
    keys = _strings(data, "key")
    _edit_shard(data, "key", [other] + keys[1:])
    problems = list(verify_shards(data))
    assert len(problems) == 1 and "is also" in problems[0] and second.name in problems[0]


def test_verify_passes_untouched_data(synth: Path) -> None:
    assert list(verify_shards(synth)) == []


# --- COCO panoptic JSON ----------------------------------------------------------------------

@pytest.fixture
def coco(tmp_path: Path) -> Path:
    from panoptic_trees import coco_tree

    return coco_tree(tmp_path / "coco", n_train=2, n_val=1).root


def _edit_coco(root: Path, split: str, fn, raw: str | None = None) -> None:
    path = root / "annotations" / f"panoptic_{split}2017.json"
    doc = json.loads(path.read_text())
    fn(doc)
    text = json.dumps(doc, allow_nan=True)
    path.write_text(text.replace('"@RAW@"', raw) if raw is not None else text)


@pytest.mark.parametrize("edit, raw, fragment", [
    (lambda d: d["images"][0].update(height="@RAW@"), "1e400", "height / width"),
    (lambda d: d["images"][0].update(width="@RAW@"), "NaN", "height / width"),
    (lambda d: d["images"][0].update(height="@RAW@"), "-Infinity", "height / width"),
    (lambda d: d["images"][0].update(id=[1, 2]), None, "lacks id"),
    (lambda d: d["images"][0].update(id={"a": 1}), None, "lacks id"),
    (lambda d: d["annotations"][0].update(image_id=[1]), None, "lacks image_id"),
    (lambda d: d["images"][0].update(file_name="../../escape.jpg"), None, "image file_name"),
    (lambda d: d["images"][0].update(file_name="/etc/hostname"), None, "image file_name"),
    (lambda d: d["annotations"][0].update(file_name="../x.png"), None, "annotation file_name"),
    (lambda d: d["categories"][0].update(id="@RAW@"), "1e400", "'categories' entries"),
    (lambda d: d["images"][0].update(height="@RAW@"), "1" + "0" * 5000, "not valid JSON"),
    (lambda d: d["images"][0].update(extra="@RAW@"), DEEP, "not valid JSON"),
    (lambda d: d["images"][0].update(extra="@RAW@"), "[" * 100 + "]" * 100, "nested deeper"),
])
def test_tampered_coco_panoptic_json_is_one_line(coco: Path, tmp_path: Path, edit, raw, fragment: str) -> None:
    _edit_coco(coco, "train", edit, raw)
    with pytest.raises(UserError, match=fragment) as exc:
        prepare_coco_panoptic(coco, tmp_path / "out")
    assert "panoptic_train2017.json" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("area", [math.inf, math.nan, 1e300, 10 ** 30])
def test_huge_or_non_finite_areas_are_the_samples_error(area: float) -> None:
    record = {"id": 5, "category_id": 1, "iscrowd": 0, "area": area}
    with pytest.raises(SampleError, match="area"):
        pack_records([record], {1: 0}, "x.png")


def test_tampered_areas_skip_the_image_only(coco: Path, tmp_path: Path) -> None:
    _edit_coco(coco, "train", lambda d: d["annotations"][0]["segments_info"][0].update(area="@RAW@"), "1e300")
    from rankseg_core.convert.common import ConvertOptions

    prepare_coco_panoptic(coco, tmp_path / "out", split="train", opts=ConvertOptions(on_error="skip"))
    assert ShardIndex(tmp_path / "out").meta["splits"]["train"]["num_samples"] == 1


def test_category_ids_of_a_tampered_index_are_one_line() -> None:
    meta = {"class_names": ["a", "b"], "options": {"category_ids": [[1], "x"]}}
    with pytest.raises(UserError, match="category_ids must be a list of integers"):
        categories_of(meta)


@pytest.mark.parametrize("key, want", [("000000000139", 139), ("²", "²"), ("9" * 5000, "9" * 5000), ("a/1", "a/1")])
def test_image_id_of_odd_keys(key: str, want: object) -> None:
    assert image_id_of(key) == want


# --- weights that do not fit config.yaml ----------------------------------------------------

@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic(tmp_path_factory.mktemp("w") / "data", num_classes=40, images=4, val_images=2)


def test_run_weights_of_another_shape_are_one_line(small_data: Path, tmp_path: Path) -> None:
    from rankseg_core.engine import runs
    from rankseg_core.engine.configure import build_train_config
    from rankseg_core.families import family_of

    cfg = build_train_config(None, tiny_run(), small_data)
    run = tmp_path / "run"
    runs.save_config(run, cfg)
    other = replace(cfg.model, num_classes=cfg.model.num_classes + 3, backbone_weights=None)
    runs.save_weights(runs.run_paths(run).weights, family_of(cfg.model.model).build(other))
    with pytest.raises(UserError, match="tensors of another shape") as exc:
        runs.load_run(run)
    assert "config.yaml" in str(exc.value) and "model.safetensors" in str(exc.value)
    assert_one_line_error(cli("eval", run, "--data", small_data), "tensors of another shape")


def test_selector_weights_of_another_shape_are_one_line(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from rankseg_core.config.model import ModelConfig, SelectorConfig
    from rankseg_core.families import family_of
    from rankseg_core.model.classifier import MultiLabelClassifier, load_selector
    from rankseg_core.utils.integrity import content_digest

    model = "classifier-vitt"
    arch = family_of(model).arch(model)
    cfg = ModelConfig(model=model, num_classes=5, img_size=32, clip_len=1, dropout=0.0, drop_path=0.0)
    state = {k: v.contiguous() for k, v in MultiLabelClassifier(cfg, arch).state_dict().items()}
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    # config.yaml of the classifier edited after training: another crop size
    sel = SelectorConfig(run=str(tmp_path), weights=str(path), sha256=content_digest(state), model=model,
                         img_size=64, in_chans=3)
    with pytest.raises(UserError, match="tensors of another shape") as exc:
        load_selector(sel, 5, 1, arch)
    assert str(path) in str(exc.value)
    assert load_selector(replace(sel, img_size=32), 5, 1, arch) is not None
    assert isinstance(next(iter(state.values())), torch.Tensor)


# --- Ctrl-C in bench/replicate.py -----------------------------------------------------------

@pytest.fixture
def replicate():
    bench = str(Path(__file__).resolve().parents[1] / "bench")
    sys.path.insert(0, bench)
    try:
        import replicate as R

        yield R
    finally:
        sys.path.remove(bench)


def test_replicate_ctrl_c_is_one_line_and_130(replicate, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def interrupted(argv=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(replicate, "main", interrupted)
    assert replicate.cli([]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("interrupted") and "Traceback" not in err


def test_replicate_user_error_is_one_line_and_2(replicate, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def bad(argv=None):
        raise UserError("x: bad")

    monkeypatch.setattr(replicate, "main", bad)
    assert replicate.cli([]) == 2
    assert capsys.readouterr().err == "error: x: bad\n"


def _running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def test_replicate_ctrl_c_stops_running_jobs(replicate, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    seen: list = []
    real_pool = replicate.ProcessPoolExecutor

    class Pool(real_pool):  # type: ignore[misc, valid-type]
        def __init__(self, *a, **kw) -> None:
            super().__init__(*a, **kw)
            seen.append(self)

    procs: list = []

    def ctrl_c(fs, return_when=None):
        procs.extend(seen[0]._processes.values())  # started by submit
        raise KeyboardInterrupt

    monkeypatch.setattr(replicate, "ProcessPoolExecutor", Pool)
    monkeypatch.setattr(replicate, "wait", ctrl_c)
    tasks = [replicate.Task(("a",), time.sleep, (600,)), replicate.Task(("b",), time.sleep, (600,))]
    with pytest.raises(KeyboardInterrupt):
        replicate.run_tasks(tasks, 2)
    assert procs
    try:
        for p in procs:
            p.join(60)  # a bound, not a timing: terminated workers exit at once, sleeping ones never
        # The pool's manager thread may reap a worker first; its Popen then reports no exit code
        # for a moment, so ask the system whether the process is still there.
        assert not [p.pid for p in procs if p.exitcode is None and _running(p.pid)]
    finally:
        for p in procs:  # where they were left running, do not let the interpreter wait for them
            if p.is_alive():
                p.kill()
