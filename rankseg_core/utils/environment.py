"""The environment record (`env.json`): what produced a run, an evaluation or a set of shards.

Like `python -m torch.utils.collect_env` and mmseg's `collect_env`, but as strict JSON written
next to the outputs: versions of Python and of the libraries the results depend on, the git
commit of the rankseg checkout (when rankseg runs from one), the host, its CPU and GPUs, the
exact command line and the UTC time. `rankseg env` prints the same record.

Collecting never fails and never uses the network: what cannot be found is null (no git
binary, not a checkout, no GPU, an OS without /proc). Only writing the record can fail, as one
line naming the file (a read-only or full disk: `fsio.os_error`).

History is never overwritten: `write_record` names a fresh output `env.json`, and each later
session in the same directory (a resumed run, a re-run or a `--shard-index` part of `prepare`)
`env-1.json`, `env-2.json`, ... created exclusively, so parallel parts never replace each
other's record.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import socket
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from rankseg_core.utils import jsonio
from rankseg_core.utils.console import printable
from rankseg_core.utils.fsio import atomic_write_json, os_error, remove_quietly, write_synced

FORMAT = "rankseg-env"
VERSION = 1
FIRST = "env.json"
# Distributions whose versions change numbers (rankseg's own comes from rankseg_core.__version__).
PACKAGES = ("torch", "torchvision", "timm", "numpy", "h5py", "safetensors", "scipy", "opencv-python-headless",
            "opencv-python", "Pillow", "PyYAML")
GIT_TIMEOUT_S = 5.0  # a git on a hung network file system must not hold up training
_SHA = re.compile(r"[0-9a-f]{40}([0-9a-f]{24})?")  # SHA-1 or SHA-256 object names


def utc_now() -> str:
    """The current UTC time as ISO 8601 to the second, e.g. 2026-12-05T22:55:18Z."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _text(value: str) -> str:
    # A file name or argument that is not UTF-8 arrives with surrogate escapes, which strict
    # JSON readers refuse: written as \xNN text instead (as the consoles print it).
    return printable(value)


# ---------------------------------------------------------------------------------------
# The rankseg checkout (git)


def checkout_root() -> Path:
    """The directory holding the `rankseg_core` package (a git checkout when developing)."""
    import rankseg_core

    return Path(rankseg_core.__file__).resolve().parent.parent


def _git_dir(root: Path) -> Path | None:
    """ROOT/.git, or the directory a `.git` file points to (worktrees, submodules)."""
    dot = root / ".git"
    if dot.is_dir():
        return dot
    if dot.is_file():
        with contextlib.suppress(OSError, UnicodeDecodeError):
            text = dot.read_text().strip()
            if text.startswith("gitdir:"):
                target = Path(text[len("gitdir:"):].strip())
                target = target if target.is_absolute() else root / target
                return target if target.is_dir() else None
    return None


def _read_head(git_dir: Path) -> str | None:
    """The commit HEAD names, read from the repository's files (no git binary needed):
    a detached HEAD, a loose ref or a packed ref; None when it cannot be resolved."""
    try:
        head = (git_dir / "HEAD").read_text().strip()
        if _SHA.fullmatch(head):
            return head
        if not head.startswith("ref:"):
            return None
        ref = head[len("ref:"):].strip()
        common = git_dir
        if (git_dir / "commondir").is_file():  # a worktree keeps its branches in the main repository
            common = (git_dir / (git_dir / "commondir").read_text().strip()).resolve()
        for base in (git_dir, common):
            loose = base / ref
            if loose.is_file():
                sha = loose.read_text().strip()
                return sha if _SHA.fullmatch(sha) else None
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2 and parts[1] == ref and _SHA.fullmatch(parts[0]):
                    return parts[0]
    except (OSError, UnicodeDecodeError):
        pass
    return None


def _run_git(root: Path, *args: str) -> str | None:
    """stdout of `git -C root args`, or None (no git binary, not a repository, a timeout)."""
    # GIT_OPTIONAL_LOCKS=0: `git status` would otherwise refresh (write) the checkout's index.
    env = dict(os.environ, GIT_OPTIONAL_LOCKS="0", LC_ALL="C")
    try:
        res = subprocess.run(["git", "-C", os.fspath(root), *args], capture_output=True, text=True,
                             errors="replace", timeout=GIT_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout if res.returncode == 0 else None


def git_state(root: Path | None = None) -> dict[str, Any] | None:
    """{"commit", "dirty"} of the rankseg checkout at `root` (default: `checkout_root`), None
    when it is not a git checkout (an installed wheel). `commit` comes from git, else from the
    repository's files; `dirty` (tracked files modified) needs git, and is None without it."""
    root = checkout_root() if root is None else root
    git_dir = _git_dir(root)
    if git_dir is None:
        return None
    out = _run_git(root, "rev-parse", "HEAD")
    commit = out.strip() if out is not None and _SHA.fullmatch(out.strip()) else _read_head(git_dir)
    status = _run_git(root, "status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status.strip())}


# ---------------------------------------------------------------------------------------
# Host and devices


def cpu_model() -> str | None:
    """The CPU's marketing name (Linux /proc/cpuinfo, else what `platform` knows)."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()
    return platform.processor() or platform.machine() or None


def _usable_cpus() -> int | None:
    # The cores this process may run on (a SLURM / container CPU set), not the machine's.
    affinity = getattr(os, "sched_getaffinity", None)
    if affinity is None:
        return os.cpu_count()
    try:
        return len(affinity(0))
    except OSError:
        return os.cpu_count()


def _memory_bytes() -> int | None:
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    return None


def accelerators() -> dict[str, Any]:
    """torch's CUDA build, cuDNN and the visible GPUs (name, memory, compute capability)."""
    import torch

    cuda = torch.cuda.is_available()
    gpus = []
    for i in range(torch.cuda.device_count() if cuda else 0):
        p = torch.cuda.get_device_properties(i)
        gpus.append({"name": p.name, "memory_bytes": int(p.total_memory), "capability": f"{p.major}.{p.minor}"})
    mps = getattr(torch.backends, "mps", None)
    return {"cuda_available": cuda, "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version() if cuda else None,
            "gpus": gpus, "mps_available": bool(mps is not None and mps.is_available()),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


def package_versions() -> dict[str, str | None]:
    """Installed versions (package metadata, nothing imported); None = not installed."""
    out: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            if not name.startswith("opencv"):  # one of the two OpenCV wheels is expected
                out[name] = None
    return out


def collect(argv: list[str] | None = None) -> dict[str, Any]:
    """The environment record (plain JSON values). `argv`: the command line (default sys.argv)."""
    import rankseg_core

    root = checkout_root()
    argv = list(sys.argv if argv is None else argv)
    return {
        "format": FORMAT, "version": VERSION,
        "time_utc": utc_now(),
        "command": [_text(a) for a in argv],
        "cwd": _text(os.getcwd()) if os.path.isdir(".") else None,
        "rankseg": {"version": rankseg_core.__version__, "path": _text(str(root)), "git": git_state(root)},
        "python": {"version": platform.python_version(), "implementation": platform.python_implementation(),
                   "executable": _text(sys.executable)},
        "packages": package_versions(),
        "host": {"hostname": socket.gethostname(), "os": platform.platform(), "cpu": cpu_model(),
                 "cpu_count": os.cpu_count(), "cpus_usable": _usable_cpus(), "memory_bytes": _memory_bytes()},
        "accelerators": accelerators(),
        # torchrun's variables: the record of a DDP run says how many processes trained it.
        "distributed": {k.lower(): int(os.environ[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")
                        if os.environ.get(k, "").isdigit()},
    }


# ---------------------------------------------------------------------------------------
# Writing


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Create `path` with `data` unless it exists (False then). Atomic: the content goes to a
    temp file first and is linked to its name, which fails if the name is taken, so a reader
    or a crash never sees half a record and two writers never replace each other."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_synced(tmp, data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create, written in place
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        return True
    finally:
        remove_quietly(tmp)


def write_record(directory: str | Path, replace: bool = False, what: str = "",
                 record: dict[str, Any] | None = None) -> Path:
    """Write the environment record into `directory`; returns its path.

    replace=True: `env.json`, replacing one that is there (a fresh run restarting a directory
    whose previous attempt never checkpointed). Otherwise the first free name of `env.json`,
    `env-1.json`, `env-2.json`, ... (a resumed or repeated session keeps every earlier record).
    `what` names the session in the record ("train", "resume", "eval", "prepare").
    """
    directory = Path(directory)
    rec = dict(collect() if record is None else record)
    if what:
        rec["session"] = what
    if replace:
        path = directory / FIRST
        atomic_write_json(path, rec)
        return path
    data = (jsonio.dumps(rec, indent=1) + "\n").encode()
    n = 0
    while True:
        path = directory / (FIRST if n == 0 else f"env-{n}.json")
        try:
            if _create_exclusive(path, data):
                return path
        except OSError as exc:
            raise os_error(path, exc) from None
        n += 1


def write_record_file(path: str | Path, what: str = "", record: dict[str, Any] | None = None) -> Path:
    """The environment record (`record`, default: `collect()`) as the file `path`, replaced
    atomically: next to a report that is itself replaced when its command runs again."""
    rec = dict(collect() if record is None else record)
    if what:
        rec["session"] = what
    atomic_write_json(path, rec)
    return Path(path)


def sibling_record(report: str | Path) -> Path:
    """Where the record of a report goes: `<stem>_env.json` next to it (as `_per_class.csv`)."""
    report = Path(report)
    return report.with_name(report.stem + "_env.json")


def records(directory: str | Path) -> list[Path]:
    """The environment records of `directory`, oldest session first."""
    directory = Path(directory)

    def number(p: Path) -> int:
        m = re.fullmatch(r"env-(\d+)\.json", p.name)
        return int(m.group(1)) if m else 0

    found = [p for p in directory.glob("env*.json") if p.name == FIRST or re.fullmatch(r"env-\d+\.json", p.name)]
    return sorted(found, key=number)
