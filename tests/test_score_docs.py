"""docs/benchmarks/scoring.md's worked example is bench/protocol_example.py's output, verbatim."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from protocol_example import markdown, worked_example  # noqa: E402


def test_worked_example_in_docs_is_computed(tmp_path: Path) -> None:
    reports = worked_example(tmp_path)
    doc = (ROOT / "docs" / "benchmarks" / "scoring.md").read_text()
    block = doc.split("<!-- protocol_example:begin -->\n", 1)[1].split("<!-- protocol_example:end -->", 1)[0]
    assert block == markdown(reports)
    # The relations the page states.
    m = {q: r["miou"] for q, r in reports.items()}
    assert m["mmseg"] == m["d2-old"] and abs(m["d2-old"] - m["d2"] * 4 / 6) < 1e-12
