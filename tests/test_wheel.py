"""The wheel works (issue 9 item 10).

A wheel built from a copy of the source (`pip wheel --no-deps --no-build-isolation`, offline)
carries every class table of `datasets/`; installed with `pip install --target` and imported
with `python -S` from another directory (so neither the source tree nor the editable install's
finder can stand in for a missing file), it runs every converter on real fixtures or generated
trees and reads the same class tables as the source tree. The sdist carries datasets/, docs/
and LICENSE.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from conftest import FIXTURES
from convert_trees import ade150_tree, coco_stuff_tree, pascal_context_tree
from video_lvis_trees import stuff_doc, vspw_tree, write_jpeg, write_json, ytvis_frames

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                    ".pytest_cache", "runs", "rankseg-demo", "out")


def pip(*args: object, cwd: Path | None = None) -> None:
    res = subprocess.run([sys.executable, "-m", "pip", *map(str, args)], cwd=cwd, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The source copied aside, its wheel, its sdist and the wheel installed into a folder."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    shutil.copytree(REPO, src, ignore=NOT_SOURCE)
    pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", root / "dist", src)
    (wheel,) = (root / "dist").glob("*.whl")
    res = subprocess.run([sys.executable, "-c", "import sys; from setuptools import build_meta as b; "
                          "print(b.build_sdist(sys.argv[1]))", root / "sdist"], cwd=src, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    sdist = root / "sdist" / res.stdout.split()[-1]
    pip("install", "--no-deps", "--no-index", "--target", root / "site", wheel)
    return {"src": src, "wheel": wheel, "sdist": sdist, "site": root / "site"}


def table_files(src: Path) -> list[str]:
    return sorted(p.relative_to(src / "datasets").as_posix() for p in (src / "datasets").rglob("*") if p.is_file())


def test_wheel_carries_the_class_tables_and_metadata(built: dict[str, Path]) -> None:
    names = set(zipfile.ZipFile(built["wheel"]).namelist())
    tables = table_files(built["src"])
    assert tables and {f"rankseg_core/_tables/{t}" for t in tables} <= names
    assert not any(n.startswith("datasets/") for n in names)  # no top-level `datasets` package
    presets = sorted((built["src"] / "rankseg_core" / "config" / "presets").glob("*.yaml"))
    assert presets and {f"rankseg_core/config/presets/{p.name}" for p in presets} <= names  # --config NAME
    meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
    text = zipfile.ZipFile(built["wheel"]).read(meta).decode()
    assert "\nName: rankseg-toolkit\n" in text
    assert any(n.endswith("/LICENSE") and ".dist-info/" in n for n in names)
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "rankseg = rankseg_cli.entry:main" in zipfile.ZipFile(built["wheel"]).read(entry).decode()


def test_sdist_carries_datasets_docs_and_license(built: dict[str, Path]) -> None:
    with tarfile.open(built["sdist"]) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    src = built["src"]
    expected = {p.relative_to(src).as_posix() for d in ("datasets", "docs") for p in (src / d).rglob("*")
                if p.is_file()}
    assert expected and expected <= names
    assert {"LICENSE", "setup.py", "pyproject.toml", "README.md"} <= names


# --------------------------------------------------------------------------- running from the wheel

DRIVER = """
import json, sys
import rankseg_core
from rankseg_core.utils import resources
from rankseg_cli.app import app

jobs = json.loads(sys.argv[1])
result = {"core": rankseg_core.__file__, "tables": {t: str(resources.dataset_file(t)) for t in jobs["tables"]},
          "codes": {}}
for name, args in jobs["commands"].items():
    try:
        app(args, prog_name="rankseg")
    except SystemExit as exc:
        result["codes"][name] = exc.code
print("RESULT " + json.dumps(result))
"""


def run_from_wheel(site_dir: Path, cwd: Path, tables: list[str], commands: dict[str, list[str]]) -> dict:
    """Run `rankseg <args>` for each command inside one `python -S` whose imports come from the
    installed wheel, then the dependencies' site-packages (no .pth files, so no editable finder)."""
    path = [str(site_dir), *site.getsitepackages()]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-S", "-c", DRIVER, json.dumps({"tables": tables, "commands": commands})],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(x for x in res.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def names_in(table: str, key: str = "classes") -> list[str]:
    return [c["name"] for c in json.loads((REPO / "datasets" / table).read_text())[key]]


def test_converters_run_from_the_installed_wheel(built: dict[str, Path], tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    commands: dict[str, list[str]] = {}
    expected: dict[str, list[str] | None] = {}  # command -> class names it must store (None: not checked)

    def add(name: str, args: list, names: list[str] | None) -> None:
        commands[name] = ["prepare", *map(str, args), "--workers", "0", "--out", str(work / name)]
        expected[name] = names

    # Generated trees in the official layouts (no fixtures needed).
    ade150_tree(tmp_path / "ade150", n_train=2, n_val=1)
    add("ade20k", ["ade20k", "--root", tmp_path / "ade150"], names_in("ade20k/classes.json"))
    coco_stuff_tree(tmp_path / "cocostuff", n_train=2, n_val=1)
    add("coco-stuff", ["coco-stuff", "--root", tmp_path / "cocostuff"], names_in("coco_stuff/classes.json"))
    pascal_context_tree(tmp_path / "pc", n_train=2, n_val=1)
    add("pascal-context", ["pascal-context", "--root", tmp_path / "pc"], names_in("pascal_context/classes.json"))
    vspw_tree(tmp_path / "VSPW_480p")
    add("vspw", ["vspw", "--root", tmp_path / "VSPW_480p"], names_in("vspw/classes.json"))

    # Real files in the official formats, where this checkout has them.
    if FIXTURES.is_dir():
        add("ade20k-full", ["ade20k-full", "--root", FIXTURES / "ade20k_full" / "ADE20K_2021_17_01",
                            "--split", "training"], names_in("ade20k_full/classes.json"))
        yt = tmp_path / "ytvis_2019"
        doc = json.loads((FIXTURES / "youtube_vis_2019" / "annotations_tfds_excerpt" / "train.json").read_text())
        write_json(yt / "train.json", doc)
        ytvis_frames(yt, "train", doc)
        add("youtube-vis", ["youtube-vis", "--root", yt, "--limit", 3], names_in("youtube_vis_2019/classes.json"))
        lvis_path = FIXTURES / "coco_lvis" / "lvis" / "lvis_val_100.json"  # LVIS v0.5
        lvis = json.loads(lvis_path.read_text())
        images = sorted(lvis["images"], key=lambda i: i["id"])
        for img in images[:2]:
            write_jpeg(tmp_path / "coco" / "val2017" / f"{img['id']:012d}.jpg", img["height"], img["width"])
        stuff = write_json(tmp_path / "stuff_val2017.json",
                           stuff_doc([{"id": i["id"], "height": i["height"], "width": i["width"]} for i in images], []))
        add("coco-lvis", ["coco-lvis", "--coco-root", tmp_path / "coco", "--lvis-json", lvis_path,
                          "--stuff-json", stuff, "--limit", 2], None)

    tables = table_files(built["src"])
    result = run_from_wheel(built["site"], work, tables, commands)
    site_dir = built["site"].resolve()
    assert Path(result["core"]).resolve().is_relative_to(site_dir), result["core"]  # not the source tree
    for table, path in result["tables"].items():
        assert Path(path).resolve() == site_dir / "rankseg_core" / "_tables" / table
    assert result["codes"] == {name: 0 for name in commands}, result["codes"]
    for name, names in expected.items():
        meta = json.loads((work / name / "dataset.json").read_text())
        assert meta["splits"] and all(s["num_samples"] > 0 for s in meta["splits"].values()), name
        if names is not None:
            assert meta["class_names"] == names, name
