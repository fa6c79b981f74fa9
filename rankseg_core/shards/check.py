"""A shard directory is untrusted input: the structural checks every reader relies on.

`read_index` parses `dataset.json` strictly and checks the type and range of every field a
reader uses, and that every shard file it names is a plain name inside the directory.
`check_shard_layout` checks a shard's HDF5 attributes and the dtype and length of every
array against `dataset.json` (metadata only, nothing is read), and `check_shard_values` the
few values that index other arrays (class offsets, class ids, sizes). `ShardIndex` runs these
before it uses a file, and `verify` runs them before its deeper checks, so a crafted or
damaged directory is refused with one line instead of an IndexError deep in training.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Any, TypeGuard

import h5py
import numpy as np

from rankseg_core.errors import UserError
from rankseg_core.shards.codec import IGNORE
from rankseg_core.shards.write import FORMAT, MAX_CLASSES, VERSION_PANOPTIC, VERSIONS
from rankseg_core.utils import jsonio

MAX_INDEX_BYTES = 1 << 30  # dataset.json of the largest real dataset is a few MB
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FIX_INDEX = "re-create the directory with `rankseg prepare`"
FIX_SHARD = "run `rankseg verify` and re-create it with `rankseg prepare`"


class ShardFormatError(UserError):
    """`dataset.json` or a shard is malformed: `verify` reports it (exit 1), readers refuse (exit 2)."""


def _int(x: Any) -> TypeGuard[int | np.integer]:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _ints(xs: Any, n: int | np.integer | None = None, lo: int = 0,
          hi: int | np.integer | None = None) -> TypeGuard[list]:
    """A list of ints in lo..hi (inclusive), of length n if given."""
    return (isinstance(xs, list) and (n is None or len(xs) == n)
            and all(_int(x) and x >= lo and (hi is None or x <= hi) for x in xs))


def check_regular_file(path: Path, fix: str) -> int:
    """Size of `path` if it is a regular file (following links); ShardFormatError otherwise.

    A FIFO or device named like a shard would block or stream forever when opened.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ShardFormatError(f"{path} is missing: {fix}") from None
    except OSError as exc:
        raise ShardFormatError(f"{path}: cannot read ({exc.strerror}): {fix}") from None
    if not stat.S_ISREG(st.st_mode):
        raise ShardFormatError(f"{path} is not a regular file: {fix}")
    return st.st_size


def read_index(root: Path) -> dict:
    """Strictly parse and check `root/dataset.json`; ShardFormatError naming the first problem."""
    path = root / "dataset.json"
    size = check_regular_file(path, _FIX_INDEX)
    if size > MAX_INDEX_BYTES:
        raise ShardFormatError(f"{path} is {size} bytes, more than any real index "
                               f"({MAX_INDEX_BYTES}): {_FIX_INDEX}")
    try:
        meta = jsonio.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ShardFormatError(f"{path} is not valid JSON ({exc}): re-run `rankseg prepare` "
                               "to rebuild it") from None
    except OSError as exc:
        raise ShardFormatError(f"{path}: cannot read ({exc.strerror})") from None
    problem = index_problem(meta)
    if not problem:
        problem = _files_problem(root, meta)
    if problem:
        raise ShardFormatError(f"{path}: {problem}: {_FIX_INDEX}")
    return meta


def index_problem(meta: Any) -> str:
    """'' if `meta` has every field readers use, with the right types and ranges; else the problem."""
    if not isinstance(meta, dict):
        return "not a JSON object"
    if meta.get("format") != FORMAT or not _int(meta.get("version")) or meta["version"] not in VERSIONS:
        return (f"not a rankseg shard index of format version {' or '.join(map(str, VERSIONS))} "
                f"(format={meta.get('format')!r}, version={meta.get('version')!r}; a newer rankseg may read it)")
    k = meta.get("num_classes")
    if not _int(k) or not 1 <= k <= MAX_CLASSES:
        return f"num_classes must be an integer in 1..{MAX_CLASSES}, not {k!r}"
    checks = [
        (isinstance(meta.get("name"), str), "name must be a string"),
        (meta.get("ignore", IGNORE) == IGNORE and _int(meta.get("ignore", IGNORE)), f"ignore must be {IGNORE}"),
        (isinstance(meta.get("class_names"), list) and len(meta["class_names"]) == k
         and all(isinstance(c, str) for c in meta["class_names"]), f"class_names must be {k} strings"),
        (isinstance(meta.get("palette"), list) and len(meta["palette"]) == k
         and all(_ints(row, 3, 0, 255) for row in meta["palette"]),
         f"palette must be {k} x 3 integers in 0..255"),
        (isinstance(meta.get("class_source", ""), str), "class_source must be a string"),
        (isinstance(meta.get("options", {}), dict), "options must be an object"),
    ]
    for ok, problem in checks:
        if not ok:
            return problem
    if meta["version"] == VERSION_PANOPTIC:
        things = meta.get("thing_classes")
        if meta.get("panoptic") is not True:
            return "a version 2 index must say \"panoptic\": true"
        if not _ints(things, None, 0, k - 1) or things != sorted(set(things)):
            return f"thing_classes must be sorted distinct train ids in 0..{k - 1}"
    elif "panoptic" in meta or "thing_classes" in meta:
        return "panoptic / thing_classes need format version 2"
    splits = meta.get("splits")
    if not isinstance(splits, dict):
        return "splits must be an object"
    for name, split in splits.items():
        problem = name_problem(name)
        if problem:
            return f"split name {name[:80]!r} {problem}"
        problem = _split_problem(split, k)
        if problem:
            return f"split '{name}': {problem}"
    return ""


def _split_problem(split: Any, k: int | np.integer) -> str:
    if not isinstance(split, dict):
        return "not an object"
    n = split.get("num_samples")
    if not _int(n) or n < 0:
        return "num_samples must be an integer >= 0"
    if not (_int(split.get("num_skipped", 0)) and split.get("num_skipped", 0) >= 0):
        return "num_skipped must be an integer >= 0"
    for key in ("class_images", "class_pixels"):
        if not _ints(split.get(key), k):
            return f"{key} must be {k} integers >= 0"
    shards = split.get("shards")
    if not isinstance(shards, list) or not shards:
        return "shards must be a non-empty list"
    for i, sh in enumerate(shards):
        if not (isinstance(sh, dict) and isinstance(sh.get("file"), str)
                and _int(sh.get("num_samples")) and sh["num_samples"] >= 0
                and _int(sh.get("bytes")) and sh["bytes"] >= 0
                and isinstance(sh.get("sha256"), str) and _SHA256.fullmatch(sh["sha256"])):
            return (f"shard record {i} must have file (string), num_samples and bytes (integers >= 0) "
                    "and sha256 (64 lowercase hex digits)")
        problem = plain_name_problem(sh["file"])
        if problem:
            return f"shard file {sh['file']!r}: {problem}"
    if sum(sh["num_samples"] for sh in shards) != n:
        return f"num_samples {n} differs from the sum over its shards"
    videos = split.get("videos", {})
    if not isinstance(videos, dict) or not all(
            isinstance(v, dict) and _int(v.get("frames")) and v["frames"] >= 0
            and _ints(v.get("classes"), None, 0, k - 1) for v in videos.values()):
        return "videos must map each video to frames (integer) and classes (train ids < K)"
    return ""


MAX_NAME_BYTES = 255  # NAME_MAX of every common file system


def name_problem(name: object, suffix: str = "") -> str:
    """'' if `name` may become one component of a path: a non-empty string with no path
    separator, not absolute, not '.', '..' or hidden, no NUL, at most MAX_NAME_BYTES bytes,
    ending in `suffix` if given; else why not.

    The one check for every name read from a file (shard files, dataset and split names,
    sample keys made file names, file names in annotation JSON) before it is joined to a
    directory: a crafted name must not reach outside it.
    """
    if not isinstance(name, str):
        return "must be a string"
    if not name or "\0" in name:
        return "is empty or holds a NUL byte"
    if "/" in name or "\\" in name or os.path.isabs(name):
        return "must be a plain name inside its directory (no path separators)"
    if name in (".", "..") or name.startswith("."):
        return "must not be '.', '..' or a hidden name"
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        return f"is longer than {MAX_NAME_BYTES} bytes"
    if suffix and not name.endswith(suffix):
        return f"must end in {suffix}"
    return ""


def check_name(name: object, what: str, where: str | Path, fix: str, suffix: str = "") -> str:
    """`name` if `name_problem` finds nothing; else UserError "WHERE: WHAT 'NAME' PROBLEM: FIX"."""
    problem = name_problem(name, suffix)
    if problem:
        raise UserError(f"{where}: {what} {str(name)[:80]!r} {problem}: {fix}")
    assert isinstance(name, str)  # name_problem refuses anything else
    return name


def plain_name_problem(name: str) -> str:
    """'' if `name` is a plain `.h5` file name (no directory part, no traversal); else why not."""
    return name_problem(name, ".h5")


def _files_problem(root: Path, meta: dict) -> str:
    """Names used twice, or symlinks whose target lies outside `root`."""
    seen: set[str] = set()
    real_root = os.path.realpath(root)
    for split in meta["splits"].values():
        for sh in split["shards"]:
            name = sh["file"]
            if name in seen:
                return f"shard file {name!r} is listed twice"
            seen.add(name)
            path = root / name
            if path.is_symlink():
                target = os.path.realpath(path)
                if os.path.commonpath([target, real_root]) != real_root:
                    return f"shard file {name!r} is a symlink to {target}, outside {root}"
    return ""


def check_shard_size(path: Path, record: dict) -> None:
    """The shard is a regular file of the size `dataset.json` records (cheap: one stat).

    Checked before hashing or opening, so a 50 GB file whose record says 1 MB is never read.
    """
    size = check_regular_file(path, "re-run `rankseg prepare` with the same options to re-create it")
    if size != record["bytes"]:
        raise ShardFormatError(f"{path} is {size} bytes, dataset.json says {record['bytes']}: the file "
                               f"is truncated or was replaced: {FIX_SHARD}")


# Per-shard arrays: name -> (kind, length). Kinds: "str" utf-8 strings, "bytes" vlen uint8
# blobs, or a numpy dtype. Lengths: "n" samples, "n+1", or "t" total class entries.
_LAYOUT = {
    "key": ("str", "n"), "image": ("bytes", "n"), "label": ("bytes", "n"),
    "height": (np.int32, "n"), "width": (np.int32, "n"), "orig_height": (np.int32, "n"),
    "orig_width": (np.int32, "n"), "frame": (np.int32, "n"), "video": ("str", "n"),
    "instances": ("str", "n"), "classes": (np.uint16, "t"), "pixels": (np.int64, "t"),
    "class_offsets": (np.int64, "n+1"),
}
_LAYOUT_V2 = {"segments": ("bytes", "n"), "segments_info": ("str", "n")}


def check_shard_layout(f: h5py.File, path: Path, meta: dict, split: str, position: int) -> None:
    """Attributes and array dtypes / lengths of shard `position` of `split` (reads no data)."""
    record = meta["splits"][split]["shards"][position]
    n = record["num_samples"]
    want = {"format": FORMAT, "version": meta["version"], "num_classes": meta["num_classes"],
            "num_samples": n, "split": split, "index": position,
            "count": len(meta["splits"][split]["shards"])}
    for name, value in want.items():
        have = f.attrs.get(name)
        if isinstance(have, bytes):
            have = have.decode("utf-8", "replace")
        if isinstance(have, np.generic):
            have = have.item()
        if have != value or isinstance(have, bool):
            raise ShardFormatError(f"{path}: attribute {name} is {have!r}, dataset.json says {value!r}: {FIX_SHARD}")
    layout = dict(_LAYOUT, **(_LAYOUT_V2 if meta["version"] == VERSION_PANOPTIC else {}))
    total = None
    for name, (kind, length) in layout.items():
        ds = f.get(name)
        if not isinstance(ds, h5py.Dataset) or ds.ndim != 1:
            raise ShardFormatError(f"{path}: array '{name}' is missing or not 1-D: {FIX_SHARD}")
        if kind == "str":
            ok = h5py.check_string_dtype(ds.dtype) is not None
        elif kind == "bytes":
            ok = h5py.check_vlen_dtype(ds.dtype) == np.uint8
        else:
            ok = ds.dtype == kind
        if not ok:
            raise ShardFormatError(f"{path}: array '{name}' has dtype {ds.dtype}: {FIX_SHARD}")
        if length == "t":
            total = len(ds) if total is None else total
            expected = total
        else:
            expected = n + (length == "n+1")
        if len(ds) != expected:
            raise ShardFormatError(f"{path}: array '{name}' has length {len(ds)}, expected {expected} "
                                   f"({n} samples): {FIX_SHARD}")


def check_shard_values(path: Path, k: int, offsets: np.ndarray, num_entries: int,
                       classes: np.ndarray | None = None, heights: np.ndarray | None = None,
                       widths: np.ndarray | None = None, pixels: np.ndarray | None = None) -> None:
    """The values other arrays are indexed with: CSR offsets, class ids < K, positive sizes.

    `offsets` is the stored N + 1 array and `num_entries` the length of `classes` / `pixels`;
    the other arrays, when given, are as stored (lengths checked by `check_shard_layout`).
    """
    def bad(problem: str) -> ShardFormatError:
        return ShardFormatError(f"{path}: {problem}: {FIX_SHARD}")

    if offsets[0] != 0 or np.any(np.diff(offsets) < 0):
        raise bad("class_offsets must start at 0 and never decrease")
    if offsets[-1] != num_entries:
        raise bad(f"class_offsets ends at {offsets[-1]}, classes has {num_entries} entries")
    if classes is not None:
        if classes.size and int(classes.max()) >= k:
            raise bad(f"class id {int(classes.max())} is not a train id < K={k}")
    if pixels is not None and pixels.size and int(pixels.min()) < 0:
        raise bad("negative pixel count")
    for name, sizes in (("height", heights), ("width", widths)):
        if sizes is not None and sizes.size and int(sizes.min()) < 1:
            raise bad(f"{name} {int(sizes.min())} is not positive")
