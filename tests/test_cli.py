"""The foundation commands through typer's CliRunner: outputs, exit codes, one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rankseg_cli.app import app

runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_user_error(res, *fragments: str, code: int = 2) -> None:
    assert res.exit_code == code, res.output
    assert "Traceback" not in res.output
    text = " ".join(res.output.split())
    assert "error:" in text
    for f in fragments:
        assert f in text, text


def test_help_everywhere() -> None:
    for args in ([], ["prepare"], ["prepare", "synthetic"], ["stats"], ["stats", "class-cdf"],
                 ["inspect"], ["verify"], ["demo"]):
        res = run(*args, "--help")
        assert res.exit_code == 0, (args, res.output)
        assert "Usage" in res.output
    assert "rankseg 0." in run("--version").output


def test_prepare_inspect_verify_stats(tmp_path: Path) -> None:
    data = tmp_path / "d"
    res = run("prepare", "synthetic", "--out", data, "--num-classes", 80, "--images", 10,
              "--size", 32, "--samples-per-shard", 4)
    assert res.exit_code == 0, res.output
    res = run("inspect", data, "--jsonl")
    recs = [json.loads(x) for x in res.stdout.splitlines()]
    assert len(recs) == 12 and {r["split"] for r in recs} == {"train", "val"}
    for r in recs:
        assert set(r) >= {"key", "split", "height", "width", "classes", "pixels"}
        assert r["classes"] == sorted(r["classes"]) and len(r["pixels"]) == len(r["classes"])
    assert len(run("inspect", data, "--jsonl", "--limit", 2).stdout.splitlines()) == 4
    res = run("inspect", data)
    assert res.exit_code == 0 and "synthetic" in res.output and "K=80" in res.output
    assert run("verify", data).exit_code == 0
    res = run("stats", "class-cdf", data, data, "--plot", tmp_path / "cdf.png",
              "--json", tmp_path / "cdf.json", "--max-classes", 12)
    assert res.exit_code == 0, res.output
    out = json.loads((tmp_path / "cdf.json").read_text())
    ds = out["datasets"][0]
    assert set(ds) >= {"name", "path", "num_classes", "num_images", "cdf", "share_below_25"}
    assert ds["num_images"] == 12 and len(ds["cdf"]) == 12 and ds["cdf"][-1] == 1.0
    assert (tmp_path / "cdf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_verify_exit_1_names_shard_and_sample(tmp_path: Path) -> None:
    data = tmp_path / "d"
    run("prepare", "synthetic", "--out", data, "--num-classes", 60, "--images", 4, "--size", 32)
    shard = data / "train-00000-of-00001.h5"
    shard.write_bytes(shard.read_bytes()[:-100])
    res = run("verify", data)
    assert res.exit_code == 1
    assert "train-00000-of-00001.h5" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("args, fragments", [
    (["inspect", "/nonexistent/shards"], ["/nonexistent/shards", "rankseg prepare"]),
    (["verify", "/nonexistent/shards"], ["/nonexistent/shards"]),
    (["stats", "class-cdf", "/nonexistent/shards"], ["/nonexistent/shards"]),
    (["prepare", "synthetic", "--out", "{tmp}/o", "--num-classes", "10"], ["--num-classes >= 40"]),
    (["prepare", "synthetic", "--out", "{tmp}/o", "--size", "50"], ["--size"]),
    (["prepare", "synthetic", "--out", "{tmp}/o", "--samples-per-shard", "0"], ["--samples-per-shard must be >= 1"]),
    (["prepare", "synthetic", "--out", "{tmp}/o", "--num-classes", "65536"], ["--num-classes must be at most 65535"]),
])
def test_bad_input_one_line(tmp_path: Path, args: list[str], fragments: list[str]) -> None:
    res = run(*[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert_user_error(res, *fragments)


def test_foreign_output_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mine.txt").write_text("keep me")
    res = run("prepare", "synthetic", "--out", tmp_path, "--images", 2, "--size", 32)
    assert_user_error(res, str(tmp_path), "not made by rankseg")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_unfinished_directory_is_not_taken_as_complete(tmp_path: Path) -> None:
    data = tmp_path / "d"
    run("prepare", "synthetic", "--out", data, "--num-classes", 60, "--images", 4, "--size", 32)
    (data / "dataset.json").unlink()
    assert_user_error(run("inspect", data), "dataset.json is missing", "resume")


def test_corrupt_index_is_one_line(tmp_path: Path) -> None:
    data = tmp_path / "d"
    run("prepare", "synthetic", "--out", data, "--num-classes", 60, "--images", 4, "--size", 32)
    (data / "dataset.json").write_text("{not json")
    assert_user_error(run("inspect", data), "dataset.json is not valid JSON")


def test_python_m_rankseg_cli() -> None:
    """What `torchrun ... -m rankseg_cli train` runs."""
    import subprocess
    import sys

    res = subprocess.run([sys.executable, "-m", "rankseg_cli", "--version"], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.startswith("rankseg ")
