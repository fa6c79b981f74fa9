"""`rankseg env`: the environment record that runs, evaluations and shards keep as env.json.

Register with: app.command("env")(env).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.table import Table

from rankseg_cli.common import err, out, show, user_errors


def _gib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**30:.1f} GiB"


def _or_dash(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def rows(rec: dict[str, Any]) -> list[tuple[str, str]]:
    """The record as (name, value) rows for people (`--json` has every field)."""
    import shlex

    rs, host, acc = rec["rankseg"], rec["host"], rec["accelerators"]
    git = rs["git"]
    if git is None:
        source = "not a git checkout"
    else:
        dirty = {True: " (modified files)", False: "", None: " (git not found: modifications unknown)"}[git["dirty"]]
        source = f"{_or_dash(git['commit'])}{dirty}"
    out_rows = [("rankseg", f"{rs['version']} ({rs['path']})"), ("git commit", source),
                ("python", f"{rec['python']['version']} ({rec['python']['executable']})")]
    out_rows += [(name, _or_dash(version)) for name, version in rec["packages"].items()]
    out_rows += [("host", host["hostname"]), ("os", host["os"]), ("cpu", _or_dash(host["cpu"])),
                 ("cpus (usable / all)", f"{_or_dash(host['cpus_usable'])} / {_or_dash(host['cpu_count'])}"),
                 ("memory", _gib(host["memory_bytes"])),
                 ("torch cuda / cudnn", f"{_or_dash(acc['torch_cuda'])} / {_or_dash(acc['cudnn'])}")]
    gpus = acc["gpus"]
    out_rows += [(f"gpu {i}", f"{g['name']} ({_gib(g['memory_bytes'])}, sm {g['capability']})") for i, g in enumerate(gpus)]
    if not gpus:
        out_rows.append(("gpu", "none visible" + (" (mps available)" if acc["mps_available"] else "")))
    if rec["distributed"]:
        out_rows.append(("distributed", ", ".join(f"{k} {v}" for k, v in rec["distributed"].items())))
    out_rows += [("command", shlex.join(rec["command"])), ("time (UTC)", rec["time_utc"])]
    return out_rows


@user_errors
def env(
    json_out: Annotated[bool, typer.Option("--json", help="Print the record as JSON (what env.json holds).")] = False,
    write: Annotated[Optional[Path], typer.Option("--out", "-o", help="Also write the record to this JSON file.")] = None,
) -> None:
    """Print the environment: versions of Python, torch, torchvision, timm, numpy, h5py and
    rankseg (with its git commit when it runs from a checkout), the host, CPU, GPUs, CUDA and
    cuDNN, the command line and the UTC time. `rankseg train`, `eval` and `prepare` write the
    same record as env.json next to their outputs (docs/training.md, Run directory).

    Examples:
      rankseg env
      rankseg env --json > env.json
    """
    from rankseg_core.utils import jsonio
    from rankseg_core.utils.environment import collect, write_record_file

    rec = collect()
    if write is not None:
        write_record_file(write, record=rec)
    if json_out:
        out.print(jsonio.dumps(rec, indent=1), markup=False, highlight=False, soft_wrap=True)
    else:
        t = Table("", "")
        t.show_header = False
        for name, value in rows(rec):
            t.add_row(name, show(value))
        out.print(t)
    if write is not None:
        err.print(f"wrote {show(write)}")
