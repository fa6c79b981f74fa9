"""Write one benchmark's section into docs/benchmarks.md between its own markers."""

from __future__ import annotations

import platform
import re
from importlib.metadata import version
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
HEADER = ("# Benchmarks\n\nMeasured with the scripts in `bench/`; each section says which script "
          "and when. Ratios are measured side by side in one run; absolute times depend on the "
          "machine.\n")


def machine() -> str:
    import os

    # The version from the package metadata, not `import torch`: converter benches spawn
    # workers that re-import the bench script, and importing torch there costs seconds each.
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
            f"Python {platform.python_version()}, torch {version('torch')}")


def write_section(name: str, body: str) -> None:
    """Replace (or append) the text between `<!-- name:start -->` and `<!-- name:end -->`."""
    text = DOC.read_text() if DOC.exists() else HEADER
    block = f"<!-- {name}:start -->\n{body.strip()}\n<!-- {name}:end -->"
    pattern = re.compile(rf"<!-- {re.escape(name)}:start -->.*?<!-- {re.escape(name)}:end -->", re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    DOC.parent.mkdir(parents=True, exist_ok=True)
    DOC.write_text(text)
