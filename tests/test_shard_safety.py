"""A shard directory is untrusted input: crafted `dataset.json` / shard files are refused in one line.

Each case damages a copy of a real synthetic directory the way an attacker or a bad copy
would, re-seals the checksums where the point is to get past them, and checks that `verify`
reports it (exit 1), that `inspect` refuses it (exit 2), and that the dataset class used by
train / eval / viz raises UserError, never a traceback.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from rankseg_cli.app import app
from rankseg_core.errors import UserError
from rankseg_core.shards.read import ShardDataset
from rankseg_core.shards.verify import verify_shards
from rankseg_core.shards.write import sha256_file

runner = CliRunner()
SHARD = "train-00000-of-00003.h5"  # the synth fixture: 24 train images, 8 per shard


@pytest.fixture
def data(synth: Path, tmp_path: Path) -> Path:
    root = tmp_path / "d"
    shutil.copytree(synth, root)
    return root


def _meta(root: Path) -> dict:
    return json.loads((root / "dataset.json").read_text())


def _save(root: Path, meta: dict) -> None:
    (root / "dataset.json").write_text(json.dumps(meta))


def _reseal(root: Path) -> None:
    """Record the shards' current sizes and hashes, as a crafted directory would."""
    meta = _meta(root)
    for split in meta["splits"].values():
        for sh in split["shards"]:
            path = root / sh["file"]
            if path.is_file():
                sh.update(bytes=path.stat().st_size, sha256=sha256_file(path))
    _save(root, meta)


def _edit_shard(root: Path, fn, reseal: bool = True) -> None:
    with h5py.File(root / SHARD, "r+") as f:
        fn(f)
    if reseal:
        _reseal(root)


def _set_file(root: Path, name: str) -> None:
    meta = _meta(root)
    meta["splits"]["train"]["shards"][0]["file"] = name
    _save(root, meta)


def _replace(f: h5py.File, name: str, data: np.ndarray) -> None:
    del f[name]
    f.create_dataset(name, data=data)


def _traversal(root: Path) -> None:
    shutil.copy(root / SHARD, root.parent / "x.h5")
    _set_file(root, "../x.h5")


def _absolute(root: Path) -> None:
    shutil.copy(root / SHARD, root.parent / "abs.h5")
    _set_file(root, str(root.parent / "abs.h5"))


def _symlink_out(root: Path) -> None:
    outside = root.parent / "outside.h5"
    shutil.move(root / SHARD, outside)
    os.symlink(outside, root / SHARD)


def _fifo(root: Path) -> None:
    (root / SHARD).unlink()
    os.mkfifo(root / SHARD)


def _json_text(root: Path, old: str, new: str) -> None:
    path = root / "dataset.json"
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _meta_edit(fn):
    def apply(root: Path) -> None:
        meta = _meta(root)
        fn(meta)
        _save(root, meta)
    return apply


CASES = {
    # name: (damage, fragment of the one-line message)
    "path traversal": (_traversal, "no path separators"),
    "absolute path": (_absolute, "no path separators"),
    "symlink out of the directory": (_symlink_out, "is a symlink to"),
    "hidden name": (lambda r: _set_file(r, ".rankseg-shards.json"), "hidden name"),
    "fifo": (_fifo, "is not a regular file"),
    "wrong size": (_meta_edit(lambda m: m["splits"]["train"]["shards"][0].update(bytes=1_000_000)),
                   "dataset.json says 1000000"),
    "wrong K attribute": (lambda r: _edit_shard(r, lambda f: f.attrs.__setitem__("num_classes", 61)),
                          "attribute num_classes is 61, dataset.json says 60"),
    "wrong split attribute": (lambda r: _edit_shard(r, lambda f: f.attrs.__setitem__("split", "val")),
                              "attribute split is 'val'"),
    "decreasing offsets": (lambda r: _edit_shard(r, lambda f: f["class_offsets"].__setitem__(3, 0)),
                           "class_offsets must start at 0 and never decrease"),
    "offsets past the end": (lambda r: _edit_shard(r, lambda f: f["class_offsets"].__setitem__(-1, 10**6)),
                             "class_offsets ends at 1000000"),
    "class id >= K": (lambda r: _edit_shard(r, lambda f: f["classes"].__setitem__(0, 60)),
                      "class id 60 is not a train id < K=60"),
    "float heights": (lambda r: _edit_shard(r, lambda f: _replace(f, "height", f["height"][:].astype(np.float64))),
                      "array 'height' has dtype float64"),
    "zero width": (lambda r: _edit_shard(r, lambda f: f["width"].__setitem__(2, 0)), "width 0 is not positive"),
    "short array": (lambda r: _edit_shard(r, lambda f: _replace(f, "frame", f["frame"][:-1])),
                    "array 'frame' has length 7, expected 8"),
    "missing array": (lambda r: _edit_shard(r, lambda f: f.__delitem__("label")), "array 'label' is missing"),
    "NaN in JSON": (lambda r: _json_text(r, '"num_samples": 24', '"num_samples": NaN'), "NaN is not valid JSON"),
    "Infinity in JSON": (lambda r: _json_text(r, '"num_samples": 24', '"num_samples": Infinity'),
                         "Infinity is not valid JSON"),
    "missing palette": (_meta_edit(lambda m: m.pop("palette")), "palette must be 60 x 3 integers"),
    "K too large": (_meta_edit(lambda m: m.update(num_classes=65536)), "num_classes must be an integer in 1..65535"),
    "K as a string": (_meta_edit(lambda m: m.update(num_classes="60")), "num_classes must be an integer"),
    "class names short": (_meta_edit(lambda m: m["class_names"].pop()), "class_names must be 60 strings"),
    "palette value": (_meta_edit(lambda m: m["palette"][0].__setitem__(0, 300)), "palette must be 60 x 3"),
    "class_images length": (_meta_edit(lambda m: m["splits"]["train"]["class_images"].pop()),
                            "class_images must be 60 integers"),
    "shard record type": (_meta_edit(lambda m: m["splits"]["train"]["shards"][0].update(num_samples="8")),
                          "shard record 0 must have"),
    "splits not a dict": (_meta_edit(lambda m: m.update(splits=[1, 2])), "splits must be an object"),
    "sample sum": (_meta_edit(lambda m: m["splits"]["train"].update(num_samples=25)),
                   "num_samples 25 differs from the sum over its shards"),
    "not an object": (lambda r: (r / "dataset.json").write_text("[1, 2]"), "not a JSON object"),
    "version 3": (_meta_edit(lambda m: m.update(version=3)), "not a rankseg shard index of format version"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_crafted_directory_is_refused_in_one_line(data: Path, case: str) -> None:
    damage, fragment = CASES[case]
    damage(data)
    # verify: the finding is reported (exit 1), nothing else breaks
    problems = list(verify_shards(data))
    assert problems and fragment in problems[0], problems
    res = runner.invoke(app, ["verify", str(data)])
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output and fragment in " ".join(res.output.split())
    # inspect (table and --jsonl) refuses: exit 2, one error line
    for args in (["inspect", str(data)], ["inspect", str(data), "--jsonl"]):
        res = runner.invoke(app, args)
        assert res.exit_code == 2, (args, res.output)
        text = " ".join(res.output.split())
        assert "Traceback" not in res.output and "error:" in text and fragment in text, text
        assert res.stderr.count("error:") == 1
    # what train / eval / viz read through
    with pytest.raises(UserError, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        ds = ShardDataset(data, "train")
        for i in range(len(ds)):
            ds[i]


def test_oversized_file_is_not_hashed(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file larger than its record is refused from its size alone, before any byte is read."""
    import rankseg_core.shards.verify as verify

    with open(data / SHARD, "ab") as f:
        f.truncate(50 << 30)  # sparse: 50 GB apparent size, no disk used
    real = verify.sha256_file
    monkeypatch.setattr(verify, "sha256_file",
                        lambda p: pytest.fail(f"hashed {p}") if p.name == SHARD else real(p))
    problems = [p for p in verify_shards(data) if SHARD in p]
    assert len(problems) == 1 and "is 53687091200 bytes, dataset.json says" in problems[0]


def test_symlink_inside_the_directory_is_fine(data: Path) -> None:
    """Symlinks are refused only when they lead out of the directory."""
    (data / "store").mkdir()
    shutil.move(data / SHARD, data / "store" / SHARD)
    os.symlink(Path("store") / SHARD, data / SHARD)
    assert list(verify_shards(data)) == []
    assert len(ShardDataset(data, "train")) == 24


def test_untouched_directory_passes(data: Path) -> None:
    """The checks accept what the writer writes (the cases above are real failures, not noise)."""
    assert list(verify_shards(data)) == []
    assert runner.invoke(app, ["inspect", str(data), "--jsonl"]).exit_code == 0
