"""Weak-shot segmentation data: base / novel class splits and the hiding of novel pixels.

In the weak-shot setting (SimFormer, NeurIPS 2022; docs/weak-shot.md) the base classes keep
their pixel masks, while the novel classes are known in training only as image-level labels.
A split names the novel classes; every other class is base. The official splits ship as
`datasets/weak_shot/*.json` (COCO-Stuff-10K splits 1-9, ADE20K-150 splits 1-4, exported
from the official repository with their source and commit); any JSON file of the same form
works for any dataset:

    {"novel": [train ids or class names], ...optional checks:
     "num_classes": K, "novel_names": [the novel classes' names], "base": [the complement],
     "dataset": recipe key of the shards (coco-stuff, ade20k, ...), plus free-form
     "name", "description", "class_table", "source", "notes"}

Training (`hide_novel`, called by the loader AFTER augmentation, as the official mapper
builds its targets from the augmented crop): the image-level labels are the classes, base
and novel, present in the augmented crop (ignore excluded); then every novel pixel becomes
ignore, so no loss ever sees a novel pixel's class.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rankseg_core.config.datasets import recipe_dataset
from rankseg_core.config.train import DataConfig
from rankseg_core.errors import UserError
from rankseg_core.shards.codec import IGNORE
from rankseg_core.shards.read import ShardIndex
from rankseg_core.utils import jsonio
from rankseg_core.utils.fsio import read_regular
from rankseg_core.utils.resources import TABLE_DIRS

# The built-in splits: name -> file in datasets/weak_shot/ (a flat folder: the package data
# glob `*/*` in setup.py ships one level below datasets/).
BUILTIN_DIR = "weak_shot"
BUILTIN: dict[str, str] = {
    **{f"coco-stuff-10k/split{i}": f"coco_stuff_10k_split{i}.json" for i in range(1, 10)},
    **{f"ade20k/split{i}": f"ade20k_split{i}.json" for i in range(1, 5)},
}
# A split of the largest vocabulary here (1,284 names) is ~30 KB; 1 MiB leaves room for notes
# and stops a wrong path (a shard, a video) from being read whole.
MAX_SPLIT_BYTES = 1 << 20
_KEYS = frozenset({"novel", "base", "novel_names", "num_classes", "dataset", "name", "description", "class_table",
                   "source", "notes"})


@dataclass(frozen=True)
class WeakShotSplit:
    """A resolved split: the sorted novel train ids of a K-class vocabulary, and where it came
    from (`spec`: the built-in name or the file's absolute path; `sha256` of its bytes)."""

    spec: str
    novel: tuple[int, ...]
    num_classes: int
    sha256: str

    @property
    def base(self) -> list[int]:
        """The base train ids (every class that is not novel), sorted."""
        novel = set(self.novel)
        return [c for c in range(self.num_classes) if c not in novel]


def builtin_path(name: str) -> Path | None:
    """The file of built-in split `name` (None if no built-in has that name)."""
    fname = BUILTIN.get(name)
    if fname is None:
        return None
    for root in TABLE_DIRS:
        path = root / BUILTIN_DIR / fname
        if path.is_file():
            return path
    raise UserError(f"built-in split {name}: datasets/{BUILTIN_DIR}/{fname} is missing from this install: reinstall "
                    "rankseg (`pip install rankseg-toolkit`, or `pip install -e .` in a clone)")


def locate(spec: str, option: str = "--weak-shot") -> tuple[str, Path]:
    """(the spec to record, the file) for `--weak-shot` / `--novel-classes`: a built-in name
    (e.g. coco-stuff-10k/split1) or a JSON file; an existing file wins over a built-in name.
    A file is recorded by its absolute path, so a resume from another directory finds it."""
    path = Path(spec).expanduser()
    if path.exists():
        return str(path.resolve()), path
    found = builtin_path(spec)
    if found is not None:
        return spec, found
    raise UserError(f"{option} {spec}: no such file, and no built-in split has that name; give a JSON file "
                    f"or one of: {', '.join(BUILTIN)}")


def read_split_bytes(path: Path, option: str) -> bytes:
    """The split file's bytes (regular file, at most MAX_SPLIT_BYTES); UserError otherwise."""
    try:
        return read_regular(path, "weak-shot split", MAX_SPLIT_BYTES,
                            lambda msg: UserError(f"{option}: {msg}"))
    except FileNotFoundError:
        raise UserError(f"{option}: {path}: split file not found") from None
    except OSError as exc:
        raise UserError(f"{option}: {path}: cannot read ({exc.strerror or exc})") from None


def _class_id(v: Any, where: str, key: str, by_name: dict[str, int], k: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, str)):
        raise UserError(f"{where}: '{key}' holds {v!r}; use train ids (0..{k - 1}) or class names")
    if isinstance(v, str):
        if v not in by_name:
            raise UserError(f"{where}: '{key}' names the unknown class {v!r} (not one of the run's class names)")
        return by_name[v]
    if not 0 <= v < k:
        raise UserError(f"{where}: '{key}' holds class id {v}, outside the run's train ids 0..{k - 1}")
    return int(v)


def _ids(doc: dict, key: str, where: str, by_name: dict[str, int], k: int) -> list[int]:
    values = doc[key]
    if not isinstance(values, list):
        raise UserError(f"{where}: '{key}' must be a list of train ids or class names")
    ids = [_class_id(v, where, key, by_name, k) for v in values]
    if len(set(ids)) != len(ids):
        twice = next(c for c in ids if ids.count(c) > 1)
        raise UserError(f"{where}: '{key}' lists class {twice} twice")
    return ids


def parse_split(data: bytes, where: str, class_names: list[str], dataset: str = "") -> list[int]:
    """The sorted novel train ids a split file names, checked against the run's K class names
    (and, where the file states them, its K, the novel classes' names, the base list and the
    dataset). `where` prefixes every error (the option and the file)."""
    k = len(class_names)
    try:
        doc = jsonio.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        first = str(exc).splitlines()[0][:120] if str(exc) else exc.__class__.__name__
        raise UserError(f"{where}: not valid JSON ({first})") from None
    if not isinstance(doc, dict) or "novel" not in doc:
        raise UserError(f'{where}: expected a JSON object with "novel": [train ids or class names] '
                        "(docs/weak-shot.md, Split files)")
    unknown = sorted(set(doc) - _KEYS)
    if unknown:
        raise UserError(f"{where}: unknown key {unknown[0]!r}; a split file has {', '.join(sorted(_KEYS))}")
    by_name: dict[str, int] = {}
    for i, n in enumerate(class_names):
        by_name.setdefault(n, i)  # a repeated name means its first class; ids are never ambiguous
    if "num_classes" in doc and doc["num_classes"] != k:
        raise UserError(f"{where}: the split is for {doc['num_classes']!r} classes but the run has K={k}: "
                        "use a split of this dataset")
    stated = doc.get("dataset")
    ours = recipe_dataset(dataset) if dataset else None
    if stated is not None and ours is not None and recipe_dataset(str(stated)) != ours:
        raise UserError(f"{where}: the split is for dataset {stated!r}, the run's shards are {dataset!r}: "
                        "use a split of this dataset")
    novel = _ids(doc, "novel", where, by_name, k)
    if not novel:
        raise UserError(f"{where}: 'novel' is empty: a weak-shot split names at least one novel class")
    if len(novel) == k:
        raise UserError(f"{where}: 'novel' holds all {k} classes: no base class would keep its masks")
    if "novel_names" in doc:
        names = doc["novel_names"]
        if not isinstance(names, list) or len(names) != len(novel) or not all(isinstance(n, str) for n in names):
            raise UserError(f"{where}: 'novel_names' must list one name per entry of 'novel'")
        for c, n in zip(novel, names):
            if class_names[c] != n:
                raise UserError(f"{where}: novel class {c} is {class_names[c]!r} in the run's class table, the "
                                f"split calls it {n!r}: the split belongs to another class table")
    if "base" in doc:
        base = _ids(doc, "base", where, by_name, k)
        both = sorted(set(base) & set(novel))
        if both:
            raise UserError(f"{where}: class {both[0]} ({class_names[both[0]]}) is both base and novel")
        missing = sorted(set(range(k)) - set(base) - set(novel))
        if missing:
            raise UserError(f"{where}: class {missing[0]} ({class_names[missing[0]]}) is neither base nor novel: "
                            "'base' must be every class that is not novel (or leave 'base' out)")
    return sorted(novel)


def load_split(spec: str, class_names: list[str], dataset: str = "", option: str = "--weak-shot") -> WeakShotSplit:
    """Resolve `spec` (a built-in name or a JSON file) against the run's class names."""
    recorded, path = locate(spec, option)
    data = read_split_bytes(path, option)
    where = f"{option} {spec}"
    novel = parse_split(data, where, class_names, dataset)
    return WeakShotSplit(recorded, tuple(novel), len(class_names), hashlib.sha256(data).hexdigest())


def novel_table(novel: list[int] | tuple[int, ...], num_classes: int) -> np.ndarray:
    """K booleans: True for the novel train ids."""
    table = np.zeros(num_classes, bool)
    table[np.asarray(novel, np.int64)] = True
    return table


def hide_novel(label: np.ndarray, novel: np.ndarray, ignore: int = IGNORE) -> tuple[np.ndarray, np.ndarray]:
    """(hidden label, image-level labels) of augmented crops.

    label: N x H x W train ids (`ignore` and any value outside 0..K-1 = unlabelled, e.g. the
    crop's padding); novel: K booleans (`novel_table`). Returns a copy of `label` with every
    novel pixel set to `ignore`, and N x K float32: 1 for each class, base or novel, that
    has a pixel in that crop BEFORE hiding, else 0.
    """
    k = novel.size
    n = label.shape[0]
    flat = label.reshape(n, -1)
    valid = (flat >= 0) & (flat < k)
    present = np.zeros((n, k), np.float32)
    for i in range(n):  # N is the frames of one clip (1 for images)
        present[i, np.unique(flat[i][valid[i]])] = 1.0
    hidden = flat.copy()
    hidden[valid & novel[np.where(valid, flat, 0)]] = ignore
    return hidden.reshape(label.shape), present


def resolve_config(data: DataConfig, num_classes: int) -> None:
    """Fill a run's weak-shot keys from `data.weak_shot` (engine/configure.py `resolve`).

    A fresh run records the split's novel train ids and the file's SHA-256; a resumed run
    (keys already recorded in config.yaml) re-reads the split and is refused when the file
    changed or no longer gives the recorded ids. A run may also set `data.novel_classes`
    directly, without a split file (then nothing is recorded beyond the ids).
    """
    if not data.weak_shot:
        data.weak_shot = None
        return
    names = data.class_names or [str(i) for i in range(num_classes)]
    split = load_split(data.weak_shot, names, data.name)
    data.weak_shot = split.spec
    if data.weak_shot_sha256 and data.weak_shot_sha256 != split.sha256:
        raise UserError(f"--weak-shot {split.spec}: the split file changed since this run started (SHA-256 "
                        f"{split.sha256[:12]}..., recorded {data.weak_shot_sha256[:12]}...): restore it, or train a "
                        "new --out with the new split")
    if data.novel_classes is not None and sorted(data.novel_classes) != list(split.novel):
        raise UserError(f"--weak-shot {split.spec} makes {len(split.novel)} classes novel, but data.novel_classes "
                        f"lists {len(data.novel_classes)} others: set one of them, not both")
    data.novel_classes = list(split.novel)
    data.weak_shot_sha256 = split.sha256


def load_split_for_shards(spec: str, root: str | Path, option: str = "--novel-classes") -> WeakShotSplit:
    """`load_split` against the class table of the shards in `root` (`eval-predictions`)."""
    index = ShardIndex(root)
    return load_split(spec, list(index.class_names), index.name, option)
