"""Shared fixtures: a tiny synthetic shard set and the path of ../shared/fixtures."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch

from rankseg_core.convert.common import ConvertOptions
from rankseg_core.convert.synthetic import prepare_synthetic

# Tiny models on a small shared machine: intra-op threads cost more in sync than they gain
# (measured ~10x slower with the default thread count under load).
torch.set_num_threads(1)


def pytest_configure(config: pytest.Config) -> None:
    # A shell starts background commands with SIGINT ignored (POSIX, no job control), and the
    # ignore is inherited by everything they run: the Ctrl-C tests would then test nothing
    # but that. Take SIGINT as a terminal delivers it; children get the default on exec.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _one_thread_per_test():
    """Restore one intra-op thread after every test: a test that changes it in-process (the
    replication smoke run sets its per-job threads) must not change the float summation order
    of later tests, whose exact-equality checks compare runs made in different processes."""
    yield
    torch.set_num_threads(1)


FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


@pytest.fixture(scope="session")
def shared_fixtures() -> Path:
    """`../shared/fixtures` (real files in the official formats); skip where a clone lacks it."""
    if not FIXTURES.is_dir():
        pytest.skip("../shared/fixtures is not present in this checkout")
    return FIXTURES


def make_synthetic(out: Path, images: int = 24, num_classes: int = 60, size: int = 32,
                   seed: int = 0, per_shard: int = 8) -> Path:
    prepare_synthetic(out, num_classes=num_classes, images=images, size=size, seed=seed,
                      opts=ConvertOptions(samples_per_shard=per_shard))
    return out


@pytest.fixture(scope="session")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic shard directory shared by read-only tests."""
    return make_synthetic(tmp_path_factory.mktemp("synth") / "data")


def assert_one_line_error(res, *fragments: str) -> None:
    """A user mistake: exit 2, one `error:` line holding every fragment, no traceback."""
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output and "error:" in res.output
    text = " ".join(res.output.split())
    for f in fragments:
        assert f in text, text
